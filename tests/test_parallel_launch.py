"""The process layout and the launcher: real processes, real torch.distributed collectives."""

import os
import sys

import pytest
import torch
import torch.distributed as dist

from minillm.errors import InputError
from minillm.parallel.launch import (
    SHARED_MEMORY,
    LaunchError,
    in_turn,
    launch,
    remove_allreduce_buffers,
)
from minillm.parallel.layout import Coords, Layout


def test_bloom_176b_layout():
    bloom = Layout(tensor=4, pipeline=12, data=8)
    assert bloom.world_size == 384
    assert bloom.group_of(0, "tensor") == [0, 1, 2, 3]  # neighbours: one node's GPUs
    assert bloom.group_of(0, "data") == [0, 4, 8, 12, 16, 20, 24, 28]
    assert bloom.group_of(0, "pipeline") == [32 * s for s in range(12)]
    assert bloom.coords(383) == Coords(pipeline=11, data=7, tensor=3)


@pytest.mark.parametrize("layout", [Layout(2, 2, 2), Layout(4, 1, 3), Layout(1, 3, 2)])
def test_groups_partition_the_ranks_and_coords_round_trip(layout):
    for kind, size in (
        ("tensor", layout.tensor),
        ("pipeline", layout.pipeline),
        ("data", layout.data),
    ):
        groups = layout.groups(kind)
        assert sorted(r for g in groups for r in g) == list(range(layout.world_size))
        assert all(len(g) == size for g in groups)
    for rank in range(layout.world_size):
        assert layout.rank(layout.coords(rank)) == rank


def test_layouts_that_do_not_divide_are_refused_before_launch():
    with pytest.raises(InputError, match="not divisible by tensor"):
        Layout.for_world(6, tensor=4)
    layout = Layout.for_world(4, tensor=2, pipeline=2)
    with pytest.raises(InputError, match="heads cannot be split"):
        layout.check_model(n_head=3, n_layer=4)
    with pytest.raises(InputError, match="fewer than the 2 pipeline stages"):
        layout.check_model(n_head=4, n_layer=1)
    with pytest.raises(InputError, match="micro-batches"):
        layout.check_model(n_head=4, n_layer=4, batch_size=6, micro_batches=4)
    layout.check_model(n_head=4, n_layer=4, batch_size=8, micro_batches=4)


def _all_reduce_rank(rank, world_size):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    print(f"sum is {t.item():g}")
    return t.item()


def _fail_on_rank_1(rank, world_size):
    if rank == 1:
        raise ValueError("rank one is broken")
    return rank


def _process_id(rank, world_size, tag):
    print(f"{tag} from rank {rank}")
    return os.getpid()


def _what_the_rank_sees(rank, world_size, names):
    return tuple(os.environ.get(n) for n in names), os.getcwd(), os.getppid(), os.getpid()


def _leave_an_allreduce_buffer(rank, world_size):
    """What DeepSpeed's CPU all-reduce does in each rank: a shared-memory file named after the
    job's address and port, never removed."""
    name = (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
        f"{os.environ['MASTER_PORT']}_{rank}"
    )
    (SHARED_MEMORY / name).write_bytes(b"\0" * 64)
    return name


def _tensor_group_sums(rank, world_size):
    layout = Layout.for_world(world_size, tensor=2)
    groups = layout.new_groups(rank)
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=groups["tensor"])
    return t.item()


@pytest.mark.multiprocess
def test_launch_runs_real_processes_and_collects_results(capsys):
    assert launch(_all_reduce_rank, 2) == [3.0, 3.0]
    assert "[rank 1] sum is 3" in capsys.readouterr().out


@pytest.mark.multiprocess
def test_each_launch_starts_fresh_ranks_with_the_callers_environment_and_folder(
    tmp_path, monkeypatch
):
    """On Linux the ranks are forked from a server that has imported torch once, not spawned:
    they must still see the caller's environment and working folder as they are at each launch,
    as spawned processes would, and be new processes every time. What the server imported read
    the environment it started with, so a changed environment gets a new server."""
    kept, dropped = "MINILLM_TEST_LAUNCH_KEPT", "MINILLM_TEST_LAUNCH_DROPPED"
    monkeypatch.delenv(kept, raising=False)
    monkeypatch.setenv(dropped, "set for the first launch only")
    first = launch(_what_the_rank_sees, 2, (kept, dropped), echo=False)
    monkeypatch.setenv(kept, "set after the first launch")
    monkeypatch.delenv(dropped)
    monkeypatch.chdir(tmp_path)
    second = launch(_what_the_rank_sees, 2, (kept, dropped), echo=False)
    third = launch(_what_the_rank_sees, 2, (kept, dropped), echo=False)
    # pytest sets PYTEST_CURRENT_TEST anew for every test: it alone keeps the server.
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "the next test (call)")
    fourth = launch(_what_the_rank_sees, 2, (kept, "PYTEST_CURRENT_TEST"), echo=False)
    assert [r[0] for r in first] == [(None, "set for the first launch only")] * 2
    assert [r[:2] for r in second + third] == [
        (("set after the first launch", None), str(tmp_path))
    ] * 4
    assert [r[0] for r in fourth] == [("set after the first launch", "the next test (call)")] * 2
    pids = {r[3] for r in first + second + third + fourth}
    assert len(pids) == 8 and os.getpid() not in pids
    if sys.platform == "linux":
        servers = [{r[2] for r in run} for run in (first, second, third, fourth)]
        assert all(len(s) == 1 for s in servers) and os.getpid() not in servers[0]
        assert servers[1] != servers[0], "the environment changed: a new server"
        assert servers[2] == servers[1], "the same environment: the same server"
        assert servers[3] == servers[2], "only the test runner's variable changed"


def _has_dynamo(rank, world_size):
    return "torch._dynamo" in sys.modules


@pytest.mark.multiprocess
@pytest.mark.skipif(sys.platform != "linux", reason="ranks are spawned, not forked, elsewhere")
def test_ranks_of_a_caller_with_torch_dynamo_have_it_imported_already():
    """Every torch optimizer's constructor imports torch._dynamo, seconds of CPU: ranks of a
    caller that has it are forked from a server that imported it once."""
    import torch._dynamo  # noqa: F401 - what the caller has, the ranks get

    assert launch(_has_dynamo, 2, echo=False) == [True, True]


def _note_pid_then_wait(rank, world_size, folder):
    import time

    (folder / f"rank{rank}.pid").write_text(str(os.getpid()))
    time.sleep(120)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.multiprocess
def test_ctrl_c_during_a_launch_leaves_no_rank_running(tmp_path):
    """A KeyboardInterrupt (Ctrl-C in a notebook, a test's timeout) while the ranks run stops
    them before it reaches the caller."""
    import _thread
    import signal
    import threading
    import time

    def interrupt_once_both_started():
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("rank*.pid"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        _thread.interrupt_main()  # a KeyboardInterrupt in the main thread, as Ctrl-C raises

    # Python's own Ctrl-C handler for this test: a runner's worker may ignore SIGINT, and then
    # interrupt_main does nothing.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt_once_both_started, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            launch(_note_pid_then_wait, 2, tmp_path, echo=False, timeout_s=100)
    finally:
        signal.signal(signal.SIGINT, previous)
    pids = [int(p.read_text()) for p in sorted(tmp_path.glob("rank*.pid"))]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids), "a rank outlived the interrupted launch"


@pytest.mark.multiprocess
def test_in_turn_runs_the_calls_one_after_another_in_the_same_processes():
    calls = [(_process_id, ("first",)), (_all_reduce_rank, ()), (_process_id, ("last",))]
    ranks = launch(in_turn, 2, calls, echo=False)
    for rank, ((pid, first), (total, summed), (same_pid, last)) in enumerate(ranks):
        assert (first, summed, last) == (
            f"first from rank {rank}\n",
            "sum is 3\n",
            f"last from rank {rank}\n",
        )
        assert total == 3.0 and same_pid == pid != os.getpid()
    assert ranks[0][0][0] != ranks[1][0][0]  # one process per rank


def test_only_the_jobs_own_allreduce_buffers_are_removed(tmp_path):
    uid = os.getuid()
    names = {
        "mine": [f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_29512_{r}" for r in (0, 1)],
        "another port": [f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_295120_0"],
        "a port that ends like mine": [f"deepspeed_allreduce_buffer_{uid}_127.0.0.1_129512_0"],
        "another user": [f"deepspeed_allreduce_buffer_{uid + 1}_127.0.0.1_29512_0"],
        "not DeepSpeed's": ["sem.mp-29512"],
    }
    for group in names.values():
        for name in group:
            (tmp_path / name).write_bytes(b"x")
    assert remove_allreduce_buffers(29512, tmp_path) == 2
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {name for key, group in names.items() if key != "mine" for name in group}


@pytest.mark.multiprocess
@pytest.mark.skipif(not SHARED_MEMORY.is_dir(), reason="no /dev/shm on this system (not Linux)")
def test_launch_removes_the_allreduce_buffers_its_ranks_leave():
    names = launch(_leave_an_allreduce_buffer, 2, echo=False)
    assert len(set(names)) == 2
    assert not [name for name in names if (SHARED_MEMORY / name).exists()]


@pytest.mark.multiprocess
def test_a_failing_rank_raises_with_its_traceback():
    with pytest.raises(LaunchError, match=r"rank 1 failed(.|\n)*rank one is broken"):
        launch(_fail_on_rank_1, 2, echo=False)


@pytest.mark.multiprocess
def test_groups_from_the_layout_reduce_within_their_ranks():
    assert launch(_tensor_group_sums, 4, echo=False) == [1.0, 1.0, 5.0, 5.0]
