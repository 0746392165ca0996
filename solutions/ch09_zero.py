"""Chapter 09 solutions: ZeRO's arithmetic, ZeRO-1, -2 and -3 steps, then a DeepSpeed config.

The reference answers to exercises/ch09_zero.py, written from torch and torch.distributed
(`minillm grade ch09 --impl solutions` scores full marks).

Conventions as in the chapter: N = `world_size` ranks; a flat buffer of n values is padded to a
multiple of N and rank r owns the r-th of N equal slices; sizes are bytes; fp32 training keeps
4-byte weights and gradients and Adam's two 4-byte moments (16 bytes a parameter), mixed
precision (bf16/fp16) keeps 2-byte weights and gradients plus an fp32 master copy and the two
fp32 moments (2 + 2 + 12 = 16 bytes a parameter).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor


def shard_range(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """The slice `[start, end)` of a flat buffer of `numel` values that `rank` owns, after the
    buffer is padded to a multiple of `world_size` so that every rank's slice has the same size
    `ceil(numel / world_size)` (collectives need equal sizes). `end` may pass `numel`: the
    padding.

    >>> [shard_range(10, r, 4) for r in range(4)]
    [(0, 3), (3, 6), (6, 9), (9, 12)]
    """
    size = math.ceil(numel / world_size)
    return rank * size, (rank + 1) * size


def bytes_per_rank(
    n_params: int, stage: int, world_size: int, precision: str = "fp32"
) -> dict[str, int]:
    """Bytes one rank holds at ZeRO `stage` (0-3) for a model of `n_params` parameters:
    `{"parameters": ..., "gradients": ..., "master_weights": ..., "optimizer_states": ...}`
    (the names of `minillm.memory.STATE_PARTS`): "master_weights" is the fp32 copy that mixed
    precision ("bf16" or "fp16") keeps (0 bytes in fp32), "optimizer_states" Adam's two fp32
    moments; both are sharded from stage 1.

    Stage 1 shards the optimizer states, stage 2 also the gradients, stage 3 also the parameters;
    a sharded part holds `ceil(n_params / world_size)` values on each rank.

    >>> bytes_per_rank(1000, 1, 4, "bf16")
    {'parameters': 2000, 'gradients': 2000, 'master_weights': 1000, 'optimizer_states': 2000}
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    low = 4 if precision == "fp32" else 2  # bytes of a weight and of a gradient
    master = 0 if precision == "fp32" else 4  # the fp32 copy mixed precision updates
    shard = math.ceil(n_params / world_size)
    optimizer_values = shard if stage >= 1 else n_params
    return {
        "parameters": low * (shard if stage >= 3 else n_params),
        "gradients": low * (shard if stage >= 2 else n_params),
        "master_weights": master * optimizer_values,
        "optimizer_states": 8 * optimizer_values,  # Adam's m and v in fp32
    }


def max_params(memory_bytes: float, stage: int, world_size: int, precision: str = "bf16") -> int:
    """The largest parameter count whose model state (`bytes_per_rank`'s four parts together)
    fits in `memory_bytes` per rank at ZeRO `stage`; activations not counted.

    >>> max_params(80e9, 0, 8)  # 16 bytes a parameter, unsharded: 5e9
    5000000000
    >>> max_params(80e9, 3, 8)  # 16 / 8 = 2 bytes a parameter on each rank
    40000000000
    """
    low, high = 0, 1
    while sum(bytes_per_rank(high, stage, world_size, precision).values()) <= memory_bytes:
        low, high = high, 2 * high
    while high - low > 1:  # the state grows with n: bisect for the last n that fits
        mid = (low + high) // 2
        fits = sum(bytes_per_rank(mid, stage, world_size, precision).values()) <= memory_bytes
        low, high = (mid, high) if fits else (low, mid)
    return low


def zero1_adamw_step(
    param: Tensor,
    grad: Tensor,
    state: dict,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> None:
    """One ZeRO-1 AdamW step, run in every rank. `param` `(n,)` is the flat fp32 parameter
    vector, the same on every rank; `grad` `(n,)` is this rank's own gradient (of its shard of
    the batch). Average the gradients over the ranks, update this rank's `shard_range` slice of
    `param` only, with torch.optim.AdamW's rule, then all-gather so that every rank holds the
    whole updated `param` (in place).

    `state` is this rank's optimizer state, empty before the first step: keep in it `"step"` (an
    int) and `"exp_avg"`, `"exp_avg_sq"`, each of the slice's size (`ceil(n / N)`), not n.
    AdamW, with t the step count after incrementing it:
        p *= 1 - lr * weight_decay
        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    Example, 2 ranks, n = 3: rank 0 updates param[0:2], rank 1 param[2:3] (its slice [2, 4)
    is padded by one value); both end with all 3 values updated, `state["exp_avg"].shape == (2,)`.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    n = param.numel()
    start, end = shard_range(n, rank, world_size)
    padded = torch.zeros((end - start) * world_size, dtype=param.dtype)
    padded[:n] = grad
    dist.all_reduce(padded)
    flat = torch.zeros_like(padded)
    flat[:n] = param
    p = flat[start:end].clone()
    _adamw_update(p, padded[start:end] / world_size, state, lr, betas, eps, weight_decay)
    dist.all_gather_single(flat, p)
    param.copy_(flat[:n])


def zero2_adamw_step(
    param: Tensor,
    grad: Tensor,
    state: dict,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> Tensor:
    """One ZeRO-2 AdamW step, run in every rank: `zero1_adamw_step`, except that the gradients
    are reduce-scattered, so that this rank receives only the average of its own slice (never
    the whole averaged gradient, which is what saves ZeRO-2's memory). Returns that averaged
    gradient slice, `(ceil(n / N),)`, the padding's values 0.

    Example, 2 ranks, n = 3, rank 0's grad [1, 2, 3] and rank 1's [3, 4, 5]: rank 0 returns
    [2, 3], rank 1 [4, 0] (its slice [2, 4): one value and the padding).
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    n = param.numel()
    start, end = shard_range(n, rank, world_size)
    padded = torch.zeros((end - start) * world_size, dtype=param.dtype)
    padded[:n] = grad
    mine = torch.empty(end - start, dtype=param.dtype)
    dist.reduce_scatter_single(mine, padded)
    mine /= world_size
    flat = torch.zeros_like(padded)
    flat[:n] = param
    p = flat[start:end].clone()
    _adamw_update(p, mine, state, lr, betas, eps, weight_decay)
    dist.all_gather_single(flat, p)
    param.copy_(flat[:n])
    return mine


def zero3_adamw_step(
    shard: Tensor,
    numel: int,
    loss_fn,
    state: dict,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> float:
    """One ZeRO-3 AdamW step, run in every rank. Between steps a rank holds only `shard`, its
    `shard_range` slice `(ceil(numel / N),)` of the padded flat parameter vector. All-gather the
    whole vector, compute `loss_fn(full[:numel])` (this rank's loss, on its part of the batch)
    and its gradient, reduce-scatter the gradient averaged over the ranks into this rank's slice,
    and update `shard` in place with AdamW (as `zero1_adamw_step`); the whole vector and
    gradient are dropped when the step returns. Returns this rank's loss (a float).

    (A real ZeRO-3 engine does this layer by layer: it gathers a layer's weights just before
    the layer's forward, frees them, and gathers them again for its backward.)
    """
    world_size = dist.get_world_size()
    full = torch.empty(shard.numel() * world_size, dtype=shard.dtype)
    dist.all_gather_single(full, shard)
    full.requires_grad_(True)
    loss = loss_fn(full[:numel])
    loss.backward()
    mine = torch.empty_like(shard)
    dist.reduce_scatter_single(mine, full.grad)  # the padding's gradient is 0
    mine /= world_size
    with torch.no_grad():
        _adamw_update(shard, mine, state, lr, betas, eps, weight_decay)
    return loss.item()


def _adamw_update(p, g, state, lr, betas, eps, weight_decay) -> None:
    """torch.optim.AdamW's rule on one slice `p` (in place), its moments kept in `state`."""
    if not state:
        zeros = torch.zeros_like(p)
        state.update(step=0, exp_avg=zeros, exp_avg_sq=zeros.clone())
    b1, b2 = betas
    state["step"] += 1
    t = state["step"]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    p.mul_(1 - lr * weight_decay)
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    p.sub_(lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps))


def deepspeed_config(
    world_size: int,
    micro_batch: int,
    grad_accum: int,
    stage: int,
    *,
    lr: float,
    weight_decay: float,
    grad_clip: float,
) -> dict:
    """A DeepSpeed JSON config (as a dict) for `world_size` data-parallel ranks: batch sizes that
    multiply out (`train_batch_size` = micro batch x accumulation x ranks), the ZeRO `stage` in
    `zero_optimization`, an explicit `gradient_clipping` (DeepSpeed 0.19 otherwise clips at 1.0),
    an `AdamW` optimizer with `lr`, `weight_decay` and `"torch_adam": true` (no C++ build), and
    mixed precision in bf16 (`"bf16": {"enabled": true}`), never fp16: DeepSpeed refuses fp16 on
    a CPU, and bf16 needs no loss scaling.

    >>> deepspeed_config(2, 4, 1, 2, lr=1e-3, weight_decay=0.1, grad_clip=1.0)["train_batch_size"]
    8
    """
    return {
        "train_batch_size": micro_batch * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": lr, "weight_decay": weight_decay, "torch_adam": True},
        },
        "bf16": {"enabled": True},
        "fp16": {"enabled": False},
        "zero_optimization": {"stage": stage},
    }
