"""Point-to-point messages, the collectives and a ring all-reduce, run in real processes (gloo)."""

import pytest

from minillm.errors import InputError
from minillm.parallel import collectives
from minillm.parallel.collectives import fit_ring_cost, ring_cost, ring_schedule
from minillm.parallel.launch import launch


def _simulate_ring(world: int) -> list[list[set[int]]]:
    """Which ranks' contributions each rank's copy of each chunk holds after the whole schedule,
    tracked as sets: an independent model of what the messages carry."""
    held = [[{r} for _ in range(world)] for r in range(world)]
    for step in range(2 * (world - 1)):
        sent = [set(held[r][ring_schedule(r, world, step)[0]]) for r in range(world)]
        for r in range(world):
            recv = ring_schedule(r, world, step)[1]
            assert ring_schedule((r - 1) % world, world, step)[0] == recv, "left sends what I get"
            incoming = sent[(r - 1) % world]
            held[r][recv] = held[r][recv] | incoming if step < world - 1 else incoming
    return held


@pytest.mark.parametrize("world", [2, 3, 4, 7])
def test_ring_schedule_leaves_every_chunk_summed_over_all_ranks_everywhere(world):
    everyone = set(range(world))
    assert all(chunk == everyone for rank in _simulate_ring(world) for chunk in rank)


def test_ring_schedule_refuses_steps_and_ranks_outside_the_ring():
    assert ring_schedule(0, 4, 0) == (0, 3)
    with pytest.raises(InputError, match="steps 0 to 5"):
        ring_schedule(0, 4, 6)
    with pytest.raises(InputError, match="outside a ring"):
        ring_schedule(4, 4, 0)


def test_ring_cost_by_hand_and_fit_recovers_bandwidth_and_latency():
    # p = 4, 1 MB, 1 GB/s, 10 us: 2*3/4 * 1e6 / 1e9 + 2*3 * 1e-5 = 1.5 ms + 0.06 ms
    assert ring_cost(1e6, 4, 1e9, 1e-5) == pytest.approx(1.56e-3)
    sizes, worlds = [1e3, 1e5, 1e6, 1e3, 1e5, 1e6], [2, 2, 2, 4, 4, 4]
    times = [ring_cost(n, p, 2e8, 3e-5) for n, p in zip(sizes, worlds, strict=True)]
    bandwidth, latency = fit_ring_cost(sizes, worlds, times)
    assert bandwidth == pytest.approx(2e8) and latency == pytest.approx(3e-5)
    with pytest.raises(InputError, match="do not grow"):
        fit_ring_cost([1e3, 1e6], [2, 2], [1e-3, 1e-6])


def _three_ranks(rank, world_size):
    return (
        collectives.show_point_to_point(rank, world_size),
        collectives.show_collectives(rank, world_size),
        collectives.check_ring(rank, world_size, [0, 1, 2, 5, 1000, 1001], verbose_length=5),
    )


def _two_ranks(rank, world_size):
    ring = collectives.check_ring(rank, world_size, [1, 7, 4096])
    return ring, collectives.time_collectives(rank, world_size, [16, 4096], repeats=2)


@pytest.mark.multiprocess
def test_point_to_point_collectives_and_ring_all_reduce_on_three_processes(capsys):
    results = launch(_three_ranks, 3)
    for rank, (p2p, coll, ring_error) in enumerate(results):
        assert p2p == [0.0, 1.0, 2.0, 3.0]
        assert coll["broadcast from rank 0"] == [0.0]
        assert coll["all_reduce"] == [6.0, 6.0, 6.0]  # 1 + 2 + 3
        assert coll["reduce_scatter"] == [3.0 * rank + 30]  # sum over r' of (rank + 10 r')
        assert coll["all_gather"] == [0.0, 1.0, 2.0]
        assert ring_error < 1e-5  # gloo adds in another order: float32 rounding only
    # 5 elements in 3 chunks (2, 2, 1); rank r starts from [0..4] * 10^r, all end at the sum
    assert "[rank 2] step 3 (all-gather): sent chunk 2, got chunk 1 -> [0.0, 111.0" in (
        capsys.readouterr().out
    )


@pytest.mark.multiprocess
def test_ring_all_reduce_on_two_processes_matches_and_is_timed():
    for ring_error, times in launch(_two_ranks, 2, echo=False):
        assert ring_error == 0.0  # two addends: the same sum in either order
        for name in ("send_recv", "all_reduce", "ring_all_reduce"):
            assert len(times[name]) == 2 and all(t > 0 for t in times[name])
