"""Checkpoints that survive a crash and never run code from a file.

A checkpoint is a folder `<run>/checkpoints/step_NNNNNNN/` holding
- `model.safetensors`: the weights (safetensors: tensors only, no code);
- `state.pt`: optimizer, scheduler, gradient-scaler, RNG and data-position state, read back with
  `torch.load(weights_only=True)`, which refuses anything but tensors and plain containers;
- `config.yaml`: the run's full config, enough to rebuild the model for sampling;
- `manifest.json`: the sha256 of every other file, written last: a checkpoint is complete once
  it has one. Engines that write their own files (DeepSpeed) are verified against it before
  anything is loaded, so a damaged, swapped or added file is refused in one sentence.
The plain engine writes a temporary folder and renames it into place when complete, so a run
killed mid-save leaves the previous checkpoint as the latest one.

Loaded state is checked before anything uses it: its shape (a foreign dictionary is refused),
its size and depth (a pickle bomb of shared references is refused after a bounded walk, never
expanded), its step (not beyond `max_iters`), and the weights are finite.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from minillm import rundir
from minillm.errors import MiniLLMError

WEIGHTS, STATE, CONFIG, TOKENIZER = "model.safetensors", "state.pt", "config.yaml", "tokenizer.json"
MANIFEST = "manifest.json"
_PREFIX = "step_"
_MANIFEST_FORMAT = "minillm-checkpoint-manifest"
_MAX_MANIFEST_BYTES = 1 << 20  # a manifest lists a few hundred files at most
# Bounds on a training state: the deepest real one (optimizer state of a param group) is 6
# levels; the largest has a few thousand containers and tensors.
MAX_STATE_DEPTH = 32
MAX_STATE_NODES = 100_000


class CheckpointError(MiniLLMError):
    """A checkpoint is missing, corrupt, truncated or does not fit the model."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{_PREFIX}{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are not complete)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    # A checkpoint is complete once its manifest is there: it is written last, also by engines
    # such as DeepSpeed that write the rest of the folder themselves.
    found = [p for p in folder.iterdir() if _step_of(p) is not None and (p / MANIFEST).is_file()]
    return sorted(found, key=_step_of)


def _step_of(folder: Path) -> int | None:
    digits = folder.name[len(_PREFIX) :]
    return int(digits) if folder.name.startswith(_PREFIX) and digits.isdigit() else None


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
            f"{path} is not a checkpoint: it has no {WEIGHTS} and no complete checkpoints/step_* "
            "folders. Pass a run folder (runs/NAME) or one of its checkpoints/step_* folders."
        )
    return latest


# -- the manifest ------------------------------------------------------------------------------


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    """Every file under `folder` except the manifest, as paths relative to it."""
    return sorted(
        p.relative_to(folder) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
    )


def write_manifest(folder: Path) -> Path:
    """Record the sha256 of every file in checkpoint `folder`, atomically: the last write of a
    save, which makes the checkpoint complete."""
    folder = Path(folder)
    files = {str(rel): _sha256(folder / rel) for rel in _files(folder)}
    doc = {"format": _MANIFEST_FORMAT, "version": 1, "files": files}
    return rundir.write_atomic(folder / MANIFEST, json.dumps(doc, indent=1) + "\n")


def verify(folder: Path) -> None:
    """Refuse checkpoint `folder` unless its files are exactly those its manifest lists, with the
    same sha256: a file damaged, swapped, removed or added since the save is named."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    try:
        if manifest.stat().st_size > _MAX_MANIFEST_BYTES:
            raise CheckpointError(f"{manifest} is too large to be a checkpoint manifest")
        doc = json.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{folder} has no {MANIFEST}: it is incomplete (a save was interrupted) or was not "
            "written by minillm; resume from an earlier checkpoint"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{manifest} is unreadable ({exc}); it is damaged") from None
    files = doc.get("files") if isinstance(doc, dict) else None
    if doc.get("format") != _MANIFEST_FORMAT or not isinstance(files, dict):
        raise CheckpointError(f"{manifest} is not a minillm checkpoint manifest")
    present = {str(rel) for rel in _files(folder)}
    added = sorted(present - set(files))
    if added:
        raise CheckpointError(
            f"{folder / added[0]} is not listed in the checkpoint's manifest: it was added after "
            "the save, so it is not loaded; remove it or resume from another checkpoint"
        )
    for name, digest in sorted(files.items()):
        if name not in present:
            raise CheckpointError(f"{folder / name} is missing; the checkpoint is incomplete")
        if _sha256(folder / name) != digest:
            raise CheckpointError(
                f"{folder / name} has changed since it was saved (its sha256 differs from the "
                "manifest's): it is damaged or was replaced; resume from another checkpoint or "
                "retrain"
            )


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
    """Write checkpoint `step` atomically, then delete all but the newest `keep` checkpoints.

    Out of disk space, the half-written folder is removed and the previous checkpoints are left
    as they were; the error says so."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_model(model, str(tmp / WEIGHTS))
        # Serialized in memory first: torch's zip writer reports a full disk as "unexpected
        # pos", plain file writes report it as ENOSPC.
        buffer = io.BytesIO()
        torch.save(state, buffer)
        (tmp / STATE).write_bytes(buffer.getvalue())
        (tmp / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER)
        write_manifest(tmp)
    except (OSError, RuntimeError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_disk_full(exc):
            raise disk_full_while_saving(run_dir, step) from None
        raise
    shutil.rmtree(final, ignore_errors=True)  # the same step saved again (a resumed run)
    tmp.rename(final)
    prune(run_dir, keep)
    return final


def _is_disk_full(exc: BaseException) -> bool:
    """safetensors reports a full disk as the text of its OS error, not as an OSError."""
    text = str(exc).lower()
    return rundir.is_disk_full(exc) or any(
        f"os error {code}" in text for code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    )


def disk_full_while_saving(run_dir: Path, step: int) -> rundir.RunFolderError:
    latest = latest_checkpoint(run_dir)
    intact = f"the last complete checkpoint, {latest}, is intact" if latest else "none was saved"
    return rundir.disk_full(checkpoint_dir(run_dir, step), intact)


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (all are kept when keep <= 0), and
    the leftovers of saves cut short before the newest. The manifest goes first, so a deletion
    cut short leaves an incomplete folder, never a complete-looking one with files missing."""
    complete = list_checkpoints(run_dir)
    if not complete:
        return
    newest = _step_of(complete[-1])
    leftovers = [
        p
        for p in (Path(run_dir) / "checkpoints").iterdir()
        if p.is_dir() and p not in complete and (_step_of(p) or 0) < newest
    ]
    for old in [*(complete[:-keep] if keep > 0 else []), *leftovers]:
        (old / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(old, ignore_errors=True)


def load_config(path: Path) -> dict[str, Any]:
    """The run config saved with checkpoint `path`: a mapping with a `model` mapping."""
    path = resolve(path)
    file = path / CONFIG
    try:
        config = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CheckpointError(f"cannot read {file}: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{file} must hold a mapping of config sections, got {type(config).__name__}; the "
            "checkpoint is damaged or not minillm's"
        )
    if not isinstance(config.get("model"), dict):
        raise CheckpointError(
            f"{file} has no model section (a mapping of GPTConfig fields), so the model cannot "
            "be rebuilt; the checkpoint is damaged or not minillm's"
        )
    return config


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
    require_finite(model, file)


def require_finite(model: torch.nn.Module, source: Path) -> None:
    """Refuse weights with NaN or infinite values (a diverged run saved after the fact, or a
    damaged file): sampling from them fails, and training from them learns nothing."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            kind = "NaN" if torch.isnan(tensor).any() else "infinite"
            raise CheckpointError(
                f"{source} holds {kind} values in {name}: the run diverged before this save or "
                "the file is damaged; use an earlier checkpoint or retrain"
            )


def load_state(path: Path) -> dict[str, Any]:
    """The training state of checkpoint `path` (tensors and plain containers only)."""
    file = resolve(path) / STATE
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing") from None
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"{file} is corrupt, truncated or not a minillm training state ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); resume from an earlier checkpoint"
        ) from None
    check_state(state, file)
    return state


_STATE_KEYS = {"step": int, "data": dict, "rng": dict}  # engine-specific parts come beside them


def check_state(state: Any, source: Path | str, max_iters: float = math.inf) -> None:
    """Refuse a training state that minillm did not write, in bounded time: it must be a mapping
    with `step`, `data` and `rng`, nest at most `MAX_STATE_DEPTH` levels, hold at most
    `MAX_STATE_NODES` items in all (shared references counted each time they are reached, so a
    pickle bomb is stopped after that many, never expanded), and stop at or before `max_iters`."""
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{source} is not a minillm training state: it holds a {type(state).__name__}, not "
            "a mapping"
        )
    missing = [k for k in _STATE_KEYS if k not in state]
    wrong = [k for k, kind in _STATE_KEYS.items() if k in state and not isinstance(state[k], kind)]
    if missing or wrong:
        detail = f"missing {', '.join(missing)}" if missing else f"malformed {', '.join(wrong)}"
        raise CheckpointError(
            f"{source} is not a minillm training state ({detail}); it is damaged or was "
            "written by another program"
        )
    check_size(state, source)
    step = state["step"]
    if isinstance(step, bool) or step < 0 or step > max_iters:
        raise CheckpointError(
            f"{source} says step {step}, outside 0..max_iters={max_iters}; the checkpoint is "
            "damaged or belongs to a run with more steps (raise max_iters to continue it)"
        )


def check_size(state: Any, source: Path | str) -> None:
    """Refuse `state` if it nests deeper than `MAX_STATE_DEPTH` or reaches more than
    `MAX_STATE_NODES` items; the walk is iterative (no recursion limit to hit) and stops there."""
    todo, nodes = [(state, 0)], 0
    while todo:
        value, depth = todo.pop()
        nodes += 1
        if depth > MAX_STATE_DEPTH or nodes > MAX_STATE_NODES:
            what = (
                f"nests deeper than {MAX_STATE_DEPTH} levels"
                if depth > MAX_STATE_DEPTH
                else (f"holds more than {MAX_STATE_NODES:,} items")
            )
            raise CheckpointError(
                f"{source} {what}: no minillm training state does, so it is refused unread "
                "(a damaged or hostile file); resume from another checkpoint"
            )
        if isinstance(value, Mapping):
            todo.extend((v, depth + 1) for v in value.values())
            todo.extend((k, depth + 1) for k in value.keys() if not isinstance(k, (str, int)))
        elif isinstance(value, (list, tuple, set, frozenset)):
            todo.extend((v, depth + 1) for v in value)
