"""The graded-exercise harness. Every test here is worth points and reaches the student's code
only through the `impl` fixture: `impl("ch01_preprocessing")` imports that module of the chosen
implementation (exercises/ or solutions/) in a fresh sandboxed worker process and returns a
proxy to it, so this process (which decides pass or fail) never runs student code. A test file
may declare `OFF_LIMITS = {"exercise_function": ("library.function", ...)}`: calling one of those
from that exercise fails the test (see minillm.grading.remote and minillm.grading.worker). It may
also declare `WORKER_IMPORTS`, the libraries its exercises import (default: remote.PREIMPORTS,
which covers every chapter): the worker gets them already imported."""

import os

import pytest

from minillm.grading.remote import DEFAULT_MEMORY_MB, PREIMPORTS, Sandbox

# A hanging student function costs only its own test.
GRADED_TEST_TIMEOUT_S = 60
# The trusted side's own work (references, collection) gets this much on top, for pytest-timeout.
JUDGE_MARGIN_S = 120

_LIMIT = pytest.StashKey[float]()
_SANDBOX = pytest.StashKey[Sandbox]()


def _graded(item) -> bool:
    return "tests/exercises/" in item.nodeid.replace("\\", "/")


def time_limit(item) -> float:
    """The test's own limit (its timeout marker, else the default), capped by
    $MINILLM_GRADE_TIME_LIMIT_S (`minillm grade --time-limit`)."""
    marker = item.get_closest_marker("timeout")
    limit = float(marker.args[0]) if marker and marker.args else GRADED_TEST_TIMEOUT_S
    cap = os.environ.get("MINILLM_GRADE_TIME_LIMIT_S")
    return min(limit, float(cap)) if cap else limit


def pytest_collection_modifyitems(config, items):
    graded = [item for item in items if _graded(item)]
    for item in graded:
        marker = item.get_closest_marker("points")
        if marker is None or not marker.args or marker.args[0] <= 0:
            raise pytest.UsageError(
                f"graded test {item.nodeid} needs @pytest.mark.points(n), n > 0"
            )
        item.stash[_LIMIT] = time_limit(item)
        item.user_properties.append(("time_limit_s", item.stash[_LIMIT]))
        item.add_marker(pytest.mark.timeout(item.stash[_LIMIT] + JUDGE_MARGIN_S), append=False)
    if graded and _SANDBOX not in config.stash:
        # Started now, so the zygote imports its libraries while the first test gets ready.
        modules = {item.module for item in graded}
        off_limits = {
            name
            for module in modules
            for names in getattr(module, "OFF_LIMITS", {}).values()
            for name in names
        }
        worker_imports = {
            name for module in modules for name in getattr(module, "WORKER_IMPORTS", PREIMPORTS)
        }
        package = config.getoption("--impl")
        config.stash[_SANDBOX] = Sandbox(
            config.rootpath,
            package,
            memory_mb=int(os.environ.get("MINILLM_GRADE_MEMORY_MB", DEFAULT_MEMORY_MB)),
            preimports=sorted(worker_imports | off_limits),
            blocked=() if package == "solutions" else ("solutions",),
        )


def pytest_unconfigure(config):
    if _SANDBOX in config.stash:
        config.stash[_SANDBOX].close()


@pytest.fixture
def impl(request):
    """`impl("ch01_preprocessing")`: that module of the implementation being graded, imported in
    a sandboxed worker that lives as long as this test."""
    sandbox = request.config.stash[_SANDBOX]
    package = request.config.getoption("--impl")
    off_limits = getattr(request.module, "OFF_LIMITS", {})
    sessions = []

    def load(topic: str):
        session = sandbox.spawn(f"{package}.{topic}", request.node.stash[_LIMIT], off_limits)
        sessions.append(session)
        return session.start()

    yield load
    violations = []
    for session in sessions:
        if output := session.finish().strip():
            request.node.add_report_section("teardown", "output of the code under test", output)
        if session.violations:
            violations.append(session.violation_text())
    if violations:
        pytest.fail("; ".join(violations), pytrace=False)
