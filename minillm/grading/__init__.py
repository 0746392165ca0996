"""`minillm grade`: run the graded exercise tests, print points per chapter, write Gradescope's
results.json.

Tests run in a pytest subprocess that logs every test as it starts and ends. A student function that
hangs hits the test's time limit; one that kills the process (a segfault, `os._exit`) is charged to
the test that was running, and the remaining tests run in a fresh process.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from minillm.errors import MiniLLMError, unknown_name

IMPLEMENTATIONS = ("exercises", "solutions")
_GRADED_FILE = re.compile(r"test_(ch\d\d)_\w+\.py")
_OUTPUT_LIMIT = 2000  # characters of failure output kept per test


@dataclass
class GradedTest:
    nodeid: str
    points: float
    passed: bool = False
    output: str = "not run"

    @property
    def chapter(self) -> str:
        return _GRADED_FILE.search(self.nodeid).group(1)

    @property
    def score(self) -> float:
        return self.points if self.passed else 0.0


def graded_files(root: Path) -> dict[str, Path]:
    """Chapter ("ch01") -> its graded test file."""
    files = {}
    for path in sorted((root / "tests" / "exercises").glob("test_ch*.py")):
        if match := _GRADED_FILE.fullmatch(path.name):
            files[match.group(1)] = path
    return files


def _run_pytest(root: Path, targets: list[str], impl: str, log: Path) -> int:
    command = [
        sys.executable,
        "-m",
        "pytest",
        *targets,
        f"--impl={impl}",
        "-p",
        "minillm._grading_plugin",
        "-p",
        "no:cacheprovider",
        "-q",
        "--no-header",
        "-rN",
    ]
    env = {**os.environ, "MINILLM_GRADE_LOG": str(log), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True).returncode


def run_graded_tests(root: Path, chapters: list[str], impl: str) -> list[GradedTest]:
    """Run the graded tests of `chapters` against `impl` ("exercises" or "solutions")."""
    if impl not in IMPLEMENTATIONS:
        raise unknown_name("implementation", impl, IMPLEMENTATIONS)
    files = graded_files(root)
    for chapter in chapters:
        if chapter not in files:
            raise unknown_name("chapter with graded exercises", chapter, files)
    targets = [str(files[c].relative_to(root)) for c in chapters or files]
    tests: dict[str, GradedTest] = {}
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "events.jsonl"
        while targets:
            log.write_text("")
            code = _run_pytest(root, targets, impl, log)
            running = None
            for line in log.read_text(encoding="utf-8").splitlines():
                event = json.loads(line)
                nodeid = event["nodeid"]
                if event["event"] == "collected":
                    tests.setdefault(nodeid, GradedTest(nodeid, event["points"]))
                elif event["event"] == "start":
                    running = nodeid
                else:
                    tests[nodeid].passed = event["passed"]
                    tests[nodeid].output = event["output"][-_OUTPUT_LIMIT:]
                    running = None
            if not tests:
                raise MiniLLMError(f"pytest collected no graded tests (exit code {code})")
            if running is None:
                break  # the run finished normally
            tests[running].output = (
                f"the test process died while running this test (exit code {code}); "
                "does your function call exit() or crash the interpreter?"
            )
            done = {n for n, t in tests.items() if t.output != "not run"}
            targets = [n for n in tests if n not in done]
    return list(tests.values())


def chapter_table(tests: list[GradedTest]) -> str:
    """A per-chapter table: tests passed and points earned of possible."""
    rows = [("chapter", "tests passed", "points")]
    chapters = sorted({t.chapter for t in tests})
    for chapter in [*chapters, "total"]:
        group = [t for t in tests if chapter in ("total", t.chapter)]
        passed = sum(t.passed for t in group)
        rows.append(
            (
                chapter,
                f"{passed}/{len(group)}",
                f"{sum(t.score for t in group):g}/{sum(t.points for t in group):g}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows
    )


def gradescope_results(tests: list[GradedTest], seconds: float) -> dict:
    """Gradescope's results.json: overall score plus one entry per test."""
    return {
        "score": sum(t.score for t in tests),
        "execution_time": round(seconds, 1),
        "tests": [
            {
                "name": t.nodeid.split("::", 1)[-1],
                "number": t.chapter,
                "score": t.score,
                "max_score": t.points,
                "status": "passed" if t.passed else "failed",
                "output": t.output,
            }
            for t in tests
        ],
    }


def grade(
    root: Path, chapters: list[str], impl: str, json_path: Path | None = None
) -> list[GradedTest]:
    start = time.perf_counter()
    tests = run_graded_tests(root, chapters, impl)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        results = gradescope_results(tests, time.perf_counter() - start)
        json_path.write_text(json.dumps(results, indent=2))
    return tests
