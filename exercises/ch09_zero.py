"""Chapter 09 exercises: ZeRO's arithmetic, ZeRO-1, -2 and -3 steps, then a DeepSpeed config.

Replace each `raise NotImplementedError` with your code; `minillm grade ch09` grades them (the
tests are in tests/exercises/test_ch09_zero.py). Use torch and torch.distributed, not
`minillm.parallel.zero` or `minillm.memory`: building these yourself is the point.

Conventions as in the chapter: N = `world_size` ranks; a flat buffer of n values is padded to a
multiple of N and rank r owns the r-th of N equal slices; sizes are bytes; fp32 training keeps
4-byte weights and gradients and Adam's two 4-byte moments (16 bytes a parameter), mixed
precision (bf16/fp16) keeps 2-byte weights and gradients plus an fp32 master copy and the two
fp32 moments (2 + 2 + 12 = 16 bytes a parameter).
"""

from __future__ import annotations

import math  # noqa: F401  (you will want it)

import torch  # noqa: F401  (you will want it)
import torch.distributed as dist  # noqa: F401  (you will want it)
from torch import Tensor


def shard_range(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """The slice `[start, end)` of a flat buffer of `numel` values that `rank` owns, after the
    buffer is padded to a multiple of `world_size` so that every rank's slice has the same size
    `ceil(numel / world_size)` (collectives need equal sizes). `end` may pass `numel`: the
    padding.

    >>> [shard_range(10, r, 4) for r in range(4)]
    [(0, 3), (3, 6), (6, 9), (9, 12)]

    Off limits: `minillm.parallel.zero.shard_range` (this exercise asks you to write it; a call
    fails the test).
    """
    raise NotImplementedError


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

    Off limits: `minillm.parallel.zero.zero_state_bytes` (this exercise asks you to write it; a call
    fails the test).
    """
    raise NotImplementedError


def max_params(memory_bytes: float, stage: int, world_size: int, precision: str = "bf16") -> int:
    """The largest parameter count whose model state (`bytes_per_rank`'s four parts together)
    fits in `memory_bytes` per rank at ZeRO `stage`; activations not counted.

    >>> max_params(80e9, 0, 8)  # 16 bytes a parameter, unsharded: 5e9
    5000000000
    >>> max_params(80e9, 3, 8)  # 16 / 8 = 2 bytes a parameter on each rank
    40000000000

    Off limits: `minillm.parallel.zero.zero_state_bytes` (this exercise asks you to write it; a call
    fails the test).
    """
    raise NotImplementedError


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
    raise NotImplementedError


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

    Off limits: `dist.all_reduce` (it leaves every rank the whole averaged gradient: the test
    counts its calls) and `minillm.parallel.zero.Zero` (a call fails the test).
    """
    raise NotImplementedError


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

    Off limits: `dist.all_reduce` (the test counts its calls) and `minillm.parallel.zero.Zero`
    (a call fails the test).
    """
    raise NotImplementedError


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

    Off limits: `minillm.engines.ds_config.prepare_config` (this exercise asks you to write it; a
    call fails the test).
    """
    raise NotImplementedError
