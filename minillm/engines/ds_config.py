"""DeepSpeed JSON configs: `prepare_config` checks one against the training config *before*
anything is launched and fills its `"auto"` values (chapter 09).

DeepSpeed 0.19 traps this module guards against (each measured on a CPU machine):
- an unknown top-level key is ignored silently (`"zero_optimisation"` trains at ZeRO-0): refused
  here, with the closest valid key;
- `gradient_clipping` defaults to 1.0: always written explicitly, from `optim.grad_clip`;
- fp16 is refused on a CPU ("Type fp16 is not supported on your device"): refused here first;
- pipeline parallelism with ZeRO-2/3 is unsupported: refused here;
- batch sizes must multiply out: `train_batch_size = micro batch x accumulation x data-parallel`.
"""

from __future__ import annotations

import difflib
import functools
import json
from pathlib import Path
from typing import Any

from minillm.errors import InputError
from minillm.train_config import TrainConfig

# Sections DeepSpeed reads that its parser looks up with `.keys()` (so a recorder misses them).
_READ_VIA_KEYS = {
    "optimizer",
    "scheduler",
    "activation_checkpointing",
    "flops_profiler",
    "aio",
    "autotuning",
    "zero_optimization",
}


@functools.cache
def known_top_level_keys() -> frozenset[str]:
    """Every top-level key DeepSpeed's config parser reads, recorded from the parser itself."""
    from deepspeed.runtime.config import DeepSpeedConfig

    seen: set[str] = set()

    class Recorder(dict):
        def get(self, key, *default):
            seen.add(key)
            return super().get(key, *default)

        def __contains__(self, key):
            seen.add(key)
            return super().__contains__(key)

        def __getitem__(self, key):
            seen.add(key)
            return super().__getitem__(key)

    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1  # the parser checks batch math
    DeepSpeedConfig(
        Recorder(
            train_batch_size=world, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1
        )
    )
    return frozenset(seen | _READ_VIA_KEYS)


def load_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"DeepSpeed config {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InputError(f"{path} must hold a JSON object at the top level")
    return config


def _fill(section: dict, key: str, value: Any) -> None:
    if section.get(key, "auto") == "auto":
        section[key] = value


def prepare_config(
    config: dict[str, Any], train: TrainConfig, world_size: int, device_type: str
) -> dict:
    """A copy of DeepSpeed `config` with "auto" filled from `train` (a TrainConfig), after checks
    that DeepSpeed itself would skip, make silently, or make only after launching."""
    config = json.loads(json.dumps(config))  # a deep copy
    known = known_top_level_keys()
    for key in config:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise InputError(
                f"unknown DeepSpeed config key {key!r}{hint} (DeepSpeed would ignore it silently)"
            )
    stages = config.get("pipeline", {}).get("stages", 1)
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise InputError(f"pipeline.stages must be a whole number of stages >= 1, got {stages!r}")
    if world_size % stages:
        raise InputError(
            f"{world_size} processes cannot form {stages} pipeline stages: the process count "
            "must be a multiple of pipeline.stages"
        )
    data_parallel = world_size // stages
    _fill(config, "train_micro_batch_size_per_gpu", train.batch_size)
    _fill(config, "gradient_accumulation_steps", train.grad_accum)
    micro, accumulation = (
        config["train_micro_batch_size_per_gpu"],
        config["gradient_accumulation_steps"],
    )
    _fill(config, "train_batch_size", micro * accumulation * data_parallel)
    if config["train_batch_size"] != micro * accumulation * data_parallel:
        raise InputError(
            f"batch sizes do not multiply out: train_batch_size {config['train_batch_size']} != "
            f"micro batch {micro} x accumulation {accumulation} x data-parallel {data_parallel}"
        )
    if (micro, accumulation) != (train.batch_size, train.grad_accum):
        raise InputError(
            f"the DeepSpeed config says micro batch {micro} and accumulation {accumulation}, the "
            f"training config batch_size={train.batch_size} and grad_accum={train.grad_accum}; "
            'make them agree or write "auto" in the DeepSpeed config'
        )
    _fill(config, "gradient_clipping", train.optim.grad_clip)  # 0.19's default would be 1.0
    optimizer = config.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    o = train.optim
    for key, value in (
        ("lr", o.learning_rate),
        ("betas", [o.beta1, o.beta2]),
        ("weight_decay", o.weight_decay),
    ):
        _fill(params, key, value)
    for precision in ("bf16", "fp16"):
        section = config.setdefault(precision, {})
        _fill(section, "enabled", train.precision == precision)
    if config["fp16"]["enabled"] and device_type == "cpu":
        raise InputError(
            "fp16 is not supported by DeepSpeed on a CPU; use the bf16 config there "
            "(fp16 configs are for GPUs)"
        )
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if "pipeline" in config and stage >= 2:
        raise InputError(
            f"pipeline parallelism cannot be combined with ZeRO stage {stage}; use "
            "stage 0 or 1 with a pipeline"
        )
    if (
        "pipeline" in config
        and stage == 0
        and not config["bf16"]["enabled"]
        and config["gradient_clipping"] > 0
    ):
        raise InputError(  # measured: DeepSpeed 0.19 then clips by stage 0's gradient norm only
            "a pipeline at ZeRO stage 0 in fp32 clips gradients by the first stage's norm, not "
            "the whole model's; use ZeRO stage 1 or set optim.grad_clip=0"
        )
    return config
