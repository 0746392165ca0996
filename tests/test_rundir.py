"""Run folders: the marker `--fresh` needs, one run per folder (a real flock held by another
process), atomic rewrites, whole-line appends, full and read-only disks.

A full disk is a real one where the tests may mount (root: a small tmpfs, so writes fail with
ENOSPC); elsewhere a real per-file size limit (RLIMIT_FSIZE, so writes fail with EFBIG), which
minillm reports the same way."""

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from minillm import rundir

# -- helpers other test modules share: a small disk, a read-only folder --------------------


def _can_mount() -> bool:
    return os.geteuid() == 0 and sys.platform.startswith("linux")


@contextlib.contextmanager
def small_disk(folder: Path, size_kb: int):
    """`folder` on a tmpfs of `size_kb` KiB (root), else `folder` as it is with every file this
    process and its children write limited to `size_kb` KiB. Yields the kind: "tmpfs" or
    "rlimit". A test child process inherits the limit (an RLIMIT is per process)."""
    folder.mkdir(parents=True, exist_ok=True)
    if _can_mount():
        options = f"size={size_kb}k"
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", folder], check=True)
        try:
            yield "tmpfs"
        finally:
            subprocess.run(["umount", "-l", folder], check=True)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (size_kb * 1024, hard))
    try:
        yield "rlimit"
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` made read-only for this process: a read-only bind mount as root (whom file modes
    do not stop), else its mode without write bits."""
    if _can_mount():
        subprocess.run(["mount", "--bind", folder, folder], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", folder], check=True)
        try:
            yield
        finally:
            subprocess.run(["umount", folder], check=True)
        return
    mode = folder.stat().st_mode
    folder.chmod(0o555)
    try:
        yield
    finally:
        folder.chmod(mode)


# -- the marker and --fresh ----------------------------------------------------------------


def test_a_new_or_empty_folder_is_marked_and_a_used_one_is_not(tmp_path):
    assert (rundir.create(tmp_path / "new" / "run") / rundir.MARKER).is_file()
    (tmp_path / "empty").mkdir()
    assert (rundir.create(tmp_path / "empty") / rundir.MARKER).is_file()
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    rundir.create(used)
    assert not (used / rundir.MARKER).exists()


def test_fresh_deletes_a_folder_minillm_made(tmp_path):
    run = rundir.create(tmp_path / "run")
    (run / "metrics.csv").write_text("step,loss\n")
    assert rundir.remove_fresh(run) is True
    assert not run.exists()
    assert rundir.remove_fresh(run) is False  # nothing there: nothing to do


def test_fresh_on_the_current_folder_refuses_and_deletes_nothing(tmp_path, monkeypatch):
    (tmp_path / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(rundir.RunFolderError, match="holds the current folder; nothing deleted"):
        rundir.remove_fresh(Path("."))
    rundir.create(tmp_path)  # even a marked current folder (an empty one trained into) is kept
    (tmp_path / rundir.MARKER).write_text("")
    with pytest.raises(rundir.RunFolderError, match="nothing deleted"):
        rundir.remove_fresh(Path("."))
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


def test_fresh_refuses_a_folder_without_the_marker(tmp_path):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "a.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(rundir.RunFolderError, match=r"no \.minillm-run marker; nothing deleted"):
        rundir.remove_fresh(mine)
    assert (mine / "a.jpg").exists()
    with pytest.raises(rundir.RunFolderError, match="is a file"):
        rundir.remove_fresh(mine / "a.jpg")


# -- one run per folder --------------------------------------------------------------------

_HOLD = textwrap.dedent(
    """
    import sys, time
    from minillm import rundir
    lock = rundir.acquire(sys.argv[1])
    print("locked", flush=True)
    time.sleep(60)
    """
)


@contextlib.contextmanager
def _held_by_another_process(folder: Path):
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_a_second_run_is_refused_naming_the_first(tmp_path):
    run = tmp_path / "run"
    with _held_by_another_process(run) as holder:
        with pytest.raises(rundir.RunFolderError) as refused:
            rundir.acquire(run)
        message = str(refused.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message
        assert "in use by another minillm run" in message and "choose another out_dir" in message
        with pytest.raises(rundir.RunFolderError, match=f"pid {holder.pid}"):
            rundir.remove_fresh(run)  # --fresh never deletes a folder a run is writing
        with pytest.raises(rundir.RunFolderError, match=f"pid {holder.pid}"):
            rundir.check_free(run)
        assert run.is_dir()


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    run = tmp_path / "run"
    with _held_by_another_process(run) as holder:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with rundir.acquire(run) as lock:  # the kernel dropped the dead process's lock
            assert not lock.read_only
            assert f"pid {os.getpid()}" in (run / rundir.LOCK).read_text()


def test_a_read_only_folder_gets_a_read_only_lock(tmp_path):
    run = rundir.create(tmp_path / "run")
    with read_only(run):
        lock = rundir.acquire(run)
        assert lock.read_only
        lock.release()


# -- atomic rewrites and appends -----------------------------------------------------------


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "tokenizer.json"
    rundir.write_atomic(path, "old")
    with pytest.raises(KeyboardInterrupt), rundir.atomic_path(path) as tmp:
        tmp.write_text("new, half writ")
        raise KeyboardInterrupt  # the writer stops half-way
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temporary left
    rundir.write_atomic(path, b"new")
    assert path.read_bytes() == b"new"


def test_appends_are_whole_lines_and_a_torn_line_is_dropped(tmp_path):
    path = tmp_path / "metrics.csv"
    rundir.append_line(path, "1,2.5", header="step,loss")
    rundir.append_line(path, "2,2.4", header="step,loss")
    assert rundir.read_lines(path) == ["step,loss", "1,2.5", "2,2.4"]
    with open(path, "a") as f:
        f.write("3,2.")  # a kill in the middle of a write
    assert rundir.read_lines(path) == ["step,loss", "1,2.5", "2,2.4"]
    rundir.append_line(path, "3,2.3", header="step,loss")
    assert rundir.read_lines(path) == ["step,loss", "1,2.5", "2,2.4", "3,2.", "3,2.3"]
    empty = tmp_path / "evals.csv"
    empty.write_text("")  # killed between creating the file and its first write
    rundir.append_line(empty, "5,1.0,1.1", header="step,train_loss,val_loss")
    assert rundir.read_lines(empty) == ["step,train_loss,val_loss", "5,1.0,1.1"]
    assert rundir.read_lines(tmp_path / "missing.csv") == []


def test_a_full_disk_is_one_sentence_and_the_old_file_survives(tmp_path):
    disk = tmp_path / "disk"
    with small_disk(disk, size_kb=64) as kind:
        path = disk / "tokenizer.json"
        rundir.write_atomic(path, "x" * 1000)
        start = time.process_time()  # CPU time: a busy machine does not inflate it
        with pytest.raises(rundir.RunFolderError, match="no space left to write") as full:
            rundir.write_atomic(path, "y" * 200_000)
        assert "the previous version of the file is intact" in str(full.value)
        assert "run the same command again" in str(full.value)
        assert path.read_text() == "x" * 1000, kind
        assert sorted(p.name for p in disk.iterdir()) == ["tokenizer.json"]
        with pytest.raises(rundir.RunFolderError, match="the rows written before are intact"):
            rundir.append_line(disk / "metrics.csv", "z" * 200_000)
        assert time.process_time() - start < 10
