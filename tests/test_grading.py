"""The grader: points per test, Gradescope's format, time limits and crashes charged to one test;
and on the real exercises, full marks for solutions/ and zero for the untouched stubs."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from minillm.errors import InputError
from minillm.grading import chapter_table, grade, graded_files

REPO = Path(__file__).resolve().parents[1]

DEMO_TESTS = """
import os
import time

import pytest


@pytest.fixture
def ex(impl):
    return impl("ch98_demo")


@pytest.mark.points(2)
def test_add(ex):
    assert ex.add(2, 3) == 5


@pytest.mark.points(3)
def test_add_negative(ex):
    assert ex.add(-2, -3) == -5


@pytest.mark.points(1)
@pytest.mark.timeout(2)
def test_hangs_on_stub(ex):
    assert ex.hang() == "done"


@pytest.mark.points(4)
def test_crashes_on_stub(ex):
    assert ex.crash() == "fine"


@pytest.mark.points(5)
def test_after_the_crash(ex):
    assert ex.add(0, 0) == 0
"""

DEMO_SOLUTION = """
def add(a, b):
    return a + b


def hang():
    return "done"


def crash():
    return "fine"
"""

DEMO_STUDENT = """
import os
import time


def add(a, b):
    return a + b if a >= 0 else a - b  # a typical slip: wrong for negatives


def hang():
    while True:
        time.sleep(0.1)


def crash():
    os._exit(3)
"""


@pytest.fixture(scope="module")
def demo_repo(tmp_path_factory):
    """A throwaway course repository with one graded chapter, using the real conftest files."""
    root = tmp_path_factory.mktemp("course")
    (root / "tests" / "exercises").mkdir(parents=True)
    shutil.copy(REPO / "tests" / "conftest.py", root / "tests" / "conftest.py")
    shutil.copy(
        REPO / "tests" / "exercises" / "conftest.py", root / "tests" / "exercises" / "conftest.py"
    )
    (root / "tests" / "exercises" / "test_ch98_demo.py").write_text(DEMO_TESTS)
    for package, body in (("exercises", DEMO_STUDENT), ("solutions", DEMO_SOLUTION)):
        (root / package).mkdir()
        (root / package / "__init__.py").write_text("")
        (root / package / "ch98_demo.py").write_text(body)
    (root / "pytest.ini").write_text(
        textwrap.dedent("""
        [pytest]
        pythonpath = .
        markers =
            points(n): points
    """)
    )
    return root


def test_solutions_earn_every_point_and_gradescope_json_has_the_right_shape(demo_repo, tmp_path):
    results = tmp_path / "results.json"
    tests = grade(demo_repo, ["ch98"], "solutions", results)
    assert [t.passed for t in tests] == [True] * 5
    report = json.loads(results.read_text())
    assert report["score"] == 15
    assert [t["max_score"] for t in report["tests"]] == [2, 3, 1, 4, 5]
    assert {t["status"] for t in report["tests"]} == {"passed"}
    assert set(report["tests"][0]) >= {"name", "score", "max_score", "status", "output"}


def test_a_hanging_or_crashing_function_costs_only_its_own_test(demo_repo):
    tests = {t.nodeid.rsplit("::", 1)[-1]: t for t in grade(demo_repo, ["ch98"], "exercises")}
    assert tests["test_add"].passed and tests["test_after_the_crash"].passed
    assert not tests["test_add_negative"].passed and "assert" in tests["test_add_negative"].output
    assert (
        not tests["test_hangs_on_stub"].passed and "Timeout" in tests["test_hangs_on_stub"].output
    )
    assert not tests["test_crashes_on_stub"].passed
    assert "died" in tests["test_crashes_on_stub"].output
    table = chapter_table(list(tests.values()))
    rows = [line.split() for line in table.splitlines()]
    assert ["ch98", "2/5", "7/15"] in rows and ["total", "2/5", "7/15"] in rows


def test_unknown_chapter_is_refused(demo_repo):
    with pytest.raises(InputError, match="ch98"):
        grade(demo_repo, ["ch97"], "solutions")


def test_a_graded_test_without_points_is_refused(demo_repo, tmp_path):
    bad = demo_repo / "tests" / "exercises" / "test_ch97_nopoints.py"
    bad.write_text("def test_free():\n    assert True\n")
    try:
        run = subprocess.run(
            [sys.executable, "-m", "pytest", str(bad)],
            cwd=demo_repo,
            capture_output=True,
            text=True,
        )
    finally:
        bad.unlink()
    assert run.returncode != 0 and "needs @pytest.mark.points" in run.stdout + run.stderr


def _cli_grade(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "minillm.cli", "grade", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
    )


def test_reference_solutions_score_full_marks(tmp_path):
    run = _cli_grade("--impl", "solutions", "--json", str(tmp_path / "r.json"))
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert graded_files(REPO) and report["tests"], "no graded tests found"
    failed = [t["name"] for t in report["tests"] if t["status"] != "passed"]
    assert not failed
    assert report["score"] == sum(t["max_score"] for t in report["tests"])


def _exercises_untouched() -> bool:
    changed = subprocess.run(
        ["git", "status", "--porcelain", "--", "exercises"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    return changed.returncode != 0 or changed.stdout.strip() == ""


@pytest.mark.skipif(
    not _exercises_untouched(),
    reason="exercises/ holds your own answers; the stub check runs on a clean checkout",
)
def test_every_graded_test_fails_on_the_untouched_stubs(tmp_path):
    run = _cli_grade("--impl", "exercises", "--json", str(tmp_path / "r.json"))
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["tests"]) >= 6 * len(graded_files(REPO))
    passing = [t["name"] for t in report["tests"] if t["status"] == "passed"]
    assert not passing, f"graded tests that pass on the stubs hand out free points: {passing}"
    assert report["score"] == 0
