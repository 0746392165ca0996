"""The untrusted side of the grader: a zygote that pre-imports the libraries, and the worker it
forks for each graded test, in which the student's module is imported and called.

The zygote (`python -m minillm.grading.worker FD ROOT MODULE...`) imports the course's libraries
before any student code exists, then forks one worker per request that arrives on its control
socket. A worker cuts itself off before it imports student code: its own session, stdin from
/dev/null, stdout and stderr to a file, every other descriptor closed, resource limits, no
capabilities, Landlock (read-only access to what Python needs and to the module under test,
writes only in its own folder), tripwires on the functions the exercise must not call. Then it
imports the module and answers the requests of the trusted test process (pickled: they come from
the trusted side) with `codec`-encoded data, never with pickles.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import signal
import socket
import struct
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from minillm.grading import codec, isolation

MAX_FRAME = 256 << 20


@dataclass
class WorkerConfig:
    """What the trusted side asks of one worker."""

    module: str  # "exercises.ch01_preprocessing"
    folder: str  # the worker's private folder: its cwd, HOME, TMPDIR, output file
    rules: dict[str, int]  # Landlock: tree -> the rights beneath it (reading, mostly)
    memory_mb: int
    off_limits: dict[str, tuple[str, ...]]  # exercise function -> dotted names it must not call
    blocked_packages: tuple[str, ...] = ()  # importing these fails (solutions/ for exercises/)
    extra_tasks: int = 256
    file_mb: int = 64
    env: dict[str, str] = field(default_factory=dict)
    tasks_cgroup: str | None = None  # a pids cgroup to join: the task limit of a uid-0 worker


# -- framing: 8-byte length, then the payload ---------------------------------------------------


def send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack("<Q", len(payload)) + payload)


def recv_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket, limit: int = MAX_FRAME) -> bytes | None:
    """The next frame, or None at end of stream; a frame over `limit` raises CodecError."""
    head = recv_exact(sock, 8)
    if head is None:
        return None
    (size,) = struct.unpack("<Q", head)
    if size > limit:
        raise codec.CodecError(f"a reply of {size:,} bytes (the limit is {limit:,})")
    return recv_exact(sock, size)


# -- pickling helpers shared with the trusted side ---------------------------------------------


def with_grad(tensor, grad):
    """Unpickles a tensor together with its .grad (plain pickling drops gradients)."""
    tensor.grad = grad
    return tensor


_objects: dict[int, tuple[object, str]] = {}  # handle number -> (object, exercise it came from)


def handle_ref(ident: int):
    """Unpickles a handle the trusted side passes back: the object it stands for."""
    return _objects[ident][0]


# -- off-limits calls ---------------------------------------------------------------------------


class OffLimitsCall(BaseException):
    """Raised in the worker when an exercise calls what it must not; the trusted side has been
    told already, so catching this changes nothing."""


class _Tripwires:
    def __init__(self):
        self.active: str | None = None  # the exercise function running now
        self.off_limits: dict[str, tuple[str, ...]] = {}
        self.report = None

    def wrap(self, name: str, original):
        state = self

        def tripwire(*args, **kwargs):
            if name in state.off_limits.get(state.active, ()):
                state.report(state.active, name)
                raise OffLimitsCall(f"{state.active} must not call {name}")
            return original(*args, **kwargs)

        tripwire.__name__ = getattr(original, "__name__", name.rsplit(".", 1)[-1])
        tripwire.__qualname__ = getattr(original, "__qualname__", tripwire.__name__)
        tripwire.__doc__ = getattr(original, "__doc__", None)
        return tripwire


_tripwires = _Tripwires()


def _resolve(dotted: str):
    """(owner, attribute name, raw attribute) for "package.module.name" or "...Class.method"."""
    import inspect

    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:-1]:
            owner = getattr(owner, attr)
        return owner, parts[-1], inspect.getattr_static(owner, parts[-1])
    raise ImportError(f"cannot find {dotted}")


def install_tripwires(names: set[str]) -> None:
    """Replace each named callable, wherever a loaded module binds it, by a tripwire."""
    by_id = {}
    for dotted in sorted(names):
        owner, attr, raw = _resolve(dotted)
        if isinstance(owner, type):
            if isinstance(raw, classmethod):
                setattr(owner, attr, classmethod(_tripwires.wrap(dotted, raw.__func__)))
            elif isinstance(raw, staticmethod):
                setattr(owner, attr, staticmethod(_tripwires.wrap(dotted, raw.__func__)))
            else:
                setattr(owner, attr, _tripwires.wrap(dotted, raw))
        else:
            by_id[id(raw)] = (raw, _tripwires.wrap(dotted, raw))
    if not by_id:
        return
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for key, value in list(namespace.items()):
            hit = by_id.get(id(value))
            if hit is not None and hit[0] is value:
                namespace[key] = hit[1]


class _BlockPackages:
    """A meta-path finder that refuses to import the given top-level packages."""

    def __init__(self, packages: tuple[str, ...]):
        self.packages = packages

    def find_spec(self, name, path=None, target=None):
        if name.split(".", 1)[0] in self.packages:
            raise ImportError(f"the code under test may not import {name}")
        return None


# -- the worker ---------------------------------------------------------------------------------


class _Guarded:
    """The student's module as a helper in tests/exercises sees it: calls count as calls of that
    exercise, with its tripwires armed."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        value = getattr(self._module, name)
        return _armed(value, name) if callable(value) else value


def _armed(fn, origin: str):
    def call(*args, **kwargs):
        saved = _tripwires.active
        _tripwires.active = origin
        try:
            return fn(*args, **kwargs)
        finally:
            _tripwires.active = saved

    return call


def _state(value, depth: int = 0):
    """What the trusted side copies back into its own arguments after a call: tensors (with
    their gradients), arrays, and the parameters of modules, so that a function that changes
    its arguments in place is seen doing so."""
    import numpy as np

    # Where torch was never imported no argument holds a tensor, and importing it takes seconds.
    torch = sys.modules.get("torch")
    if depth > 8:
        return None
    if torch is not None and isinstance(value, torch.Tensor):
        return (value, value.grad)
    if isinstance(value, np.ndarray):
        return value
    if torch is not None and isinstance(value, torch.nn.Module):
        return {name: (p, p.grad) for name, p in value.named_parameters()}
    if isinstance(value, (list, tuple)):
        return [_state(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {k: _state(v, depth + 1) for k, v in value.items() if isinstance(k, str)}
    return None


def _error_reply(exc: BaseException) -> tuple:
    import builtins

    kind = next(
        (k.__name__ for k in type(exc).__mro__ if getattr(builtins, k.__name__, None) is k),
        "Exception",
    )
    try:
        message = str(exc)[:4000]
    except BaseException:  # noqa: BLE001 - a __str__ that raises must not end the worker
        message = "(the exception's message could not be read)"
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__) if "minillm/grading" not in f.filename
    ]
    where = ""
    if frames:
        last = frames[-1]
        where = f"{last.filename}:{last.lineno} in {last.name}\n"
        where += "".join(traceback.format_list(frames[-8:]))[-6000:]
    return ("error", kind, message, where)


class _Worker:
    def __init__(self, sock: socket.socket, config: WorkerConfig):
        self.sock = sock
        self.config = config
        self.module = None
        self.next_id = 1

    def send(self, message: tuple) -> None:
        try:
            payload = codec.encode(message, self.keep)
        except codec.CodecError as exc:
            payload = codec.encode(
                ("error", "TypeError", f"cannot send the value: {exc}", ""), None
            )
        send_frame(self.sock, payload)

    def keep(self, obj) -> codec.Handle:
        ident = self.next_id
        self.next_id += 1
        _objects[ident] = (obj, self.origin)
        return codec.Handle(ident, type(obj).__qualname__)

    def report(self, exercise: str, name: str) -> None:
        send_frame(self.sock, codec.encode(("violation", exercise, name), None))

    def run(self) -> None:
        _tripwires.report = self.report
        self.origin = None
        try:
            self.module = importlib.import_module(self.config.module)
        except BaseException as exc:  # noqa: BLE001 - whatever the import does is reported
            self.send(_error_reply(exc))
            return
        _objects[0] = (self.module, None)
        self.send(("ready",))
        while True:
            frame = recv_frame(self.sock)
            if frame is None:
                return
            self.send(self.answer(pickle.loads(frame)))

    def answer(self, request: tuple) -> tuple:
        op = request[0]
        try:
            if op == "getattr":
                _, ident, name = request
                obj, origin = _objects[ident]
                self.origin = name if ident == 0 else origin
                return ("ok", getattr(obj, name), None)
            if op == "call":
                _, ident, args, kwargs = request
                fn, self.origin = _objects[ident]
                call = _armed(fn, self.origin)
            else:  # "helper": a function of tests/exercises, given the guarded module
                _, helper, args, kwargs = request
                self.origin = None
                guarded = _Guarded(self.module)

                def call(*a, **k):
                    return helper(guarded, *a, **k)

            result = call(*args, **kwargs)
            return ("ok", result, (_state(list(args)), _state(kwargs)))
        except BaseException as exc:  # noqa: BLE001 - the student's exception is the answer
            return _error_reply(exc)


def _confine(config: WorkerConfig) -> None:
    """Everything a worker does to itself before it imports student code."""
    os.setsid()
    for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    os.environ.update(config.env)
    for name in [k for k in os.environ if k.startswith("MINILLM_GRADE")]:
        del os.environ[name]
    folder = config.folder
    os.environ.update(HOME=folder, TMPDIR=folder, MPLCONFIGDIR=folder, PYTHONDONTWRITEBYTECODE="1")
    os.chdir(folder)
    root = os.getuid() == 0
    has_landlock = isolation.landlock_abi() > 0
    uid = os.getuid()
    if root and not has_landlock:
        uid = 65534
        os.chown(folder, uid, uid)
    memory = isolation.address_space_bytes() + config.memory_mb * (1 << 20)
    isolation.limit_resources(memory, config.extra_tasks, config.file_mb << 20, uid)
    if root:
        if has_landlock:
            # Linux does not apply RLIMIT_NPROC to uid 0: its cgroup limits its tasks instead.
            if config.tasks_cgroup:
                isolation.join_tasks_cgroup(Path(config.tasks_cgroup), config.extra_tasks)
            isolation.drop_capabilities()
        else:
            isolation.become_nobody(uid, uid)
    write = isolation.ALL_RIGHTS
    rules = dict(config.rules)
    rules.update({folder: write, "/dev/shm": write, "/dev/null": isolation.WRITE_FILE})
    isolation.restrict_filesystem(rules)


def _start_worker(sock: socket.socket, config: WorkerConfig) -> None:
    out = os.open(
        os.path.join(config.folder, "output.txt"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
    )
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    keep = sock.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, 1 << 16)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)
    _confine(config)
    names = {name for group in config.off_limits.values() for name in group}
    install_tripwires(names)
    _tripwires.off_limits = config.off_limits
    if config.blocked_packages:
        sys.meta_path.insert(0, _BlockPackages(config.blocked_packages))
    _Worker(sock, config).run()


def zygote(control_fd: int, root: str, preimports: list[str]) -> None:
    """Import the libraries, then fork a worker for every request on the control socket."""
    isolation.die_with_parent()
    isolation.become_subreaper()  # a worker's orphans stay below the zygote, to be killed
    sys.path.insert(0, root)
    for name in preimports:  # "pkg.module" or "pkg.module.Class.method": import the module
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                importlib.import_module(".".join(parts[:cut]))
                break
            except Exception:  # noqa: BLE001 - not a module (or a library that fails to import)
                continue
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # workers and orphans: reaped by the kernel
    control = socket.socket(fileno=control_fd)
    control.sendall(b"ready")
    while True:
        message, fds, _, _ = socket.recv_fds(control, 1 << 20, 1)
        if not message or not fds:
            return
        config = pickle.loads(message)
        pid = os.fork()
        if pid == 0:
            control.close()
            code = 0
            try:
                with socket.socket(fileno=fds[0]) as sock:
                    _start_worker(sock, config)
            except BaseException:  # noqa: BLE001 - a worker never returns into the zygote loop
                code = 70
            os._exit(code)
        os.close(fds[0])
        control.sendall(struct.pack("<q", pid))


if __name__ == "__main__":
    zygote(int(sys.argv[1]), sys.argv[2], sys.argv[3:])
