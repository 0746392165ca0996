"""Graded tests for chapter 07 (data parallelism): `minillm grade ch07`.

The functions that communicate run in real processes: `launch` starts them inside the sandboxed
worker (tests/exercises/in_worker.py), and this process checks what they return. References: a
simulation of which ranks' contributions each chunk holds, the sum of the ranks' inputs, hand
values, and one process on the global batch. Sums of small integers in float64 are exact, so
those comparisons are exact; trained weights are compared in float64 with atol 1e-12.
"""

import pytest
import torch
from torch import nn

from minillm.parallel.ddp import make_buckets
from tests.exercises import in_worker

# What each exercise must not call: the library function it asks you to write (a call fails
# the test). A guard against the obvious shortcut; the stubs' docstrings name the same.
OFF_LIMITS = {
    "ring_schedule": ("minillm.parallel.collectives.ring_schedule",),
    "shard_batch": ("minillm.parallel.ddp.shard_batch",),
    "make_buckets": ("minillm.parallel.ddp.make_buckets",),
    # overlap_gradient_buckets runs in launched processes, where in_worker refuses the DDP classes.
}

F64 = {"atol": 1e-12, "rtol": 0.0}


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
def test_ring_all_reduce(impl):
    """Three processes, lengths that 3 does not divide (7), smaller than 3 (2: an empty chunk)
    and divisible (12), against the sum of the three ranks' inputs, exactly. Catches wrong chunk
    indices, adding during the all-gather (chunks counted twice), chunks cut as copies (the
    result never written back) and calling dist.all_reduce itself."""
    ex = impl("ch07_data_parallel")
    lengths = [7, 2, 12]
    ranks = ex.run_helper(in_worker.ring_all_reduce_on_ranks, 3, lengths)
    assert len(ranks) == 3
    for rank, (results, all_reduce_calls) in enumerate(ranks):
        assert all_reduce_calls == 0, (
            "ring_all_reduce must be built from isend/irecv, not dist.all_reduce or "
            "minillm.parallel.collectives.ring_all_reduce"
        )
        for n, got in zip(lengths, results, strict=True):
            expected = sum(in_worker.ring_input(r, n) for r in range(3))
            assert isinstance(got, torch.Tensor) and torch.equal(got, expected), (
                f"rank {rank}, length {n}: {got} instead of the sum {expected}"
            )


@pytest.mark.points(2)
@pytest.mark.multiprocess
def test_average_gradients(impl):
    """Two processes with different gradients. Catches forgetting to divide by the world size
    (the sum, 3.0 instead of 1.5) and averaging twice (0.75)."""
    ex = impl("ch07_data_parallel")
    for weight, bias in ex.run_helper(in_worker.average_gradients_on_ranks, 2):
        assert weight.tolist() == [[1.5] * 3] * 2
        assert bias.tolist() == [2.0, -2.0]


@pytest.mark.points(3)
@pytest.mark.multiprocess
def test_accumulate_and_step(impl):
    """Two processes, three micro-batches each, two steps: the weights must equal one process
    training on all 24 rows (atol 1e-12), with at most one all-reduce per parameter per step.
    Catches syncing during accumulation (3x the messages), not dividing the loss by the number of
    micro-batches, and forgetting the average over ranks."""
    ex = impl("ch07_data_parallel")
    world, k, steps = 2, 3, 2
    # One process, every rank's micro-batches at once (the same data on every rank).
    single = in_worker.small_net()
    single_opt = torch.optim.SGD(single.parameters(), lr=0.1)
    everything = torch.cat([x for r in range(world) for x, _ in in_worker.batches(r, k)])
    for _ in range(steps):
        nn.functional.mse_loss(single(everything), everything).backward()
        single_opt.step()
        single_opt.zero_grad()
    n_params = len(list(single.parameters()))
    for params, calls in ex.run_helper(in_worker.accumulate_and_step_on_ranks, world, k, steps):
        assert len(params) == n_params
        gap = max(
            (a - b.detach()).abs().max().item()
            for a, b in zip(params, single.parameters(), strict=True)
        )
        assert gap < F64["atol"], f"weights differ from one process by {gap:.3g}"
        assert 1 <= calls <= steps * n_params, f"{calls} all-reduces in 2 steps of 3 micro-batches"


@pytest.mark.points(3)
@pytest.mark.multiprocess
@pytest.mark.timeout(120)  # 2 processes start and import torch: slow on a busy machine
def test_overlap_gradient_buckets(impl):
    """Two processes, two steps: after backward and wait() every gradient must be the average of
    the two ranks' (one process on both ranks' data, atol 1e-12), with one asynchronous
    all-reduce per bucket, all started during backward. Catches all-reducing after backward
    instead of from the hooks (no overlap), one all-reduce per parameter instead of per bucket,
    waiting inside the hook (async_op missing), forgetting to divide by the world size, and
    state not reset between steps (the second step's buckets never start)."""
    ex = impl("ch07_data_parallel")
    world, steps = 2, 2
    single = in_worker.small_net()
    optimizer = torch.optim.SGD(single.parameters(), lr=0.1)
    expected = []
    for pairs in zip(*(in_worker.batches(r, steps) for r in range(world)), strict=True):
        sum(nn.functional.mse_loss(single(x), y) for x, y in pairs).div(world).backward()
        expected.append([p.grad.clone() for p in single.parameters()])
        optimizer.step()
        optimizer.zero_grad()
    n_buckets = len(make_buckets(list(single.parameters()), in_worker.OVERLAP_CAP_BYTES))
    ranks = ex.run_helper(in_worker.overlap_gradient_buckets_on_ranks, world, steps)
    assert len(ranks) == world
    for rank, (grads, calls, refused) in enumerate(ranks):
        assert refused == 0, "build the buckets and hooks yourself, not with a DDP class"
        assert len(grads) == steps
        for step, (got, want) in enumerate(zip(grads, expected, strict=True)):
            gap = max((a - b).abs().max().item() for a, b in zip(got, want, strict=True))
            ratio = (got[0].flatten() @ want[0].flatten() / want[0].flatten().norm() ** 2).item()
            assert gap < F64["atol"], (
                f"rank {rank}, step {step + 1}: gradients off the two ranks' average by {gap:.3g} "
                f"({ratio:.2f} times it): all-reduce sums, so divide by the world size once, and "
                "copy the averages back into .grad in wait()"
            )
        expected_calls = [("backward", True)] * n_buckets * steps
        assert calls == expected_calls, (
            f"rank {rank}: all-reduces (phase, async_op) {calls} instead of {expected_calls}: one "
            f"asynchronous all-reduce per bucket ({n_buckets} buckets of at most "
            f"{in_worker.OVERLAP_CAP_BYTES} bytes), started by the hooks during backward, none "
            "by wait()"
        )
