"""FlashAttention's algorithm written in plain PyTorch: exact attention that never holds the
`(seq_q, seq_k)` score matrix.

Written-out attention (`minillm.attention`) computes all scores S = q k^T / sqrt(d), their
softmax P, then P v: S and P are seq x seq per head, so memory grows with the square of the
sequence. FlashAttention (Dao et al., 2022; FlashAttention-2, 2023) walks the keys and values in
tiles of `block_k` and keeps, for each query row, three running quantities:

    m    the largest score seen so far
    l    the sum of exp(score - m) over the keys seen so far
    acc  the sum of exp(score - m) * v over the keys seen so far

A new tile with scores s updates them by the **online softmax**:

    m_new = max(m, max(s));  alpha = exp(m - m_new)
    l     = alpha * l   + sum(exp(s - m_new))
    acc   = alpha * acc + exp(s - m_new) @ v_tile

and after the last tile the output is acc / l: exactly softmax(S) v, because rescaling by alpha
replaces the old maximum by the new one in every term already summed. The forward keeps only the
output and each row's log-sum-exp, lse = m + log(l). The backward recomputes each tile's
probabilities from it, P = exp(s - lse), instead of storing them: more arithmetic, far less
memory, the trade that makes long contexts fit.

Memory: the tiles of one query block, `(..., block_q, block_k)`, instead of `(..., seq, seq)`.
(The real kernels also gain speed, by keeping tiles in on-chip SRAM; a Python loop over tiles
is slower than torch's fused kernels, and this module is for reading and measuring, not speed.)

`peak_tensor_bytes` measures the peak memory of any computation, on any device, so that the two
implementations can be compared (benchmarks/flash_attention_memory.py).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from minillm.errors import InputError, InputTypeError, require_positive


def _check_inputs(q: Any, k: Any, v: Any, block_q: Any, block_k: Any) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise InputTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise InputTypeError(
                f"{name} must be a floating-point tensor, got {x.dtype}; convert it with .float()"
            )
        if x.dim() < 2:
            raise InputError(f"{name} must have shape (..., seq, features), got {tuple(x.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise InputTypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise InputError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not q.shape[:-2] == k.shape[:-2] == v.shape[:-2]:
        raise InputError(
            "q, k, v must have the same leading (batch, heads) dimensions, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}; repeat shared key/value "
            "heads first (minillm.llama.share_kv_heads)"
        )
    if q.shape[-1] != k.shape[-1]:
        raise InputError(
            f"q and k must have the same last dimension d_k, got {q.shape[-1]} and {k.shape[-1]}"
        )
    if k.shape[-2] != v.shape[-2]:
        raise InputError(
            f"k and v must have the same number of positions seq_k, got {k.shape[-2]} and "
            f"{v.shape[-2]}"
        )
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        raise InputError(
            f"q and k need at least one position each, got seq_q={q.shape[-2]}, seq_k={k.shape[-2]}"
        )
    require_positive(block_q, "block_q", integer=True)
    require_positive(block_k, "block_k", integer=True)


def _causal_fill(scores: Tensor, q_start: int, k_start: int) -> Tensor:
    """-inf where a key lies after its query (query i sees keys 0..i, as torch's is_causal)."""
    rows = torch.arange(q_start, q_start + scores.shape[-2], device=scores.device)
    cols = torch.arange(k_start, k_start + scores.shape[-1], device=scores.device)
    return scores.masked_fill(cols[None, :] > rows[:, None], float("-inf"))


def _key_tiles(seq_k: int, block_k: int, q_end: int, causal: bool) -> range:
    """Start positions of the key tiles a query block ending at `q_end` needs: under the causal
    mask the tiles wholly after its last query are skipped (about half the work)."""
    return range(0, min(seq_k, q_end) if causal else seq_k, block_k)


def online_softmax_update(
    m: Tensor, denom: Tensor, acc: Tensor, scores: Tensor, v: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One step of the online softmax: the running row maximum `m` `(..., n)`, denominator
    `denom` `(..., n)` (l above) and numerator `acc` `(..., n, d_v)`, updated with a tile of
    `scores` `(..., n, t)` and its values `v` `(..., t, d_v)`. Start from m = -inf, denom = 0,
    acc = 0; after the last tile acc / denom is the softmax-weighted sum of every tile's values."""
    m_new = torch.maximum(m, scores.amax(dim=-1))
    # A row whose keys are all masked so far has m_new = -inf; exp(-inf - -inf) would be NaN.
    safe = m_new.masked_fill(m_new == float("-inf"), 0.0)
    p = torch.exp(scores - safe[..., None])
    alpha = torch.exp(m - safe)
    return m_new, alpha * denom + p.sum(dim=-1), alpha[..., None] * acc + p @ v


def flash_attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    block_q: int = 64,
    block_k: int = 64,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """softmax(q k^T * scale) v computed tile by tile, and each row's log-sum-exp of the scaled
    scores: `(..., seq_q, d_v)` and `(..., seq_q)`. No gradient is recorded (the autograd
    function `FlashAttention` pairs it with its own backward)."""
    _check_inputs(q, k, v, block_q, block_k)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    seq_q, seq_k = q.shape[-2], k.shape[-2]
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = q.new_empty(q.shape[:-1])
    with torch.no_grad():
        for qs in range(0, seq_q, block_q):
            qi = q[..., qs : qs + block_q, :] * scale
            rows = qi.shape[-2]
            m = qi.new_full((*qi.shape[:-1],), float("-inf"))
            denom = qi.new_zeros(m.shape)
            acc = qi.new_zeros((*m.shape, v.shape[-1]))
            for ks in _key_tiles(seq_k, block_k, qs + rows, causal):
                s = qi @ k[..., ks : ks + block_k, :].transpose(-2, -1)  # (..., rows, tile)
                if causal:
                    s = _causal_fill(s, qs, ks)
                m, denom, acc = online_softmax_update(
                    m, denom, acc, s, v[..., ks : ks + block_k, :]
                )
            out[..., qs : qs + rows, :] = acc / denom[..., None]
            lse[..., qs : qs + rows] = m + torch.log(denom)
    return out, lse


class FlashAttention(torch.autograd.Function):
    """Tiled exact attention with a hand-written backward that recomputes the probabilities tile
    by tile from the saved log-sum-exp (FlashAttention-2's backward pass). Call it through
    `flash_attention`."""

    @staticmethod
    def forward(ctx, q, k, v, causal, block_q, block_k, scale):
        out, lse = flash_attention_forward(
            q, k, v, causal=causal, block_q=block_q, block_k=block_k, scale=scale
        )
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.block_q, ctx.block_k, ctx.scale = causal, block_q, block_k, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        causal, block_q, block_k = ctx.causal, ctx.block_q, ctx.block_k
        scale = 1.0 / math.sqrt(q.shape[-1]) if ctx.scale is None else ctx.scale
        seq_q, seq_k = q.shape[-2], k.shape[-2]
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        # dL/ds = P * (dP - delta) with delta_i = sum_j P_ij dP_ij = dO_i . O_i: one number per
        # row, computed once from the output instead of from the whole row of P.
        delta = (grad_out * out).sum(dim=-1)  # (..., seq_q)
        for qs in range(0, seq_q, block_q):
            qi, do = q[..., qs : qs + block_q, :], grad_out[..., qs : qs + block_q, :]
            rows = qi.shape[-2]
            lse_i, delta_i = lse[..., qs : qs + rows, None], delta[..., qs : qs + rows, None]
            for ks in _key_tiles(seq_k, block_k, qs + rows, causal):
                kj, vj = k[..., ks : ks + block_k, :], v[..., ks : ks + block_k, :]
                s = (qi @ kj.transpose(-2, -1)) * scale
                if causal:
                    s = _causal_fill(s, qs, ks)
                p = torch.exp(s - lse_i)  # the forward's probabilities, recomputed
                dv[..., ks : ks + block_k, :] += p.transpose(-2, -1) @ do
                ds = p * (do @ vj.transpose(-2, -1) - delta_i) * scale
                dq[..., qs : qs + rows, :] += ds @ kj
                dk[..., ks : ks + block_k, :] += ds.transpose(-2, -1) @ qi
        return dq, dk, dv, None, None, None, None


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    block_q: int = 64,
    block_k: int = 64,
    scale: float | None = None,
) -> Tensor:
    """Exact attention softmax(q k^T * scale) v in tiles, differentiable.

    Args:
        q: `(..., seq_q, d_k)` queries; k: `(..., seq_k, d_k)` keys; v: `(..., seq_k, d_v)`
            values; the same leading (batch, heads) dimensions.
        causal: query i attends to keys 0..i only (aligned top-left, as torch's `is_causal`).
        block_q, block_k: tile sizes; they need not divide the sequence lengths.
        scale: multiplies the scores; 1 / sqrt(d_k) by default.

    Returns `(..., seq_q, d_v)`, equal to `minillm.attention.scaled_dot_product_attention` up to
    rounding.
    """
    _check_inputs(q, k, v, block_q, block_k)
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
    ):
        raise InputError(f"scale must be a finite number (or None for 1/sqrt(d_k)), got {scale!r}")
    return FlashAttention.apply(q, k, v, bool(causal), int(block_q), int(block_k), scale)


# ---------------------------------------------------------------------------------------------
# Measuring peak memory
# ---------------------------------------------------------------------------------------------


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the tensors that torch operations create while it is active, each
    storage once, until it is freed: `peak` is the largest total at any moment."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}  # storage address -> bytes
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if _dense(t)}
        for t in tree_leaves(result):
            if not _dense(t):
                continue
            storage = t.untyped_storage()
            address, size = storage.data_ptr(), storage.nbytes()
            # Views and in-place results share an input's storage: nothing new was allocated.
            if size == 0 or address in inputs or address in self.live:
                continue
            self.live[address] = size
            self.now += size
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, address)
        return result

    def _free(self, address: int) -> None:
        self.now -= self.live.pop(address, 0)


def _dense(t: Any) -> bool:
    return isinstance(t, Tensor) and t.layout == torch.strided


def peak_tensor_bytes(fn: Callable[[], Any]) -> int:
    """The most bytes that tensors created by `fn()` occupied at once, on any device.

    Every torch operation that `fn` runs, forward and backward, is seen by a `TorchDispatchMode`
    that adds each new storage's size and subtracts it when the storage is freed; what `fn`'s
    inputs occupied before the call is not counted, what it returns is. This is the memory that
    the computation asks for; the allocator's rounding and caching come on top (on CUDA,
    `torch.cuda.max_memory_allocated` includes them).
    """
    if not callable(fn):
        raise InputTypeError(f"fn must be a function of no arguments, got {type(fn).__name__}")
    counter = _LiveTensorBytes()
    with counter:
        result = fn()
    del result
    return counter.peak
