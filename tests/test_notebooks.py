"""Every chapter notebook follows the template, is committed with its real outputs, and runs top to
bottom in a fresh kernel within the two-minute budget."""

import json
import re
from pathlib import Path

import pytest

from minillm.notebooks import NOTEBOOK_BUDGET_S, chapter_notebooks, execute_notebook

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = chapter_notebooks(REPO)


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def test_chapters_00_and_01_exist():
    assert {p.name[:2] for p in NOTEBOOKS} >= {"00", "01"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_follows_the_chapter_template(path):
    cells = _cells(path)
    number = path.name[:2]
    assert re.match(rf"# Chapter {number}: ", _source(cells[0])), (
        "first cell: '# Chapter NN: Title'"
    )
    assert "After this chapter you can" in _source(cells[0])
    assert (
        f"colab.research.google.com/github/minillm-course/minillm/blob/main/chapters/{path.name}"
        in _source(cells[0])
    )
    assert 'find_spec("minillm") is None' in _source(cells[1]), "second cell: the setup cell"
    markdown = "\n".join(_source(c) for c in cells if c["cell_type"] == "markdown")
    assert "## Summary" in markdown
    if list((REPO / "exercises").glob(f"ch{number}_*.py")):
        assert f"minillm grade ch{number}" in markdown, "say how the chapter's exercises are graded"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_with_outputs_and_no_errors(path):
    code = [c for c in _cells(path) if c["cell_type"] == "code" and _source(c).strip()]
    assert all(c["execution_count"] is not None for c in code), "execute it: minillm notebooks PATH"
    errors = [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors
    counts = [c["execution_count"] for c in code]
    assert counts == list(range(1, len(code) + 1)), "outputs must come from one top-to-bottom run"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom_within_budget(path):
    run = execute_notebook(path, write=False)
    assert run.error is None, run.error
    assert run.seconds <= NOTEBOOK_BUDGET_S, f"{path.name} took {run.seconds:.0f} s"
