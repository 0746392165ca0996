"""Chapter 03 exercises: attention from torch primitives. Replace each `raise NotImplementedError`.

Conventions as in the chapter: shapes are `(batch, heads, seq, d)` or `(..., seq, d)`; a boolean
mask is True where a query may attend to a key (torch's `F.scaled_dot_product_attention`
convention); linear weights are stored as `nn.Linear` stores them, `(out_features, in_features)`,
so a projection is `x @ w.T`.

Grade with `minillm grade ch03`, or
`pytest tests/exercises/test_ch03_attention.py --impl exercises`.
"""

from __future__ import annotations

import math  # noqa: F401 -- you will need it, as the examples do

import torch  # noqa: F401
from torch import Tensor


def stable_softmax(x: Tensor, dim: int = -1) -> Tensor:
    """Softmax along `dim` that does not overflow for large inputs.

    exp(x_i) / sum_j exp(x_j) is unchanged when the same constant is subtracted from every x_j of
    one slice, so subtract each slice's maximum first: the largest exponent is then exp(0) = 1.

    Args:
        x: any shape, floating point.
        dim: the axis that sums to one.

    Returns:
        Same shape as `x`; non-negative, summing to 1 along `dim`.

    Example:
        >>> stable_softmax(torch.tensor([1000.0, 1000.0 + math.log(3.0)]))
        tensor([0.2500, 0.7500])

    Off limits: `torch.softmax`, `torch.nn.functional.softmax`, `torch.Tensor.softmax`,
    `torch.special.softmax` (this exercise asks you to write it; a call fails the test).
    """
    raise NotImplementedError


def attention_scores(q: Tensor, k: Tensor) -> Tensor:
    """Scaled attention scores q k^T / sqrt(d_k).

    Args:
        q: `(..., seq_q, d_k)` queries.
        k: `(..., seq_k, d_k)` keys.

    Returns:
        `(..., seq_q, seq_k)`: entry (i, j) says how well query i matches key j.

    Example:
        >>> attention_scores(torch.ones(1, 4), torch.ones(2, 4))  # (1*1 * 4) / sqrt(4)
        tensor([[2., 2.]])
    """
    raise NotImplementedError


def causal_mask(seq_len: int) -> Tensor:
    """Boolean `(seq_len, seq_len)` mask, True where query i may attend to key j, i.e. j <= i.

    A token sees itself and everything before it, never what comes after.

    Example:
        >>> causal_mask(3)
        tensor([[ True, False, False],
                [ True,  True, False],
                [ True,  True,  True]])

    Off limits: `minillm.attention.causal_mask` (this exercise asks you to write it; a call fails
    the test).
    """
    raise NotImplementedError


def padding_mask(lengths: Tensor, seq_len: int) -> Tensor:
    """Boolean `(batch, 1, 1, seq_len)` mask, True at the real (non-padding) keys.

    Sequence b has `lengths[b]` real tokens followed by padding (right padding). The two middle
    axes broadcast over heads and queries: padding is hidden as a key from every query.

    Args:
        lengths: `(batch,)` integers in [1, seq_len].
        seq_len: padded length.

    Example:
        >>> padding_mask(torch.tensor([2, 3]), 4)[:, 0, 0]
        tensor([[ True,  True, False, False],
                [ True,  True,  True, False]])

    Off limits: `minillm.attention.padding_mask` (this exercise asks you to write it; a call fails
    the test).
    """
    raise NotImplementedError


def scaled_dot_product_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None
) -> Tensor:
    """softmax(q k^T / sqrt(d_k)) v, with the softmax over the keys.

    Args:
        q: `(..., seq_q, d_k)`.
        k: `(..., seq_k, d_k)`.
        v: `(..., seq_k, d_v)`.
        mask: boolean, broadcastable to `(..., seq_q, seq_k)`, True where a query may attend
            (every query row allows at least one key). Blocked scores become -inf before the
            softmax, so their weight is exactly 0.

    Returns:
        `(..., seq_q, d_v)`: each query's weighted average of the values.

    Example:
        >>> q = k = torch.eye(2); v = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> scaled_dot_product_attention(q, k, v, mask=causal_mask(2))
        tensor([[1.0000, 2.0000],
                [2.3395, 3.3395]])

    Off limits: `torch.nn.functional.scaled_dot_product_attention`,
    `minillm.attention.scaled_dot_product_attention`, and torch's softmax in every spelling
    (`torch.softmax`, `torch.nn.functional.softmax`, `torch.Tensor.softmax`,
    `torch.special.softmax`, and the `log_softmax` ones): use your `stable_softmax` (this
    exercise asks you to write it; a call fails the test).
    """
    raise NotImplementedError


def split_heads(x: Tensor, n_heads: int) -> Tensor:
    """`(batch, seq, d_model)` -> `(batch, n_heads, seq, d_head)`, d_head = d_model // n_heads.

    Head h of token t holds features `h*d_head:(h+1)*d_head` of token t. Split the last axis
    first, then move the head axis in front of seq.

    Example:
        >>> split_heads(torch.arange(8.0).reshape(1, 2, 4), 2)[0, 1]  # head 1: features 2:4
        tensor([[2., 3.],
                [6., 7.]])

    Off limits: `minillm.attention.split_heads` (this exercise asks you to write it; a call fails
    the test).
    """
    raise NotImplementedError


def merge_heads(x: Tensor) -> Tensor:
    """`(batch, n_heads, seq, d_head)` -> `(batch, seq, n_heads * d_head)`; undoes split_heads.

    Example:
        >>> x = torch.arange(8.0).reshape(1, 2, 4)
        >>> torch.equal(merge_heads(split_heads(x, 2)), x)
        True

    Off limits: `minillm.attention.merge_heads` (this exercise asks you to write it; a call fails
    the test).
    """
    raise NotImplementedError


def multi_head_attention(
    x_q: Tensor,
    x_kv: Tensor,
    w_q: Tensor,
    w_k: Tensor,
    w_v: Tensor,
    w_o: Tensor,
    n_heads: int,
    mask: Tensor | None = None,
) -> Tensor:
    """Multi-head attention without biases, as `nn.MultiheadAttention(bias=False)` computes it.

    Project (q = x_q w_q^T, k = x_kv w_k^T, v = x_kv w_v^T), split each into heads, attend per
    head, merge the heads, and finish with the output projection w_o.

    Args:
        x_q: `(batch, seq_q, d_model)`, the positions that ask.
        x_kv: `(batch, seq_k, d_model)`, the positions attended to (pass `x_q` for self-attention).
        w_q, w_k, w_v, w_o: `(d_model, d_model)` each, in `nn.Linear`'s (out, in) layout.
        n_heads: divides d_model.
        mask: boolean, broadcastable to `(batch, n_heads, seq_q, seq_k)`, True = may attend.

    Returns:
        `(batch, seq_q, d_model)`.

    Example:
        >>> x = torch.randn(2, 5, 8); eye = torch.eye(8)
        >>> multi_head_attention(x, x, eye, eye, eye, eye, n_heads=2).shape
        torch.Size([2, 5, 8])

    Off limits: `torch.nn.functional.multi_head_attention_forward`,
    `torch.nn.MultiheadAttention.forward`, `torch.nn.functional.scaled_dot_product_attention`,
    `minillm.attention.scaled_dot_product_attention`, `minillm.attention.MultiHeadAttention.forward`
    and torch's softmax in every spelling, as for `scaled_dot_product_attention` (this exercise
    asks you to write it; a call fails the test).
    """
    raise NotImplementedError


def online_softmax_update(
    m: Tensor, denom: Tensor, acc: Tensor, scores: Tensor, v: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One tile of the online softmax, the update at the heart of FlashAttention.

    Attention over keys seen one tile at a time keeps, for each query row, the largest score so
    far `m`, the sum `denom` of exp(score - m) and the sum `acc` of exp(score - m) * v. A new
    tile of `scores` with values `v` updates them:

        m_new = max(m, max of the tile's scores)
        denom = exp(m - m_new) * denom + sum_j exp(s_j - m_new)
        acc   = exp(m - m_new) * acc   + sum_j exp(s_j - m_new) * v_j

    Starting from m = -inf, denom = 0, acc = 0, after the last tile acc / denom equals
    softmax(all scores) @ all values. A row whose scores so far are all -inf (masked) must keep
    denom = 0 and acc = 0, never NaN.

    Args:
        m, denom: `(..., n)` running maximum and denominator of n query rows.
        acc: `(..., n, d_v)` running numerator.
        scores: `(..., n, t)` this tile's scores (-inf where masked).
        v: `(..., t, d_v)` this tile's values.
    Returns:
        `(m_new, denom_new, acc_new)`, shaped like `(m, denom, acc)`.

    Example:
        >>> m, denom, acc = torch.tensor([-math.inf]), torch.zeros(1), torch.zeros(1, 1)
        >>> s, v = torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[4.0], [8.0]])
        >>> m, denom, acc = online_softmax_update(m, denom, acc, s, v)
        >>> acc / denom[..., None]  # 1/4 of 4 + 3/4 of 8
        tensor([[7.]])

    Off limits: `minillm.flash_attention.online_softmax_update`,
    `minillm.flash_attention.flash_attention_forward` (this exercise asks you to write it; a call
    fails the test).
    """
    raise NotImplementedError


def tiled_attention(q: Tensor, k: Tensor, v: Tensor, block_k: int, causal: bool = False) -> Tensor:
    """softmax(q k^T / sqrt(d_k)) v computed over the keys one tile at a time (FlashAttention's
    forward pass), never holding the whole `(seq_q, seq_k)` score matrix.

    Walk the keys in tiles of `block_k` (the last tile may be shorter): score the tile, mask it,
    and fold it into the running (m, denom, acc) with `online_softmax_update`; the output is
    acc / denom. With `causal`, query i attends to keys 0..i (torch's `is_causal`): mind that
    key j of a tile starting at key `start` is key `start + j` of the sequence.

    Args:
        q: `(..., seq_q, d_k)`; k: `(..., seq_k, d_k)`; v: `(..., seq_k, d_v)`.
        block_k: keys per tile, at least 1; it need not divide seq_k.
        causal: hide the keys after each query.

    Returns:
        `(..., seq_q, d_v)`, equal to exact attention up to rounding.

    Example:
        >>> q = k = torch.eye(2); v = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> tiled_attention(q, k, v, block_k=1)  # one key per tile
        tensor([[1.6605, 2.6605],
                [2.3395, 3.3395]])

    Off limits: torch's softmax in every spelling (as for `scaled_dot_product_attention`),
    `torch.nn.functional.scaled_dot_product_attention`,
    `minillm.attention.scaled_dot_product_attention`, `minillm.flash_attention.flash_attention`,
    `minillm.flash_attention.flash_attention_forward` and
    `minillm.flash_attention.online_softmax_update` (this exercise asks you to write it; a call
    fails the test).
    """
    raise NotImplementedError
