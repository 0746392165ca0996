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

from minillm import checkpoint, data, rundir
from minillm.engines.common import lr_schedule, mean_over_ranks, rebuild_model, shard_pair
from minillm.engines.ds_config import prepare_config
from minillm.parallel.launch import free_port, remove_allreduce_buffers
from minillm.train_config import TrainConfig


def launch(nproc: int, ds_config: dict, train: TrainConfig, argv: list[str]) -> int:
    """Check the DeepSpeed and training configs for `nproc` processes, then start them with
    DeepSpeed's launcher running `minillm <argv>` (without --nproc). Returns its exit code."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    prepare_config(ds_config, train, nproc, device_type)  # refuse a bad config before launching
    data.fetch(train.data.corpus)  # download once here, not in every rank
    argv = list(argv)
    i = argv.index("--nproc")
    del argv[i : i + 2]
    rundir.check_free(Path(train.out_dir))  # another run there: refused before any rank starts
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # the launcher leaves it unset: 2-25x slower steps
    port = free_port()  # a free one, not the fixed default that another run may hold
    command = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--master_port",
        str(port),
        "--num_gpus",
        str(nproc),
        "--module",
        "minillm.cli",
        *argv,
    ]
    try:
        return subprocess.call(command, env=env)
    finally:
        remove_allreduce_buffers(port)


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

        # Also where the process group is up already (minillm.parallel.launch): DeepSpeed's config
        # parser counts the ranks of its own communication layer, which this joins to that group.
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
        _load_files_weights_only(self.engine)
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
        the full fp32 weights as `model.safetensors`, with the config and tokenizer `minillm
        sample` reads, and writes the manifest of every file's sha256 last: its presence marks
        the checkpoint complete, and a resume verifies the files against it before DeepSpeed
        reads any."""
        folder = checkpoint.checkpoint_dir(run_dir, step)
        if self.rank == 0 and folder.exists():  # the leftovers of a save of this step cut short
            shutil.rmtree(folder)
        dist.barrier()
        self.engine.save_checkpoint(
            str(folder.parent), tag=folder.name, client_state=state, save_latest=False
        )
        weights = self._fp32_state_dict(folder)  # a collective at ZeRO 1-3: every rank takes part
        if self.rank == 0:
            (folder / checkpoint.CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
            tokenizer.save(folder / checkpoint.TOKENIZER)
            save_model(rebuild_model(config, weights), str(folder / checkpoint.WEIGHTS))
            checkpoint.write_manifest(folder)
            checkpoint.prune(run_dir, keep)
        dist.barrier()
        return folder

    def _fp32_state_dict(self, folder: Path) -> dict[str, torch.Tensor]:
        """The full fp32 weights under the GPT's names, assembled in memory from DeepSpeed's
        fp32 partitions (ZeRO 1-3, or the bf16 optimizer's master copy), never read back from
        the files just written. Every rank calls it: the assembly is a collective."""
        from deepspeed.utils import safe_get_full_fp32_param

        full: dict[int, torch.Tensor] = {}  # tied weights are one parameter, assembled once
        weights = {}
        for name, tensor in self.module.state_dict(keep_vars=True).items():
            if isinstance(tensor, nn.Parameter):
                if id(tensor) not in full:
                    master = safe_get_full_fp32_param(tensor)  # None where nothing is sharded
                    full[id(tensor)] = tensor if master is None else master
                tensor = full[id(tensor)]
            weights[name] = tensor.detach().float().cpu()
        return weights

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Verify every file of checkpoint `path` against its manifest, then let DeepSpeed load
        its shards, through `torch.load(weights_only=True)` (see `_load_files_weights_only`)."""
        path = Path(path)
        checkpoint.verify(path)
        loaded, state = self.engine.load_checkpoint(str(path.parent), tag=path.name)
        if loaded is None:
            raise checkpoint.CheckpointError(f"DeepSpeed could not load the checkpoint in {path}")
        return state


# The classes DeepSpeed 0.19 pickles into its ZeRO files beside tensors and plain containers
# (found with torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO 0-3, bf16, offload and
# pipeline checkpoints). Rebuilding them sets attributes; it runs no code from the file.
def _deepspeed_safe_globals() -> list[type]:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_file_weights_only(path: str | Path, map_location=None) -> Any:
    """A DeepSpeed checkpoint file read with `torch.load(weights_only=True)`: tensors, plain
    containers and the few DeepSpeed classes above, never a code payload, and refused if it
    nests or branches like a pickle bomb."""
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            loaded = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # an unsupported global (a payload), a truncated file, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise checkpoint.CheckpointError(
            f"{path} is not a DeepSpeed checkpoint file minillm will read ({first}); it is "
            "damaged or hostile: resume from another checkpoint"
        ) from None
    checkpoint.check_size(loaded, path)
    return loaded


def _load_files_weights_only(engine) -> None:
    """Make `engine` read its checkpoint files with `load_file_weights_only`: DeepSpeed's torch
    checkpoint engine calls `torch.load(weights_only=False)`, which would run a payload."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path, map_location=None):
            return load_file_weights_only(path, map_location)

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise checkpoint.CheckpointError(
            f"DeepSpeed chose the {type(engine.checkpoint_engine).__name__} for this config; "
            "minillm loads checkpoints only through the torch one (remove the checkpoint writer "
            "settings from the DeepSpeed config)"
        )
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)
