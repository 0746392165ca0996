"""DeepSpeed as another engine under the same Trainer, model and data (chapter 09).

`prepare_config` checks a DeepSpeed JSON config against the training config *before* anything is
launched and fills its `"auto"` values; `DeepSpeedTrainEngine` gives `deepspeed.initialize`'s
engine the interface the Trainer drives (`forward`, `backward`, `step`, `lr`, checkpoints).

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
import os
from pathlib import Path
from typing import Any

import torch

from minillm.errors import InputError

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


def prepare_config(config: dict[str, Any], train, world_size: int, device_type: str) -> dict:
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
    data_parallel = world_size // config.get("pipeline", {}).get("stages", 1)
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
    return config


def rank_device() -> str:
    """The device of this launched process: its own GPU where there are GPUs, else the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def launch(nproc: int, ds_config: dict, train, argv: list[str]) -> int:
    """Check the DeepSpeed and training configs for `nproc` processes, then start them with
    DeepSpeed's launcher running `minillm <argv>` (without --nproc). Returns its exit code."""
    import shutil
    import subprocess
    import sys

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    prepare_config(ds_config, train, nproc, device_type)  # refuse a bad config before launching
    from minillm import data

    data.fetch(train.data.corpus)  # download once here, not in every rank
    argv = list(argv)
    i = argv.index("--nproc")
    del argv[i : i + 2]
    if "--fresh" in argv:  # here, once, not in every rank
        argv.remove("--fresh")
        shutil.rmtree(train.out_dir, ignore_errors=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # the launcher leaves it unset: 2-25x slower steps
    from minillm.parallel.launch import free_port

    command = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--master_port",  # a free one, not the fixed default that another run may hold
        str(free_port()),
        "--num_gpus",
        str(nproc),
        "--module",
        "minillm.cli",
        *argv,
    ]
    return subprocess.call(command, env=env)


class DeepSpeedTrainEngine:
    """`deepspeed.initialize` behind the Trainer's engine interface. Each rank runs its slice of
    the global micro-batch; DeepSpeed averages gradients across ranks (ZeRO shards them)."""

    def __init__(self, model: torch.nn.Module, train, device: torch.device, ds_config: dict):
        import deepspeed
        import torch.distributed as dist

        from minillm.train import lr_at

        if not dist.is_initialized():
            deepspeed.init_distributed()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.config = prepare_config(ds_config, train, self.world_size, device.type)
        o = train.optim

        def schedule(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: lr_at(step, o, train.max_iters) / o.learning_rate
            )

        self.engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=model.param_groups(o.weight_decay),
            lr_scheduler=schedule,
            config=self.config,
        )
        self.module = model

    def shard(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of a global micro-batch (batch_size x world_size sequences)."""
        size = x.shape[0] // self.world_size
        rows = slice(self.rank * size, (self.rank + 1) * size)
        return x[rows], y[rows]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.engine(x, y)[1]

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # DeepSpeed divides by the accumulation steps itself
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # DeepSpeed counts micro-batches in step(); this one only counts

    def step(self) -> float | None:
        self.engine.step()  # the last micro-batch of the window: the real update
        norm = self.engine.get_global_grad_norm()  # None at ZeRO-0 in fp32
        return None if norm is None else float(norm)

    def mean(self, value: float) -> float:
        """The average of a per-rank number (a loss) over the ranks."""
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item() / self.world_size

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    # -- checkpoints: DeepSpeed's own format, plus one safetensors file for sampling ---------
    def save_checkpoint(
        self, run_dir: Path, step: int, state: dict, config: dict, keep: int, tokenizer
    ) -> Path:
        """Every rank writes its shard with DeepSpeed's `save_checkpoint`; rank 0 then exports
        the full fp32 weights as `model.safetensors` (written last, so its presence marks the
        checkpoint complete), with the config and tokenizer `minillm sample` reads."""
        import torch.distributed as dist
        import yaml
        from safetensors.torch import save_model

        from minillm import checkpoint
        from minillm.model import GPT, GPTConfig

        folder = checkpoint.checkpoint_dir(run_dir, step)
        self.engine.save_checkpoint(str(folder.parent), tag=folder.name, client_state=state)
        weights = self._fp32_state_dict(folder)  # collective at ZeRO-3: every rank takes part
        if self.rank == 0:
            (folder / checkpoint.CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
            tokenizer.save(folder / checkpoint.TOKENIZER)
            model = GPT(GPTConfig.from_dict(config["model"]))
            model.load_state_dict(weights)
            tmp = folder / f".{checkpoint.WEIGHTS}.tmp"
            save_model(model, str(tmp))
            tmp.rename(folder / checkpoint.WEIGHTS)
            checkpoint.prune(run_dir, keep)
        dist.barrier()
        return folder

    def _fp32_state_dict(self, folder: Path) -> dict[str, torch.Tensor]:
        stage = self.config.get("zero_optimization", {}).get("stage", 0)
        if stage == 0:  # every rank holds the whole model
            return {k: v.detach().float().cpu() for k, v in self.module.state_dict().items()}
        import torch.distributed as dist
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        dist.barrier()  # all shards are on disk
        if self.rank != 0:
            return {}
        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        path = Path(path)
        loaded, state = self.engine.load_checkpoint(str(path.parent), tag=path.name)
        if loaded is None:
            from minillm.checkpoint import CheckpointError

            raise CheckpointError(f"DeepSpeed could not load the checkpoint in {path}")
        return state
