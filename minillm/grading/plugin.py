"""pytest plugin loaded by `minillm grade` in the trusted test process: appends one JSON line per
event to $MINILLM_GRADE_LOG (a file in the grader's private folder, which no worker can reach),
so the grader knows the graded tests, their points and limits before any student code runs, and
which test was running should the test process itself end."""

import json
import os

import pytest

from minillm.grading import isolation

_reports: dict[str, list] = {}


def _log(**event) -> None:
    with open(os.environ["MINILLM_GRADE_LOG"], "a", encoding="utf-8") as f:
        f.write(json.dumps(event) + "\n")


def _checks(item) -> str:
    """What the test checks: its docstring's first paragraph, on one line."""
    doc = getattr(getattr(item, "obj", None), "__doc__", None) or ""
    return " ".join(doc.strip().split("\n\n", 1)[0].split())


def pytest_configure(config):
    isolation.protect_from_tracing()


@pytest.hookimpl(trylast=True)  # after the conftest has checked points and set time limits
def pytest_collection_modifyitems(items):
    for item in items:
        marker = item.get_closest_marker("points")
        limit = dict(item.user_properties).get("time_limit_s")
        _log(
            event="collected",
            nodeid=item.nodeid,
            points=marker.args[0] if marker and marker.args else 0,
            limit_s=limit,
            checks=_checks(item),
        )


def pytest_collectreport(report):
    if report.failed:
        _log(event="collect_error", report=f"{report.nodeid}: {report.longreprtext[-3000:]}")


def pytest_runtest_logstart(nodeid):
    _log(event="start", nodeid=nodeid)


def _message(report) -> str:
    """The failure's own message: the assertion and its explanation, or the exception."""
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    text = text.removeprefix("minillm.grading.remote.CodeUnderTestError: ")
    lines = text.strip().splitlines()
    return "\n".join(lines[:12])[:1500]


def pytest_runtest_logreport(report):
    _reports.setdefault(report.nodeid, []).append(report)
    if report.when != "teardown":
        return
    reports = _reports.pop(report.nodeid)
    failed = [r for r in reports if r.failed]
    passed = not failed and any(r.when == "call" and r.passed for r in reports)
    if failed:
        message = _message(failed[0])
        output = "\n\n".join(
            [failed[0].longreprtext]
            + [f"--- {title} ---\n{body}" for r in reports for title, body in r.sections]
        )
    elif not passed:
        message = output = "skipped: a skipped graded test earns no points"
    else:
        message = output = ""
    _log(event="result", nodeid=report.nodeid, passed=passed, message=message, output=output)
