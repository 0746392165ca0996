"""Hostile submissions (tests/hostile/*.py, each appended to the untouched chapter 01 stub) score
exactly 0, the grade finishes within its limits, and nothing the submission started outlives
it: not the results, not the tests, not the grader's log, not its processes."""

import ast
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HOSTILE = REPO / "tests" / "hostile"


def _graded_tests(test_file: Path) -> dict[str, int]:
    """The graded tests of a test file and their points, read from its `points` decorators."""
    graded = {}
    for node in ast.parse(test_file.read_text()).body:
        for decorator in getattr(node, "decorator_list", []):
            call = isinstance(decorator, ast.Call)
            if call and ast.unparse(decorator.func) == "pytest.mark.points":
                graded[node.name] = decorator.args[0].value
    return graded


GRADED = _graded_tests(REPO / "tests" / "exercises" / "test_ch01_preprocessing.py")
N_TESTS = len(GRADED)
POINTS = sum(GRADED.values())
# The time limit per graded test: short for the submissions that hang (each costs it on every
# test), ample for the others, whose checks read the messages of tests that ran to the end.
HANGING = {"swallow_timeout": 1, "fork_bomb": 1}
TIME_LIMIT_S = 20


def _wall_limit(time_limit_s: float) -> float:
    """The most a grade of chapter 01 may take: every test at its limit, plus the start of the
    two processes (minutes on a loaded machine)."""
    return N_TESTS * (time_limit_s + 5) + 240


def _course(tmp_path: Path, snippet: str) -> Path:
    """A course folder with chapter 01's graded tests, the stub with `snippet` appended, and the
    reference answers (which the submission must not reach)."""
    root = tmp_path / "course"
    for path in (
        "pyproject.toml",
        "tests/conftest.py",
        "tests/exercises/conftest.py",
        "tests/exercises/in_worker.py",
        "tests/exercises/test_ch01_preprocessing.py",
        "exercises/__init__.py",
        "solutions/__init__.py",
        "solutions/ch01_preprocessing.py",
    ):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / path, root / path)
    stub = (REPO / "exercises" / "ch01_preprocessing.py").read_text()
    (root / "exercises" / "ch01_preprocessing.py").write_text(stub + "\n\n" + snippet)
    return root


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


SUBMISSIONS = sorted(p.stem for p in HOSTILE.glob("*.py"))


def test_there_are_at_least_twelve_hostile_submissions():
    assert len(SUBMISSIONS) >= 12, SUBMISSIONS


@pytest.mark.slow
@pytest.mark.parametrize("name", SUBMISSIONS)
def test_a_hostile_submission_scores_zero_and_leaves_nothing_behind(name, tmp_path):
    root = _course(tmp_path, (HOSTILE / f"{name}.py").read_text())
    tests_before = {p: p.read_bytes() for p in (root / "tests").rglob("*") if p.is_file()}
    results = tmp_path / "results" / "results.json"
    marker = f"MINILLM_HOSTILE_MARKER={uuid.uuid4().hex}"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1], "OMP_NUM_THREADS": "1"}
    limit = HANGING.get(name, TIME_LIMIT_S)
    start = time.monotonic()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "minillm.cli",
            "grade",
            "ch01",
            "--course",
            str(root),
            "--json",
            str(results),
            "--time-limit",
            str(limit),
            "--memory-mb",
            "1024",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=_wall_limit(limit),
    )
    seconds = time.monotonic() - start
    print(f"hostile submission {name}: {seconds:.1f} s")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert seconds < _wall_limit(limit)

    report = json.loads(results.read_text())
    by_name = {t["name"]: t for t in report["tests"]}
    print(f"hostile submission {name}: score {report['score']} of {POINTS}")
    assert report["score"] == 0, [t["name"] for t in report["tests"] if t["score"]]
    assert set(by_name) == set(GRADED)
    assert {t["status"] for t in report["tests"]} == {"failed"}
    assert sum(t["max_score"] for t in report["tests"]) == POINTS
    assert f"0 of {POINTS} points" in run.stdout
    assert results.stat().st_size < 200_000, "the results carry the submission's output uncapped"

    # Nothing it started is still running, and what it tried to write stayed unwritten.
    time.sleep(1.0)
    assert _processes_with(marker) == []
    assert json.loads(results.read_text())["score"] == 0
    after = {p: p.read_bytes() for p in (root / "tests").rglob("*") if p.is_file()}
    assert after == tests_before, "the submission changed or added files in tests/"
    assert not (REPO / "minillm" / "grading" / "hostile_was_here.py").exists()
    assert "LEAKED" not in results.read_text(), "the submission read a secret of the machine"

    # Why every test failed: the attack's own failure, or, where it changed nothing, the stub.
    unchanged = "not written yet"
    expected = {
        "call_library": "must not call",
        "swallow_timeout": "time limit",
        "memory_hog": "MemoryError",
        "import_solutions": "may not import solutions",
        "rewrite_test_file_exit": "ended",
        **{
            name: unchanged
            for name in (
                "atexit_log",
                "wrap_plugin_log",
                "patch_testreport",
                "detached_results_writer",
                "fork_holds_pipes",
                "kill_the_grader",
                "write_tests_dir",
                "read_solutions_by_path",
                "patch_test_tools",
                "read_machine_secrets",
            )
        },
    }
    if name in expected:
        missing = [t["output"] for t in report["tests"] if expected[name] not in t["output"]]
        assert not missing, missing[0][:3000]
