"""Options shared by the whole suite."""

import os

IMPLEMENTATIONS = ("exercises", "solutions")


def pytest_addoption(parser):
    parser.addoption(
        "--impl",
        choices=IMPLEMENTATIONS,
        default=os.environ.get("MINILLM_IMPL", "solutions"),
        help="which package the graded exercise tests import: your stubs in exercises/ or the "
        "reference answers in solutions/ (default: $MINILLM_IMPL, else solutions)",
    )


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
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, target)


_point_data_cache_at_a_local_copy()
