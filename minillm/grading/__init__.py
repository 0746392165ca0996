"""`minillm grade`: run the graded exercise tests, print points per chapter with feedback that
says what each failing test checks, write Gradescope's results.json.

Three kinds of process, and student code runs in only one of them:
- this one, the grader: it starts the trusted test process, follows its event log (in a private
  folder), and writes the results;
- the trusted test process: pytest on tests/exercises with the `minillm.grading.plugin` plugin;
  it collects the tests and their points before any student code exists, computes every
  reference and decides pass or fail, and never imports student code;
- one sandboxed worker per test (minillm.grading.worker), in which the student's module is
  imported and called through proxies (minillm.grading.remote).

A test that runs past its limit has its worker killed, with everything the worker started. Should
the trusted process itself end during a test, that test is charged and the rest run in a new one.
Before the results are written, every process left below the grader is killed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from minillm.errors import MiniLLMError, unknown_name

IMPLEMENTATIONS = ("exercises", "solutions")
DEFAULT_MEMORY_MB = 4096  # per test, on top of the libraries a worker starts with
_GRADED_FILE = re.compile(r"test_(ch\d\d)_\w+\.py")
_OUTPUT_LIMIT = 6000  # characters of a failing test's full output kept
_JUDGE_GRACE_S = 150.0  # the trusted side's own time per test beyond the test's limit


@dataclass
class GradedTest:
    nodeid: str
    points: float
    limit_s: float | None = None
    checks: str = ""  # what the test checks: its docstring's first paragraph
    passed: bool = False
    message: str = "not run"  # why it failed: the assertion's message or the exception
    output: str = ""  # the full failure report, and what the code under test printed
    ran: bool = False

    @property
    def chapter(self) -> str:
        return _GRADED_FILE.search(self.nodeid).group(1)

    @property
    def name(self) -> str:
        return self.nodeid.split("::", 1)[-1]

    @property
    def score(self) -> float:
        return self.points if self.passed else 0.0


def sandbox_warning() -> str | None:
    """What this machine's kernel cannot isolate, for the person grading; None when all is."""
    from minillm.grading import isolation

    abi = isolation.landlock_abi()
    if abi == 0 and os.getuid() != 0:
        return (
            "warning: this kernel has no Landlock and the grader does not run as root, so the "
            "code under test runs with your permissions (it could read solutions/ or change the "
            "tests); grade untrusted code as root, or on Linux 5.13 or newer"
        )
    if 0 < abi < 6:
        return (
            f"note: Landlock ABI {abi} cannot keep the code under test from signalling the "
            "grader's processes (ABI 6, Linux 6.12, can)"
        )
    return None


def graded_files(root: Path) -> dict[str, Path]:
    """Chapter ("ch01") -> its graded test file."""
    files = {}
    for path in sorted((root / "tests" / "exercises").glob("test_ch*.py")):
        if match := _GRADED_FILE.fullmatch(path.name):
            files[match.group(1)] = path
    return files


def counted(n: float, word: str) -> str:
    """ "1 point", "2 points", "1.5 points"."""
    return f"{n:g} {word}{'' if n == 1 else 's'}"


class _Judge:
    """One run of the trusted test process, followed through its event log."""

    def __init__(self, root: Path, targets: list[str], impl: str, folder: Path, env: dict):
        self.log = folder / "events.jsonl"
        self.log.write_text("")
        self.console = folder / "pytest-output.txt"
        command = [
            sys.executable,
            "-m",
            "pytest",
            *targets,
            f"--impl={impl}",
            "-p",
            "minillm.grading.plugin",
            "-p",
            "no:cacheprovider",
            # Hypothesis's plugin imports Hypothesis (2 s of every grade's start-up); `@given`
            # works without it, and no graded test uses it today. AnyIO's imports trio (almost
            # 1 s), for async tests, which no graded test is.
            "-p",
            "no:hypothesispytest",
            "-p",
            "no:anyio",
            "-q",
            "--no-header",
            "-rN",
        ]
        with self.console.open("wb") as console:
            self.process = subprocess.Popen(
                command,
                cwd=root,
                env={**env, "MINILLM_GRADE_LOG": str(self.log)},
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
            )
        self.offset = 0
        self.collection_errors: list[str] = []
        self.running: str | None = None
        self.started = 0.0

    def events(self):
        with self.log.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.decode("utf-8").splitlines():
            yield json.loads(line)


def run_graded_tests(
    root: Path,
    chapters: list[str],
    impl: str,
    *,
    memory_mb: int = DEFAULT_MEMORY_MB,
    time_limit_s: float | None = None,
) -> list[GradedTest]:
    """Run the graded tests of `chapters` (all when empty) against `impl`."""
    from minillm.grading import isolation

    if impl not in IMPLEMENTATIONS:
        raise unknown_name("implementation", impl, IMPLEMENTATIONS)
    files = graded_files(root)
    for chapter in chapters:
        if chapter not in files:
            raise unknown_name("chapter with graded exercises", chapter, files)
    targets = [str(files[c].relative_to(root)) for c in chapters or files]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "MINILLM_GRADE_MEMORY_MB": str(memory_mb)}
    if time_limit_s is not None:
        env["MINILLM_GRADE_TIME_LIMIT_S"] = str(time_limit_s)
    isolation.become_subreaper()  # what the test process leaves behind stays below us
    isolation.protect_from_tracing()
    mine = isolation.children(os.getpid())
    tests: dict[str, GradedTest] = {}
    with tempfile.TemporaryDirectory(prefix="minillm-grade-") as folder:
        while targets:
            judge = _Judge(root, targets, impl, Path(folder), env)
            progress = _follow(judge, tests, collecting=not tests)
            isolation.kill_all(lambda: isolation.descendants(os.getpid(), mine))
            if judge.collection_errors:
                raise MiniLLMError(
                    "the graded tests could not be collected (nothing was graded):\n"
                    + "\n".join(judge.collection_errors)
                )
            if not tests:
                console = judge.console.read_text(errors="replace")[-3000:]
                raise MiniLLMError(
                    f"pytest collected no graded tests (exit code {judge.process.returncode}):"
                    f"\n{console}"
                )
            if judge.running is not None:
                test = tests[judge.running]
                test.ran = True
                test.message = (
                    test.message
                    if test.message != "not run"
                    else (
                        "the test process ended while this test ran "
                        f"(exit code {judge.process.returncode})"
                    )
                )
            remaining = [n for n, t in tests.items() if not t.ran]
            if not progress or remaining == targets:
                break
            targets = remaining
    return list(tests.values())


def _follow(judge: _Judge, tests: dict[str, GradedTest], collecting: bool) -> bool:
    """Read the judge's events until it exits; stop it if a test overruns. Whether any test
    finished."""
    progress = False
    while True:
        done = judge.process.poll() is not None
        for event in judge.events():
            nodeid = event.get("nodeid")
            if event["event"] == "collect_error":
                judge.collection_errors.append(event["report"])
            elif event["event"] == "collected":
                if collecting:
                    tests.setdefault(
                        nodeid,
                        GradedTest(nodeid, event["points"], event["limit_s"], event["checks"]),
                    )
            elif nodeid not in tests:
                continue  # only the tests collected first count
            elif event["event"] == "start":
                judge.running, judge.started = nodeid, time.monotonic()
            else:
                test = tests[nodeid]
                test.passed, test.ran = bool(event["passed"]), True
                test.message = event["message"]
                test.output = event["output"][-_OUTPUT_LIMIT:]
                judge.running, progress = None, True
        if done:
            return progress
        if judge.running is not None:
            limit = (tests[judge.running].limit_s or 60.0) + _JUDGE_GRACE_S
            if time.monotonic() - judge.started > limit:
                judge.process.kill()
                judge.process.wait()
                tests[
                    judge.running
                ].message = (
                    f"the test did not finish within {limit:g} s and its test process was stopped"
                )
                continue
        time.sleep(0.1)


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
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def summary(tests: list[GradedTest]) -> str:
    """ "7 of 15 points, 2 of 5 tests passed"."""
    passed = sum(t.passed for t in tests)
    score, points = sum(t.score for t in tests), sum(t.points for t in tests)
    return (
        f"{score:g} of {counted(points, 'point')}, {passed} of {counted(len(tests), 'test')} passed"
    )


def feedback(test: GradedTest, verbose: bool = False) -> str:
    """What a failing test checks and what went wrong, for a person to read."""
    width = 100
    lines = [f"{test.chapter} {test.name} ({counted(test.points, 'point')})"]
    if test.checks:
        lines += textwrap.wrap(
            test.checks, width, initial_indent="  checks: ", subsequent_indent="          "
        )
    message = []
    for line in test.message.strip().splitlines()[:8]:
        if not line.strip():
            break  # the first paragraph: the message, not the traceback after it
        message.append(line.rstrip())
    message = message or [""]
    lines.append(f"  got:    {message[0]}")
    lines += [f"          {line}" for line in message[1:]]
    if verbose and test.output:
        lines += ["  full output:", textwrap.indent(test.output.rstrip(), "    | ")]
    return "\n".join(lines)


def gradescope_results(tests: list[GradedTest], seconds: float) -> dict:
    """Gradescope's results.json: overall score plus one entry per test."""
    return {
        "score": sum(t.score for t in tests),
        "execution_time": round(seconds, 1),
        "tests": [
            {
                "name": t.name,
                "number": t.chapter,
                "score": t.score,
                "max_score": t.points,
                "status": "passed" if t.passed else "failed",
                "output": "" if t.passed else feedback(t, verbose=True),
            }
            for t in tests
        ],
    }


def write_json_atomically(path: Path, data: dict) -> None:
    """Write to a temporary file beside `path`, then rename: readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def grade(
    root: Path,
    chapters: list[str],
    impl: str,
    json_path: Path | None = None,
    *,
    memory_mb: int = DEFAULT_MEMORY_MB,
    time_limit_s: float | None = None,
) -> list[GradedTest]:
    """Grade and, with `json_path`, write Gradescope's results.json; a grade that cannot run
    still writes one (score 0, the reason as its output) before raising."""
    start = time.perf_counter()
    try:
        tests = run_graded_tests(
            root, chapters, impl, memory_mb=memory_mb, time_limit_s=time_limit_s
        )
    except MiniLLMError as exc:
        if json_path is not None:
            write_json_atomically(
                json_path,
                {"score": 0, "output": f"the grader could not run: {exc}", "tests": []},
            )
        raise
    if json_path is not None:
        write_json_atomically(json_path, gradescope_results(tests, time.perf_counter() - start))
    return tests
