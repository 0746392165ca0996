"""Run folders that cannot lose work and resumes that cannot run code, on real `minillm train`
processes: SIGKILL at many moments then resume (the same losses as an uninterrupted run), a full
disk (a real small tmpfs as root, else a real RLIMIT_FSIZE: see tests/test_rundir.py), a
read-only finished run, two runs into one folder, `--fresh` on a folder minillm did not make,
NaN weights in `minillm sample` (hostile DeepSpeed files: tests/test_ds.py)."""

import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minillm import checkpoint, cli
from minillm.train import read_metrics
from tests.test_rundir import _can_mount, read_only

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=16",
    "batch_size=4",
    "eval_interval=10",
    "eval_iters=2",
    "checkpoint_interval=10",
    "sample_tokens=0",
    "optim.warmup_iters=5",
]


def _command(run_dir: Path, *extra: str, fresh: bool = False) -> list[str]:
    overrides = [*TINY, f"out_dir={run_dir}", *extra]
    return [
        sys.executable,
        "-m",
        "minillm.cli",
        "train",
        *(["--fresh"] if fresh else []),
        *[arg for o in overrides for arg in ("--set", o)],
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in every run: same floats


def _train(run_dir: Path, *extra: str, preexec=None, cwd=REPO, fresh=False):
    return subprocess.run(
        _command(run_dir, *extra, fresh=fresh),
        env=_env(),
        capture_output=True,
        text=True,
        cwd=cwd,
        preexec_fn=preexec,
        timeout=300,
    )


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(int(r["step"]), r["loss"]) for r in read_metrics(run_dir)[0]]


def _one_line(stderr: str) -> str:
    """The one-sentence error of a run (the progress bar shares stderr), and no traceback."""
    lines = [line for line in stderr.splitlines() if line.startswith("minillm ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """An uninterrupted 40-step run: the reference every interrupted one must reproduce."""
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    done = _train(run_dir, "max_iters=40")
    assert done.returncode == 0, done.stderr
    return run_dir


# -- SIGKILL at many moments -------------------------------------------------------------------


def _kill_when(run_dir: Path, rows: int, jitter: float) -> None:
    """Start the run, SIGKILL it once metrics.csv holds `rows` lines plus `jitter` seconds (so
    the kill lands inside evaluation, a checkpoint save, a log append or start-up)."""
    process = subprocess.Popen(
        _command(run_dir, "max_iters=40"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    metrics = run_dir / "metrics.csv"
    while time.time() < deadline and process.poll() is None:
        if rows == 0 or (metrics.exists() and len(metrics.read_bytes().splitlines()) > rows):
            break
        time.sleep(0.005)
    time.sleep(jitter)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_sigkill_at_many_moments_then_resume_gives_the_uninterrupted_run(whole, tmp_path):
    run_dir = tmp_path / "run"
    rng = random.Random()
    # start-up (before the first row), around the checkpoints at 10 and 20, and anywhere else
    moments = [(0, rng.uniform(0.5, 3.0)), (10, 0.0), (10, 0.02), (20, 0.01)]
    moments += sorted((rng.randint(1, 38), rng.uniform(0, 0.05)) for _ in range(3))
    for rows, jitter in moments:
        _kill_when(run_dir, rows, jitter)
        if run_dir.exists():  # every kill leaves a folder whose logs and checkpoints read back
            steps = [s for s, _ in _losses(run_dir)]
            assert steps == list(range(1, len(steps) + 1)), (rows, jitter, steps)
            for ckpt in checkpoint.list_checkpoints(run_dir):
                checkpoint.verify(ckpt)
    resumed = _train(run_dir, "max_iters=40")
    assert resumed.returncode == 0, resumed.stderr
    assert _losses(run_dir) == _losses(whole)  # every step once, bitwise the same
    assert [r["step"] for r in read_metrics(run_dir)[1]] == [10, 20, 30, 40]
    final = checkpoint.latest_checkpoint(run_dir) / checkpoint.WEIGHTS
    assert (
        final.read_bytes()
        == (checkpoint.latest_checkpoint(whole) / checkpoint.WEIGHTS).read_bytes()
    )


# -- a full disk ------------------------------------------------------------------------------


def _limit_file_size(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


@pytest.mark.slow
def test_a_full_disk_says_so_and_the_rerun_resumes(tmp_path):
    """10 steps fit; the run to 30 hits the full disk at its step-20 checkpoint; once there is
    room again the same command resumes from step 10. Compared with the same 10-then-30 runs on
    a roomy disk."""
    reference = tmp_path / "reference"
    for steps in (10, 30):
        assert _train(reference, f"max_iters={steps}").returncode == 0
    disk = tmp_path / "disk"
    disk.mkdir()
    run_dir = disk / "run"
    state_bytes = (checkpoint.checkpoint_dir(reference, 30) / checkpoint.STATE).stat().st_size
    if _can_mount():
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", disk], check=True)
    try:
        assert _train(run_dir, "max_iters=10").returncode == 0
        if _can_mount():  # shrink the disk to what is used plus half a checkpoint
            usage = shutil.disk_usage(disk).used
            size = f"size={(usage + state_bytes // 2) // 1024}k"
            subprocess.run(["mount", "-o", f"remount,{size}", disk], check=True)
            full = _train(run_dir, "max_iters=30")
        else:  # no mount: a per-file size limit below the size of a training state
            full = _train(run_dir, "max_iters=30", preexec=_limit_file_size(state_bytes // 2))
        assert full.returncode == 2
        message = _one_line(full.stderr)
        assert "no space left to write" in message and "run the same command again" in message
        first = checkpoint.checkpoint_dir(run_dir, 10)
        assert checkpoint.list_checkpoints(run_dir) == [first]
        checkpoint.verify(first)  # the previous checkpoint is whole and usable
        sample = subprocess.run(
            [sys.executable, "-m", "minillm.cli", "sample", "--checkpoint", str(run_dir)],
            capture_output=True,
            text=True,
            env=_env(),
        )
        assert sample.returncode == 0, sample.stderr
        if _can_mount():
            subprocess.run(["mount", "-o", "remount,size=64m", disk], check=True)  # room again
        resumed = _train(run_dir, "max_iters=30")
        assert resumed.returncode == 0, resumed.stderr
        assert "resuming from" in resumed.stdout and "step_0000010" in resumed.stdout
        assert _losses(run_dir) == _losses(reference)
    finally:
        if _can_mount():
            subprocess.run(["umount", "-l", disk], check=True)


# -- read-only folders, two runs, --fresh ----------------------------------------------------


@pytest.mark.slow
def test_a_read_only_finished_run_exits_cleanly_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    assert _train(run_dir, "max_iters=10").returncode == 0
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    with read_only(run_dir):
        again = _train(run_dir, "max_iters=10")
        assert again.returncode == 0, again.stderr
        assert "step 10: train loss" in again.stdout
        more = _train(run_dir, "max_iters=20")
        assert more.returncode == 2
        assert "is read-only and its run stopped at step 10 of max_iters=20" in _one_line(
            more.stderr
        )
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


@pytest.mark.slow
def test_a_second_run_into_the_same_folder_is_refused_naming_the_first(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(
        _command(run_dir, "max_iters=100000"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not (run_dir / "metrics.csv").exists() and time.time() < deadline:
            time.sleep(0.05)
        second = _train(run_dir, "max_iters=10")
        assert second.returncode == 2
        message = _one_line(second.stderr)
        assert f"in use by another minillm run (pid {first.pid} on host" in message
        fresh = _train(run_dir, "max_iters=10", fresh=True)  # --fresh does not delete it either
        assert f"pid {first.pid}" in _one_line(fresh.stderr)
        assert first.poll() is None  # the first run never noticed
    finally:
        first.kill()
        first.wait()
    rows = [r for r in (run_dir / "metrics.csv").read_text().splitlines() if r]
    assert len(rows) == len(set(rows))  # nothing interleaved


def test_fresh_on_the_current_folder_refuses_and_deletes_nothing(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    refused = _train(Path("."), "max_iters=10", cwd=tmp_path, fresh=True)
    assert refused.returncode == 2
    assert "nothing deleted" in _one_line(refused.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_fresh_deletes_a_finished_run_minillm_made_and_retrains(tmp_path):
    run_dir = tmp_path / "run"
    assert _train(run_dir, "max_iters=10").returncode == 0
    (run_dir / "checkpoints" / "step_0000010" / "extra").write_text("stale")
    again = _train(run_dir, "max_iters=10", fresh=True)
    assert again.returncode == 0 and "resuming" not in again.stdout
    assert not (run_dir / "checkpoints" / "step_0000010" / "extra").exists()


# -- hostile and damaged checkpoints through the CLI ---------------------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert _train(run_dir, "max_iters=10").returncode == 0
    return run_dir


def test_minillm_sample_on_nan_weights_says_so(finished, tmp_path, capsys):
    ckpt = Path(shutil.copytree(checkpoint.latest_checkpoint(finished), tmp_path / "step"))
    weights = load_file(ckpt / checkpoint.WEIGHTS)
    name = sorted(weights)[0]
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, ckpt / checkpoint.WEIGHTS)
    start = time.process_time()  # CPU time: a busy machine does not inflate it
    assert cli.main(["sample", "--checkpoint", str(ckpt), "--tokens", "5"]) == 2
    assert time.process_time() - start < 30
    message = capsys.readouterr().err.strip()
    assert f"holds NaN values in {name}" in message and "multinomial" not in message


def test_resume_refuses_a_step_beyond_max_iters(finished, tmp_path):
    run_dir = Path(shutil.copytree(finished, tmp_path / "run"))
    refused = _train(run_dir, "max_iters=5")
    assert refused.returncode == 2
    assert "says step 10, outside 0..max_iters=5" in _one_line(refused.stderr)


def test_resume_refuses_a_changed_file_before_loading_it(finished, tmp_path):
    run_dir = Path(shutil.copytree(finished, tmp_path / "run"))
    state = checkpoint.latest_checkpoint(run_dir) / checkpoint.STATE
    state.write_bytes(state.read_bytes()[:-10] + b"\0" * 10)
    refused = _train(run_dir, "max_iters=20")
    assert refused.returncode == 2
    assert "state.pt has changed since it was saved" in _one_line(refused.stderr)


def test_resume_refuses_a_config_that_is_not_minillms(finished, tmp_path):
    run_dir = Path(shutil.copytree(finished, tmp_path / "run"))
    (checkpoint.latest_checkpoint(run_dir) / checkpoint.CONFIG).write_text("- 1\n- 2\n")
    refused = _train(run_dir, "max_iters=20")
    assert refused.returncode == 2
    assert "must hold a mapping of config sections, got list" in _one_line(refused.stderr)
