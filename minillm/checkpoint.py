"""Checkpoints that survive a crash and never unpickle arbitrary objects.

A checkpoint is a folder `<run>/checkpoints/step_NNNNNNN/` holding
- `model.safetensors`: the weights (safetensors: tensors only, no code);
- `state.pt`: optimizer, scheduler, gradient-scaler, RNG and data-position state, read back with
  `torch.load(weights_only=True)`, which refuses anything but tensors and plain containers;
- `config.yaml`: the run's full config, enough to rebuild the model for sampling.
It is written to a temporary folder and renamed into place only when complete, so a run killed
mid-save leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from minillm.errors import MiniLLMError

WEIGHTS, STATE, CONFIG, TOKENIZER = "model.safetensors", "state.pt", "config.yaml", "tokenizer.json"
_PREFIX = "step_"


class CheckpointError(MiniLLMError):
    """A checkpoint is missing, corrupt, truncated or does not fit the model."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{_PREFIX}{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are not complete)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    # A checkpoint is complete once its weights are there: they are written last (renamed into
    # place), also by engines such as DeepSpeed that write the rest of the folder themselves.
    found = [p for p in folder.iterdir() if p.name.startswith(_PREFIX) and (p / WEIGHTS).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve(path: Path) -> Path:
    """A checkpoint folder from either a checkpoint folder or a run folder (its latest one)."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(
            f"{path} is not a checkpoint: it has no {WEIGHTS} and no checkpoints/step_* folders. "
            "Pass a run folder (runs/NAME) or one of its checkpoints/step_* folders."
        )
    return latest


def rng_state() -> dict[str, Any]:
    """Every random-number generator a training step touches, as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    state: dict[str, Any],
    config: dict[str, Any],
    keep: int = 2,
    tokenizer=None,
) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep` checkpoints."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / WEIGHTS))
    torch.save(state, tmp / STATE)
    (tmp / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    if tokenizer is not None:
        tokenizer.save(tmp / TOKENIZER)
    shutil.rmtree(final, ignore_errors=True)  # the same step saved again (a resumed run)
    tmp.rename(final)
    prune(run_dir, keep)
    return final


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (all are kept when keep <= 0)."""
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_config(path: Path) -> dict[str, Any]:
    path = resolve(path)
    try:
        return yaml.safe_load((path / CONFIG).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise CheckpointError(f"cannot read {path / CONFIG}: {exc}") from None


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Load the weights of checkpoint `path` into `model`, which must have the same shapes."""
    path = resolve(path)
    file = path / WEIGHTS
    try:
        load_model(model, str(file), strict=True, device=str(next(model.parameters()).device))
    except SafetensorError as exc:
        raise CheckpointError(
            f"{file} is corrupt or truncated ({exc}); resume from an earlier checkpoint or retrain"
        ) from None
    except RuntimeError as exc:
        raise CheckpointError(
            f"{file} does not fit this model (different config?): {str(exc).splitlines()[0][:300]}"
        ) from None
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing") from None


def load_state(path: Path) -> dict[str, Any]:
    """The training state of checkpoint `path` (tensors and plain containers only)."""
    file = resolve(path) / STATE
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing") from None
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"{file} is corrupt, truncated or not a minillm training state ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); resume from an earlier checkpoint"
        ) from None
