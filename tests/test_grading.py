"""The grader: points per test, feedback that names what a failing test checks, Gradescope's
format written atomically, time limits, crashes and memory limits charged to one test, calls
through the sandbox (arguments changed in place, objects that stay in the worker, exceptions,
off-limits functions); and on the real exercises, full marks for solutions/ and zero for the
untouched stubs."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from minillm.grading import graded_files

REPO = Path(__file__).resolve().parents[1]

DEMO_TESTS = '''
import numpy as np
import pytest
import torch

OFF_LIMITS = {"add": ("operator.add",)}


@pytest.fixture
def ex(impl):
    return impl("ch98_demo")


@pytest.mark.points(2)
def test_add(ex):
    """Adds two numbers."""
    assert ex.add(2, 3) == 5


@pytest.mark.points(3)
def test_add_negative(ex):
    """Catches adding the magnitudes of negative numbers.

    A second paragraph that the grade output leaves out."""
    assert ex.add(-2, -3) == -5, "add(-2, -3) is -5"


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


@pytest.mark.points(1)
def test_through_the_sandbox(ex):
    """Arguments changed in place, objects that stay in the worker, exceptions."""
    a = np.zeros(3)
    t = torch.nn.Parameter(torch.ones(2))
    t.grad = torch.full((2,), 4.0)
    assert ex.double_in_place(a, t) is None
    np.testing.assert_array_equal(a, [2.0, 2.0, 2.0])
    torch.testing.assert_close(t.detach(), torch.full((2,), 2.0))
    torch.testing.assert_close(t.grad, torch.full((2,), 8.0))  # gradients travel both ways
    counter = ex.Counter(start=5)
    assert counter.bump() == 6 and counter.bump() == 7 and counter.value == 7
    with pytest.raises(ValueError, match="negative"):
        ex.Counter(start=-1)
    assert type(ex.forged()) is float  # a float subclass arrives as a plain float
'''

DEMO_SOLUTION = """
def add(a, b):
    return a + b


def hang():
    return "done"


def crash():
    return "fine"


def double_in_place(a, t):
    a += 2.0
    t.data *= 2
    t.grad *= 2


class Counter:
    def __init__(self, start):
        if start < 0:
            raise ValueError("a negative start")
        self.value = start

    def bump(self):
        self.value += 1
        return self.value


class _Forged(float):
    def __eq__(self, other):
        return True


def forged():
    return _Forged(1.0)


def allocate(mb):
    return len(bytearray(mb << 20))
"""

DEMO_STUDENT = """
import operator
import os
import time


def add(a, b):
    if a < 0:
        return operator.add(-a, -b)  # off limits, and wrong too
    return a + b


def hang():
    while True:
        time.sleep(0.1)


def crash():
    os._exit(3)
"""

MEMORY_TESTS = """
import pytest


@pytest.mark.points(1)
def test_allocates_600_mb(impl):
    assert impl("ch97_memory").allocate(600) == 600 << 20
"""


TASKS_TESTS = """
import pytest


@pytest.mark.points(1)
def test_starts_400_processes(impl):
    assert impl("ch94_tasks").start_sleepers(400) == 400
"""

TASKS_SUBMISSION = """
import os
import time


def start_sleepers(n):
    started = 0
    for _ in range(n):
        try:
            pid = os.fork()
        except BlockingIOError:  # the task limit
            break
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        started += 1
    return started
"""


@pytest.fixture(scope="module")
def demo_repo(tmp_path_factory):
    """A throwaway course repository with two graded chapters, using the real conftest files."""
    root = tmp_path_factory.mktemp("course")
    (root / "tests" / "exercises").mkdir(parents=True)
    for path in ("tests/conftest.py", "tests/exercises/conftest.py"):
        shutil.copy(REPO / path, root / path)
    (root / "tests" / "exercises" / "test_ch98_demo.py").write_text(DEMO_TESTS)
    (root / "tests" / "exercises" / "test_ch97_memory.py").write_text(MEMORY_TESTS)
    (root / "tests" / "exercises" / "test_ch94_tasks.py").write_text(TASKS_TESTS)
    for package, body in (("exercises", DEMO_STUDENT), ("solutions", DEMO_SOLUTION)):
        (root / package).mkdir()
        (root / package / "__init__.py").write_text("")
        (root / package / "ch98_demo.py").write_text(body)
        (root / package / "ch97_memory.py").write_text(DEMO_SOLUTION)
        (root / package / "ch94_tasks.py").write_text(TASKS_SUBMISSION)
    (root / "pytest.ini").write_text(
        textwrap.dedent("""
        [pytest]
        pythonpath = .
        markers =
            points(n): points
    """)
    )
    return root


def _grade(*args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "minillm.cli", "grade", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
    )


def _demo(demo_repo, tmp_path, *args):
    results = tmp_path / "results.json"
    run = _grade("--course", str(demo_repo), "--json", str(results), *args)
    assert run.returncode == 0, run.stdout + run.stderr
    return run, json.loads(results.read_text())


def test_solutions_earn_every_point_and_gradescope_json_has_the_right_shape(demo_repo, tmp_path):
    run, report = _demo(demo_repo, tmp_path, "ch98", "--impl", "solutions")
    assert [t["status"] for t in report["tests"]] == ["passed"] * 6
    assert report["score"] == 16
    assert [t["max_score"] for t in report["tests"]] == [2, 3, 1, 4, 5, 1]
    assert set(report["tests"][0]) >= {"name", "score", "max_score", "status", "output"}
    assert "16 of 16 points, 6 of 6 tests passed" in run.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"], "a temporary file was left"


def test_a_hanging_or_crashing_function_costs_only_its_own_test(demo_repo, tmp_path):
    run, report = _demo(demo_repo, tmp_path, "ch98")
    tests = {t["name"]: t for t in report["tests"]}
    assert tests["test_add"]["status"] == tests["test_after_the_crash"]["status"] == "passed"
    assert "time limit" in tests["test_hangs_on_stub"]["output"]
    assert "ended during this call" in tests["test_crashes_on_stub"]["output"]
    rows = [line.split() for line in run.stdout.splitlines()]
    assert ["ch98", "2/6", "7/16"] in rows and ["total", "2/6", "7/16"] in rows


def test_feedback_names_what_the_failing_test_checks_and_the_assertion(demo_repo, tmp_path):
    run, report = _demo(demo_repo, tmp_path, "ch98")
    out = run.stdout
    assert "7 of 16 points, 2 of 6 tests passed" in out
    block = out[out.index("ch98 test_add_negative") :].split("\n  ch98 ")[0]
    assert "ch98 test_add_negative (3 points)" in block
    assert "checks: Catches adding the magnitudes of negative numbers." in block
    assert "second paragraph" not in block
    assert "add must not call operator.add" in block  # the off-limits call, not a bare assert
    assert "ch98 test_hangs_on_stub (1 point)" in out  # singular
    assert "(--verbose shows each failing test's full output)" in out
    verbose = _grade("--course", str(demo_repo), "ch98", "--verbose").stdout
    assert "full output:" in verbose and "def test_hangs_on_stub(ex):" in verbose
    negative = {t["name"]: t for t in report["tests"]}["test_add_negative"]["output"]
    assert "Catches adding the magnitudes" in negative and "operator.add" in negative


def test_a_wrong_answer_says_what_was_expected(demo_repo, tmp_path):
    (demo_repo / "exercises" / "ch98_demo.py").write_text(
        DEMO_STUDENT.replace("return operator.add(-a, -b)", "return -a - b")
    )
    try:
        run = _grade("--course", str(demo_repo), "ch98")
    finally:
        (demo_repo / "exercises" / "ch98_demo.py").write_text(DEMO_STUDENT)
    block = run.stdout[run.stdout.index("ch98 test_add_negative") :]
    assert "got:    AssertionError: add(-2, -3) is -5" in block
    assert "assert 5 == -5" in block


def test_the_memory_limit_is_per_test_and_configurable(demo_repo, tmp_path):
    _, roomy = _demo(demo_repo, tmp_path, "ch97", "--memory-mb", "2048")
    assert roomy["score"] == 1
    _, tight = _demo(demo_repo, tmp_path, "ch97", "--memory-mb", "300")
    assert tight["score"] == 0 and "MemoryError" in tight["tests"][0]["output"]


def test_a_submission_starts_no_more_tasks_than_the_limit_even_as_root(demo_repo, tmp_path):
    """256 tasks (threads count) beyond what a worker holds when it starts: RLIMIT_NPROC for a
    user, and a pids cgroup where the worker stays uid 0 (root with Landlock), which Linux
    exempts from RLIMIT_NPROC; where no cgroup can be made, the grader counts the tasks and
    stops them all past the limit."""
    import os
    import re

    from minillm.grading import isolation

    if os.geteuid() == 0 and isolation.landlock_abi() > 0:
        probe = isolation.tasks_cgroup(f"minillm-probe-{os.getpid()}")
        if probe is None:
            _, report = _demo(demo_repo, tmp_path, "ch94")
            output = report["tests"][0]["output"]
            assert report["score"] == 0 and "more than 256 processes or threads" in output
            return
        isolation.remove_tasks_cgroup(probe)
    _, report = _demo(demo_repo, tmp_path, "ch94")
    output = report["tests"][0]["output"]
    started = re.search(r"assert (\d+) == 400", output)
    assert report["score"] == 0 and started, output[-2000:]
    assert 0 < int(started.group(1)) <= 256


BOUNDED_FORK_BOMB = """
import os
import signal

for _ in range(600):  # 600 waiting children: past the limit, yet bounded should the grader fail
    if os.fork() == 0:
        break
signal.pause()
"""


def test_where_no_cgroup_holds_a_uid0_worker_its_tasks_are_counted_and_stopped(demo_repo):
    """cgroup v2, or no pids hierarchy: a worker that stays uid 0 is not bound by RLIMIT_NPROC
    and joins no cgroup, so its session counts the tasks below the zygote and kills them all
    once they pass the 256 it may start."""
    import os
    import time

    from minillm.grading import isolation
    from minillm.grading.remote import CodeUnderTestError, Sandbox

    if not (os.geteuid() == 0 and isolation.landlock_abi() > 0):
        why = "workers stay uid 0 only where the grader runs as root with Landlock"
        if os.environ.get("MINILLM_CI"):  # in CI the machine must have what the test needs
            pytest.fail(why)
        pytest.skip(why)
    (demo_repo / "solutions" / "ch93_fork_bomb.py").write_text(BOUNDED_FORK_BOMB)
    sandbox = Sandbox(demo_repo, "solutions", memory_mb=1024, preimports=[], use_cgroup=False)
    try:
        assert sandbox.tasks_cgroup is None and sandbox.task_watch is not None
        # An honest worker may start all but a few of its 256.
        honest = sandbox.spawn("solutions.ch94_tasks", 60.0, {})
        assert honest.start().start_sleepers(250) == 250
        time.sleep(0.5)  # ten counts of the watch
        assert len(isolation.descendants(sandbox.zygote.pid)) == 251, honest.ended
        honest.finish()
        session = sandbox.spawn("solutions.ch93_fork_bomb", 60.0, {})
        start = time.monotonic()
        with pytest.raises(CodeUnderTestError, match="more than 256 processes or threads"):
            session.start()
        assert time.monotonic() - start < 30, "stopped by the time limit, not the task count"
        assert isolation.descendants(sandbox.zygote.pid) == set()
        session.finish()
        # The next worker has its whole allowance again.
        after = sandbox.spawn("solutions.ch94_tasks", 60.0, {})
        assert after.start().start_sleepers(250) == 250
        time.sleep(0.5)
        assert len(isolation.descendants(sandbox.zygote.pid)) == 251, after.ended
        after.finish()
    finally:
        sandbox.close()


def test_tasks_below_counts_every_thread_of_every_descendant():
    """Below a child: its child's main thread and 3 more, and a zombie it has not reaped: 5
    tasks, as RLIMIT_NPROC counts them; 1 living process."""
    import subprocess
    import sys
    import time

    from minillm.grading import isolation

    grandchild = (
        "import threading, time\n"
        "for _ in range(3): threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
        "print('ready', flush=True); time.sleep(60)"
    )
    child = (
        "import subprocess, sys\n"
        f"p = subprocess.Popen([sys.executable, '-c', {grandchild!r}], stdout=subprocess.PIPE)\n"
        "import os\n"
        "if os.fork() == 0: os._exit(0)\n"  # a zombie: never waited for
        "print(p.stdout.readline().decode().strip(), flush=True); p.wait()"
    )
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.2)  # the zombie's exit
        assert isolation.tasks_below(proc.pid) == 5
        assert len(isolation.descendants(proc.pid)) == 1
    finally:
        isolation.kill_all(lambda: isolation.descendants(proc.pid))
        proc.kill()
        proc.wait()


def test_unknown_chapter_is_refused(demo_repo):
    run = _grade("--course", str(demo_repo), "ch90")
    assert run.returncode == 2 and "ch98" in run.stderr


def test_tests_that_cannot_be_collected_stop_the_grade_and_still_write_results(demo_repo, tmp_path):
    broken = demo_repo / "tests" / "exercises" / "test_ch96_broken.py"
    broken.write_text("import a_module_that_does_not_exist\n")
    results = tmp_path / "results.json"
    try:
        run = _grade("--course", str(demo_repo), "ch96", "--json", str(results))
    finally:
        broken.unlink()
    assert run.returncode == 2 and "could not be collected" in run.stderr
    report = json.loads(results.read_text())
    assert report["score"] == 0 and "a_module_that_does_not_exist" in report["output"]


def test_a_graded_test_without_points_is_refused(demo_repo, tmp_path):
    bad = demo_repo / "tests" / "exercises" / "test_ch95_nopoints.py"
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


def test_the_course_grades_the_reference_solutions_of_two_chapters_with_full_marks(tmp_path):
    """`minillm grade` on the course itself, across chapters. That every graded test passes on
    the reference solutions is the suite's own run of tests/exercises (the same sandbox, with
    --impl solutions, the default): grading the whole course here again would double it."""
    run = _grade("ch01", "ch03", "--impl", "solutions", "--json", str(tmp_path / "r.json"))
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert graded_files(REPO) and report["tests"], "no graded tests found"
    failed = [t["name"] for t in report["tests"] if t["status"] != "passed"]
    assert not failed
    assert report["score"] == sum(t["max_score"] for t in report["tests"]) > 0
    # The table: a row per chapter and the total, every test passed and every point earned.
    rows = {
        cells[0]: [cell.split("/") for cell in cells[1:]]
        for cells in (line.split() for line in run.stdout.splitlines())
        if cells and cells[0] in ("ch01", "ch03", "total")
    }
    assert set(rows) == {"ch01", "ch03", "total"}, run.stdout
    assert all(done == of for cells in rows.values() for done, of in cells), run.stdout
    tests, points = rows["total"]
    assert int(tests[1]) == len(report["tests"]) and int(points[1]) == report["score"]


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
    run = _grade("--impl", "exercises", "--json", str(tmp_path / "r.json"))
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["tests"]) >= 6 * len(graded_files(REPO))
    passing = [t["name"] for t in report["tests"] if t["status"] == "passed"]
    assert not passing, f"graded tests that pass on the stubs hand out free points: {passing}"
    assert report["score"] == 0
