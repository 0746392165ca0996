"""The chapters' setup cell: on Colab it installs the course from the repository URL (minillm, its
dependencies, WordNet) and says so; anywhere else without minillm it stops with one sentence that
names the kernel to choose, and creates nothing.

"Colab" here is a fresh Python environment that has the course's dependencies preinstalled (torch
and the rest, seen through a .pth file) but not minillm, with COLAB_RELEASE_TAG set as on Colab
and MINILLM_REPO pointed at a local git copy of the course."""

import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
from course_repo import publish_course

from minillm.notebooks import KERNEL_DISPLAY_NAME, SETUP_CELL

SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])


def _is_minillm(entry: str) -> bool:
    return "minillm" in entry.lower()


@pytest.fixture
def fresh_python(tmp_path) -> Path:
    """A new environment without minillm that sees the course's other packages, as Colab has
    torch, numpy and the rest preinstalled."""
    venv = tmp_path / "colab-python"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    preinstalled = tmp_path / "preinstalled"  # the course's site-packages less minillm itself
    preinstalled.mkdir()
    for entry in os.listdir(SITE_PACKAGES):
        if not _is_minillm(entry) and not entry.endswith(".pth"):
            (preinstalled / entry).symlink_to(SITE_PACKAGES / entry)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "colab-preinstalled.pth").write_text(f"{preinstalled}\n")
    return python


def _run(python: Path, code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    clean_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("COLAB_", "PYTHON", "VIRTUAL_ENV", "MINILLM_REPO"))
    }
    return subprocess.run(
        [str(python), "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**clean_env, **env},
        timeout=300,
    )


def test_outside_colab_without_minillm_it_names_the_kernel(fresh_python, tmp_path):
    precondition = _run(
        fresh_python, "import torch, importlib.util as u; print(u.find_spec('minillm'))", tmp_path
    )
    assert precondition.stdout.strip() == "None", precondition.stderr
    done = _run(fresh_python, SETUP_CELL, tmp_path)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: minillm is not installed in this kernel")
    assert f'"{KERNEL_DISPLAY_NAME}"' in last
    assert "CalledProcessError" not in done.stderr
    assert list(tmp_path.glob("minillm-course")) == [] and not Path("/content/minillm").exists()


@pytest.mark.slow
def test_on_colab_the_setup_cell_installs_the_course(fresh_python, tmp_path):
    course = publish_course(tmp_path / "published")
    content = tmp_path / "content"  # Colab's working folder
    content.mkdir()
    checks = textwrap.dedent(
        """
        import minillm, nltk
        from minillm.wordnet import require_wordnet
        require_wordnet()
        from nltk.stem import WordNetLemmatizer
        print("lemma:", WordNetLemmatizer().lemmatize("geese"))
        print("minillm from:", minillm.__file__)
        """
    )
    colab = {"COLAB_RELEASE_TAG": "release-colab-test", "MINILLM_REPO": course.as_uri()}
    # pip finds every dependency already installed, as on Colab; nothing is downloaded.
    offline = {"PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0"}
    done = _run(fresh_python, SETUP_CELL + "\n" + checks, content, **colab, **offline)
    assert done.returncode == 0, done.stdout + done.stderr
    installed = content / "minillm-course"
    assert f"Colab setup: cloned {course.as_uri()} into {installed}" in done.stdout
    assert "WordNet" in done.stdout  # what setup-nltk did, in its words
    assert "lemma: goose" in done.stdout
    assert f"minillm from: {installed / 'minillm' / '__init__.py'}" in done.stdout
    # The next chapter's kernel finds the installed course, so its setup cell does nothing.
    again = _run(
        fresh_python,
        SETUP_CELL + "\nimport minillm; print(minillm.__file__)",
        content,
        **colab,
        **offline,
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == str(installed / "minillm" / "__init__.py")
