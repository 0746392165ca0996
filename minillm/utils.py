"""Small helpers every chapter uses."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU) so that a run repeats exactly."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def repo_root() -> Path:
    """The course repository (the folder holding exercises/ and tests/): the current folder or a
    parent of it, else the checkout minillm was installed from."""

    from minillm.errors import MiniLLMError

    here = Path.cwd().resolve()
    package_checkout = Path(__file__).resolve().parents[1]
    for candidate in (here, *here.parents, package_checkout):
        if (candidate / "exercises").is_dir() and (candidate / "tests" / "exercises").is_dir():
            return candidate
    raise MiniLLMError(
        "this needs the course repository (the folder with exercises/ and tests/); "
        "cd into your clone of minillm and run it again"
    )
