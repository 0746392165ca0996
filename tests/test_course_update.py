"""A student's work is safe: on real git repositories, opening or running a chapter leaves `git
status` clean, and `./course update` brings in a new version of the course while the student's
edited exercise and notebook stay as they were. Also the notebook filter and merge on their own."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from course_repo import GIT_ENV, REPO, git, publish_course

from minillm.notebooks import (
    CONFLICT_OURS,
    CONFLICT_THEIRS,
    KERNELSPEC,
    chapter_notebooks,
    clean,
    dumps,
    merge,
    outputs_digest,
    refresh_git_index,
)

VENV = Path(sys.prefix)
CHAPTER = "chapters/03_attention.ipynb"
EXERCISE = "exercises/ch03_attention.py"


def course(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    # A student without a git identity must still be able to update.
    anonymous = ("GIT_AUTHOR", "GIT_COMMITTER")
    env = {k: v for k, v in {**os.environ, **GIT_ENV}.items() if not k.startswith(anonymous)}
    env["MINILLM_VENV"] = str(VENV)
    return subprocess.run(
        ["bash", str(cwd / "course"), *args], cwd=cwd, capture_output=True, text=True, env=env
    )


def notebook(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def cell_with(nb: dict, text: str) -> dict:
    return next(c for c in nb["cells"] if text in "".join(c["source"]))


def run_in_jupyter(path: Path) -> None:
    """What opening and running a chapter in JupyterLab does to the file: another kernelspec and
    Python version, timings, a widget state, new outputs and execution counts."""
    nb = notebook(path)
    nb["metadata"]["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "x"}
    nb["metadata"]["language_info"]["version"] = "3.12.9"
    nb["metadata"]["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    for n, cell in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
        cell["metadata"]["execution"] = {"iopub.status.idle": "2030-01-01T00:00:00Z"}
        cell["execution_count"] = 40 + n
        cell["outputs"] = [
            {"name": "stdout", "output_type": "stream", "text": [f"run again {n}\n"]},
            {
                "data": {
                    "application/vnd.jupyter.widget-view+json": {"model_id": f"m{n}"},
                    "text/plain": ["bar"],
                },
                "metadata": {},
                "output_type": "display_data",
            },
        ]
    path.write_text(json.dumps(nb, indent=1), encoding="utf-8")


@pytest.fixture
def upstream(tmp_path):
    """The course's repository."""
    return publish_course(tmp_path / "upstream")


def test_student_work_survives_a_course_update(upstream, tmp_path):
    student = tmp_path / "student"
    git(tmp_path, "clone", "-q", str(upstream), str(student))
    assert course(student, "update").returncode == 0  # configures git; nothing to merge yet

    # Running a chapter in Jupyter, without editing it: git sees no change in it (the filter),
    # and once the lab's post-save hook has run, `git status` is clean too.
    ran = student / "chapters/02_tokenization.ipynb"
    run_in_jupyter(ran)
    assert git(student, "diff", "--stat") == ""
    assert refresh_git_index(os_path=str(ran), model={"type": "notebook"})
    assert git(student, "status", "--porcelain") == ""

    # The student edits an exercise and one cell of chapter 03, then runs the chapter.
    exercise = student / EXERCISE
    exercise.write_text(exercise.read_text() + "\n# my attempt: scale by sqrt(d_k)\n")
    nb = notebook(student / CHAPTER)
    mine = nb["cells"][2]
    mine["source"] = ["# my note on the imports\n", *mine["source"]]
    (student / CHAPTER).write_text(dumps(nb), encoding="utf-8")
    run_in_jupyter(student / CHAPTER)
    assert not refresh_git_index(os_path=str(student / CHAPTER))  # a real edit stays a change
    assert sorted(git(student, "status", "--porcelain").split()) == ["M", "M", CHAPTER, EXERCISE]

    # The course publishes a new version: a README line and chapter 03 re-executed with another
    # output in its last code cell and a corrected markdown cell.
    (upstream / "README.md").write_text((upstream / "README.md").read_text() + "\nNew: v2.\n")
    course_nb = notebook(upstream / CHAPTER)
    course_nb["cells"][0]["source"].append("\n\nErratum: v2.")
    last_code = [c for c in course_nb["cells"] if c["cell_type"] == "code"][-1]
    last_code["outputs"] = [{"name": "stdout", "output_type": "stream", "text": ["v2 output\n"]}]
    course_nb["metadata"]["minillm"]["outputs_digest"] = outputs_digest(course_nb)
    (upstream / CHAPTER).write_text(dumps(course_nb), encoding="utf-8")
    git(upstream, "commit", "-q", "-am", "course v2")

    done = course(student, "update")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "your changes are kept" in done.stdout
    assert git(student, "branch", "--show-current").strip() == "my-work"
    assert git(student, "status", "--porcelain") == ""
    # The course's change arrived ...
    assert (student / "README.md").read_text().endswith("New: v2.\n")
    merged = notebook(student / CHAPTER)
    assert "Erratum: v2." in "".join(merged["cells"][0]["source"])
    assert [c for c in merged["cells"] if c["cell_type"] == "code"][-1]["outputs"][0]["text"] == [
        "v2 output\n"
    ]
    # ... and the student's work is still there, in the file and in the history.
    assert exercise.read_text().endswith("# my attempt: scale by sqrt(d_k)\n")
    assert "".join(merged["cells"][2]["source"]).startswith("# my note on the imports\n")
    assert "My work, saved by ./course update" in git(student, "log", "--format=%s")
    # The local course branch follows the course.
    assert git(student, "rev-parse", "main") == git(upstream, "rev-parse", "main")


def test_a_conflicting_update_says_what_to_do_and_keeps_the_work(upstream, tmp_path):
    student = tmp_path / "student"
    git(tmp_path, "clone", "-q", str(upstream), str(student))
    exercise = student / EXERCISE
    original = exercise.read_text()
    first = original.splitlines()[0]
    exercise.write_text(original.replace(first, first + "  # mine", 1))
    (upstream / EXERCISE).write_text(original.replace(first, first + "  # the course's", 1))
    git(upstream, "commit", "-q", "-am", "course v2")

    done = course(student, "update")
    assert done.returncode == 1
    assert EXERCISE in done.stderr and "Your work is safe" in done.stderr
    assert "git merge --abort" in done.stderr
    saved = git(student, "show", f"my-work:{EXERCISE}")
    assert saved.splitlines()[0] == first + "  # mine"
    # A second update before the first is finished refuses, saying why.
    again = course(student, "update")
    assert again.returncode == 1 and "half done" in again.stderr
    git(student, "merge", "--abort")
    assert exercise.read_text().splitlines()[0] == first + "  # mine"


def test_update_outside_a_git_clone_or_without_the_course_remote_says_so(tmp_path):
    shutil.copy2(REPO / "course", tmp_path / "course")
    done = course(tmp_path, "update")
    assert done.returncode == 1 and "needs a git clone" in done.stderr
    git(tmp_path, "init", "-q", "-b", "main")
    git(tmp_path, "add", "course")
    git(tmp_path, "commit", "-q", "-m", "a copy without its remote")
    done = course(tmp_path, "update")
    assert done.returncode == 1 and "git remote add origin" in done.stderr


# -- the filter and the merge on their own ------------------------------------------------------


@pytest.mark.parametrize("path", chapter_notebooks(REPO), ids=lambda p: p.stem)
def test_committed_notebooks_are_in_normal_form(path):
    text = path.read_text(encoding="utf-8")
    assert clean(text, text) == text, "normalise it: see docs/authoring.md"
    assert notebook(path)["metadata"]["kernelspec"] == KERNELSPEC


def test_clean_keeps_edited_cells_and_a_published_run():
    committed = (REPO / CHAPTER).read_text(encoding="utf-8")
    nb = notebook(REPO / CHAPTER)
    edited = nb["cells"][2]
    edited["source"] = ["x = 1\n"]
    edited["outputs"] = [{"name": "stdout", "output_type": "stream", "text": ["mine\n"]}]
    untouched = nb["cells"][4]
    untouched["outputs"] = []
    stored = json.loads(clean(json.dumps(nb), committed))
    assert stored["cells"][2]["outputs"][0]["text"] == ["mine\n"]  # the student's edit and output
    assert stored["cells"][4]["outputs"] == notebook(REPO / CHAPTER)["cells"][4]["outputs"]
    # Outputs from a whole `minillm notebooks` run (digest stamped) are stored as they are.
    nb["metadata"]["minillm"]["outputs_digest"] = outputs_digest(nb)
    assert json.loads(clean(json.dumps(nb), committed))["cells"][4]["outputs"] == []
    # Something that is not a notebook is stored unchanged.
    assert clean("not json {", committed) == "not json {"


def _nb(*cells: tuple[str, str]) -> dict:
    return {
        "cells": [
            {
                "cell_type": "code",
                "id": i,
                "source": s,
                "metadata": {},
                "outputs": [],
                "execution_count": None,
            }
            for i, s in cells
        ],
        "metadata": {},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def test_merge_cell_by_cell():
    base = _nb(("a", "1"), ("b", "2"), ("c", "3"), ("d", "4"))
    ours = _nb(("a", "1 mine"), ("new", "added by me"), ("b", "2"), ("c", "3"))  # d deleted
    theirs = _nb(("a", "1"), ("b", "2 course"), ("c", "3"), ("d", "4"), ("e", "5 course"))
    merged, conflicts = merge(base, ours, theirs)
    assert conflicts == 0
    assert [(c["id"], c["source"]) for c in merged["cells"]] == [
        ("a", "1 mine"),
        ("new", "added by me"),
        ("b", "2 course"),
        ("c", "3"),
        ("e", "5 course"),
    ]


def test_merge_conflict_keeps_both_versions_in_a_notebook_that_opens():
    base, ours, theirs = _nb(("a", "x = 1")), _nb(("a", "x = 2")), _nb(("a", "x = 3"))
    merged, conflicts = merge(base, ours, theirs)
    assert conflicts == 1
    source = merged["cells"][0]["source"]
    assert source.splitlines() == [CONFLICT_OURS, "x = 2", "=======", "x = 3", CONFLICT_THEIRS]
    json.loads(dumps(merged))


def test_merge_keeps_a_cell_the_student_changed_and_the_course_removed():
    base, ours, theirs = (
        _nb(("a", "1"), ("b", "2")),
        _nb(("a", "1"), ("b", "2 mine")),
        _nb(("a", "1")),
    )
    merged, conflicts = merge(base, ours, theirs)
    assert conflicts == 0 and [c["source"] for c in merged["cells"]] == ["1", "2 mine"]


def test_the_post_save_hook_never_fails_a_save(tmp_path, monkeypatch):
    saved = tmp_path / "03.ipynb"
    saved.write_text("{}")
    assert not refresh_git_index(os_path=str(saved))  # not in a git repository
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all
    assert not refresh_git_index(os_path=str(saved))
    assert not refresh_git_index(os_path=str(tmp_path / "notes.txt"))  # not a notebook
