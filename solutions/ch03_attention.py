"""Chapter 03 exercises: attention from torch primitives (reference answers).

Conventions as in the chapter: shapes are `(batch, heads, seq, d)` or `(..., seq, d)`; a boolean
mask is True where a query may attend to a key (torch's `F.scaled_dot_product_attention`
convention); linear weights are stored as `nn.Linear` stores them, `(out_features, in_features)`,
so a projection is `x @ w.T`.

Grade with `minillm grade ch03`, or
`pytest tests/exercises/test_ch03_attention.py --impl exercises`.
"""

from __future__ import annotations

import math

import torch
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
    """
    shifted = x - x.amax(dim=dim, keepdim=True)
    e = shifted.exp()
    return e / e.sum(dim=dim, keepdim=True)


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
    return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])


def causal_mask(seq_len: int) -> Tensor:
    """Boolean `(seq_len, seq_len)` mask, True where query i may attend to key j, i.e. j <= i.

    A token sees itself and everything before it, never what comes after.

    Example:
        >>> causal_mask(3)
        tensor([[ True, False, False],
                [ True,  True, False],
                [ True,  True,  True]])
    """
    return torch.ones(seq_len, seq_len, dtype=torch.bool).tril()


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
    """
    positions = torch.arange(seq_len, device=lengths.device)
    return (positions < lengths[:, None])[:, None, None, :]


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
    """
    scores = attention_scores(q, k)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return stable_softmax(scores, dim=-1) @ v


def split_heads(x: Tensor, n_heads: int) -> Tensor:
    """`(batch, seq, d_model)` -> `(batch, n_heads, seq, d_head)`, d_head = d_model // n_heads.

    Head h of token t holds features `h*d_head:(h+1)*d_head` of token t. Split the last axis
    first, then move the head axis in front of seq.

    Example:
        >>> split_heads(torch.arange(8.0).reshape(1, 2, 4), 2)[0, 1]  # head 1: features 2:4
        tensor([[2., 3.],
                [6., 7.]])
    """
    batch, seq, d_model = x.shape
    return x.reshape(batch, seq, n_heads, d_model // n_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """`(batch, n_heads, seq, d_head)` -> `(batch, seq, n_heads * d_head)`; undoes split_heads.

    Example:
        >>> x = torch.arange(8.0).reshape(1, 2, 4)
        >>> torch.equal(merge_heads(split_heads(x, 2)), x)
        True
    """
    batch, n_heads, seq, d_head = x.shape
    return x.transpose(1, 2).reshape(batch, seq, n_heads * d_head)


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
    """
    q = split_heads(x_q @ w_q.T, n_heads)
    k = split_heads(x_kv @ w_k.T, n_heads)
    v = split_heads(x_kv @ w_v.T, n_heads)
    return merge_heads(scaled_dot_product_attention(q, k, v, mask)) @ w_o.T


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
    """
    m_new = torch.maximum(m, scores.amax(dim=-1))
    # Where every score so far is -inf, subtract 0 instead: exp(-inf - (-inf)) would be NaN.
    shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    p = torch.exp(scores - shift[..., None])
    alpha = torch.exp(m - shift)  # rescales what was summed under the old maximum
    return m_new, alpha * denom + p.sum(dim=-1), alpha[..., None] * acc + p @ v


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
    """
    seq_k = k.shape[-2]
    q = q / math.sqrt(q.shape[-1])
    m = q.new_full(q.shape[:-1], float("-inf"))  # (..., seq_q)
    denom = q.new_zeros(q.shape[:-1])
    acc = q.new_zeros((*q.shape[:-1], v.shape[-1]))  # (..., seq_q, d_v)
    rows = torch.arange(q.shape[-2], device=q.device)[:, None]
    for start in range(0, seq_k, block_k):
        scores = q @ k[..., start : start + block_k, :].transpose(-2, -1)  # (..., seq_q, tile)
        if causal:
            cols = torch.arange(start, start + scores.shape[-1], device=q.device)[None, :]
            scores = scores.masked_fill(cols > rows, float("-inf"))  # the sequence's key index
        m, denom, acc = online_softmax_update(
            m, denom, acc, scores, v[..., start : start + block_k, :]
        )
    return acc / denom[..., None]
