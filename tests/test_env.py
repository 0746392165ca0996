"""`minillm env`: one line per check, each OK or saying what to do."""

import hashlib
import os
from pathlib import Path

import pytest
import torch

from minillm import data
from minillm.env import FIX, NOTE, OK, check_data, environment_report, format_report


def test_report_covers_versions_devices_deepspeed_nltk_and_data():
    checks = {c.name.strip(): c for c in environment_report()}
    for name in (
        "python",
        "torch",
        "cpu",
        "gpu",
        "deepspeed",
        "transformers",
        "nltk wordnet",
        "data cache",
        "deepspeed_shm_comm",
    ):
        assert name in checks, name
    assert checks["python"].status == OK
    assert "accelerator" in checks["deepspeed"].detail and "backend" in checks["deepspeed"].detail
    assert all(c.status in (OK, NOTE, FIX) for c in checks.values())


def test_every_problem_line_says_what_to_do():
    for check in environment_report():
        if check.status == FIX:
            assert any(w in check.detail for w in ("run", "install", "set")), check.line()


def test_data_lines_reflect_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MINILLM_DATA", str(tmp_path))
    by_name = {c.name.strip(): c for c in check_data()}
    assert str(tmp_path) in by_name["data cache"].detail
    assert (
        by_name["tinyshakespeare"].status == NOTE
        and "minillm data download" in by_name["tinyshakespeare"].detail
    )

    path = data.cached_path("tinyshakespeare")
    path.parent.mkdir(parents=True)
    path.write_text("not shakespeare")
    assert hashlib.sha256(path.read_bytes()).hexdigest() != data.CORPORA["tinyshakespeare"].sha256
    assert {c.name.strip(): c for c in check_data()}["tinyshakespeare"].status == FIX


def test_format_report_ends_with_a_verdict():
    report = format_report(environment_report())
    assert report.splitlines()[0].startswith("[  OK] python")
    assert report.splitlines()[-1] == "all set" or "to fix" in report.splitlines()[-1]


def test_the_op_cache_is_where_torch_puts_it(monkeypatch, tmp_path):
    from minillm.env import jit_library

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert jit_library("deepspeed_shm_comm") is None
    # With TORCH_EXTENSIONS_DIR set, torch builds an op in a folder of its name right under it.
    (tmp_path / "deepspeed_shm_comm").mkdir()
    library = tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"
    library.write_bytes(b"")
    assert jit_library("deepspeed_shm_comm") == str(library)


def test_the_course_compiles_the_op_again_when_its_cache_was_deleted(tmp_path):
    """`./course` compiles DeepSpeed's op once and remembers it in a stamp; a stamp whose library
    is gone (a cleared cache) must not keep it from compiling again."""
    import shutil
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    shutil.copy2(repo / "course", tmp_path / "course")
    venv, cache = tmp_path / "venv", tmp_path / "extensions"
    (venv / "bin").mkdir(parents=True)
    (venv / ".minillm-installed").touch()  # minillm itself counts as installed
    log = tmp_path / "calls.log"
    # The real interpreter; a `minillm` that logs its calls and "builds" where torch would.
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    library = cache / "deepspeed_shm_comm" / "deepspeed_shm_comm.so"
    (venv / "bin" / "minillm").write_text(
        f'#!/bin/sh\necho "$1" >> {log}\n'
        f'[ "$1" = setup-deepspeed ] && mkdir -p {library.parent} && touch {library}\nexit 0\n'
    )
    for program in ("python", "minillm"):
        (venv / "bin" / program).chmod(0o755)
    env = {**os.environ, "MINILLM_VENV": str(venv), "TORCH_EXTENSIONS_DIR": str(cache)}

    def setup() -> list[str]:
        done = subprocess.run(
            ["bash", str(tmp_path / "course"), "setup"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        calls = log.read_text().split() if log.exists() else []
        log.unlink(missing_ok=True)
        return [c for c in calls if c == "setup-deepspeed"]

    assert setup() == ["setup-deepspeed"]
    assert (venv / ".minillm-deepspeed-ops").read_text().split() == [str(cache), str(library)]
    assert setup() == []  # built, and remembered
    shutil.rmtree(cache)
    assert setup() == ["setup-deepspeed"] and library.is_file()
    assert setup() == []


ON_A_GPU = pytest.mark.skipif(
    torch.cuda.is_available(), reason="DeepSpeed on CUDA has no shared-memory op to build"
)


@ON_A_GPU
def test_setup_deepspeed_leaves_the_op_built_so_the_first_run_waits_for_nothing(capsys):
    from minillm.cli import main

    assert main(["setup-deepspeed"]) == 0
    assert "deepspeed_shm_comm op is ready" in capsys.readouterr().out
    line = {c.name.strip(): c for c in environment_report()}["deepspeed_shm_comm"]
    assert line.status == OK and line.detail.startswith("built"), line.line()


@ON_A_GPU
def test_setup_deepspeed_without_a_compiler_says_what_to_install(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "CXX": "/bin/false", "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "minillm.cli", "setup-deepspeed"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "could not compile its deepspeed_shm_comm op" in done.stderr
    assert "apt-get install g++" in done.stderr
