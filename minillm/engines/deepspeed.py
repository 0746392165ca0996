"""DeepSpeed as another engine under the same Trainer, model and data (chapter 09):
`DeepSpeedTrainEngine` gives `deepspeed.initialize`'s engine the interface the Trainer drives,
and `launch` starts DeepSpeed's launcher once the configs are checked."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from safetensors.torch import save_model
from torch import nn

from minillm import checkpoint, data
from minillm.engines.common import lr_schedule, mean_over_ranks, rebuild_model, shard_pair
from minillm.engines.ds_config import prepare_config
from minillm.model import GPT
from minillm.parallel.launch import free_port
from minillm.train_config import TrainConfig


def rank_device() -> str:
    """The device of this launched process: its own GPU where there are GPUs, else the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def launch(nproc: int, ds_config: dict, train: TrainConfig, argv: list[str]) -> int:
    """Check the DeepSpeed and training configs for `nproc` processes, then start them with
    DeepSpeed's launcher running `minillm <argv>` (without --nproc). Returns its exit code."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    prepare_config(ds_config, train, nproc, device_type)  # refuse a bad config before launching
    data.fetch(train.data.corpus)  # download once here, not in every rank
    argv = list(argv)
    i = argv.index("--nproc")
    del argv[i : i + 2]
    if "--fresh" in argv:  # here, once, not in every rank
        argv.remove("--fresh")
        shutil.rmtree(train.out_dir, ignore_errors=True)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # the launcher leaves it unset: 2-25x slower steps
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
    """`deepspeed.initialize` behind the Trainer's engine interface. Each data-parallel rank runs
    its slice of the global micro-batch; DeepSpeed averages gradients across ranks (ZeRO shards
    them). A config with an `activation_checkpointing` section also recomputes every block in
    the backward pass with `deepspeed.checkpointing.checkpoint`, configured by that section."""

    schedules_micro_batches = False

    def __init__(
        self, model: nn.Module, config: TrainConfig, device: torch.device, *, ds_config: dict
    ):
        import deepspeed

        if not dist.is_initialized():
            deepspeed.init_distributed()
        self.rank = dist.get_rank()
        self.config = config
        self.ds_config = prepare_config(ds_config, config, dist.get_world_size(), device.type)
        self.module = model
        if "activation_checkpointing" in self.ds_config:
            checkpointing = deepspeed.checkpointing
            checkpointing.configure(None, deepspeed_config=self.ds_config)
            model.set_activation_checkpointing(True, checkpointing.checkpoint)
            if self.rank == 0 and checkpointing.is_configured():
                print(
                    f"activation checkpointing: {len(model.blocks)} block(s) recomputed in "
                    "backward by deepspeed.checkpointing (partition_activations="
                    f"{checkpointing.PARTITION_ACTIVATIONS}, cpu_checkpointing="
                    f"{checkpointing.CPU_CHECKPOINT})"
                )
        trained = self._trained_module(model)
        local = {id(p) for p in trained.parameters()}  # a pipeline stage holds only its layers
        groups = [
            {**group, "params": [p for p in group["params"] if id(p) in local]}
            for group in model.param_groups(config.optim.weight_decay)
        ]
        self.engine, *_ = deepspeed.initialize(
            model=trained,
            model_parameters=[g for g in groups if g["params"]],
            lr_scheduler=functools.partial(lr_schedule, config=config),
            config=self.ds_config,
        )
        # The Trainer's world is the data-parallel one: that many ranks split each batch.
        self.world_size = self.engine.dp_world_size
        self.data_rank = dist.get_rank(group=self.engine.data_parallel_group)

    def _trained_module(self, model: nn.Module) -> nn.Module:
        """What `deepspeed.initialize` wraps: the GPT itself (a pipeline wraps its layers)."""
        return model

    def shard(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of a global micro-batch (batch_size x data-parallel sequences)."""
        return shard_pair(x, y, self.data_rank, self.world_size)

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
        """The average of a per-rank number (a loss) over the data-parallel ranks."""
        return mean_over_ranks(value, self.engine.device, self.engine.data_parallel_group)

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
        folder = checkpoint.checkpoint_dir(run_dir, step)
        self.engine.save_checkpoint(str(folder.parent), tag=folder.name, client_state=state)
        weights = self._fp32_state_dict(folder)  # collective at ZeRO-3: every rank takes part
        if self.rank == 0:
            (folder / checkpoint.CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
            tokenizer.save(folder / checkpoint.TOKENIZER)
            model = rebuild_model(config, weights)
            tmp = folder / f".{checkpoint.WEIGHTS}.tmp"
            save_model(model, str(tmp))
            tmp.rename(folder / checkpoint.WEIGHTS)
            checkpoint.prune(run_dir, keep)
        dist.barrier()
        return folder

    def _fp32_state_dict(self, folder: Path) -> dict[str, torch.Tensor]:
        stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        if stage == 0:  # every rank holds the whole model
            return {k: v.detach().float().cpu() for k, v in self.module.state_dict().items()}
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        dist.barrier()  # all shards are on disk
        if self.rank != 0:
            return {}
        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        path = Path(path)
        loaded, state = self.engine.load_checkpoint(str(path.parent), tag=path.name)
        if loaded is None:
            raise checkpoint.CheckpointError(f"DeepSpeed could not load the checkpoint in {path}")
        return state


def make_engine(
    model: GPT, config: TrainConfig, device: torch.device, *, ds_config: dict
) -> DeepSpeedTrainEngine:
    """The engine `ds_config` asks for: a pipeline engine where it has a `pipeline` section."""
    from minillm.engines.pipeline import PipelineTrainEngine  # which builds on this module

    engine = PipelineTrainEngine if "pipeline" in ds_config else DeepSpeedTrainEngine
    return engine(model, config, device, ds_config=ds_config)
