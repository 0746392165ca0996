"""Chapter 07 exercises: data parallelism from torch and torch.distributed primitives.

Replace each `raise NotImplementedError` with your code; `minillm grade ch07` grades them (the
tests are in tests/exercises/test_ch07_data_parallel.py). Use torch and torch.distributed, not
`minillm.parallel.collectives` or `minillm.parallel.ddp`: building these yourself is the point.

Conventions as in the chapter: p ranks form a ring, rank r sends to rank (r + 1) % p and receives
from rank (r - 1) % p; a tensor of n elements is cut into p chunks by `torch.tensor_split`
(chunk sizes differ by at most one); the functions that communicate run inside every rank (the
tests start them with `minillm.parallel.launch.launch`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist  # noqa: F401  (you will want it)
from torch import Tensor, nn


def ring_schedule(rank: int, world_size: int, step: int) -> tuple[int, int]:
    """The chunk `rank` sends to its right neighbour and the chunk it receives from its left one
    at `step` of a ring all-reduce: `(send_chunk, recv_chunk)`, for steps 0 .. 2p-3.

    Steps 0 .. p-2 reduce-scatter: at step s rank r sends chunk (r - s) % p and receives chunk
    (r - s - 1) % p, which it adds to its own copy; afterwards rank r holds the full sum of chunk
    (r + 1) % p. Steps p-1 .. 2p-3 all-gather: rank r first sends that finished chunk and receives
    chunk r, then passes on what it last received; received chunks replace the local copy.

    >>> [ring_schedule(0, 3, s) for s in range(4)]
    [(0, 2), (2, 1), (1, 0), (0, 2)]

    Off limits: `minillm.parallel.collectives.ring_schedule` (this exercise asks you to write it; a
    call fails the test).
    """
    raise NotImplementedError


def ring_all_reduce(tensor: Tensor) -> Tensor:
    """Sum a contiguous `tensor` (any shape, any number of elements n) over all ranks, in place,
    with `dist.isend` / `dist.irecv` to the ring neighbours only (no `dist.all_reduce`); return it.

    Cut `tensor.view(-1)` into p chunks with `torch.tensor_split` (views: writing them writes the
    tensor), then follow `ring_schedule`. Post the send and the receive of a step together and wait
    for both; skip empty chunks (n < p) on both sides.

    Example, 2 ranks: rank 0 holds [1., 2., 3.], rank 1 holds [10., 20., 30.]; afterwards both
    hold [11., 22., 33.].
    """
    raise NotImplementedError


def ring_cost(n_bytes: float, world_size: int, bandwidth: float, latency: float) -> float:
    """Seconds of a ring all-reduce of `n_bytes` over p = `world_size` ranks, on links of
    `bandwidth` bytes/s with `latency` seconds per message: each rank sends 2(p-1) messages of
    n/p bytes.

    >>> ring_cost(1e6, 2, 1e9, 0.0)  # 2 * 1/2 * 1e6 / 1e9
    0.001
    """
    raise NotImplementedError


def shard_batch(batch: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank `rank`'s contiguous share of `batch` `(B, ...)`: `(B / p, ...)`, rows rank*B/p onwards.
    Raise `ValueError` when p does not divide B.

    >>> shard_batch(torch.arange(6), 1, 3)
    tensor([2, 3])

    Off limits: `minillm.parallel.ddp.shard_batch` (this exercise asks you to write it; a call fails
    the test).
    """
    raise NotImplementedError


def make_buckets(sizes_bytes: list[int], cap_bytes: int) -> list[list[int]]:
    """Indices of parameters (of `sizes_bytes` bytes each, in model order) grouped into gradient
    buckets: last parameter first (backward finishes the last layers first); a bucket takes the
    next parameter while its total stays <= `cap_bytes`; a parameter larger than the cap gets a
    bucket of its own. Every index appears exactly once.

    >>> make_buckets([40, 1200, 80, 120, 160], 960)
    [[4, 3, 2], [1], [0]]

    Off limits: `minillm.parallel.ddp.make_buckets` (this exercise asks you to write it; a call
    fails the test).
    """
    raise NotImplementedError


def overlap_gradient_buckets(model: nn.Module, cap_bytes: int) -> Callable[[], None]:
    """Data parallelism with gradient buckets overlapped with backward: hooks on `model`'s
    parameters that average every gradient over the ranks, one bucket at a time, while backward
    is still running. Returns `wait`, to call after each backward and before the optimizer step.

    Buckets as in `make_buckets` (parameters in reverse order, each bucket at most `cap_bytes`
    unless one parameter alone is larger). On every parameter, `register_post_accumulate_grad_hook`
    runs a hook once its gradient is final; when the last gradient of a bucket is in, start one
    `dist.all_reduce(flat, async_op=True)` of the bucket's gradients concatenated into one flat
    tensor, and keep the handle. `wait()` waits for every handle, divides each flat tensor by the
    world size, copies the averages back into the parameters' `.grad`, and gets ready for the
    next backward (one all-reduce per bucket per step, none of them started by `wait`).

    Example, 2 ranks, one parameter: gradient 1.0 on rank 0 and 3.0 on rank 1 are 2.0 on both
    after `loss.backward(); wait()`.

    Off limits: `minillm.parallel.ddp.DataParallel` and `torch.nn.parallel.DistributedDataParallel`
    (this exercise asks you to write it; a call fails the test).
    """
    raise NotImplementedError


def average_gradients(model: nn.Module) -> None:
    """Replace every `param.grad` of `model` by its mean over all ranks, in place, with
    `dist.all_reduce` (which sums). Parameters without a gradient are left alone.

    Example, 2 ranks: grads 1.0 on rank 0 and 3.0 on rank 1 become 2.0 on both.
    """
    raise NotImplementedError


def accumulate_and_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[tuple[Tensor, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
) -> float:
    """One data-parallel optimizer step with gradient accumulation over this rank's
    `micro_batches` (k pairs of inputs `(b, ...)` and targets): for each, `loss_fn(model(x), y)`
    divided by k, backward; gradients are averaged over the ranks once, after the last micro-batch
    (one `dist.all_reduce` per parameter at most, none in between); then `optimizer.step()` and
    `optimizer.zero_grad()`. Returns this rank's mean micro-batch loss.

    The result equals one process stepping on all ranks' micro-batches together (equal sizes).
    """
    raise NotImplementedError
