"""`minillm grade --gradescope DIR`: the autograder folder is complete, carries no solution, and
its run_autograder, run against a sample submission in a stand-in for /autograder, writes a
valid results.json with the submission's score."""

import ast
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _export(out: Path, *chapters: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "minillm.cli", "grade", "--gradescope", str(out), *chapters],
        cwd=REPO,
        capture_output=True,
        text=True,
    )


@pytest.fixture(scope="module")
def autograder(tmp_path_factory):
    out = tmp_path_factory.mktemp("autograder") / "ag"
    run = _export(out, "ch01", "ch02")
    assert run.returncode == 0, run.stderr
    return out


def _solution_functions() -> list[str]:
    """The source of every function and class in solutions/."""
    sources = []
    for path in sorted((REPO / "solutions").glob("ch*.py")):
        text = path.read_text()
        for node in ast.parse(text).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                body = ast.get_source_segment(text, node.body[-1])
                if body and "NotImplementedError" not in body:
                    sources.append(ast.get_source_segment(text, node))
    return sources


def test_the_autograder_is_complete(autograder):
    for path in (
        "setup.sh",
        "run_autograder",
        "autograder.zip",
        "course/pyproject.toml",
        "course/minillm/grading/worker.py",
        "course/tests/conftest.py",
        "course/tests/exercises/conftest.py",
        "course/tests/exercises/in_worker.py",
        "course/tests/exercises/test_ch01_preprocessing.py",
        "course/tests/exercises/test_ch02_tokenization.py",
        "course/exercises/__init__.py",
        "course/exercises/ch01_preprocessing.py",
        "course/exercises/ch02_tokenization.py",
    ):
        assert (autograder / path).is_file(), path
    assert not (autograder / "course/tests/exercises/test_ch03_attention.py").exists()
    for script in ("setup.sh", "run_autograder"):
        assert os.access(autograder / script, os.X_OK)
        assert subprocess.run(["bash", "-n", str(autograder / script)]).returncode == 0
    import torch

    assert f"torch=={torch.__version__.split('+')[0]}" in (autograder / "setup.sh").read_text()
    with zipfile.ZipFile(autograder / "autograder.zip") as zf:
        names = set(zf.namelist())
    assert {"setup.sh", "run_autograder", "course/exercises/ch01_preprocessing.py"} <= names


def test_the_autograder_carries_no_solution(autograder):
    files = [p for p in autograder.rglob("*") if p.is_file()]
    assert not [p for p in files if "solutions" in p.relative_to(autograder).parts]
    with zipfile.ZipFile(autograder / "autograder.zip") as zf:
        texts = [zf.read(n).decode(errors="replace") for n in zf.namelist()]
    texts += [p.read_text(errors="replace") for p in files if p.suffix != ".zip"]
    leaked = [f for f in _solution_functions() if any(f in t for t in texts)]
    assert not leaked, leaked[0][:300]


def test_a_folder_that_is_not_empty_is_refused(tmp_path):
    (tmp_path / "something").write_text("")
    run = _export(tmp_path)
    assert run.returncode == 2 and "not empty" in run.stderr


@pytest.mark.slow
def test_run_autograder_grades_a_sample_submission(autograder, tmp_path):
    """A stand-in for /autograder: the zip unpacked as source/, a submission that solved
    chapter 01 (in a subfolder, as students upload), and results/."""
    root = tmp_path / "autograder"
    with zipfile.ZipFile(autograder / "autograder.zip") as zf:
        zf.extractall(root / "source")
    (root / "submission" / "my work").mkdir(parents=True)
    shutil.copyfile(
        REPO / "solutions" / "ch01_preprocessing.py",
        root / "submission" / "my work" / "ch01_preprocessing.py",
    )
    env = {**os.environ, "AUTOGRADER_ROOT": str(root), "AUTOGRADER_PYTHON": sys.executable}
    run = subprocess.run(
        ["bash", str(root / "source" / "run_autograder")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads((root / "results" / "results.json").read_text())
    chapters = {t["number"] for t in report["tests"]}
    assert chapters == {"ch01", "ch02"}
    ch01 = [t for t in report["tests"] if t["number"] == "ch01"]
    assert all(t["status"] == "passed" for t in ch01)
    assert report["score"] == sum(t["max_score"] for t in ch01) == 22
    assert all(t["status"] == "failed" for t in report["tests"] if t["number"] == "ch02")
