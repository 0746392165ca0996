"""pip and conda install the same dependencies, as ranges, never exact pins."""

import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"pytorch": "torch"}  # conda-forge package -> PyPI name


def _split(requirement: str) -> tuple[str, str]:
    requirement = requirement.split(";")[0].split("#")[0].strip()
    name, spec = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", requirement).groups()
    return CONDA_NAMES.get(name.lower(), name.lower()), spec.replace(" ", "")


def _pyproject() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    requirements = project["dependencies"] + extras["lab"] + extras["dev"]
    return dict(_split(r) for r in requirements)


def _conda() -> dict[str, str]:
    found = {}
    for item in yaml.safe_load((REPO / "environment.yml").read_text())["dependencies"]:
        entries = item["pip"] if isinstance(item, dict) else [item]
        for entry in entries:
            if not entry.startswith("-e"):
                found.update([_split(entry)])
    return found


def test_conda_and_pip_list_the_same_dependencies():
    conda = _conda()
    assert conda.pop("python") == ">=3.11" and conda.pop("pip") == ""
    assert conda == _pyproject()


def test_dependencies_are_ranges_never_exact_pins():
    for name, spec in _pyproject().items():
        assert spec.startswith(">="), f"{name}{spec}: use a lower bound, not a pin"
        assert "==" not in spec


@pytest.mark.xdist_group("grouping_check")
def test_xdist_keeps_the_suites_groups_together(request):
    """Under `./course test` (`--dist loadgroup`) a group's tests run on one worker: the chapters
    one after another, and the DeepSpeed runs that several tests share once. With pytest 9.2,
    xdist dropped the groups without a word (pytest-dev/pytest-xdist#1386), and the suite ran the
    chapters side by side and each shared run once per worker."""
    if getattr(request.config.option, "loadgroup", False):  # set in the workers of --dist loadgroup
        assert request.node.nodeid.endswith("@grouping_check"), (
            f"xdist did not receive this test's group ({request.node.nodeid}): the installed "
            "pytest and pytest-xdist do not group tests"
        )
