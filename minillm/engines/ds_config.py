"""DeepSpeed JSON configs, checked whole before anything is launched (chapter 09).

`prepare_config(config, train, world_size, device_type)` returns a copy of a DeepSpeed config with
its `"auto"` values filled from the training config, or refuses it with one sentence that names
the key and the fix. The launcher process calls it before any rank starts, so a mistake costs a
second, not a launch and a log from every rank. The checks, in order:

1. **Shape.** Every top-level key is one DeepSpeed reads (a typo gets the closest key: DeepSpeed
   itself ignores unknown keys silently, so `"zero_optimisation"` would train at ZeRO-0), and
   every value has the JSON type DeepSpeed expects: `"bf16": true` is refused, not a crash.
2. **Nothing silently overridden or dropped.** Each section is honoured or refused. minillm
   takes the batch sizes, clipping, learning rate, betas and weight decay from the training
   config, so a value here that differs from it is refused (write `"auto"`); it schedules the
   learning rate itself, so a `scheduler` is refused; sections it does not wire (random-LTD and
   curriculum in `data_efficiency`, AutoTP, ...) are refused; the legacy `"bfloat16"` spelling
   is honoured as `"bf16"`.
3. **DeepSpeed's own model.** Each section DeepSpeed describes with a pydantic model (ZeRO and
   its offload devices, bf16, fp16, monitors, ...) is validated by that model, and the sections
   it reads key by key are checked against the keys and defaults its parser reads (recorded from
   the parser itself), so nested typos (`"stge"`, `"offload_optimiser"`, `"enabeld"`) and bad
   values (`"device": "cpuu"`, stage 5) are refused with the closest valid name. Finally the
   whole filled config goes through `deepspeed.runtime.config.DeepSpeedConfig`.
4. **What DeepSpeed checks only inside every rank:** the optimizer type and its parameters
   (against the constructor DeepSpeed will call), fp16 on a CPU, offload at a stage that ignores
   it, pipelines with ZeRO-2/3, and clipping by the wrong norm in an fp32 pipeline at ZeRO-0.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import inspect
import json
import math
import re
from pathlib import Path
from typing import Any

from minillm.errors import InputError
from minillm.train_config import TrainConfig

AUTO = "auto"
_OBJECT = dict  # the kind of a section: a JSON object
_CHECKED_BY_DEEPSPEED = object()  # a key DeepSpeed only tests for: its parser decides on it

# Sections DeepSpeed looks up with `.keys()` or `in` only, so a recorder of `get` misses them.
_READ_VIA_KEYS = {
    "optimizer",
    "scheduler",
    "activation_checkpointing",
    "flops_profiler",
    "aio",
    "autotuning",
    "zero_optimization",
}

# What minillm does not wire, with the reason a student reads. Each of these would be accepted
# by DeepSpeed and then do nothing, or something minillm's loop contradicts.
REFUSED = {
    "scheduler": "minillm schedules the learning rate itself (linear warm-up, then a cosine to "
    "optim.min_lr at max_iters); remove the scheduler section and set optim.warmup_iters and "
    "optim.min_lr instead",
    "data_efficiency": "minillm does not wire DeepSpeed's data efficiency library (random-LTD "
    "layer dropping and curriculum sampling need DeepSpeed's data loader and layer wrappers); "
    "remove the section",
    "hybrid_engine": "the hybrid engine serves RLHF generation, which minillm does not use; "
    "remove the section",
    "tensor_parallel": "minillm does not wire DeepSpeed's AutoTP (chapter 08 builds tensor "
    "parallelism from scratch instead); remove the section",
    "expert_parallel": "the course GPT has no mixture-of-experts layers; remove the section",
    "use_data_before_expert_parallelism": "the course GPT has no mixture-of-experts layers; "
    "remove the key",
    "weight_quantization": "minillm does not wire DeepSpeed's weight quantization; remove the "
    "section",
    "compile": "minillm compiles the model itself: remove the section and set compile=true in "
    "the training config",
    "autotuning": "autotuning needs `deepspeed --autotuning`, which minillm's launcher does not "
    "run; remove the section",
    "dataloader_drop_last": "it applies to DeepSpeed's own data loader, and minillm feeds its "
    "own batches; remove the key",
    "datastates_ckpt": "minillm saves and loads checkpoints through DeepSpeed's torch engine "
    "only (it loads them with weights_only=True, so a file cannot run code); remove the key",
}
# Keys of the `checkpoint` section that would make DeepSpeed read files with
# torch.load(weights_only=False) or through another engine than the one minillm makes safe.
_UNSAFE_CHECKPOINT_KEYS = {
    "load_universal": "DeepSpeed loads universal checkpoints with torch.load(weights_only=False), "
    "which can run code from the file",
    "writer": "minillm saves and loads checkpoints through DeepSpeed's torch engine only, reading "
    "them with weights_only=True",
}

# Values minillm fills from the training config: a different explicit value is refused.
_FROM_TRAINING = {
    "train_micro_batch_size_per_gpu": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "gradient_clipping": "optim.grad_clip",
}

# Top-level scalars whose DeepSpeed default is None (so the recorder cannot tell their type).
_SCALARS = {
    "train_batch_size": int,
    "train_micro_batch_size_per_gpu": int,
    "gradient_accumulation_steps": int,
    "steps_per_print": int,
    "vocabulary_size": int,
    "communication_data_type": str,
    "log_level": str,
}
_EXAMPLES = {
    "zero_optimization": '{"stage": 2}',
    "bf16": '{"enabled": true}',
    "bfloat16": '{"enabled": true}',
    "fp16": '{"enabled": true}',
    "optimizer": '{"type": "AdamW", "params": {"lr": "auto"}}',
    "pipeline": '{"stages": 2}',
    "activation_checkpointing": '{"partition_activations": false}',
}
# The pipeline keys minillm's pipeline engine reads (chapter 08), and their kinds.
_PIPELINE = {
    "stages": int,
    "partition": str,
    "activation_checkpoint_interval": int,
    "pipe_partitioned": bool,
    "grad_partitioned": bool,
}
_OPTIMIZER_KEYS = {"type": str, "params": _OBJECT, "legacy_fusion": bool}
# Nested keys whose DeepSpeed default is null (so the recorder cannot tell their type).
_NESTED = {"activation_checkpointing.number_checkpoints": int, "flops_profiler.output_file": str}


class _Recorder(dict):
    """A config section that records every key DeepSpeed's parser reads, with its default."""

    def __init__(self, reads: dict, path: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._reads, self._path = reads, path

    def _note(self, key, default):
        self._reads.setdefault(self._path, {}).setdefault(key, default)

    def get(self, key, *default):
        self._note(key, default[0] if default else None)
        return super().get(key, *default)

    def __contains__(self, key):
        self._note(key, _CHECKED_BY_DEEPSPEED)
        return super().__contains__(key)

    def __getitem__(self, key):
        self._note(key, _CHECKED_BY_DEEPSPEED)
        return super().__getitem__(key)


# Sections read key by key (not by a pydantic model) whose reads the recorder can follow.
_RECORDED_SECTIONS = (
    "activation_checkpointing",
    "flops_profiler",
    "aio",
    "data_types",
    "torch_autocast",
    "timers",
)


@functools.cache
def deepspeed_reads() -> dict[str, dict[str, Any]]:
    """{section: {key: default}} for every key DeepSpeed 0.19's config parser reads: "" is the
    top level, the other sections are those it reads key by key. Recorded from the parser."""
    import torch.distributed as dist
    from deepspeed.runtime.config import DeepSpeedConfig

    world = dist.get_world_size() if dist.is_initialized() else 1  # the parser checks batch math
    reads: dict[str, dict[str, Any]] = {}
    sections = {name: _Recorder(reads, name) for name in _RECORDED_SECTIONS}
    DeepSpeedConfig(
        _Recorder(
            reads,
            "",
            train_batch_size=world,
            train_micro_batch_size_per_gpu=1,
            gradient_accumulation_steps=1,
            **sections,
        )
    )
    for name in _READ_VIA_KEYS:
        reads[""].setdefault(name, {})
    for name in _RECORDED_SECTIONS:  # a section is an object, whatever its default says
        reads[""][name] = {}
    return reads


def known_top_level_keys() -> frozenset[str]:
    """Every top-level key DeepSpeed's config parser reads."""
    return frozenset(deepspeed_reads()[""])


@functools.cache
def _pydantic_sections() -> dict[str, type]:
    """Sections DeepSpeed validates with a pydantic model of its own: {section: model}."""
    from deepspeed.comm.config import CommsLoggerConfig
    from deepspeed.monitor.config import CometConfig, CSVConfig, TensorBoardConfig, WandbConfig
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return {
        "zero_optimization": DeepSpeedZeroConfig,
        "bf16": DeepSpeedBF16Config,
        "fp16": DeepSpeedFP16Config,
        "tensorboard": TensorBoardConfig,
        "csv_monitor": CSVConfig,
        "wandb": WandbConfig,
        "comet": CometConfig,
        "comms_logger": CommsLoggerConfig,
    }


def load_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"DeepSpeed config {path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InputError(f"{path} must hold a JSON object at the top level")
    return config


# -- one sentence per mistake -----------------------------------------------------------------


def _json(value: Any) -> str:
    try:
        return json.dumps(value)[:80]
    except (TypeError, ValueError):
        return repr(value)[:80]


def _hint(name: str, candidates) -> str:
    close = difflib.get_close_matches(str(name), sorted(set(candidates)), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _unknown(path: str, key: str, candidates, what: str = "DeepSpeed") -> InputError:
    return InputError(
        f"unknown DeepSpeed config key {path + key!r}{_hint(key, candidates)} ({what} does not "
        "read it, so it would be ignored)"
    )


_KIND_WORDS = {
    bool: "true or false",
    int: "a whole number",
    float: "a number",
    str: "text",
    list: "a list",
    _OBJECT: "a JSON object",
}


def _kind_of(default: Any) -> type | None:
    if isinstance(default, bool):
        return bool
    for kind in (int, float, str, list, _OBJECT):
        if isinstance(default, kind):
            return kind
    return None


def _require(path: str, value: Any, kind: type, example: str | None = None) -> None:
    """Refuse `value` at `path` unless it is of JSON kind `kind` (an int counts as a float)."""
    ok = (
        isinstance(value, bool)
        if kind is bool
        else (
            not isinstance(value, bool)
            and (isinstance(value, (int, float)) if kind is float else isinstance(value, kind))
        )
    )
    if kind is int and isinstance(value, float) and value.is_integer():
        ok = True  # 5e6 is written as a float in JSON
    if not ok:
        such = f" such as {example}" if example else ""
        quoted = " (written in quotes: drop them)" if isinstance(value, str) else ""
        raise InputError(
            f"DeepSpeed config key {path!r} must be {_KIND_WORDS[kind]}{such}, got "
            f"{_json(value)}{quoted}"
        )


def _number(path: str, value: Any, *, low: float, low_open: bool = False, whole=False) -> None:
    _require(path, value, int if whole else float)
    if not math.isfinite(value) or value < low or (low_open and value == low):
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        raise InputError(f"DeepSpeed config key {path!r} must be {bound}, got {_json(value)}")


# -- the checks -----------------------------------------------------------------------------


def _check_top_level(config: dict) -> None:
    top = deepspeed_reads()[""]
    for key, value in config.items():
        if key in REFUSED:
            raise InputError(f"DeepSpeed config section {key!r} is not supported: {REFUSED[key]}")
        if key not in top:
            raise _unknown("", key, top)
        if value == AUTO and key in {"train_batch_size", *_FROM_TRAINING}:
            continue
        if key in _pydantic_sections() or key in _READ_VIA_KEYS:
            kind = _OBJECT
        elif top[key] is _CHECKED_BY_DEEPSPEED:
            continue  # e.g. a removed feature: DeepSpeedConfig refuses it with its own message
        else:
            kind = _SCALARS.get(key) or _kind_of(top[key]) or _OBJECT
        if value is None and key == "communication_data_type":
            continue  # null: DeepSpeed picks the type
        _require(key, value, kind, _EXAMPLES.get(key))
        if key == "steps_per_print":
            _number(key, value, low=1, whole=True)


def _check_recorded_section(name: str, section: dict) -> None:
    reads = deepspeed_reads().get(name, {})
    for key, value in section.items():
        if key not in reads:
            raise _unknown(f"{name}.", key, reads)
        kind = _kind_of(reads[key]) or _NESTED.get(f"{name}.{key}")
        if value is None and reads[key] is None:
            continue  # null where DeepSpeed's default is null
        if kind is not None and value != AUTO:
            _require(f"{name}.{key}", value, kind)


def _model_fields(model) -> dict[str, Any]:
    """{name or alias: annotation} of a pydantic model's fields."""
    fields = {}
    for name, info in model.model_fields.items():
        fields[name] = info.annotation
        if info.alias:
            fields[info.alias] = info.annotation
    return fields


def _submodel(annotation):
    """The pydantic model inside an annotation such as `Optional[OffloadConfig]`, or None."""
    from pydantic import BaseModel

    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _pydantic_message(section: str, model, error: dict) -> str:
    """One sentence for the first error pydantic reports in DeepSpeed's model of `section`."""
    loc = [str(part) for part in error["loc"]]
    path = ".".join([section, *loc])
    owner = model
    for part in loc[:-1]:
        owner = _submodel(_model_fields(owner).get(part)) or owner
    value = error.get("input")
    kind = error["type"]
    if kind == "extra_forbidden":
        return (
            f"unknown DeepSpeed config key {path!r}{_hint(loc[-1], _model_fields(owner))} "
            "(DeepSpeed's own config model refuses it)"
        )
    if kind == "enum":
        choices = re.findall(r"'([^']*)'", error.get("ctx", {}).get("expected", ""))
        hint = _hint(value, choices) if choices else ""
        return f"DeepSpeed config key {path!r} cannot be {_json(value)}: {error['msg']}{hint}"
    words = {
        "bool": "true or false",
        "int": "a whole number",
        "float": "a number",
        "string": "text",
        "model": "a JSON object",
        "dict": "a JSON object",
    }
    for prefix, word in words.items():
        if kind.startswith(prefix):
            return f"DeepSpeed config key {path!r} must be {word}, got {_json(value)}"
    reason = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return f"DeepSpeed config key {path!r} is refused by DeepSpeed: {reason}"


def _check_pydantic_section(name: str, section: dict) -> None:
    from pydantic import ValidationError

    model = _pydantic_sections()[name]
    try:
        model(**section)
    except ValidationError as exc:
        raise InputError(_pydantic_message(name, model, exc.errors()[0])) from None
    except (AssertionError, ValueError) as exc:  # DeepSpeed's own validators
        raise InputError(f"DeepSpeed config section {name!r} is refused: {exc}") from None


def _check_pipeline(config: dict, world_size: int) -> int:
    """The data-parallel size left once the pipeline stages are cut."""
    pipe = config.get("pipeline")
    if pipe is None:
        return world_size
    for key, value in pipe.items():
        if key not in _PIPELINE:
            raise _unknown("pipeline.", key, _PIPELINE, "minillm's pipeline engine")
        _require(f"pipeline.{key}", value, _PIPELINE[key])
    stages = pipe.get("stages", 1)
    _number("pipeline.stages", stages, low=1, whole=True)
    _number(
        "pipeline.activation_checkpoint_interval",
        pipe.get("activation_checkpoint_interval", 0),
        low=0,
        whole=True,
    )
    partition = pipe.get("partition", "type:PipeBlock")
    if partition not in ("parameters", "uniform") and not partition.startswith("type:"):
        raise InputError(
            f"DeepSpeed config key 'pipeline.partition' cannot be {partition!r}: use "
            '"parameters", "uniform" or "type:PipeBlock" (a layer class name pattern)'
        )
    if world_size % stages:
        raise InputError(
            f"{world_size} processes cannot form {stages} pipeline stages: the process count "
            "must be a multiple of pipeline.stages"
        )
    return world_size // stages


def _fill_or_agree(section: dict, key: str, value: Any, path: str, train_name: str) -> None:
    """Fill an "auto" (or absent) value from the training config; refuse a different one."""
    written = section.get(key, AUTO)
    if written == AUTO:
        section[key] = value
    elif written != value:
        raise InputError(
            f"DeepSpeed config key {path!r} is {_json(written)} but the training config's "
            f'{train_name} is {_json(value)}; make them agree (write "auto" here, or set '
            f"{train_name}={_json(written)})"
        )


def _check_batches(config: dict, train: TrainConfig, data_parallel: int) -> None:
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if config.get(key, AUTO) != AUTO:
            _number(key, config[key], low=1, whole=True)
            config[key] = int(config[key])
        _fill_or_agree(config, key, getattr(train, _FROM_TRAINING[key]), key, _FROM_TRAINING[key])
    micro, accumulation = (
        config["train_micro_batch_size_per_gpu"],
        config["gradient_accumulation_steps"],
    )
    if config.get("train_batch_size", AUTO) == AUTO:
        config["train_batch_size"] = micro * accumulation * data_parallel
    _number("train_batch_size", config["train_batch_size"], low=1, whole=True)
    config["train_batch_size"] = int(config["train_batch_size"])
    if config["train_batch_size"] != micro * accumulation * data_parallel:
        raise InputError(
            f"batch sizes do not multiply out: train_batch_size {config['train_batch_size']} != "
            f"micro batch {micro} x accumulation {accumulation} x data-parallel {data_parallel}"
        )
    clip = config.get("gradient_clipping", AUTO)
    if clip != AUTO:
        _number("gradient_clipping", clip, low=0)
    # written explicitly: DeepSpeed 0.19's default would clip at 1.0
    _fill_or_agree(
        config, "gradient_clipping", train.optim.grad_clip, "gradient_clipping", "optim.grad_clip"
    )


_DEEPSPEED_OPTIMIZERS = (
    "Adam",
    "AdamW",
    "Adagrad",
    "Lamb",
    "Lion",
    "MuAdam",
    "MuAdamW",
    "MuSGD",
    "Muon",
)


def _torch_optimizers() -> dict[str, type]:
    import torch

    return {
        name: cls
        for name, cls in vars(torch.optim).items()
        if isinstance(cls, type)
        and issubclass(cls, torch.optim.Optimizer)
        and cls is not torch.optim.Optimizer
    }


def _optimizer_class(name: str, params: dict, offload: bool, device_type: str):
    """The class DeepSpeed 0.19 will build for optimizer `name` (engine.py,
    `_configure_basic_optimizer`), and the parameters it takes out of `params` itself."""
    import torch

    lower = name.lower()
    if lower == "muon":  # Muon splits its parameters itself (muon_lr, adam_lr, ...)
        return None, set()
    if lower in ("adam", "adamw"):
        own = {"torch_adam", "adam_w_mode", "fp32_optimizer_states"}
        if params.get("torch_adam") is True:
            return (torch.optim.AdamW if lower == "adamw" else torch.optim.Adam), own | {"foreach"}
        if offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam, own  # DeepSpeed passes adamw_mode itself
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam, own
    if lower == "adagrad":
        if offload:
            from deepspeed.ops.adagrad import DeepSpeedCPUAdagrad

            return DeepSpeedCPUAdagrad, set()
        return torch.optim.Adagrad, set()
    if lower in ("lamb", "lion") and device_type != "cuda" and not (lower == "lion" and offload):
        raise InputError(
            f"DeepSpeed's {name} optimizer (optimizer.type) is a CUDA kernel and cannot run on "
            "this machine's CPU; use AdamW, or run on a GPU"
        )
    if lower == "lamb":
        from deepspeed.ops.lamb import FusedLamb

        return FusedLamb, set()
    if lower == "lion":
        from deepspeed.ops.lion import DeepSpeedCPULion, FusedLion

        return (DeepSpeedCPULion if offload else FusedLion), set()
    if lower in ("muadam", "muadamw", "musgd"):
        if importlib.util.find_spec("mup") is None:
            raise InputError(
                f"DeepSpeed's {name} optimizer (optimizer.type) needs the mup package; "
                "pip install mup, or use AdamW"
            )
        import mup

        return getattr(mup, {"muadam": "MuAdam", "muadamw": "MuAdamW"}.get(lower, "MuSGD")), set()
    torch_classes = _torch_optimizers()
    if name in torch_classes:
        return torch_classes[name], set()
    raise InputError(
        f"DeepSpeed config key 'optimizer.type' cannot be {name!r}: it is neither one of "
        f"DeepSpeed's optimizers ({', '.join(_DEEPSPEED_OPTIMIZERS)}) nor a torch.optim class"
        f"{_hint(name, [*_DEEPSPEED_OPTIMIZERS, *torch_classes])}"
    )


def _check_optimizer(config: dict, train: TrainConfig, device_type: str) -> None:
    optimizer = config.setdefault("optimizer", {"type": "AdamW", "params": {}})
    train.optim.require_adamw(
        "DeepSpeed",
        "ZeRO cuts every parameter into slices, and Muon needs each matrix whole; here the "
        'DeepSpeed config\'s optimizer section builds the optimizer, its "auto" values filled '
        "from AdamW's settings",
    )
    for key, value in optimizer.items():
        if key not in _OPTIMIZER_KEYS:
            raise _unknown("optimizer.", key, _OPTIMIZER_KEYS)
        _require(f"optimizer.{key}", value, _OPTIMIZER_KEYS[key], _EXAMPLES["optimizer"])
    if "type" not in optimizer:
        raise InputError(
            "DeepSpeed config key 'optimizer.type' is missing: name the optimizer, e.g. "
            '"type": "AdamW" (or remove the optimizer section to use AdamW)'
        )
    params = optimizer.setdefault("params", {})
    if "max_grad_norm" in params:
        raise InputError(
            "DeepSpeed config key 'optimizer.params.max_grad_norm' is refused by DeepSpeed: "
            "clip with optim.grad_clip in the training config (DeepSpeed's gradient_clipping)"
        )
    zero = config.get("zero_optimization", {})
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    cls, own = _optimizer_class(optimizer["type"], params, offload, device_type)
    if cls is None:
        accepted = {"lr", "betas", "weight_decay", *params}
        defaults = {}
    else:
        signature = inspect.signature(cls.__init__).parameters.values()
        defaults = {
            p.name: p.default for p in signature if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }
        # DeepSpeed passes adamw_mode and fp32_optimizer_states to its CPU Adam itself.
        accepted = (set(defaults) - {"self", "params", "adamw_mode", "fp32_optimizer_states"}) | own
    for key, value in params.items():
        if key not in accepted:
            raise _unknown("optimizer.params.", key, accepted, cls.__name__)
        kind = _kind_of(defaults.get(key))
        if kind is not None and value != AUTO and key not in ("lr", "betas", "weight_decay"):
            _require(f"optimizer.params.{key}", value, float if kind is int else kind)
    o = train.optim
    _fill_or_agree(params, "lr", o.learning_rate, "optimizer.params.lr", "optim.learning_rate")
    if "betas" in accepted:
        written = params.get("betas", AUTO)
        if written != AUTO and not (
            isinstance(written, list)
            and len(written) == 2
            and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in written)
        ):
            raise InputError(
                "DeepSpeed config key 'optimizer.params.betas' must be a list of two numbers "
                f"such as [0.9, 0.99], got {_json(written)}"
            )
        betas = [o.beta1, o.beta2]
        _fill_or_agree(params, "betas", betas, "optimizer.params.betas", "optim.beta1/beta2")
    if "weight_decay" in accepted:
        _fill_or_agree(
            params,
            "weight_decay",
            o.weight_decay,
            "optimizer.params.weight_decay",
            "optim.weight_decay",
        )
    for key in [k for k, v in params.items() if v == AUTO]:
        del params[key]  # "auto" with no training-config value: the optimizer's own default
    for key in ("eps",):
        if key in params:
            _number(f"optimizer.params.{key}", params[key], low=0, low_open=True)
    for key in ("torch_adam", "adam_w_mode"):
        if key in params:
            _require(f"optimizer.params.{key}", params[key], bool)


def _check_precision(config: dict, train: TrainConfig, device_type: str) -> None:
    if "bfloat16" in config:  # DeepSpeed's legacy spelling: honoured, under its current name
        if "bf16" in config:
            raise InputError(
                'the DeepSpeed config has both "bf16" and its legacy spelling "bfloat16"; keep '
                'only "bf16"'
            )
        config["bf16"] = config.pop("bfloat16")
    for precision in ("bf16", "fp16"):
        section = config.setdefault(precision, {})
        written = section.get("enabled", AUTO)
        if written == AUTO:
            section["enabled"] = train.precision == precision
        else:
            _require(f"{precision}.enabled", written, bool)
            if not written and train.precision == precision:
                raise InputError(
                    f"the training config asks for precision={precision} but the DeepSpeed "
                    f'config disables it ("{precision}": {{"enabled": false}}); make them agree '
                    '(write "auto" there, or set precision=fp32)'
                )
    if config["bf16"]["enabled"] and config["fp16"]["enabled"]:
        raise InputError(
            "the DeepSpeed config enables both bf16 and fp16; enable one of them (bf16 on a CPU)"
        )
    if config["fp16"]["enabled"] and device_type == "cpu":
        raise InputError(
            "fp16 is not supported by DeepSpeed on a CPU; use the bf16 config there "
            "(fp16 configs are for GPUs)"
        )


def _check_zero(config: dict) -> int:
    zero = config.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        quoted = " (written in quotes: drop them)" if isinstance(stage, str) else ""
        raise InputError(
            "DeepSpeed config key 'zero_optimization.stage' must be 0, 1, 2 or 3 (the ZeRO "
            f"stage), got {_json(stage)}{quoted}"
        )
    _check_pydantic_section("zero_optimization", zero)
    optimizer_device = (zero.get("offload_optimizer") or {}).get("device", "none")
    param_device = (zero.get("offload_param") or {}).get("device", "none")
    if optimizer_device != "none" and stage == 0:
        raise InputError(
            "DeepSpeed config key 'zero_optimization.offload_optimizer' needs ZeRO stage 1, 2 or "
            "3 (DeepSpeed ignores it at stage 0); raise zero_optimization.stage or remove it"
        )
    if param_device != "none" and stage != 3:
        raise InputError(
            "DeepSpeed config key 'zero_optimization.offload_param' needs ZeRO stage 3 "
            f"(DeepSpeed ignores it at stage {stage}); set zero_optimization.stage to 3 or "
            "remove it"
        )
    return stage


def _check_with_deepspeed(config: dict) -> None:
    """The filled config through DeepSpeed's own parser (`DeepSpeedConfig`), at one process: the
    batch arithmetic for the real world size was checked above, so the global batch is left for
    DeepSpeed to derive."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils import logger
    from pydantic import ValidationError

    single = {k: v for k, v in config.items() if k != "train_batch_size"}
    level = logger.level
    logger.setLevel("WARNING")  # not its INFO lines in the launcher's output
    try:
        DeepSpeedConfig(single)
    except ValidationError as exc:
        raise InputError(f"DeepSpeed refuses the config: {exc.errors()[0]['msg']}") from None
    except Exception as exc:  # DeepSpeed raises AssertionError, ValueError and its own errors
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"DeepSpeed refuses the config: {first}") from None
    finally:
        logger.setLevel(level)


def prepare_config(
    config: dict[str, Any], train: TrainConfig, world_size: int, device_type: str
) -> dict:
    """A copy of DeepSpeed `config` with "auto" filled from `train`, checked whole (see the
    module docstring): every mistake is one `InputError` naming the key and the fix."""
    if not isinstance(config, dict):
        raise InputError(f"a DeepSpeed config must be a JSON object, got {_json(config)}")
    config = json.loads(json.dumps(config))  # a deep copy
    _check_top_level(config)
    _check_precision(config, train, device_type)
    for name, section in config.items():
        if name in _pydantic_sections() and name != "zero_optimization":
            _check_pydantic_section(name, section)
        elif name in _RECORDED_SECTIONS:
            _check_recorded_section(name, section)
    for key, why in _UNSAFE_CHECKPOINT_KEYS.items():
        if config.get("checkpoint", {}).get(key):
            raise InputError(f"DeepSpeed config key 'checkpoint.{key}' is not supported: {why}")
    stage = _check_zero(config)
    data_parallel = _check_pipeline(config, world_size)
    _check_batches(config, train, data_parallel)
    _check_optimizer(config, train, device_type)
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
    _check_with_deepspeed(config)
    return config
