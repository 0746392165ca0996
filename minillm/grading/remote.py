"""The trusted side of the grader's sandbox: the graded tests run here, in a process that never
imports student code, and reach the student's module through `RemoteModule` proxies.

`Sandbox` starts the zygote (`minillm.grading.worker`) and forks a fresh worker from it for each
test. A call on a proxy sends the arguments to the worker (pickled: trusted data going to the
untrusted side) and gets back only what `codec.decode` builds: plain data, arrays and tensors,
or handles (`RemoteObject`) for objects that stay in the worker, such as a class the student
wrote and its instances. Tensors and arrays passed in are updated in place from the worker's
copies after each call, so a function that changes its arguments is seen doing so. Each test
has a deadline; at the deadline, and at the end of every test, the worker and every process
below it are killed with SIGKILL.
"""

from __future__ import annotations

import builtins
import os
import pickle
import shutil
import site
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from minillm.grading import codec, isolation, worker

DEFAULT_MEMORY_MB = 4096
OUTPUT_KEPT = 8000  # characters of a worker's output shown with a failing test
ZYGOTE_START_S = 300.0
TASK_POLL_S = 0.05  # how often the tasks of a worker no cgroup holds are counted

# Libraries a worker gets already imported (forked from the zygote), so that no test pays for
# importing them: what the exercises import. A graded test file may name its own list
# (WORKER_IMPORTS, tests/exercises/conftest.py); the libraries whose functions are off limits
# are always added.
PREIMPORTS = [
    "numpy",
    "scipy.stats",
    "scipy.ndimage",
    "pandas",
    "torch",
    "torch.nn.functional",
    "torch.distributed",
    "minillm.model",
    "minillm.parallel.launch",
]


# What a Python process reads in /etc: the dynamic linker's cache, users and groups, names
# (gloo resolves localhost), time zone, TLS certificates, MIME types.
_ETC = (
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "passwd",
    "group",
    "nsswitch.conf",
    "hosts",
    "host.conf",
    "gai.conf",
    "resolv.conf",
    "localtime",
    "timezone",
    "ssl",
    "mime.types",
    "os-release",
    "protocols",
    "services",
)


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the code under test)."""


class CodeUnderTestError(Exception):
    """The code under test did something a test cannot go on after: it ran past its time limit,
    its process died, or it sent something that is not an answer."""


def _outcome_failed():
    from _pytest.outcomes import Failed

    return Failed


def _read_paths(root: Path, package: str) -> dict[str, int]:
    """Landlock rules: what a worker may read. The course folder itself only as a directory
    listing (so solutions/ and .git stay unreadable), the package under test, tests/ (the
    helpers that run in the worker), the minillm package, Python and the system's libraries."""
    import minillm

    read = isolation.READ
    rules = {str(root): isolation.READ_DIR}
    trees = [
        root / package,
        root / "tests",
        Path(minillm.__file__).parent,
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        *site.getsitepackages(),
        *("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/opt", "/proc", "/sys"),
        # Not all of /etc and /dev: a uid-0 worker could read /etc/shadow or a raw disk there.
        *(f"/etc/{name}" for name in _ETC),
        *(f"/dev/{name}" for name in ("null", "zero", "full", "random", "urandom")),
    ]
    for tree in trees:
        rules.setdefault(str(tree), read)
        rules[str(tree)] |= read
    return rules


class _ToWorker(pickle.Pickler):
    """Pickles arguments with their gradients, which plain pickling of tensors drops."""

    def reducer_override(self, obj):
        torch = sys.modules.get("torch")  # no tensor exists before torch is imported
        tensor = torch is not None and isinstance(obj, torch.Tensor)
        if tensor and obj.is_leaf and obj.grad is not None:
            copy = obj.detach()
            if isinstance(obj, torch.nn.Parameter):
                copy = torch.nn.Parameter(copy, requires_grad=obj.requires_grad)
            else:
                copy.requires_grad_(obj.requires_grad)
            return worker.with_grad, (copy, obj.grad)
        return NotImplemented


def _to_worker(message) -> bytes:
    import io

    buffer = io.BytesIO()
    _ToWorker(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(message)
    return buffer.getvalue()


def _copy_back(original, state, depth: int = 0) -> None:
    """Make `original` (an argument of a call) look like the worker's copy after the call."""
    # No tensor or array exists before its library is imported: import neither for plain data.
    torch, np = sys.modules.get("torch"), sys.modules.get("numpy")
    if state is None or depth > 8:
        return
    if torch is not None and isinstance(original, torch.Tensor):
        if not (isinstance(state, tuple) and len(state) == 2):
            return
        data, grad = state
        if isinstance(data, torch.Tensor) and data.shape == original.shape:
            if data.dtype == original.dtype and not torch.equal(data, original.detach()):
                with torch.no_grad():
                    original.copy_(data)
        if original.is_leaf:
            if grad is None:
                original.grad = None
            elif isinstance(grad, torch.Tensor) and grad.shape == original.shape:
                original.grad = grad.to(original.dtype)
    elif np is not None and isinstance(original, np.ndarray):
        if (
            isinstance(state, np.ndarray)
            and state.shape == original.shape
            and state.dtype == original.dtype
            and original.flags.writeable
            and not np.array_equal(state, original, equal_nan=state.dtype.kind in "fc")
        ):
            np.copyto(original, state)
    elif torch is not None and isinstance(original, torch.nn.Module):
        if isinstance(state, dict):
            for name, parameter in original.named_parameters():
                _copy_back(parameter, state.get(name), depth + 1)
    elif isinstance(original, (list, tuple)):
        if isinstance(state, list):
            for item, item_state in zip(original, state, strict=False):
                _copy_back(item, item_state, depth + 1)
    elif isinstance(original, dict) and isinstance(state, dict):
        for key, item in original.items():
            _copy_back(item, state.get(key), depth + 1)


def _exception(kind: str, message: str, where: str, root: Path) -> BaseException:
    """The exception the code under test raised, as a builtin exception of the same kind (so
    `pytest.raises(ValueError)` still works); never one that stops the test run. `where` is the
    raising line, then the traceback (paths shown relative to the course folder)."""
    cls = getattr(builtins, kind, None)
    ordinary = isinstance(cls, type) and issubclass(cls, Exception)
    if not ordinary or cls in (StopIteration, StopAsyncIteration):
        cls, message = RuntimeError, f"{kind}: {message}"
    where = where.replace(f"{root}{os.sep}", "")
    line, _, trace = where.partition("\n")
    text = message.strip() or (
        "not written yet" if kind == "NotImplementedError" else "(no message)"
    )
    if line:
        text += f"\n(raised in the code under test at {line})"
    if trace:
        text += f"\n\ntraceback in the code under test:\n{trace}"
    try:
        return cls(text)
    except Exception:  # noqa: BLE001 - a builtin exception with unusual arguments
        return RuntimeError(f"{kind}: {text}")


class RemoteObject:
    """An object that lives in the worker: attribute access and calls go there."""

    __slots__ = ("_session", "_ident", "_type_name")

    def __init__(self, session: WorkerSession, ident: int, type_name: str):
        object.__setattr__(self, "_session", session)
        object.__setattr__(self, "_ident", ident)
        object.__setattr__(self, "_type_name", type_name)

    def __getattr__(self, name: str):
        __tracebackhide__ = True  # the student's traceback is the one to read
        if name.startswith("__"):
            raise AttributeError(name)
        return self._session.request(("getattr", self._ident, name))

    def __setattr__(self, name, value):
        raise AttributeError("objects of the code under test are read-only from the tests")

    def __call__(self, *args, **kwargs):
        __tracebackhide__ = True
        return self._session.request(("call", self._ident, args, kwargs), args, kwargs)

    def __reduce__(self):
        return worker.handle_ref, (self._ident,)

    def __bool__(self):
        raise TypeError(
            f"a {self._type_name} object of the code under test has no truth value here: "
            "return plain data (numbers, strings, lists, dicts, arrays or tensors)"
        )

    def __repr__(self) -> str:
        return f"<{self._type_name} object of the code under test>"


class RemoteModule(RemoteObject):
    """The student's module, imported in a worker."""

    __slots__ = ()

    def run_helper(self, helper, *args, **kwargs):
        """`helper(module, *args, **kwargs)` inside the worker, for checks that need the
        objects there (autograd, processes started with `launch`): `helper` is a function of
        a module in tests/exercises and must return plain data, which the trusted test then
        checks against its own reference."""
        __tracebackhide__ = True
        return self._session.request(("helper", helper, args, kwargs))


class WorkerSession:
    """One worker: the test's connection to its copy of the student's module."""

    def __init__(self, sandbox: Sandbox, module: str, pid: int, sock, folder: Path, limit_s):
        self.sandbox = sandbox
        self.module_name = module
        self.pid = pid
        self.sock = sock
        self.folder = folder
        self.limit_s = limit_s
        self.deadline = time.monotonic() + limit_s
        self.violations: list[str] = []
        self.ended: str | None = None
        self.task_limit_passed: int | None = None  # set by the sandbox's _TaskWatch

    def _ended_text(self, otherwise: str) -> str:
        if self.task_limit_passed is None:
            return otherwise
        return (
            f"the code under test started more than {self.task_limit_passed} processes or "
            "threads (a fork bomb?); all of them were stopped"
        )

    def _receive(self):
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self.sock.settimeout(remaining)
            frame = worker.recv_frame(self.sock)
            if frame is None:
                raise EOFError
            reply = codec.decode(frame)
            if not isinstance(reply, tuple) or not reply or not isinstance(reply[0], str):
                raise codec.CodecError("not a reply")
            if reply[0] == "violation" and len(reply) == 3:
                self.violations.append(f"{reply[1]} must not call {reply[2]}")
                continue
            return reply

    def _end(self, why: str) -> CodeUnderTestError:
        self.ended = why
        self.close()
        return CodeUnderTestError(why)

    def request(self, message: tuple, args=(), kwargs=None):
        """Send one request; return its answer or raise what the code under test raised."""
        __tracebackhide__ = True
        if self.ended:
            raise CodeUnderTestError(self.ended)
        try:
            worker.send_frame(self.sock, _to_worker(message))
            reply = self._receive()
        except TimeoutError:
            raise self._end(
                self._ended_text(
                    f"time limit: the code under test was still running after {self.limit_s:g} "
                    "s (an endless loop, or far too slow); it was stopped"
                )
            ) from None
        except (EOFError, ConnectionError, BrokenPipeError):
            raise self._end(
                self._ended_text(
                    "the process running the code under test ended during this call: did it "
                    "call exit(), crash the interpreter, or run out of memory "
                    f"({self.sandbox.memory_mb} MiB)?"
                )
            ) from None
        except (codec.CodecError, struct.error, ValueError) as exc:
            raise self._end(
                f"the code under test sent something that is not an answer ({exc})"
            ) from None
        if self.violations:
            raise _outcome_failed()(self.violation_text(), pytrace=False)
        return self._answer(reply, args, kwargs or {})

    def violation_text(self) -> str:
        unique = list(dict.fromkeys(self.violations))
        return (
            "; ".join(unique) + ": that is the function this exercise asks you to write "
            "(the stub's docstring lists what is off limits)"
        )

    def _answer(self, reply: tuple, args, kwargs):
        __tracebackhide__ = True
        if reply[0] == "ok" and len(reply) == 3:
            _, value, states = reply
            if isinstance(states, tuple) and len(states) == 2:
                _copy_back(list(args), states[0])
                _copy_back(kwargs, states[1])
            return self._wrap(value)
        if reply[0] == "error" and len(reply) == 4 and all(isinstance(x, str) for x in reply[1:]):
            raise _exception(*reply[1:], self.sandbox.root)
        raise self._end("the code under test sent something that is not an answer")

    def _wrap(self, value):
        if isinstance(value, codec.Handle):
            return RemoteObject(self, value.ident, value.type_name)
        if isinstance(value, list):
            return [self._wrap(v) for v in value]
        if isinstance(value, tuple):
            return tuple(self._wrap(v) for v in value)
        if isinstance(value, dict):
            return {k: self._wrap(v) for k, v in value.items()}
        return value

    def start(self) -> RemoteModule:
        """Wait for the worker to import the module: the proxy, or the import's exception."""
        __tracebackhide__ = True
        try:
            reply = self._receive()
        except TimeoutError:
            raise self._end(
                self._ended_text(
                    f"time limit: importing {self.module_name} took more than {self.limit_s:g} s"
                )
            ) from None
        except (EOFError, ConnectionError):
            raise self._end(
                self._ended_text(
                    f"the process importing {self.module_name} ended (exit() or a crash at import)"
                )
            ) from None
        except (codec.CodecError, struct.error, ValueError) as exc:
            raise self._end(f"the worker sent something that is not an answer ({exc})") from None
        if reply == ("ready",):
            return RemoteModule(self, 0, self.module_name)
        if reply[0] == "error" and len(reply) == 4:
            self.close()
            cause = _exception(*reply[1:], self.sandbox.root)
            raise ImportError(
                f"importing {self.module_name} failed: {type(cause).__name__}: {cause}"
            )
        raise self._end("the worker sent something that is not an answer")

    def close(self) -> None:
        """Kill the worker and everything it started."""
        try:
            self.sock.close()
        finally:
            self.sandbox.kill_workers()

    def finish(self) -> str:
        """Kill the worker, remove its folder; what the code under test printed (the start and
        the end when there is much)."""
        self.close()
        text = self._output()
        shutil.rmtree(self.folder, ignore_errors=True)
        return text

    def _output(self) -> str:
        # The worker owns its folder: never follow a link it left, nor block on a FIFO.
        path = self.folder / "output.txt"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return ""
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                return "(the code under test replaced its output file)"
            head = f.read(OUTPUT_KEPT // 4)
            if info.st_size <= OUTPUT_KEPT:
                return (head + f.read()).decode(errors="replace")
            f.seek(info.st_size - 3 * OUTPUT_KEPT // 4)
            tail = f.read(OUTPUT_KEPT)
        left_out = info.st_size - len(head) - len(tail)
        return (
            head.decode(errors="replace")
            + f"\n[... {left_out:,} bytes left out ...]\n"
            + tail.decode(errors="replace")
        )


class Sandbox:
    """The zygote and the workers it forks, for one test session."""

    def __init__(
        self,
        root: Path,
        package: str,
        memory_mb: int = DEFAULT_MEMORY_MB,
        preimports: list[str] | None = None,
        blocked: tuple[str, ...] = (),
        use_cgroup: bool = True,
    ):
        self.root = Path(root).resolve()
        self.package = package
        self.memory_mb = memory_mb
        self.blocked = blocked
        self.preimports = list(dict.fromkeys(PREIMPORTS if preimports is None else preimports))
        self.base = Path(tempfile.mkdtemp(prefix="minillm-sandbox-"))
        self.rules = _read_paths(self.root, package)
        self.landlock = isolation.landlock_abi()
        self.count = 0
        self.zygote: subprocess.Popen | None = None
        self._lock = threading.RLock()  # a spawn, a kill and the task watch, one at a time
        self._start_zygote()
        # Where workers stay uid 0 (root, with Landlock) RLIMIT_NPROC does not bind them: a pids
        # cgroup limits their tasks where one can be made (`use_cgroup=False` makes none), and
        # elsewhere the sandbox's _TaskWatch counts them.
        uid0 = os.geteuid() == 0 and self.landlock > 0
        self.tasks_cgroup = None
        if uid0 and use_cgroup:
            self.tasks_cgroup = isolation.tasks_cgroup(self.base.name)
        self.task_watch = _TaskWatch(self) if uid0 and self.tasks_cgroup is None else None

    def _start_zygote(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        log = open(self.base / "zygote.log", "ab")  # noqa: SIM115 - the zygote holds it open
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        self.zygote = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "minillm.grading.worker",
                str(theirs.fileno()),
                str(self.root),
                *self.preimports,
            ],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            env=env,
        )
        theirs.close()
        log.close()
        self.control = mine
        self.ready = False

    def _wait_ready(self) -> None:
        if self.ready:
            return
        self.control.settimeout(ZYGOTE_START_S)
        try:
            message = self.control.recv(16)
        except TimeoutError:
            message = b""
        if message != b"ready":
            log = (self.base / "zygote.log").read_text(errors="replace")[-3000:]
            raise SandboxError(f"the grader's worker process did not start:\n{log}")
        self.control.settimeout(30.0)
        self.ready = True

    def spawn(self, module: str, limit_s: float, off_limits: dict) -> WorkerSession:
        """A fresh worker that imports `module`; the test's clock starts now."""
        if self.zygote is None or self.zygote.poll() is not None:
            self._start_zygote()
        self._wait_ready()
        self.count += 1
        folder = self.base / f"worker-{self.count}"
        folder.mkdir(mode=0o700)
        config = worker.WorkerConfig(
            module=module,
            folder=str(folder),
            rules=self.rules,
            memory_mb=self.memory_mb,
            off_limits={k: tuple(v) for k, v in off_limits.items()},
            blocked_packages=self.blocked,
            tasks_cgroup=str(self.tasks_cgroup) if self.tasks_cgroup else None,
        )
        mine, theirs = socket.socketpair()
        with self._lock:
            try:
                socket.send_fds(self.control, [pickle.dumps(config)], [theirs.fileno()])
                (pid,) = struct.unpack("<q", self.control.recv(8))
            except (OSError, struct.error) as exc:
                self.kill_workers()  # before the zygote, whose orphans would leave its tree
                self.zygote.kill()
                raise SandboxError(f"the grader's worker process stopped answering: {exc}") from exc
            finally:
                theirs.close()
            session = WorkerSession(self, module, pid, mine, folder, limit_s)
            if self.task_watch is not None:
                self.task_watch.admit(session, config.extra_tasks)
        return session

    def kill_workers(self) -> int:
        """SIGKILL every process below the zygote: the worker and all it started, orphans
        included (the zygote is their subreaper), however they forked or detached."""
        if self.zygote is None:
            return 0
        with self._lock:
            if self.task_watch is not None:
                self.task_watch.forget()
            return isolation.kill_all(lambda: isolation.descendants(self.zygote.pid))

    def close(self) -> None:
        if self.task_watch is not None:
            self.task_watch.stop()
        if self.zygote is not None:
            self.kill_workers()
            self.control.close()
            self.zygote.kill()
            self.zygote.wait()
        if self.tasks_cgroup is not None:
            isolation.remove_tasks_cgroup(self.tasks_cgroup)
        shutil.rmtree(self.base, ignore_errors=True)


class _TaskWatch:
    """The task limit of workers that stay uid 0 (RLIMIT_NPROC does not bind uid 0) where no pids
    cgroup can hold them: a thread counts the tasks below the zygote every TASK_POLL_S and kills
    them all once they pass the limit. Like the cgroup's pids.max, the limit is set at each
    worker's start to the tasks there then plus the worker's allowance, so that workers alive at
    once share it. A soft limit: a fast fork or thread bomb overshoots it by what it starts in
    one interval."""

    def __init__(self, sandbox: Sandbox):
        self.sandbox = sandbox
        self.limit: int | None = None  # no worker alive
        self.sessions: list[WorkerSession] = []
        self.extra = 0
        self.generation = 0  # changes at every start and kill: a count taken before is stale
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="minillm-task-watch", daemon=True)
        self._thread.start()

    def admit(self, session: WorkerSession, extra: int) -> None:
        """Called under the sandbox's lock, with the new worker forked."""
        self.generation += 1
        self.limit = isolation.tasks_below(self.sandbox.zygote.pid) + extra
        self.extra = extra
        self.sessions.append(session)

    def forget(self) -> None:
        """Called under the sandbox's lock before every worker is killed."""
        self.generation += 1
        self.limit = None
        self.sessions = []

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(TASK_POLL_S):
            with self.sandbox._lock:  # the three as one start or kill left them
                generation, limit, zygote = self.generation, self.limit, self.sandbox.zygote
            if limit is None or zygote is None or isolation.tasks_below(zygote.pid) <= limit:
                continue
            with self.sandbox._lock:
                if generation != self.generation or self._stop.is_set():
                    continue  # a worker started or all were killed while counting
                for session in self.sessions:
                    session.task_limit_passed = self.extra
                self.sandbox.kill_workers()
