"""`minillm grade --gradescope DIR`: a ready Gradescope autograder.

DIR gets `setup.sh` (run once when Gradescope builds the image: Python, the CPU build of PyTorch,
minillm and its dependencies), `run_autograder` (run for every submission: the submission's
exercise files replace the stubs, `minillm grade` writes /autograder/results/results.json) and
`course/` (the minillm package, the graded tests and the stubs: never solutions/), and
`autograder.zip`, the file to upload. `AUTOGRADER_ROOT` and `AUTOGRADER_PYTHON` point
run_autograder elsewhere than /autograder, so it can be tried on a machine of one's own.
"""

from __future__ import annotations

import shutil
import stat
import zipfile
from pathlib import Path

from minillm.errors import InputError

SETUP = """\
#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder's image.
set -euo pipefail
cd "$(dirname "$0")"
export DEBIAN_FRONTEND=noninteractive
python=python3
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  apt-get update -q
  apt-get install -y -q python3.11 python3.11-venv
  python=python3.11
fi
apt-get install -y -q python3-venv 2>/dev/null || true
"$python" -m venv /autograder/venv
pip=(/autograder/venv/bin/python -m pip install -q --disable-pip-version-check)
"${{pip[@]}}" "torch=={torch}" --index-url https://download.pytorch.org/whl/cpu
"${{pip[@]}}" "./course[dev]"
"""

RUN = """\
#!/usr/bin/env bash
# Gradescope runs this for every submission; it always leaves results/results.json.
set -uo pipefail
root=${{AUTOGRADER_ROOT:-/autograder}}
course="$root/source/course"
python=${{AUTOGRADER_PYTHON:-$root/venv/bin/python}}
results="$root/results/results.json"
mkdir -p "$root/results"
umask 022
# The submission's exercise files replace the stubs, wherever in the upload they are.
for stub in "$course"/exercises/ch*.py; do
  found=$(find "$root/submission" -type f -name "$(basename "$stub")" -print -quit)
  if [ -n "$found" ]; then cp "$found" "$stub"; fi
done
cd "$course"
"$python" -m minillm.cli grade {chapters} --json "$results"
if [ ! -s "$results" ]; then
  echo '{{"score": 0, "output": "The autograder could not grade this submission."}}' > "$results"
fi
"""

_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")


def _torch_version() -> str:
    import torch

    return torch.__version__.split("+", 1)[0]


def write_autograder(root: Path, out: Path, chapters: list[str]) -> str:
    """Write the autograder for `chapters` (all graded ones when empty) of the course at `root`
    into the folder `out` (new or empty). Returns what was written, for a person to read."""
    from minillm.grading import graded_files

    files = graded_files(root)
    unknown = [c for c in chapters if c not in files]
    if unknown:
        raise InputError(f"no graded tests for {', '.join(unknown)}; chapters: {', '.join(files)}")
    chosen = chapters or list(files)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} is not empty: give a new folder for the autograder")
    course = out / "course"
    shutil.copytree(root / "minillm", course / "minillm", ignore=_IGNORE)
    (course / "tests" / "exercises").mkdir(parents=True)
    (course / "exercises").mkdir()
    copies = [
        "pyproject.toml",
        "README.md",
        "tests/conftest.py",
        "tests/exercises/conftest.py",
        "tests/exercises/in_worker.py",
        "exercises/__init__.py",
    ]
    for chapter in chosen:
        test = files[chapter]
        copies.append(str(test.relative_to(root)))
        copies.append(f"exercises/{test.name.removeprefix('test_')}")  # the stub, as default
    for relative in copies:
        shutil.copyfile(root / relative, course / relative)
    for name, text in (
        ("setup.sh", SETUP.format(torch=_torch_version())),
        ("run_autograder", RUN.format(chapters=" ".join(chosen))),
    ):
        path = out / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    archive = out / "autograder.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(out.rglob("*")):
            if path.is_file() and path != archive:
                info = zipfile.ZipInfo.from_file(path, path.relative_to(out))
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, path.read_bytes())
    return (
        f"wrote a Gradescope autograder for {', '.join(chosen)} to {out}:\n"
        f"  setup.sh, run_autograder, course/ (minillm, the graded tests, the stubs; no "
        "solutions)\n"
        f"  upload {archive} as the assignment's autograder (Ubuntu image)"
    )
