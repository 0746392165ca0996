"""The from-scratch ZeRO engine: `minillm.parallel.zero.Zero` under the Trainer (chapter 09)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from minillm import checkpoint
from minillm.engines.common import lr_schedule, mean_over_ranks, rebuild_model, shard_pair
from minillm.errors import InputError
from minillm.model import GPT
from minillm.parallel.zero import Zero
from minillm.train_config import TrainConfig


class ZeroEngine:
    """`Zero` behind the Trainer's engine interface: fp32, accumulation, clipping and the
    Trainer's learning-rate schedule. Use `functools.partial(ZeroEngine, stage=k)` as a Trainer's
    `engine_factory` in launched ranks."""

    schedules_micro_batches = False

    def __init__(self, model: GPT, config: TrainConfig, device: torch.device, *, stage: int = 2):
        if config.precision != "fp32":
            raise InputError("ZeroEngine trains in fp32; use precision=fp32")
        config.optim.require_adamw(
            "ZeroEngine", "ZeRO cuts every parameter into slices, and Muon needs each matrix whole"
        )
        o = config.optim
        self.module, self.config, self.device = model, config, device
        self.zero = Zero(
            model.param_groups(o.weight_decay),
            stage,
            torch.optim.AdamW,
            module=model,
            grad_clip=o.grad_clip,
            lr=o.learning_rate,
            betas=(o.beta1, o.beta2),
        )
        self.rank, self.world_size = self.zero.rank, self.zero.world_size
        self.scheduler = lr_schedule(self.zero.optimizer, config)
        self._micro = 0

    def shard(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return shard_pair(x, y, self.rank, self.world_size)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.module(x, y)[1]

    def backward(self, loss: Tensor) -> None:
        self.zero.backward(loss / self.config.grad_accum)
        self._micro += 1

    def step(self) -> float | None:
        if self._micro % self.config.grad_accum:
            return None
        norm = self.zero.step()
        self.scheduler.step()
        return norm

    @property
    def lr(self) -> float:
        return self.zero.optimizer.param_groups[0]["lr"]

    def mean(self, value: float) -> float:
        return mean_over_ranks(value, self.device)

    def save_checkpoint(
        self, run_dir: Path, step: int, state: dict, config: dict, keep: int, tokenizer
    ) -> Path:
        """Rank 0 writes one ordinary checkpoint: the full weights gathered from the shards, and
        in its state every rank's optimizer slices (sent to rank 0 for the save: simple, and
        atomic with the rest; a large model would have each rank write its own file)."""
        weights = self.zero.full_state_dict()
        shards = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(_on_cpu(self.zero.state_dict()), shards, dst=0)
        if self.rank == 0:
            engine = {"scheduler": self.scheduler.state_dict(), "shards": shards}
            model = rebuild_model(config, weights)
            checkpoint.save(
                run_dir, step, model, {**state, "engine": engine}, config, keep, tokenizer
            )
        dist.barrier()
        return checkpoint.checkpoint_dir(run_dir, step)

    def load_checkpoint(self, path: Path) -> dict:
        """Every rank reads the whole checkpoint and keeps its own slices of it."""
        state = checkpoint.load_state(path)
        full = rebuild_model(checkpoint.load_config(path), Path(path))
        self.zero.load_full_state_dict(full.state_dict())
        shards = state["engine"]["shards"]
        if len(shards) != self.world_size:
            raise checkpoint.CheckpointError(
                f"{path} was saved by {len(shards)} ZeRO ranks; resume it with {len(shards)} "
                f"processes, not {self.world_size}"
            )
        self.zero.load_state_dict(shards[self.rank])
        self.scheduler.load_state_dict(state["engine"]["scheduler"])
        return state


def _on_cpu(value):
    """`value` (nested dicts, lists and tensors) with every tensor moved to the CPU."""
    if isinstance(value, Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_on_cpu(v) for v in value)
    return value
