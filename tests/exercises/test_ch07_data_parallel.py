"""Graded tests for chapter 07 (data parallelism): `minillm grade ch07`.

The functions that communicate run in real processes: `launch` starts them and calls the runners
below, which import the implementation being graded by its package name (exercises or solutions).
References: a simulation of which ranks' contributions each chunk holds, torch's `dist.all_reduce`,
hand values, and one process on the global batch. Sums of small integers in float64 are exact, so
those comparisons are exact; trained weights are compared in float64 with atol 1e-12.
"""

import importlib

import pytest
import torch
import torch.distributed as dist
from torch import nn

from minillm.parallel.launch import launch

F64 = {"atol": 1e-12, "rtol": 0.0}


@pytest.fixture
def package(request):
    return request.config.getoption("--impl")


def _load(package):
    return importlib.import_module(f"{package}.ch07_data_parallel")


# -- runners: module-level, so that spawned processes can import them -------------------------


def _run_ring(rank, world_size, package, lengths):
    ex = _load(package)

    def refuse(*args, **kwargs):
        raise AssertionError("ring_all_reduce must be built from isend/irecv, not dist.all_reduce")

    expected = []
    for n in lengths:
        x = torch.arange(n, dtype=torch.float64) * 10**rank + rank
        reference = x.clone()
        dist.all_reduce(reference)
        expected.append(reference)
    dist.all_reduce, real = refuse, dist.all_reduce
    try:
        got = [
            ex.ring_all_reduce(torch.arange(n, dtype=torch.float64) * 10**rank + rank)
            for n in lengths
        ]
    finally:
        dist.all_reduce = real
    return [torch.equal(g, e) for g, e in zip(got, expected, strict=True)]


def _run_average(rank, world_size, package):
    torch.manual_seed(0)
    model = nn.Linear(3, 2, dtype=torch.float64)
    model.weight.grad = torch.full_like(model.weight, rank + 1.0)  # rank 0: 1.0, rank 1: 2.0
    model.bias.grad = torch.tensor([rank * 4.0, -2.0], dtype=torch.float64)
    _load(package).average_gradients(model)
    return model.weight.grad.tolist(), model.bias.grad.tolist()


def _batches(rank, k):
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(4, 3, generator=g, dtype=torch.float64),) * 2 for _ in range(k)]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _run_accumulate(rank, world_size, package, k):
    model = _net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = [0]
    real = dist.all_reduce

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    dist.all_reduce = counted
    try:
        for _ in range(2):  # two optimizer steps
            _load(package).accumulate_and_step(
                model, optimizer, _batches(rank, k), nn.functional.mse_loss
            )
    finally:
        dist.all_reduce = real
    # One process, every rank's micro-batches at once (the same data on every rank).
    single = _net()
    single_opt = torch.optim.SGD(single.parameters(), lr=0.1)
    everything = torch.cat([x for r in range(world_size) for x, _ in _batches(r, k)])
    for _ in range(2):
        nn.functional.mse_loss(single(everything), everything).backward()
        single_opt.step()
        single_opt.zero_grad()
    gaps = [
        (a - b).abs().max().item()
        for a, b in zip(model.parameters(), single.parameters(), strict=True)
    ]
    return max(gaps), calls[0]


# -- pure functions ---------------------------------------------------------------------------


@pytest.mark.points(2)
def test_ring_schedule(impl):
    """Catches a chunk index off by one (sending the chunk just received instead of the one
    reduced last, or starting the all-gather with chunk r instead of r + 1): simulated with sets of
    contributing ranks, every copy of every chunk must end up holding every rank's share."""
    ex = impl("ch07_data_parallel")
    assert [ex.ring_schedule(0, 3, s) for s in range(4)] == [(0, 2), (2, 1), (1, 0), (0, 2)]
    for p in (2, 3, 4, 5):
        held = [[{r} for _ in range(p)] for r in range(p)]
        for step in range(2 * (p - 1)):
            sent = [set(held[r][ex.ring_schedule(r, p, step)[0]]) for r in range(p)]
            for r in range(p):
                recv = ex.ring_schedule(r, p, step)[1]
                incoming = sent[(r - 1) % p]
                held[r][recv] = held[r][recv] | incoming if step < p - 1 else incoming
        assert all(chunk == set(range(p)) for copy in held for chunk in copy), f"p = {p}"


@pytest.mark.points(1)
def test_ring_cost(impl):
    """Catches n / B without the 2(p-1)/p factor, and (p-1) instead of 2(p-1) latencies (the
    all-gather sends as many messages as the reduce-scatter)."""
    ex = impl("ch07_data_parallel")
    assert ex.ring_cost(1e6, 2, 1e9, 0.0) == pytest.approx(1e-3, rel=1e-12)
    assert ex.ring_cost(1e6, 4, 1e9, 1e-5) == pytest.approx(1.5e-3 + 6e-5, rel=1e-12)
    assert ex.ring_cost(0.0, 8, 1e9, 2e-6) == pytest.approx(14 * 2e-6, rel=1e-12)


@pytest.mark.points(1)
def test_shard_batch(impl):
    """Catches interleaved shards (batch[rank::p]), overlapping or short shards, and a batch that
    does not divide silently losing its last rows instead of raising ValueError."""
    ex = impl("ch07_data_parallel")
    batch = torch.arange(24).view(6, 4)
    shards = [ex.shard_batch(batch, r, 3) for r in range(3)]
    assert torch.equal(torch.cat(shards), batch)
    assert torch.equal(shards[2], batch[4:6])
    with pytest.raises(ValueError):
        ex.shard_batch(batch, 0, 4)


@pytest.mark.points(2)
def test_make_buckets(impl):
    """Catches bucket boundaries dropping a gradient (the last, partly filled bucket never
    appended), buckets in model order instead of last-first, and a bucket exceeding the cap."""
    ex = impl("ch07_data_parallel")
    assert ex.make_buckets([40, 1200, 80, 120, 160], 960) == [[4, 3, 2], [1], [0]]
    sizes = [4 * (7 * i % 13 + 1) for i in range(20)]
    buckets = ex.make_buckets(sizes, 60)
    assert [i for b in buckets for i in b] == list(reversed(range(20))), "each index once"
    assert all(sum(sizes[i] for i in b) <= 60 for b in buckets)
    assert all(
        sum(sizes[i] for i in a + b[:1]) > 60
        for a, b in zip(buckets[:-1], buckets[1:], strict=True)
    )
    assert ex.make_buckets([8, 8], 1000) == [[1, 0]]


# -- in real processes ------------------------------------------------------------------------


@pytest.mark.points(3)
@pytest.mark.multiprocess
def test_ring_all_reduce(package):
    """Three processes, lengths that 3 does not divide (7), smaller than 3 (2: an empty chunk)
    and divisible (12), against torch's all-reduce, exactly. Catches wrong chunk indices, adding
    during the all-gather (chunks counted twice), chunks cut as copies (the result never written
    back) and calling dist.all_reduce itself."""
    for rank, equal in enumerate(launch(_run_ring, 3, package, [7, 2, 12], echo=False)):
        assert all(equal), f"rank {rank}: lengths 7, 2, 12 equal to dist.all_reduce: {equal}"


@pytest.mark.points(2)
@pytest.mark.multiprocess
def test_average_gradients(package):
    """Two processes with different gradients. Catches forgetting to divide by the world size
    (the sum, 3.0 instead of 1.5) and averaging twice (0.75)."""
    for weight, bias in launch(_run_average, 2, package, echo=False):
        assert weight == [[1.5] * 3] * 2
        assert bias == [2.0, -2.0]


@pytest.mark.points(3)
@pytest.mark.multiprocess
def test_accumulate_and_step(package):
    """Two processes, three micro-batches each, two steps: the weights must equal one process
    training on all 24 rows (atol 1e-12), with at most one all-reduce per parameter per step.
    Catches syncing during accumulation (3x the messages), not dividing the loss by the number of
    micro-batches, and forgetting the average over ranks."""
    n_params = len(list(_net().parameters()))
    for gap, calls in launch(_run_accumulate, 2, package, 3, echo=False):
        assert gap < F64["atol"], f"weights differ from one process by {gap:.3g}"
        assert 1 <= calls <= 2 * n_params, f"{calls} all-reduces in 2 steps of 3 micro-batches"
