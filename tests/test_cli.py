"""The `minillm` command: subcommands listed, clear one-line errors instead of tracebacks."""

import subprocess
import sys

import pytest


def minillm(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "minillm.cli", *args], capture_output=True, text=True, cwd=cwd
    )


def test_help_lists_the_subcommands():
    run = minillm("--help")
    assert run.returncode == 0
    for command in ("env", "setup-nltk", "data", "grade", "notebooks"):
        assert command in run.stdout


def test_env_prints_one_status_per_line():
    run = minillm("env")
    assert run.returncode == 0
    lines = run.stdout.splitlines()
    assert all(line.startswith(("[  OK]", "[NOTE]", "[ FIX]")) for line in lines[:-1])


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ("data", "download", "tiny_shakespear"),
            "unknown corpus 'tiny_shakespear'; choose one of: tinyshakespeare",
        ),
        (("grade", "ch99"), "unknown chapter with graded exercises 'ch99'"),
    ],
)
def test_bad_input_is_one_clear_line_not_a_traceback(args, message):
    run = minillm(*args)
    assert run.returncode == 2
    assert message in run.stderr and "Traceback" not in run.stderr


def test_grade_outside_the_repository_says_where_to_run_it(tmp_path, monkeypatch):
    # Run from an empty folder with a copy of the package that is not a checkout.
    import shutil
    from pathlib import Path

    import minillm

    shutil.copytree(Path(minillm.__file__).parent, tmp_path / "pkg" / "minillm")
    run = subprocess.run(
        [sys.executable, "-m", "minillm.cli", "grade"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "pkg"), "PATH": ""},
    )
    assert run.returncode == 2 and "course repository" in run.stderr


def test_data_path_names_the_cache_file():
    run = minillm("data", "path", "tinyshakespeare")
    assert run.returncode == 0 and run.stdout.strip().endswith("tinyshakespeare/input.txt")
