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
import torch.distributed as dist
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
    """
    p = world_size
    if step < p - 1:
        return (rank - step) % p, (rank - step - 1) % p
    g = step - (p - 1)  # all-gather step
    return (rank + 1 - g) % p, (rank - g) % p


def ring_all_reduce(tensor: Tensor) -> Tensor:
    """Sum a contiguous `tensor` (any shape, any number of elements n) over all ranks, in place,
    with `dist.isend` / `dist.irecv` to the ring neighbours only (no `dist.all_reduce`); return it.

    Cut `tensor.view(-1)` into p chunks with `torch.tensor_split` (views: writing them writes the
    tensor), then follow `ring_schedule`. Post the send and the receive of a step together and wait
    for both; skip empty chunks (n < p) on both sides.

    Example, 2 ranks: rank 0 holds [1., 2., 3.], rank 1 holds [10., 20., 30.]; afterwards both
    hold [11., 22., 33.].
    """
    p, rank = dist.get_world_size(), dist.get_rank()
    chunks = torch.tensor_split(tensor.view(-1), p)
    inbox = torch.empty_like(chunks[0])
    for step in range(2 * (p - 1)):
        send, recv = ring_schedule(rank, p, step)
        incoming = inbox[: chunks[recv].numel()]
        requests = []
        if chunks[send].numel():
            requests.append(dist.isend(chunks[send], (rank + 1) % p))
        if chunks[recv].numel():
            requests.append(dist.irecv(incoming, (rank - 1) % p))
        for request in requests:
            request.wait()
        if step < p - 1:
            chunks[recv].add_(incoming)
        else:
            chunks[recv].copy_(incoming)
    return tensor


def ring_cost(n_bytes: float, world_size: int, bandwidth: float, latency: float) -> float:
    """Seconds of a ring all-reduce of `n_bytes` over p = `world_size` ranks, on links of
    `bandwidth` bytes/s with `latency` seconds per message: each rank sends 2(p-1) messages of
    n/p bytes.

    >>> ring_cost(1e6, 2, 1e9, 0.0)  # 2 * 1/2 * 1e6 / 1e9
    0.001
    """
    p = world_size
    return 2 * (p - 1) / p * n_bytes / bandwidth + 2 * (p - 1) * latency


def shard_batch(batch: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank `rank`'s contiguous share of `batch` `(B, ...)`: `(B / p, ...)`, rows rank*B/p onwards.
    Raise `ValueError` when p does not divide B.

    >>> shard_batch(torch.arange(6), 1, 3)
    tensor([2, 3])
    """
    if batch.shape[0] % world_size:
        raise ValueError(f"a batch of {batch.shape[0]} cannot be shared by {world_size} ranks")
    n = batch.shape[0] // world_size
    return batch[rank * n : (rank + 1) * n]


def make_buckets(sizes_bytes: list[int], cap_bytes: int) -> list[list[int]]:
    """Indices of parameters (of `sizes_bytes` bytes each, in model order) grouped into gradient
    buckets: last parameter first (backward finishes the last layers first); a bucket takes the
    next parameter while its total stays <= `cap_bytes`; a parameter larger than the cap gets a
    bucket of its own. Every index appears exactly once.

    >>> make_buckets([40, 1200, 80, 120, 160], 960)
    [[4, 3, 2], [1], [0]]
    """
    buckets: list[list[int]] = []
    total = 0
    for i in reversed(range(len(sizes_bytes))):
        if not buckets or total + sizes_bytes[i] > cap_bytes:
            buckets.append([])
            total = 0
        buckets[-1].append(i)
        total += sizes_bytes[i]
    return buckets


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
    """
    params = [p for p in model.parameters() if p.requires_grad]
    sizes = [p.numel() * p.element_size() for p in params]
    buckets = [[params[i] for i in bucket] for bucket in make_buckets(sizes, cap_bytes)]
    bucket_of = {p: b for b, bucket in enumerate(buckets) for p in bucket}
    ready = [0] * len(buckets)
    in_flight = []

    def gradient_ready(param: nn.Parameter) -> None:
        b = bucket_of[param]
        ready[b] += 1
        if ready[b] == len(buckets[b]):
            flat = torch.cat([p.grad.reshape(-1) for p in buckets[b]])
            in_flight.append((buckets[b], flat, dist.all_reduce(flat, async_op=True)))

    for p in params:
        p.register_post_accumulate_grad_hook(gradient_ready)

    def wait() -> None:
        world = dist.get_world_size()
        for bucket, flat, work in in_flight:
            work.wait()
            flat /= world
            for p, grad in zip(bucket, flat.split([p.numel() for p in bucket]), strict=True):
                p.grad.copy_(grad.view_as(p))
        in_flight.clear()
        ready[:] = [0] * len(buckets)

    return wait


def average_gradients(model: nn.Module) -> None:
    """Replace every `param.grad` of `model` by its mean over all ranks, in place, with
    `dist.all_reduce` (which sums). Parameters without a gradient are left alone.

    Example, 2 ranks: grads 1.0 on rank 0 and 3.0 on rank 1 become 2.0 on both.
    """
    world = dist.get_world_size()
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


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
    k = len(micro_batches)
    total = 0.0
    for x, y in micro_batches:
        loss = loss_fn(model(x), y) / k
        loss.backward()
        total += loss.item()
    world = dist.get_world_size()
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world
    optimizer.step()
    optimizer.zero_grad()
    return total
