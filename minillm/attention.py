"""Scaled dot-product attention and multi-head attention, written out in plain torch.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V

Shapes: queries `q` are `(..., seq_q, d_k)`, keys `k` are `(..., seq_k, d_k)`, values `v` are
`(..., seq_k, d_v)`; the leading dimensions are usually `(batch, heads)`. The output is
`(..., seq_q, d_v)` and the attention weights are `(..., seq_q, seq_k)`.

Masks follow torch's `F.scaled_dot_product_attention` boolean convention: **True means "may
attend"**. (`nn.MultiheadAttention`'s `attn_mask` and `key_padding_mask` use the opposite one,
True = blocked; `MultiHeadAttention.to_torch` and the tests show the conversion.) A mask broadcasts
against the scores `(batch, heads, seq_q, seq_k)`: `causal_mask` gives `(seq, seq)`,
`padding_mask` gives `(batch, 1, 1, seq_k)`, `document_mask` the block-diagonal causal
`(batch, 1, seq, seq)` of packed documents, and `combine_masks` ANDs any of them.

A query row whose keys are all masked (left padding under a causal mask, an empty sequence) has
no distribution to take: its weights and its output are defined as zeros, with finite gradients,
as torch's own SDPA does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm.errors import InputError, InputTypeError, require_positive

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def _require_float_tensor(x: object, name: str, min_dim: int = 2) -> Tensor:
    if not isinstance(x, Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputTypeError(
            f"{name} must be a floating-point tensor, got {x.dtype}; convert it with .float()"
        )
    if x.dim() < min_dim:
        raise InputError(f"{name} needs at least {min_dim} dimensions, got shape {tuple(x.shape)}")
    return x


def _check_mask(mask: object, scores_shape: torch.Size, device: torch.device) -> Tensor:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise InputTypeError(
            f"mask must be a boolean tensor (True = may attend), got {got}; for a 0/1 tensor "
            "use mask.bool()"
        )
    try:
        fits = torch.broadcast_shapes(mask.shape, scores_shape) == scores_shape
    except RuntimeError:
        fits = False
    if not fits:
        raise InputError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the attention scores' "
            f"shape {tuple(scores_shape)} (..., seq_q, seq_k)"
        )
    if mask.device != device:
        raise InputError(f"mask is on {mask.device} but q is on {device}; build it with device=")
    return mask


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """softmax(q k^T / sqrt(d_k)) v, written out.

    Args:
        q: `(..., seq_q, d_k)` queries.
        k: `(..., seq_k, d_k)` keys.
        v: `(..., seq_k, d_v)` values.
        mask: boolean, True where a query may attend to a key; broadcastable to
            `(..., seq_q, seq_k)`.
        is_causal: also block keys after the query's position (query i sees keys 0..i, aligned
            top-left as in torch when seq_q != seq_k). Combined with `mask` if both are given.
        dropout_p: probability of zeroing an attention weight (always applied when > 0, as in
            torch; pass 0.0 at evaluation).
        return_weights: also return the weights that multiplied `v`.

    Returns:
        `(..., seq_q, d_v)`, or `(output, weights)` with weights `(..., seq_q, seq_k)`. Rows with
        every key masked give zero weights and a zero output.

    Example:
        >>> q = k = torch.eye(2)
        >>> scaled_dot_product_attention(q, k, torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        tensor([[1.6605, 2.6605],
                [2.3395, 3.3395]])
    """
    q = _require_float_tensor(q, "q")
    k = _require_float_tensor(k, "k")
    v = _require_float_tensor(v, "v")
    if not q.dtype == k.dtype == v.dtype:
        raise InputTypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise InputError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] != k.shape[-1]:
        raise InputError(
            f"q and k must have the same last dimension d_k, got {q.shape[-1]} and {k.shape[-1]}"
        )
    if k.shape[-2] != v.shape[-2]:
        raise InputError(
            f"k and v must have the same number of positions seq_k, got {k.shape[-2]} and "
            f"{v.shape[-2]}"
        )
    try:
        torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except RuntimeError:
        raise InputError(
            f"the leading (batch, heads) dimensions of q, k, v do not broadcast: "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        ) from None
    if not 0.0 <= dropout_p < 1.0:
        raise InputError(f"dropout_p must be in [0, 1), got {dropout_p}")

    # Scaling q (seq_q x d_k) gives the same scores as scaling q k^T (seq_q x seq_k), for less work.
    scores = (q / math.sqrt(q.shape[-1])) @ k.transpose(-2, -1)  # (..., seq_q, seq_k)
    allowed = None if mask is None else _check_mask(mask, scores.shape, q.device)
    if is_causal:
        seq_q, seq_k = scores.shape[-2:]
        causal = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).tril()
        allowed = causal if allowed is None else allowed & causal
    if allowed is None:
        weights = scores.softmax(dim=-1)
    else:
        # A row with nothing allowed would be softmax([-inf, ...]) = NaN. Give it finite scores,
        # then zero its weights, so neither the output nor the gradient sees a NaN. (In place:
        # the matmul's backward does not need the scores.)
        empty = ~allowed.any(dim=-1, keepdim=True)
        scores.masked_fill_(~allowed, float("-inf")).masked_fill_(empty, 0.0)
        weights = scores.softmax(dim=-1).masked_fill(empty, 0.0)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    out = weights @ v
    return (out, weights) if return_weights else out


def causal_mask(seq_len: int, device: torch.device | str | None = None) -> Tensor:
    """`(seq_len, seq_len)` boolean, True on and below the diagonal: position i sees 0..i.

    >>> causal_mask(3).int()
    tensor([[1, 0, 0],
            [1, 1, 0],
            [1, 1, 1]], dtype=torch.int32)
    """
    require_positive(seq_len, "seq_len", integer=True)
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()


def padding_mask(
    lengths_or_attention_mask: Tensor | Sequence[int],
    seq_len: int | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """`(batch, 1, 1, seq_len)` boolean, True at real keys and False at padding.

    Accepts either the `(batch,)` lengths of right-padded sequences (`seq_len` defaults to the
    longest), or a `(batch, seq)` 0/1 attention mask as Hugging Face tokenizers return it
    (1 = real token; works for left padding too). Only keys are masked: a padded query still
    gets an output, which the loss should ignore.

    >>> padding_mask([2, 3]).int().squeeze()
    tensor([[1, 1, 0],
            [1, 1, 1]], dtype=torch.int32)
    """
    x = torch.as_tensor(lengths_or_attention_mask, device=device)
    if x.is_floating_point() or x.is_complex():
        raise InputTypeError(f"lengths or attention mask must hold integers, got {x.dtype}")
    if x.dim() == 2:
        if not ((x == 0) | (x == 1)).all():
            raise InputError("an attention mask must hold only 0 (padding) and 1 (real token)")
        if seq_len is not None and seq_len != x.shape[1]:
            raise InputError(f"seq_len={seq_len} disagrees with the mask's {x.shape[1]} columns")
        return x.bool()[:, None, None, :]
    if x.dim() != 1 or x.numel() == 0:
        raise InputError(
            "pass (batch,) lengths or a (batch, seq) 0/1 attention mask, got shape "
            f"{tuple(x.shape)}"
        )
    longest = int(x.max())
    seq_len = (
        longest if seq_len is None else int(require_positive(seq_len, "seq_len", integer=True))
    )
    if int(x.min()) < 0 or longest > seq_len:
        raise InputError(f"lengths must lie in [0, {seq_len}], got {x.tolist()}")
    positions = torch.arange(seq_len, device=x.device)
    return (positions < x[:, None])[:, None, None, :]


def combine_masks(*masks: Tensor | None) -> Tensor | None:
    """AND boolean masks together with broadcasting, skipping None; None if all are None.

    >>> combine_masks(causal_mask(3), padding_mask([2], seq_len=3)).shape
    torch.Size([1, 1, 3, 3])
    """
    combined = None
    for m in masks:
        if m is None:
            continue
        if not isinstance(m, Tensor) or m.dtype != torch.bool:
            raise InputTypeError("combine_masks takes boolean tensors (True = may attend)")
        combined = m if combined is None else combined & m
    return combined


def _check_doc_ids(doc_ids: object) -> Tensor:
    if not isinstance(doc_ids, Tensor) or doc_ids.dtype not in (torch.long, torch.int):
        got = doc_ids.dtype if isinstance(doc_ids, Tensor) else type(doc_ids).__name__
        raise InputTypeError(f"doc_ids must be an integer tensor (batch, seq), got {got}")
    if doc_ids.dim() != 2 or doc_ids.shape[1] == 0:
        raise InputError(f"doc_ids must have shape (batch, seq), got {tuple(doc_ids.shape)}")
    if (doc_ids[:, 1:] < doc_ids[:, :-1]).any():
        raise InputError(
            "doc_ids must not decrease along a row: each document is one run of equal ids "
            "(0, 0, 0, 1, 1, 2, ...), as pack_documents numbers them"
        )
    return doc_ids


def document_mask(doc_ids: Tensor) -> Tensor:
    """`(batch, 1, seq, seq)` boolean for documents packed into rows: query i may attend to key j
    when j <= i and both lie in the same document, so that no document sees another one.

    `doc_ids` `(batch, seq)` numbers each row's documents, one run of equal ids per document.

    >>> document_mask(torch.tensor([[0, 0, 1]])).int().squeeze()
    tensor([[1, 0, 0],
            [1, 1, 0],
            [0, 0, 1]], dtype=torch.int32)
    """
    doc_ids = _check_doc_ids(doc_ids)
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & causal_mask(doc_ids.shape[1], doc_ids.device))[:, None]


def document_positions(doc_ids: Tensor) -> Tensor:
    """`(batch, seq)` positions that restart at 0 where each document of `doc_ids` begins.

    >>> document_positions(torch.tensor([[0, 0, 0, 1, 1, 2]]))
    tensor([[0, 1, 2, 0, 1, 0]])
    """
    doc_ids = _check_doc_ids(doc_ids)
    index = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    begins = torch.ones_like(doc_ids, dtype=torch.bool)
    begins[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(begins, index, 0).cummax(dim=1).values  # where each one's document began
    return index - first


def split_heads(x: Tensor, n_heads: int) -> Tensor:
    """`(batch, seq, d_model)` -> `(batch, n_heads, seq, d_head)`; head h owns features
    `h*d_head:(h+1)*d_head` of every position."""
    batch, seq, d_model = x.shape
    if d_model % n_heads:
        raise InputError(f"n_heads={n_heads} must divide d_model={d_model}")
    return x.reshape(batch, seq, n_heads, d_model // n_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """`(batch, n_heads, seq, d_head)` -> `(batch, seq, n_heads * d_head)`; undoes `split_heads`.

    The transpose comes first: reshaping `(batch, n_heads, seq, d_head)` directly would mix
    positions of one head into one token's features.
    """
    batch, n_heads, seq, d_head = x.shape
    return x.transpose(1, 2).reshape(batch, seq, n_heads * d_head)


class MultiHeadAttention(nn.Module):
    """Multi-head attention: project, split into heads, attend per head, merge, project out.

    Each of `n_heads` heads attends in its own `d_model // n_heads`-dimensional subspace, so the
    cost matches one head of full width while the heads can look at different positions.
    Inputs are batch-first, `(batch, seq, d_model)`.
    """

    def __init__(self, d_model: int, n_heads: int, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        require_positive(d_model, "d_model", integer=True)
        require_positive(n_heads, "n_heads", integer=True)
        if d_model % n_heads:
            raise InputError(
                f"n_heads={n_heads} must divide d_model={d_model} so every head gets "
                "d_model // n_heads features"
            )
        if not 0.0 <= dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {dropout}")
        self.d_model, self.n_heads, self.dropout = d_model, n_heads, dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(
        self,
        x_q: Tensor,
        x_kv: Tensor | None = None,
        mask: Tensor | None = None,
        is_causal: bool = False,
        return_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend from `x_q` `(batch, seq_q, d_model)` to `x_kv` `(batch, seq_k, d_model)`.

        `x_kv=None` is self-attention (`x_kv = x_q`); anything else is cross-attention. `mask`
        is boolean (True = may attend), broadcastable to `(batch, n_heads, seq_q, seq_k)`.
        Returns `(batch, seq_q, d_model)`, or `(output, weights)` with per-head weights
        `(batch, n_heads, seq_q, seq_k)`.
        """
        x_kv = x_q if x_kv is None else x_kv
        for name, x in (("x_q", x_q), ("x_kv", x_kv)):
            _require_float_tensor(x, name, min_dim=3)
            if x.dim() != 3 or x.shape[-1] != self.d_model:
                raise InputError(
                    f"{name} must be (batch, seq, d_model={self.d_model}), got {tuple(x.shape)}"
                )
        if x_q.shape[0] != x_kv.shape[0]:
            raise InputError(f"x_q and x_kv batch sizes differ: {x_q.shape[0]} vs {x_kv.shape[0]}")
        q = split_heads(self.q_proj(x_q), self.n_heads)
        k = split_heads(self.k_proj(x_kv), self.n_heads)
        v = split_heads(self.v_proj(x_kv), self.n_heads)
        out, weights = scaled_dot_product_attention(
            q, k, v, mask, is_causal, self.dropout if self.training else 0.0, return_weights=True
        )
        out = self.out_proj(merge_heads(out))
        return (out, weights) if return_weights else out

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> MultiHeadAttention:
        """A copy of `mha`'s weights in this module (same device and dtype).

        torch packs the q/k/v projections into one `in_proj_weight` of shape
        `(3 * d_model, d_model)`, rows in the order q, k, v.
        """
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise InputError(
                "only nn.MultiheadAttention with kdim = vdim = embed_dim, add_bias_kv=False and "
                "add_zero_attn=False maps onto MultiHeadAttention"
            )
        bias = mha.in_proj_bias is not None
        ours = cls(mha.embed_dim, mha.num_heads, bias=bias, dropout=mha.dropout)
        ours = ours.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        with torch.no_grad():
            for proj, w in zip(
                (ours.q_proj, ours.k_proj, ours.v_proj), mha.in_proj_weight.chunk(3), strict=True
            ):
                proj.weight.copy_(w)
            ours.out_proj.weight.copy_(mha.out_proj.weight)
            if bias:
                for proj, b in zip(
                    (ours.q_proj, ours.k_proj, ours.v_proj), mha.in_proj_bias.chunk(3), strict=True
                ):
                    proj.bias.copy_(b)
                ours.out_proj.bias.copy_(mha.out_proj.bias)
        return ours.train(mha.training)

    def to_torch(self) -> nn.MultiheadAttention:
        """An `nn.MultiheadAttention(batch_first=True)` holding a copy of these weights.

        Remember its mask convention is inverted: pass `attn_mask=~mask`.
        """
        bias = self.q_proj.bias is not None
        w = self.q_proj.weight
        mha = nn.MultiheadAttention(
            self.d_model,
            self.n_heads,
            dropout=self.dropout,
            bias=bias,
            batch_first=True,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            mha.in_proj_weight.copy_(
                torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
            )
            mha.out_proj.weight.copy_(self.out_proj.weight)
            if bias:
                mha.in_proj_bias.copy_(
                    torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
                )
                mha.out_proj.bias.copy_(self.out_proj.bias)
        return mha.train(self.training)


def plot_attention(
    weights: Tensor,
    tokens: Sequence[str] | None = None,
    ax: Axes | None = None,
    key_tokens: Sequence[str] | None = None,
    title: str | None = None,
) -> Axes:
    """Draw `(seq_q, seq_k)` attention weights as a heat map: rows are queries, columns keys.

    `tokens` label both axes (self-attention); give `key_tokens` for the columns when they
    differ (cross-attention). Returns the matplotlib Axes.
    """
    import matplotlib.pyplot as plt

    if not isinstance(weights, Tensor):
        raise InputTypeError(f"weights must be a torch.Tensor, got {type(weights).__name__}")
    if weights.dim() != 2:
        raise InputError(
            f"weights must be (seq_q, seq_k); pick one batch item and head, e.g. weights[0, 0], "
            f"got shape {tuple(weights.shape)}"
        )
    key_tokens = tokens if key_tokens is None else key_tokens
    seq_q, seq_k = weights.shape
    if tokens is not None and len(tokens) != seq_q:
        raise InputError(f"tokens has {len(tokens)} labels for {seq_q} query positions")
    if key_tokens is not None and len(key_tokens) != seq_k:
        raise InputError(f"{len(key_tokens)} key labels for {seq_k} key positions")
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    image = ax.imshow(weights.detach().float().cpu().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if tokens is not None:
        ax.set_yticks(range(len(tokens)), tokens)
    if key_tokens is not None:
        ax.set_xticks(range(len(key_tokens)), key_tokens, rotation=90)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    if title:
        ax.set_title(title)
    return ax


@dataclass
class AttentionCost:
    """One sequence length's cost. Times are the fastest of several calls, in seconds.

    `score_bytes` is computed, not measured: the size of one `(batch, heads, seq, seq)` score
    tensor, which the written-out attention must hold (at its peak it holds the scores and the
    weights, plus boolean masks of that shape when masking). `peak_bytes` and `torch_peak_bytes`
    are measured with `torch.cuda.max_memory_allocated` above what the inputs occupy, on CUDA only
    (None on CPU, where torch has no allocator statistics).
    """

    seq_len: int
    seconds: float
    torch_seconds: float
    score_bytes: int
    peak_bytes: int | None = None
    torch_peak_bytes: int | None = None

    @property
    def slowdown(self) -> float:
        """How many times slower the written-out attention was than torch's SDPA."""
        return self.seconds / self.torch_seconds


def _best_seconds(fn, repeats: int, min_total_s: float, device: torch.device) -> float:
    """The fastest of at least `repeats` calls, repeated for `min_total_s` (at most 100 calls):
    the call least disturbed by other work on the machine."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()  # warm-up: first calls pay for kernel selection and allocation
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_total_s and len(times) < 100):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def _cuda_peak_bytes(fn, device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def attention_cost(
    seq_lens: Sequence[int],
    *,
    batch: int = 1,
    n_heads: int = 4,
    d_head: int = 64,
    causal: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    repeats: int = 3,
    min_total_s: float = 0.5,
) -> list[AttentionCost]:
    """Time this module's attention against `F.scaled_dot_product_attention` on random inputs
    `(batch, n_heads, seq, d_head)` for each sequence length, in the same run.

    Each time is the fastest of at least `repeats` calls, repeated for `min_total_s`: on a machine
    shared with other programs the fastest call is the one least disturbed."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    require_positive(repeats, "repeats", integer=True)
    element = torch.empty((), dtype=dtype).element_size()
    results = []
    for seq in seq_lens:
        require_positive(seq, "sequence length", integer=True)
        q, k, v = torch.randn(3, batch, n_heads, seq, d_head, dtype=dtype, device=device)

        def ours(q=q, k=k, v=v):
            return scaled_dot_product_attention(q, k, v, is_causal=causal)

        def theirs(q=q, k=k, v=v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        with torch.inference_mode():
            results.append(
                AttentionCost(
                    seq_len=seq,
                    seconds=_best_seconds(ours, repeats, min_total_s, device),
                    torch_seconds=_best_seconds(theirs, repeats, min_total_s, device),
                    score_bytes=batch * n_heads * seq * seq * element,
                    peak_bytes=_cuda_peak_bytes(ours, device),
                    torch_peak_bytes=_cuda_peak_bytes(theirs, device),
                )
            )
    return results
