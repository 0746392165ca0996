"""Options shared by the whole suite."""

import os

import pytest

IMPLEMENTATIONS = ("exercises", "solutions")

# Under pytest-xdist (`./course test` runs a worker per core) each worker and every process it
# starts gets one thread: two workers each running torch on every core would oversubscribe them.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_addoption(parser):
    parser.addoption(
        "--impl",
        choices=IMPLEMENTATIONS,
        default=os.environ.get("MINILLM_IMPL", "solutions"),
        help="which package the graded exercise tests import: your stubs in exercises/ or the "
        "reference answers in solutions/ (default: $MINILLM_IMPL, else solutions)",
    )


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups (a later mark is not seen)
def pytest_collection_modifyitems(config, items):
    """Tests that start several processes form one xdist group: on two cores, two multi-rank
    launches side by side (or one beside a chapter's kernel and another launch) slow each other
    down several times over. Measured: the suite took 1690.6 s with this group, 1926.7 s
    without it. A test that is in a group already (runs it shares) keeps its own."""
    for item in items:
        if item.get_closest_marker("multiprocess") and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group("multiprocess"))


def _point_data_cache_at_a_local_copy():
    """Tests never need the network for the course corpus: CI keeps a copy beside the checkout
    (../shared/data), and the download code itself is tested against a local HTTP server."""
    import shutil
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cache = Path(os.environ.setdefault("MINILLM_DATA", str(repo / ".minillm-cache" / "data")))
    local = repo.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
    target = cache / "tinyshakespeare" / "input.txt"
    if local.is_file() and not target.is_file():
        # Copied under a private name and renamed: the other xdist workers never read half a file.
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        shutil.copyfile(local, partial)
        os.replace(partial, target)


_point_data_cache_at_a_local_copy()
