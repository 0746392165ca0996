"""Operating-system isolation for the grader's untrusted worker processes (Linux).

- `restrict_filesystem`: Landlock (via ctypes), so a worker reads only the trees it needs, writes
  only its own folder, and (Landlock ABI 6+) cannot signal or reach abstract sockets of processes
  outside its sandbox, such as the grader.
- `drop_capabilities` and `become_nobody`: a worker started as root loses every capability for
  good and stays uid 0 where Landlock confines it (Python may be installed where only root can
  read, as under /root/.pyenv), or becomes `nobody` where there is no Landlock.
- `limit_resources`: memory (address space), processes, file size, no core files. Linux never
  applies the process limit to uid 0, so a worker that stays uid 0 is limited by a pids cgroup
  instead (`tasks_cgroup`, `join_tasks_cgroup`) where the grader can make one (cgroup v1), and
  elsewhere by the grader counting its tasks (`tasks_below`) and killing them all past the limit.
- `become_subreaper`, `descendants` and `kill_all`: every process a worker starts, even one that
  double-forks or calls setsid(), stays below the grader's subreaper and is SIGKILLed there.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import time
from collections.abc import Callable
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)

# <linux/prctl.h>
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
# SECBIT_NOROOT, SECBIT_NO_SETUID_FIXUP, SECBIT_KEEP_CAPS and SECBIT_NO_CAP_AMBIENT_RAISE, each
# with its _LOCKED bit: exec never hands a uid-0 process its capabilities back.
_SECUREBITS_ALL_LOCKED = 0xFF

# <linux/landlock.h>; the syscall numbers are the same on every architecture.
_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_ALL_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 5: (1 << 16) - 1}
_FILE_ONLY = EXECUTE | WRITE_FILE | READ_FILE | (1 << 14) | (1 << 15)  # + TRUNCATE, IOCTL_DEV
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1

READ = EXECUTE | READ_FILE | READ_DIR
ALL_RIGHTS = (1 << 16) - 1  # masked down to what the kernel handles


class IsolationError(OSError):
    """The kernel refused a sandboxing step."""


def _check(result: int, what: str) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise IsolationError(errno, f"{what}: {os.strerror(errno)}")
    return result


def _prctl(option: int, arg: int = 0, what: str = "prctl") -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), what)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 where Landlock is missing or disabled."""
    version = _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, 0, _LANDLOCK_CREATE_RULESET_VERSION)
    return max(int(version), 0)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def restrict_filesystem(rules: dict[str, int]) -> int:
    """Confine this process (and everything it starts) to `rules`: path -> the rights it gets
    beneath that path (READ, or READ | write rights). Returns the ABI used; 0 means Landlock is
    unavailable and nothing was restricted."""
    abi = landlock_abi()
    if abi == 0:
        return 0
    handled = _ALL_FS_BY_ABI[max(k for k in _ALL_FS_BY_ABI if k <= abi)]
    attr = _RulesetAttr(handled, 0, _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if abi >= 6 else 0)
    size = ctypes.sizeof(attr) if abi >= 6 else 8  # older kernels know only the first field
    ruleset = _check(
        _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), size, 0), "landlock ruleset"
    )
    try:
        for path, access in rules.items():
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # a tree that does not exist here needs no rule
            try:
                allowed = access & handled
                if not os.path.isdir(path):
                    allowed &= _FILE_ONLY
                rule = _PathBeneathAttr(allowed, fd)
                _check(
                    _libc.syscall(
                        _SYS_LANDLOCK_ADD_RULE,
                        ruleset,
                        _LANDLOCK_RULE_PATH_BENEATH,
                        ctypes.byref(rule),
                        0,
                    ),
                    f"landlock rule for {path}",
                )
            finally:
                os.close(fd)
        _prctl(PR_SET_NO_NEW_PRIVS, 1, "no_new_privs")
        _check(_libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock restrict_self")
    finally:
        os.close(ruleset)
    return abi


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def drop_capabilities() -> None:
    """Give up every capability for good: bounding set, ambient, effective and permitted."""
    _prctl(PR_SET_SECUREBITS, _SECUREBITS_ALL_LOCKED, "securebits")
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last + 1):
        _prctl(PR_CAPBSET_DROP, cap, "drop bounding capability")
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "clear ambient capabilities")
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def become_nobody(uid: int = 65534, gid: int = 65534) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def tasks_of_uid(uid: int) -> int:
    """How many tasks (threads count) the uid runs now: RLIMIT_NPROC counts them all."""
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            count += int(fields.get("Threads", "1"))
    return count


def address_space_bytes() -> int:
    """This process's mapped address space (VmSize)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise IsolationError(0, "no VmSize in /proc/self/status")


def limit_resources(memory_bytes: int, extra_tasks: int, file_bytes: int, uid: int) -> None:
    """Address space, tasks of this uid, size of any file written, and no core dumps."""
    for which, value in (
        (resource.RLIMIT_AS, memory_bytes),
        (resource.RLIMIT_NPROC, tasks_of_uid(uid) + extra_tasks),
        (resource.RLIMIT_FSIZE, file_bytes),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(which, (value, value))


_CGROUP_V1_PIDS = Path("/sys/fs/cgroup/pids")


def tasks_cgroup(name: str) -> Path | None:
    """A new, empty cgroup named `name` below this process's own in cgroup v1's pids hierarchy,
    for a sandbox's workers; None where this process may not make one (not root, no such
    hierarchy), which is the case of every user account. Not cgroup v2: there a process that
    holds any descriptor of a cgroup folder may clone a child into it (CLONE_INTO_CGROUP), which
    Landlock does not check, and uid 0 passes the permission test."""
    if os.geteuid() != 0 or not _CGROUP_V1_PIDS.is_dir():
        return None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            group = _CGROUP_V1_PIDS / path.lstrip("/") / name
            break
    else:
        return None
    try:
        group.mkdir()
    except OSError:
        return None
    if not (group / "pids.max").is_file():
        group.rmdir()
        return None
    return group


def join_tasks_cgroup(group: Path, extra_tasks: int) -> None:
    """Move this process into `group` and let it hold `extra_tasks` tasks (threads count) more
    than it holds now. Done before the capabilities go; Landlock then keeps the worker from
    writing to the cgroup files, and so from leaving or raising the limit."""
    (group / "cgroup.procs").write_text(str(os.getpid()))
    current = int((group / "pids.current").read_text())
    (group / "pids.max").write_text(str(current + extra_tasks))


def remove_tasks_cgroup(group: Path) -> None:
    """Remove a sandbox's cgroup once its processes are gone (the kernel refuses it before)."""
    try:
        group.rmdir()
    except OSError:
        pass


def become_subreaper() -> None:
    """Orphaned descendants are re-parented to this process instead of init, so they can still
    be found (and killed) below it."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1, "child subreaper")


def protect_from_tracing() -> None:
    """Not dumpable: a process of the same uid cannot ptrace this one or read its memory."""
    _prctl(PR_SET_DUMPABLE, 0, "dumpable")


def die_with_parent() -> None:
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "parent death signal")


def children(pid: int) -> frozenset[int]:
    return frozenset(child for child, parent in _parents().items() if parent == pid)


def _processes(zombies: bool = False) -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, threads) of every living process, and of every zombie if `zombies`
    (a zombie holds its pid, and one task, until its parent reaps it)."""
    processes = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces
        if fields[0] == "Z" and zombies:
            processes[int(entry.name)] = (int(fields[1]), 1)
        elif fields[0] not in ("Z", "X"):
            processes[int(entry.name)] = (int(fields[1]), int(fields[17]))
    return processes


def _parents() -> dict[int, int]:
    """pid -> parent pid of every living (non-zombie) process."""
    return {pid: parent for pid, (parent, _) in _processes().items()}


def tasks_below(root: int) -> int:
    """Tasks below `root` as RLIMIT_NPROC and a pids cgroup count them: every thread, and every
    zombie not yet reaped."""
    processes = _processes(zombies=True)
    below = descendants(root, parents={pid: parent for pid, (parent, _) in processes.items()})
    return sum(processes[pid][1] for pid in below)


def descendants(
    root: int, spare: frozenset[int] = frozenset(), *, parents: dict[int, int] | None = None
) -> set[int]:
    """Living processes below `root` (never `root` itself, nor this process), leaving out the
    processes in `spare` and all below them; `parents` is `_parents()` when already read."""
    children: dict[int, list[int]] = {}
    for pid, parent in (_parents() if parents is None else parents).items():
        children.setdefault(parent, []).append(pid)
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found and child not in spare:
                found.add(child)
                todo.append(child)
    found.discard(os.getpid())
    return found


def _sigkill(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)  # pins this process, so a recycled pid is never hit
    except OSError:
        return
    try:
        signal.pidfd_send_signal(fd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(fd)


def kill_all(find: Callable[[], set[int]], timeout_s: float = 10.0) -> int:
    """SIGKILL the processes `find()` names, again and again until it names none (a process may
    fork while the sweep runs). Returns how many were killed."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = find()
        if not alive:
            break
        for pid in alive:
            _sigkill(pid)
        killed |= alive
        time.sleep(0.005)
    return len(killed)
