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


# Seconds between two updates of a progress bar written to a log (a file, a pipe, CI's output):
# a line every few seconds says that the run is alive without filling the log.
LOG_PROGRESS_INTERVAL_S = 5.0


def _progress_mode() -> str:
    """Where bars go: "widget" in a Jupyter kernel that can draw widgets, "terminal" on a
    terminal, else "log".
    MINILLM_PROGRESS set to one of these overrides it (`minillm notebooks` asks for "log")."""
    import os
    import sys

    chosen = os.environ.get("MINILLM_PROGRESS", "")
    if chosen in ("widget", "terminal", "log"):
        return chosen
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    if shell is not None and "IPKernelApp" in getattr(shell, "config", {}):
        try:
            import ipywidgets  # noqa: F401 - tqdm's widget bar needs it
        except ImportError:
            return "log"
        return "widget"
    stream = sys.stderr
    return "terminal" if stream is not None and stream.isatty() else "log"


def progress_bar(iterable=None, **kwargs):
    """A tqdm progress bar that suits where it is shown: a widget in JupyterLab, a redrawn line in
    a terminal, and in a log one update every LOG_PROGRESS_INTERVAL_S seconds. Takes tqdm's
    arguments (total, desc, unit, disable, ...)."""
    mode = _progress_mode()
    if mode == "widget":
        from tqdm.notebook import tqdm
    else:
        from tqdm import tqdm

        if mode == "log":
            kwargs.setdefault("mininterval", LOG_PROGRESS_INTERVAL_S)
    return tqdm(iterable, **kwargs)
