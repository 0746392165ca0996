"""The chapter notebooks: their setup cell, their normal form in git, and running them as CI does.

`minillm notebooks` re-executes every notebook in `chapters/` and writes the outputs back, so that
what is committed is what the notebook really produced; `--check` runs them without writing.

Git calls this module as a clean filter and a merge driver for `*.ipynb` (`./course setup` wires
them into `.git/config`; `.gitattributes` names them), so that a student's clone stays clean when
chapters are only opened or run, and a course update merges notebooks cell by cell:

    python -m minillm.notebooks clean PATH < worktree-file > normal-form
    python -m minillm.notebooks merge BASE OURS THEIRS PATH
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from minillm.errors import InputError

# Each chapter must run top to bottom on a 2-core CPU in this many seconds of wall time. A busy
# machine stretches wall time but not CPU time, so the check is on the CPU seconds of the kernel
# and everything it started: a chapter within the budget uses at most both cores for 120 s.
NOTEBOOK_BUDGET_S = 120.0
BUDGET_CORES = 2
NOTEBOOK_CPU_BUDGET_S = NOTEBOOK_BUDGET_S * BUDGET_CORES
# A cell that runs longer than this has hung: a guard, not the budget, so it is wide enough for a
# machine busy with other work.
CELL_HANG_S = 900

# The Jupyter kernel `./course lab` registers: the course's environment, by a stable name.
KERNEL_NAME = "minillm"
KERNEL_DISPLAY_NAME = "Python (minillm)"
KERNELSPEC = {"display_name": KERNEL_DISPLAY_NAME, "language": "python", "name": KERNEL_NAME}
# What every Python 3 kernel reports, less the version of the Python that last saved the file.
LANGUAGE_INFO = {
    "codemirror_mode": {"name": "ipython", "version": 3},
    "file_extension": ".py",
    "mimetype": "text/x-python",
    "name": "python",
    "nbconvert_exporter": "python",
    "pygments_lexer": "ipython3",
}
# Cell metadata that records how a cell was last viewed or run, not what the chapter says.
VOLATILE_CELL_METADATA = ("execution", "ExecuteTime", "collapsed", "scrolled", "jupyter", "trusted")
# A widget's view is a reference to state that only lives in the browser; its text/plain stays.
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

REPOSITORY_URL = "https://github.com/minillm-course/minillm"

# Cell 1 of every chapter. The one source of truth: `minillm notebooks` writes it into every
# chapter before running it, and tests/test_notebooks.py checks the committed ones.
SETUP_CELL = "\n".join(
    [
        f'# Setup. Locally, pick the kernel "{KERNEL_DISPLAY_NAME}" (./course lab); '
        "on Colab this installs the course.",
        "import importlib.util, os, subprocess, sys",
        'if importlib.util.find_spec("minillm") is None:',
        '    if "google.colab" not in sys.modules and "COLAB_RELEASE_TAG" not in os.environ:',
        "        raise ModuleNotFoundError('minillm is not installed in this kernel: choose the "
        f'kernel "{KERNEL_DISPLAY_NAME}" (Kernel > Change Kernel; ./course lab sets it up, '
        "see the README)')",
        f'    repo = os.environ.get("MINILLM_REPO", "{REPOSITORY_URL}")',
        '    course = os.path.abspath("minillm-course")  # /content/minillm-course on Colab',
        "    if not os.path.isdir(course):",
        '        subprocess.run(["git", "clone", "-q", "--depth", "1", repo, course], check=True)',
        '    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", course], '
        "check=True)",
        "    sys.path.insert(0, course)",
        '    wordnet = subprocess.run([sys.executable, "-m", "minillm.cli", "setup-nltk"], '
        "check=True, capture_output=True, text=True).stdout.strip()",
        '    print(f"Colab setup: cloned {repo} into {course} and installed minillm with its '
        'dependencies (pip).\\n{wordnet}")',
    ]
)


@dataclass
class NotebookRun:
    path: Path
    seconds: float  # wall time
    cpu_seconds: float  # CPU time of the kernel and every process it started
    error: str | None  # the failing cell's error, or None

    @property
    def ok(self) -> bool:
        return self.error is None and self.cpu_seconds <= NOTEBOOK_CPU_BUDGET_S

    @property
    def verdict(self) -> str:
        """One line for the report: the times, then ok or what is wrong."""
        times = f"{self.seconds:6.1f} s wall, {self.cpu_seconds:6.1f} s CPU"
        if self.error:
            return f"{times}  {self.error}"
        if self.cpu_seconds > NOTEBOOK_CPU_BUDGET_S:
            return (
                f"{times}  over the budget of {NOTEBOOK_BUDGET_S:.0f} s on {BUDGET_CORES} cores "
                f"({NOTEBOOK_CPU_BUDGET_S:.0f} CPU-seconds): make the chapter cheaper"
            )
        if self.seconds > NOTEBOOK_BUDGET_S:
            return f"{times}  ok (wall time over {NOTEBOOK_BUDGET_S:.0f} s: a busy machine)"
        return f"{times}  ok"


def chapter_notebooks(root: Path) -> list[Path]:
    """The numbered chapter notebooks under `root/chapters`, in order."""
    found = sorted((root / "chapters").glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise InputError(
            f"no chapter notebooks in {root / 'chapters'}; run this from the repository"
        )
    return found


# -- the normal form in git ------------------------------------------------------------------


def _text(value: str | list[str]) -> str:
    return "".join(value) if isinstance(value, list) else value


def dumps(nb: dict) -> str:
    """The notebook as nbformat and JupyterLab write it, so an untouched file stays byte-equal."""
    return json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def normalise(nb: dict) -> dict:
    """`nb` (parsed JSON) with the metadata that records where and how it was last opened or run
    replaced by the course's: the course kernel, Python without a version, no widget state, no
    per-cell timing or view state, widget outputs reduced to their text. Sources and outputs are
    kept as they are."""
    meta = nb.setdefault("metadata", {})
    meta["kernelspec"] = dict(KERNELSPEC)
    meta["language_info"] = json.loads(json.dumps(LANGUAGE_INFO))
    meta.pop("widgets", None)
    for cell in nb.get("cells", []):
        cell_meta = cell.setdefault("metadata", {})
        for key in VOLATILE_CELL_METADATA:
            cell_meta.pop(key, None)
        for output in cell.get("outputs", []):
            data = output.get("data")
            if data and WIDGET_VIEW in data:
                del data[WIDGET_VIEW]
                output.get("metadata", {}).pop(WIDGET_VIEW, None)
    return nb


def outputs_digest(nb: dict) -> str:
    """A fingerprint of every code cell's source, execution count and outputs."""
    cells = [
        [_text(c.get("source", "")), c.get("execution_count"), c.get("outputs", [])]
        for c in nb.get("cells", [])
        if c.get("cell_type") == "code"
    ]
    return hashlib.sha256(json.dumps(cells, sort_keys=True).encode()).hexdigest()


def _is_published_run(nb: dict) -> bool:
    """True when the outputs are exactly those `minillm notebooks` wrote (it stamps the digest)."""
    return nb.get("metadata", {}).get("minillm", {}).get("outputs_digest") == outputs_digest(nb)


def clean(worktree: str, committed: str | None) -> str:
    """What git stores for a notebook: `worktree` normalised and, unless its outputs come from a
    whole `minillm notebooks` run, each code cell whose source is the `committed` cell's (same id)
    gets the committed outputs back. A student's edited cells keep their new outputs; cells that
    were only run do not change the file, so `git status` shows only the student's own edits."""
    try:
        nb = normalise(json.loads(worktree))
    except (json.JSONDecodeError, AttributeError, TypeError):
        return worktree  # not a notebook Jupyter could open: store it exactly as it is
    if committed is not None and not _is_published_run(nb):
        try:
            before = {c.get("id"): c for c in json.loads(committed).get("cells", []) if "id" in c}
        except (json.JSONDecodeError, AttributeError):
            before = {}
        for cell in nb.get("cells", []):
            old = before.get(cell.get("id"))
            if (
                cell.get("cell_type") == "code"
                and old is not None
                and old.get("cell_type") == "code"
                and _text(old.get("source", "")) == _text(cell.get("source", ""))
            ):
                cell["outputs"] = old.get("outputs", [])
                cell["execution_count"] = old.get("execution_count")
    return dumps(nb)


def refresh_git_index(os_path: str, **_) -> bool:
    """JupyterLab's post-save hook (`./course lab` sets it). git calls a file whose size changed
    modified without running its clean filter, so after a save that changed nothing git keeps
    (metadata, outputs of unchanged cells) this records the file's new size in the index: `git
    add` of a blob identical to the staged one. A real edit stays a change. True if it did."""
    import subprocess

    path = Path(os_path)
    if path.suffix != ".ipynb":
        return False

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["git", *args], cwd=path.parent, capture_output=True, text=True, encoding="utf-8"
        )

    try:  # a save must never fail because of this: no git, no repository, a busy index
        if git("config", "filter.minillm-notebook.clean").returncode != 0:
            return False  # without the filter, `git add` would stage the file as it is
        staged = git("cat-file", "blob", f":./{path.name}")
        if staged.returncode != 0:
            return False
        if clean(path.read_text(encoding="utf-8"), staged.stdout) != staged.stdout:
            return False
        return git("add", "--", path.name).returncode == 0
    except (OSError, UnicodeDecodeError):
        return False


# -- merging a course update into a student's notebook -----------------------------------------

CONFLICT_OURS, CONFLICT_SEP, CONFLICT_THEIRS = (
    "<<<<<<< your version",
    "=======",
    ">>>>>>> the course's new version",
)


def merge(base: dict, ours: dict, theirs: dict) -> tuple[dict, int]:
    """Three-way merge of notebooks, cell by cell (cells matched by id). The result is the course's
    new version (`theirs`) with every cell the student changed, added or deleted since `base`
    changed the same way. A cell both changed is a conflict: it keeps both sources between
    markers, in a notebook that still opens. Returns the merged notebook and the conflict count."""
    base_cells = {c["id"]: c for c in base.get("cells", [])}
    their_cells = {c["id"]: c for c in theirs.get("cells", [])}
    our_ids = [c["id"] for c in ours.get("cells", [])]
    result = [dict(c) for c in theirs.get("cells", [])]
    conflicts = 0

    def position(cell_id: str) -> int | None:
        return next((i for i, c in enumerate(result) if c["id"] == cell_id), None)

    def same(a: dict, b: dict) -> bool:
        return a.get("cell_type") == b.get("cell_type") and _text(a.get("source", "")) == _text(
            b.get("source", "")
        )

    for index, cell in enumerate(ours.get("cells", [])):
        old, new = base_cells.get(cell["id"]), their_cells.get(cell["id"])
        if old is not None and same(cell, old):
            continue  # untouched by the student: the course's version (or its deletion) wins
        if new is None:  # the student's new cell, or one they changed that the course removed
            after = next(
                (p for p in (position(i) for i in reversed(our_ids[:index])) if p is not None), -1
            )
            result.insert(after + 1, cell)
        elif same(new, cell):
            continue  # both made the same change: keep the course's outputs
        elif old is not None and same(new, old):
            result[position(cell["id"])] = cell
        else:
            conflicts += 1
            both = {
                **cell,
                "source": "\n".join(
                    [
                        CONFLICT_OURS,
                        _text(cell["source"]),
                        CONFLICT_SEP,
                        _text(new["source"]),
                        CONFLICT_THEIRS,
                    ]
                ),
            }
            if both.get("cell_type") == "code":
                both.update(outputs=[], execution_count=None)
            result[position(cell["id"])] = both
    for cell_id, old in base_cells.items():
        new = their_cells.get(cell_id)
        if cell_id not in our_ids and new is not None and same(new, old):
            del result[position(cell_id)]  # the student deleted it and the course did not touch it
    merged = dict(theirs)
    merged["cells"] = result
    return normalise(merged), conflicts


def _has_cell_ids(*notebooks: dict) -> bool:
    return all("id" in c for nb in notebooks for c in nb.get("cells", []))


def merge_files(base: Path, ours: Path, theirs: Path) -> int:
    """git's merge driver: merge into `ours` in place; exit status 1 when there are conflicts.
    Notebooks without cell ids (nbformat < 4.5) fall back to git's line merge."""
    import subprocess

    try:
        notebooks = [json.loads(p.read_text(encoding="utf-8")) for p in (base, ours, theirs)]
    except json.JSONDecodeError:
        notebooks = []
    if not notebooks or not _has_cell_ids(*notebooks):
        line_merge = ["git", "merge-file", str(ours), str(base), str(theirs)]
        return min(1, subprocess.run(line_merge).returncode)
    merged, conflicts = merge(*notebooks)
    ours.write_text(dumps(merged), encoding="utf-8")
    if conflicts:
        print(f"{conflicts} cell(s) changed both by you and by the course", file=sys.stderr)
    return 1 if conflicts else 0


def _committed_version(path: str) -> str | None:
    """The staged (index) version of `path`, which a clean filter compares against, or None."""
    import subprocess

    found = subprocess.run(
        ["git", "cat-file", "blob", f":{path}"], capture_output=True, text=True, encoding="utf-8"
    )
    return found.stdout if found.returncode == 0 else None


# -- running the chapters --------------------------------------------------------------------


def _kernel_env() -> dict[str, str]:
    """The environment of a kernel that runs a chapter for its saved outputs."""
    env = dict(os.environ)
    # Draw to inline images, never to a window.
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # Progress bars as a log writes them: the first and last line, no widget ids, no IProgress.
    env["MINILLM_PROGRESS"] = "log"
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    # A chapter's figures come from torch's default threads (a chapter that wants fewer sets them
    # itself): a caller's limit, such as the one-thread test workers', must not change them.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(name, None)
    # A thread waiting for work sleeps instead of spinning: on a machine busy with other work (the
    # test suite runs two notebooks at once), spinning adds CPU seconds that do no work to the
    # budget's measure. The sums are the same either way.
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    # Library deprecation notices say nothing about the chapter.
    env["PYTHONWARNINGS"] = ",".join(
        w for w in (env.get("PYTHONWARNINGS"), "ignore::FutureWarning") if w
    )
    # Without a GPU, DeepSpeed logs a warning per process that it chose the CPU; say it instead.
    if "DS_ACCELERATOR" not in env:
        import torch

        if not torch.cuda.is_available():
            env["DS_ACCELERATOR"] = "cpu"
    return env


def _machine_paths() -> list[tuple[str, str]]:
    """Paths of this machine that outputs may contain, and what they are saved as, most specific
    first: the repository as a student's clone (README: `git clone ... minillm`); the Python
    environment by what it is, since a student's may be `.venv`, Colab's or conda's."""
    from minillm.utils import repo_root

    pairs = []
    for path, shown in (
        (Path(sys.prefix), "<environment>"),
        (repo_root(), "~/minillm"),
        (Path.home(), "~"),
    ):
        for form in {str(path), str(path.resolve())}:
            if len(form) > 1:
                pairs.append((form, shown))
    return pairs


def _without_machine_paths(nb, pairs: list[tuple[str, str]]) -> None:
    def replace(text):
        if isinstance(text, list):
            return [replace(t) for t in text]
        for path, shown in pairs:  # whole path components only: /root is not /rootfs
            text = re.sub(re.escape(path) + r"(?![\w.-])", shown, text)
        return text

    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if "text" in output:
                output["text"] = replace(output["text"])
            if "traceback" in output:
                output["traceback"] = replace(output["traceback"])
            for mime, value in output.get("data", {}).items():
                if mime.startswith("text/") or mime == "application/json":
                    if isinstance(value, str | list):
                        output["data"][mime] = replace(value)


def _cpu_seconds(pid: int) -> float:
    """CPU time of process `pid` and of every process below it: each one's own time and that of
    the children it has waited for. A process still running counts its waited-for children too:
    `launch`'s ranks are forked from a server that waits for them and lives on."""
    import psutil

    def used(process) -> float:
        t = process.cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    try:
        process = psutil.Process(pid)
        total = used(process)
        for child in process.children(recursive=True):
            total += used(child)
    except psutil.Error:
        return 0.0
    return total


def execute_notebook(path: Path, *, write: bool, timeout_s: float = CELL_HANG_S) -> NotebookRun:
    """Run `path` in a fresh kernel started in its own folder (relative paths work as for a
    student); if `write`, save the outputs back in the normal form, with the machine's paths
    shown as a student's clone would show them."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    nb = nbformat.read(path, as_version=4)
    nb.cells[1].source = SETUP_CELL
    cpu = {"seconds": 0.0}

    def measure(**_) -> None:
        cpu["seconds"] = max(cpu["seconds"], _cpu_seconds(client.km.provisioner.pid))

    client = NotebookClient(
        nb,
        timeout=int(timeout_s),
        kernel_name="python3",  # this Python, whichever kernels are registered
        record_timing=False,
        store_widget_state=False,
        on_cell_executed=measure,
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    error = None
    try:
        client.execute(env=_kernel_env())
    except (CellExecutionError, CellTimeoutError) as exc:
        if isinstance(exc, CellTimeoutError):
            error = f"a cell ran past {timeout_s:.0f} s and was stopped (did it hang?)"
        else:
            error = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    seconds = time.perf_counter() - start
    if write and error is None:
        _without_machine_paths(nb, _machine_paths())
        data = normalise(json.loads(nbformat.writes(nb)))
        minillm_meta = data["metadata"].setdefault("minillm", {})
        minillm_meta["execution_seconds"] = round(seconds, 1)
        minillm_meta["cpu_seconds"] = round(cpu["seconds"], 1)
        minillm_meta["outputs_digest"] = outputs_digest(data)
        path.write_text(dumps(data), encoding="utf-8")
    return NotebookRun(path, seconds, cpu["seconds"], error)


def main(argv: list[str]) -> int:
    """Entry point for git (see the module docstring)."""
    if len(argv) == 2 and argv[0] == "clean":
        sys.stdout.write(clean(sys.stdin.read(), _committed_version(argv[1])))
        return 0
    if len(argv) == 5 and argv[0] == "merge":
        return merge_files(Path(argv[1]), Path(argv[2]), Path(argv[3]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.stdin.reconfigure(encoding="utf-8")
    sys.stdout.reconfigure(encoding="utf-8")
    raise SystemExit(main(sys.argv[1:]))
