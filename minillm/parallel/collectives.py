"""Communication between processes: point-to-point messages, the collectives, a ring all-reduce.

Point-to-point: one rank sends a tensor, one rank receives it (`dist.send` / `dist.recv`, or the
non-blocking `isend` / `irecv`). Collectives involve every rank of a group:

| collective     | before (rank r holds)      | after (every rank holds)                 |
|----------------|----------------------------|------------------------------------------|
| broadcast      | x on the source rank       | x                                        |
| all-reduce     | x_r                        | x_0 + ... + x_{p-1}                      |
| reduce-scatter | x_r, p chunks              | chunk r of the sum (one chunk per rank)  |
| all-gather     | one chunk c_r              | [c_0, ..., c_{p-1}]                      |

A collective is not a different kind of wire: libraries (gloo, NCCL, MPI) build it from
point-to-point messages. `ring_all_reduce` builds all-reduce that way: p ranks in a ring, each
tensor cut into p chunks; p - 1 steps of reduce-scatter leave each rank with one chunk summed over
all ranks, p - 1 steps of all-gather pass the summed chunks round. Every rank sends
2 (p - 1) / p * n bytes in 2 (p - 1) messages, so the time is

    t(n, p) = 2 (p - 1) / p * n / B  +  2 (p - 1) * latency

for a link bandwidth B: nearly independent of p for large n, which is why data parallelism scales.
`ring_cost` is that formula, `fit_ring_cost` fits B and latency to measured times, and
`time_collectives` measures send/recv, `dist.all_reduce` and `ring_all_reduce` side by side.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
import torch.distributed as dist

from minillm.errors import InputError, require_positive
from minillm.parallel.launch import device_for

# -- the ring ----------------------------------------------------------------------------------


def ring_schedule(rank: int, world_size: int, step: int) -> tuple[int, int]:
    """The chunks `rank` sends to its right neighbour and receives from its left one at `step` of a
    ring all-reduce: `(send_chunk, recv_chunk)`.

    Steps 0 .. p-2 are the reduce-scatter (the received chunk is added to the local one), steps
    p-1 .. 2p-3 the all-gather (the received chunk, already a full sum, replaces the local one).
    At reduce-scatter step s, rank r sends chunk r - s and receives chunk r - s - 1 (mod p), so
    after p - 1 steps it holds the full sum of chunk r + 1; the all-gather starts by sending that.
    """
    if not 0 <= rank < world_size:
        raise InputError(f"rank {rank} is outside a ring of {world_size} ranks")
    if not 0 <= step < 2 * (world_size - 1):
        raise InputError(f"a ring of {world_size} ranks has steps 0 to {2 * world_size - 3}")
    s = step if step < world_size - 1 else step - (world_size - 1) - 1  # gather lags one chunk
    return (rank - s) % world_size, (rank - s - 1) % world_size


def ring_all_reduce(tensor: torch.Tensor, group=None, *, verbose: bool = False) -> torch.Tensor:
    """Sum `tensor` (any shape, any length) over the ranks of `group` in place, from isend/irecv
    to the ring neighbours only; returns it. The chunks are `torch.tensor_split`'s, so a length
    that the world size does not divide gives chunks one element apart (empty ones are skipped,
    by sender and receiver alike)."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if world == 1:
        return tensor
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
    right, left = ranks[(rank + 1) % world], ranks[(rank - 1) % world]
    flat = tensor.view(-1)  # needs a contiguous tensor: the chunks must be views of it
    chunks = torch.tensor_split(flat, world)
    inbox = torch.empty_like(chunks[0])  # the largest chunk is the first
    for step in range(2 * (world - 1)):
        send, recv = ring_schedule(rank, world, step)
        incoming = inbox[: chunks[recv].numel()]
        requests = []
        if chunks[send].numel():
            requests.append(dist.isend(chunks[send], right, group=group))
        if chunks[recv].numel():
            requests.append(dist.irecv(incoming, left, group=group))
        for request in requests:  # both are in flight at once: no rank waits for a send first
            request.wait()
        if step < world - 1:
            chunks[recv].add_(incoming)
        else:
            chunks[recv].copy_(incoming)
        if verbose:
            phase = "reduce-scatter" if step < world - 1 else "all-gather"
            print(f"step {step} ({phase}): sent chunk {send}, got chunk {recv} -> {flat.tolist()}")
    return tensor


# -- the cost model ----------------------------------------------------------------------------


def ring_cost(n_bytes: float, world_size: int, bandwidth: float, latency: float) -> float:
    """Seconds a ring all-reduce of `n_bytes` over `world_size` ranks takes on links of
    `bandwidth` bytes/s with `latency` seconds per message."""
    p = world_size
    return 2 * (p - 1) / p * n_bytes / bandwidth + 2 * (p - 1) * latency


def fit_ring_cost(
    n_bytes: list[float], world_sizes: list[int], seconds: list[float]
) -> tuple[float, float]:
    """Least-squares `(bandwidth, latency)` of `ring_cost` for measured times: the model is linear
    in 1/B and latency, with features 2(p-1)/p * n and 2(p-1). Relative errors are minimised
    (each row divided by its time), so microsecond and millisecond messages count alike."""
    p = np.asarray(world_sizes, dtype=float)
    t = np.asarray(seconds, dtype=float)
    features = np.stack([2 * (p - 1) / p * np.asarray(n_bytes, dtype=float), 2 * (p - 1)], axis=1)
    (inv_bandwidth, latency), *_ = np.linalg.lstsq(
        features / t[:, None], np.ones_like(t), rcond=None
    )
    if inv_bandwidth <= 0:
        raise InputError("the times do not grow with the message size; measure larger messages")
    return 1.0 / inv_bandwidth, max(float(latency), 0.0)


# -- workers for `launch`: each runs in every rank ---------------------------------------------


def show_point_to_point(rank: int, world_size: int) -> list[float]:
    """Rank 0 sends a tensor to every other rank, one message each; returns what this rank has."""
    device = device_for(rank)
    if rank == 0:
        data = torch.arange(4.0, device=device)
        for other in range(1, world_size):
            dist.send(data, dst=other)
        print(f"sent {data.tolist()} to ranks 1..{world_size - 1}, one message each")
    else:
        data = torch.zeros(4, device=device)
        dist.recv(data, src=0)
        print(f"received {data.tolist()} from rank 0")
    return data.tolist()


def show_collectives(rank: int, world_size: int) -> dict[str, list[float]]:
    """Each collective on small tensors; prints and returns what this rank holds afterwards."""
    device, p = device_for(rank), world_size
    out = {}
    x = torch.tensor([10.0 * rank], device=device)
    dist.broadcast(x, src=0)
    out["broadcast from rank 0"] = x.tolist()
    x = torch.full((p,), float(rank + 1), device=device)  # rank r holds [r+1, ..., r+1]
    dist.all_reduce(x)
    out["all_reduce"] = x.tolist()
    x = torch.arange(p, dtype=torch.float32, device=device) + 10 * rank  # rank r: [10r, 10r+1, ..]
    mine = torch.empty(1, device=device)
    dist.reduce_scatter_single(mine, x)
    out["reduce_scatter"] = mine.tolist()
    gathered = torch.empty(p, device=device)
    dist.all_gather_single(gathered, torch.tensor([float(rank)], device=device))
    out["all_gather"] = gathered.tolist()
    for name, value in out.items():
        print(f"{name:22s} -> {value}")
    return out


def check_ring(rank: int, world_size: int, lengths: list[int], verbose_length: int = 0) -> float:
    """`ring_all_reduce` against `dist.all_reduce` on random tensors of each length; returns the
    largest difference. A positive `verbose_length` first prints each step on 0, 1, 2, ..."""
    device = device_for(rank)
    if verbose_length:
        x = torch.arange(verbose_length, dtype=torch.float32, device=device) * 10**rank
        print(f"start: {x.tolist()}")
        ring_all_reduce(x, verbose=True)
    worst = 0.0
    for n in lengths:
        x = torch.randn(n, generator=torch.Generator().manual_seed(rank * 1000 + n)).to(device)
        expected = x.clone()
        dist.all_reduce(expected)
        worst = max(worst, (ring_all_reduce(x) - expected).abs().max().item() if n else 0.0)
    return worst


def _median_seconds(operation, repeats: int) -> float:
    """Median wall time of `operation` over `repeats` runs, ranks lined up by a barrier each time
    so that nobody's time includes waiting for a late partner to arrive."""
    times = []
    for _ in range(repeats + 1):  # the first run warms up buffers and connections
        dist.barrier()
        start = time.perf_counter()
        operation()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def time_collectives(
    rank: int, world_size: int, sizes: list[int], repeats: int = 5
) -> dict[str, list[float]]:
    """Median seconds, for float32 tensors of each number of elements in `sizes`, of one message
    from rank 0 to rank 1 (send/recv), of `dist.all_reduce` and of `ring_all_reduce`."""
    for n in sizes:
        require_positive(n, "tensor size", integer=True)
    device = device_for(rank)
    result: dict[str, list[float]] = {"send_recv": [], "all_reduce": [], "ring_all_reduce": []}
    for n in sizes:
        x = torch.ones(n, device=device)

        def send_recv(x=x):
            if rank == 0:
                dist.send(x, dst=1)
            elif rank == 1:
                dist.recv(x, src=0)

        result["send_recv"].append(_median_seconds(send_recv, repeats))
        result["all_reduce"].append(_median_seconds(lambda x=x: dist.all_reduce(x), repeats))
        result["ring_all_reduce"].append(_median_seconds(lambda x=x: ring_all_reduce(x), repeats))
    return result
