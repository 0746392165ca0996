"""Run folders that cannot lose work: who made them, who is using them, and how files change.

- A marker file `.minillm-run` says that minillm created the folder; `--fresh` deletes only a
  folder that carries it (never `out_dir=.` or a folder of your own files).
- A lock (`fcntl.flock` on `.minillm-lock`) lets one run at a time write into a folder; a second
  run is told the pid and host of the first. The kernel drops the lock when its process dies, so
  a killed run never leaves a stale lock behind.
- Every file a run rewrites is replaced atomically (`write_atomic`: a temporary file, fsync,
  `os.replace`), and logs grow by whole lines (`append_line`), so a kill at any moment leaves
  either the old file or the new one, and at worst one torn last line that `read_lines` drops.
- A full disk becomes one sentence (`disk_full`) that says what is still intact and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from minillm.errors import MiniLLMError

MARKER = ".minillm-run"
LOCK = ".minillm-lock"
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, over quota, over a size limit


class RunFolderError(MiniLLMError):
    """A run folder cannot be used: someone else's files, another run inside, read-only, full."""


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _FULL


def disk_full(path: Path, intact: str) -> RunFolderError:
    """The error for a write into `path` that ran out of space; `intact` says what survived."""
    return RunFolderError(
        f"no space left to write {path} ({intact}); free some disk space and run the same "
        "command again: it resumes from the last complete checkpoint"
    )


def is_writable(folder: Path) -> bool:
    """Whether files can be created in `folder` (permissions and read-only mounts both count)."""
    return os.access(folder, os.W_OK | os.X_OK)


def create(folder: Path) -> Path:
    """Make `folder` a run folder: created (with its marker) when missing; an empty existing
    folder is marked too; a folder with other content is used as it is, unmarked, so that
    `--fresh` will never delete it."""
    folder = Path(folder)
    new = not folder.exists() or not any(folder.iterdir())
    folder.mkdir(parents=True, exist_ok=True)
    if new:
        write_atomic(folder / MARKER, "created by minillm; `minillm train --fresh` may delete it\n")
    return folder


def remove_fresh(folder: Path) -> bool:
    """Delete run folder `folder` for `--fresh`, only if minillm created it and no run uses it.
    Returns whether something was deleted."""
    folder = Path(folder)
    if not folder.exists():
        return False
    resolved = folder.resolve()
    if not resolved.is_dir():
        raise RunFolderError(f"--fresh: {folder} is a file, not a run folder; nothing deleted")
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents:
        raise RunFolderError(
            f"--fresh would delete {folder}, which holds the current folder; nothing deleted. "
            "Choose an out_dir of its own (e.g. runs/NAME)"
        )
    if not (folder / MARKER).is_file():
        raise RunFolderError(
            f"--fresh deletes only folders minillm created, and {folder} has no {MARKER} "
            "marker; nothing deleted. Delete it yourself or choose another out_dir"
        )
    acquire(folder).release()  # refuses while another run is writing there
    shutil.rmtree(folder)
    return True


class RunLock:
    """An exclusive lock on a run folder, held until `release` (or the process's end)."""

    def __init__(self, folder: Path, fd: int | None):
        self.folder, self._fd = folder, fd

    @property
    def read_only(self) -> bool:
        """True when the folder is read-only: nothing may be written, so no lock was needed."""
        return self._fd is None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __del__(self) -> None:  # a Trainer dropped without finishing frees its folder
        self.release()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(folder: Path) -> RunLock:
    """Lock run folder `folder` for this process, or raise naming the run that holds it.

    A folder that exists but cannot be written gets a read-only `RunLock`: the caller may read
    (evaluate, sample) but must write nothing.
    """
    folder = Path(folder)
    if folder.is_dir() and not is_writable(folder):
        return RunLock(folder, None)
    create(folder)
    path = folder / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = path.read_text(encoding="utf-8", errors="replace").strip() or "an unknown run"
        raise RunFolderError(
            f"{folder} is in use by another minillm run ({holder}); wait for it to finish, stop "
            "it, or choose another out_dir"
        ) from None
    os.ftruncate(fd, 0)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}, since {started}".encode())
    return RunLock(folder, fd)


def check_free(folder: Path) -> None:
    """Raise unless `folder` could be locked now (a launcher checks before starting ranks)."""
    if Path(folder).exists():
        acquire(folder).release()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; on success it replaces `path` in one step.
    On failure the temporary file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full(path, "the previous version of the file is intact") from None
        raise
    _fsync_dir(path.parent)


def write_atomic(path: Path, content: str | bytes) -> Path:
    """Replace `path` with `content` atomically."""
    with atomic_path(path) as tmp:
        if isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        else:
            tmp.write_bytes(content)
    return Path(path)


def append_line(path: Path, line: str, header: str | None = None) -> None:
    """Append one line (and, to a new or empty file, `header` first) in a single write, so that a
    reader sees whole lines; a torn last line from a kill mid-write is dropped by `read_lines`."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        text = line if line.endswith("\n") else line + "\n"
        size = os.fstat(fd).st_size
        if size and not _ends_with_newline(path, size):
            text = "\n" + text  # after a torn line: start a fresh one (the torn one is dropped)
        if header is not None and size == 0:
            text = header.rstrip("\n") + "\n" + text
        data = text.encode("utf-8")
        while data:  # a nearly full disk writes part, then fails on the rest
            data = data[os.write(fd, data) :]
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full(path, "the rows written before are intact") from None
        raise
    finally:
        os.close(fd)


def read_lines(path: Path) -> list[str]:
    """The complete lines of `path` (a last line without its newline is torn: dropped)."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    return [line for line in lines[:-1] if line]  # the part after the last newline is torn


def _ends_with_newline(path: Path, size: int) -> bool:
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1) == b"\n"


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
