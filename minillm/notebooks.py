"""Execute the chapter notebooks top to bottom in a fresh kernel, as CI does.

`minillm notebooks` re-executes every notebook in `chapters/` and writes the outputs back, so that
what is committed is what the notebook really produced; `--check` runs them without writing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from minillm.errors import InputError

# Each chapter must run top to bottom on a 2-core CPU in this many seconds.
NOTEBOOK_BUDGET_S = 120.0


@dataclass
class NotebookRun:
    path: Path
    seconds: float
    error: str | None  # the failing cell's error, or None

    @property
    def ok(self) -> bool:
        return self.error is None and self.seconds <= NOTEBOOK_BUDGET_S


def chapter_notebooks(root: Path) -> list[Path]:
    """The numbered chapter notebooks under `root/chapters`, in order."""
    found = sorted((root / "chapters").glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise InputError(
            f"no chapter notebooks in {root / 'chapters'}; run this from the repository"
        )
    return found


def execute_notebook(
    path: Path, *, write: bool, timeout_s: float = NOTEBOOK_BUDGET_S
) -> NotebookRun:
    """Run `path` in a fresh kernel started in its own folder; write outputs back if `write`."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    nb = nbformat.read(path, as_version=4)
    # Notebooks draw to files and inline images, never to a window; keep threads to what CI has.
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = NotebookClient(
        nb,
        timeout=int(timeout_s),
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    error = None
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as exc:
        error = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    seconds = time.perf_counter() - start
    if write and error is None:
        nb.metadata.setdefault("minillm", {})["execution_seconds"] = round(seconds, 1)
        nbformat.write(nb, path)
    return NotebookRun(path, seconds, error)
