"""pytest plugin loaded by `minillm grade`: appends one JSON line per event to $MINILLM_GRADE_LOG,
so the grader can tell which test was running if a student function kills the process."""

import json
import os

_outcomes: dict[str, list] = {}


def _log(**event) -> None:
    with open(os.environ["MINILLM_GRADE_LOG"], "a", encoding="utf-8") as f:
        f.write(json.dumps(event) + "\n")
        f.flush()


def pytest_collection_modifyitems(items):
    for item in items:
        marker = item.get_closest_marker("points")
        _log(event="collected", nodeid=item.nodeid, points=marker.args[0] if marker else 0)


def pytest_runtest_logstart(nodeid):
    _log(event="start", nodeid=nodeid)


def pytest_runtest_logreport(report):
    _outcomes.setdefault(report.nodeid, []).append(report)
    if report.when != "teardown":
        return
    reports = _outcomes.pop(report.nodeid)
    failed = [r for r in reports if r.failed]
    passed = not failed and any(r.when == "call" and r.passed for r in reports)
    if failed:
        output = failed[0].longreprtext
    elif not passed:
        output = "skipped: a skipped graded test earns no points"
    else:
        output = ""
    _log(event="result", nodeid=report.nodeid, passed=passed, output=output)
