"""Start real processes that talk through torch.distributed, from a script, a test or a notebook.

`launch(fn, world_size, *args)` starts `world_size` processes (fresh interpreters, so CUDA and
notebooks are safe: on Linux forked from a server that has imported torch, elsewhere spawned),
joins them into one process group (gloo on CPUs, NCCL when every rank has a GPU), calls
`fn(rank, world_size, *args)` in each and returns the results in rank order. What each rank prints
is collected and printed afterwards, prefixed with its rank, so it shows in a notebook cell. An
exception in any rank is raised here with that rank's traceback. `fn` must be importable (defined
in a module, not in a notebook cell), and a script that calls `launch` needs an
`if __name__ == "__main__":` guard, since each process imports the script again.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import os
import pickle
import socket
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from minillm.errors import MiniLLMError, require_positive


class LaunchError(MiniLLMError):
    """A rank failed or did not finish."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SHARED_MEMORY = Path("/dev/shm")


def remove_allreduce_buffers(port: int, folder: Path = SHARED_MEMORY) -> int:
    """Remove the shared-memory files of DeepSpeed's CPU all-reduce for the job whose master port
    was `port`. Each rank creates one (deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>)
    and none is ever unlinked, on a normal exit or a crash: run after run they would fill the
    machine's memory. Returns how many were removed."""
    removed = 0
    for path in folder.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def default_backend() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "gloo"


def device_for(rank: int):
    """The device this rank computes on: its own GPU under NCCL, else the CPU."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


_server_started_with: tuple[dict[str, str], list[str]] | None = None
# Set anew for every call by a test runner (pytest at each phase of each test), read by nothing
# at import: a change in them alone keeps the server. The ranks see their current values anyway.
_PER_CALL_VARIABLES = frozenset({"PYTEST_CURRENT_TEST"})


def _start_method():
    """A rank starts from a fresh interpreter, never a copy of the caller (its CUDA state, its
    threads, a notebook's objects). On Linux the ranks are forked from one such interpreter that
    has imported torch already (forkserver), kept for the caller's lifetime: importing torch
    costs each spawned rank seconds of CPU, more than many a small run. Elsewhere they are
    spawned. The ranks of one launch share Python's string-hash seed, as forked processes do."""
    global _server_started_with
    if sys.platform != "linux" or "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    from multiprocessing import forkserver

    environment = {k: v for k, v in os.environ.items() if k not in _PER_CALL_VARIABLES}
    preload = ["torch", "torch.distributed"]
    # torch._dynamo too once the caller has it: every torch optimizer's constructor imports it
    # (torch._disable_dynamo), over 2 s of CPU in each rank. A caller without it, such as a
    # grader's worker, mostly launches ranks that build none, and a server importing it costs
    # as much.
    if "torch._dynamo" in sys.modules:
        preload.append("torch._dynamo")
    if _server_started_with not in (None, (environment, preload)):
        # The server, and what it imported, read the environment it started with
        # (torch.distributed reads TORCH_DISTRIBUTED_DEBUG at import): a changed one needs a
        # new server, as a spawned rank would start with it; so does a longer preload list.
        stop = getattr(forkserver._forkserver, "_stop", None)
        if stop is None:
            return mp.get_context("spawn")
        stop()
    _server_started_with = (environment, preload)
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(preload)
    return context


def _worker(rank, world_size, port, backend, fn, args, queue, environment) -> None:
    import torch
    import torch.distributed as dist

    # The caller's environment as it is now, also where the server was started with another.
    os.environ.clear()
    os.environ.update(environment)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)  # N processes share the cores; more threads only contend
    printed = io.StringIO()
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        with contextlib.redirect_stdout(printed):
            result = fn(rank, world_size, *args)
        dist.barrier()
        queue.put(pickle.dumps(("ok", rank, result, printed.getvalue())))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        queue.put(pickle.dumps(("error", rank, traceback.format_exc(), printed.getvalue())))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str | None = None,
    timeout_s: float = 300.0,
    echo: bool = True,
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` processes; return results by rank."""
    require_positive(world_size, "world_size", integer=True)
    backend = backend or default_backend()
    context = _start_method()
    queue = context.SimpleQueue()
    port = free_port()
    processes = [
        context.Process(
            target=_worker,
            args=(rank, world_size, port, backend, fn, args, queue, dict(os.environ)),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    results: dict[int, Any] = {}
    outputs: dict[int, str] = {}
    failure = None
    stop_at_once = True  # until every rank has answered: on an error or Ctrl-C none outlives us
    import time

    try:
        for process in processes:
            process.start()
        deadline = time.monotonic() + timeout_s
        while len(results) < world_size and failure is None:
            if not queue.empty():
                status, rank, payload, printed = pickle.loads(queue.get())
                outputs[rank] = printed
                if status == "ok":
                    results[rank] = payload
                else:
                    failure = f"rank {rank} failed:\n{payload}"
            elif time.monotonic() > deadline:
                failure = (
                    f"ranks {sorted(set(range(world_size)) - set(results))} did not finish "
                    f"within {timeout_s:.0f} s"
                )
            elif any(p.exitcode not in (None, 0) for p in processes) and queue.empty():
                dead = [r for r, p in enumerate(processes) if p.exitcode not in (None, 0)]
                codes = [processes[r].exitcode for r in dead]
                failure = f"rank(s) {dead} died with exit code(s) {codes}"
            else:
                time.sleep(0.01)
        stop_at_once = failure is not None
    finally:
        for process in processes:
            if process.pid is None:  # never started
                continue
            process.join(timeout=0.1 if stop_at_once else 5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)  # gone before its files are removed
        remove_allreduce_buffers(port)
    if echo:
        for rank in sorted(outputs):
            for line in outputs[rank].splitlines():
                print(f"[rank {rank}] {line}")
    sys.stdout.flush()
    if failure:
        raise LaunchError(failure)
    return [results[rank] for rank in range(world_size)]


def in_turn(rank: int, world_size: int, calls: list[tuple[Callable[..., Any], tuple]]) -> list:
    """For `launch`: several runs in the same processes, which then share one start-up (a fresh
    Python importing torch, and DeepSpeed where a run uses it, costs more than a small run).
    Calls `fn(rank, world_size, *args)` for each `(fn, args)` of `calls`, one after another, and
    returns `(result, printed)` for each: its result and what it printed."""
    done = []
    for fn, args in calls:
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            result = fn(rank, world_size, *args)
        done.append((result, printed.getvalue()))
    return done
