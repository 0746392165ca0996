"""Small helpers every chapter uses."""

from __future__ import annotations

import random

import numpy as np


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU) so that a run repeats exactly."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
