"""The data-parallel engine: `PlainEngine` whose gradients `minillm.parallel.ddp.DataParallel`
averages over the ranks (chapter 07)."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from minillm import checkpoint
from minillm.engines.common import join_process_group, mean_over_ranks, shard_pair
from minillm.engines.plain import PlainEngine
from minillm.model import GPTConfig
from minillm.parallel.ddp import DataParallel, model_and_batches
from minillm.train_config import TrainConfig


class DDPEngine(PlainEngine):
    """`PlainEngine` (autocast, accumulation, clipping, optimizer, schedule) made data-parallel:
    `shard` keeps this rank's rows of the global batch; the backward pass of the last micro-batch
    of each accumulation window averages the gradients, the others skip it; `mean` averages a
    number (the loss) over the ranks. Use `functools.partial(DDPEngine, mode=...)` as a Trainer's
    `engine_factory`; every rank must draw the same global batches (the same seed). Outside
    `minillm.parallel.launch` it joins the process group torchrun describes (`minillm train
    --ddp`, one machine or several)."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        device: torch.device,
        *,
        mode: str = "overlapped",
        bucket_cap_mb: float = 1.0,
        group=None,
    ):
        join_process_group()
        super().__init__(model, config, device)
        self.ddp = DataParallel(model, mode, bucket_cap_mb, group)
        self.rank, self.world_size = dist.get_rank(group), self.ddp.world_size
        self.group = group

    def shard(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return shard_pair(x, y, self.rank, self.world_size)

    def mean(self, value: float) -> float:
        return mean_over_ranks(value, self.device, self.group)

    def backward(self, loss: Tensor) -> None:
        last = (self._micro + 1) % self.config.grad_accum == 0
        with contextlib.nullcontext() if last else self.ddp.no_sync():
            super().backward(loss)
        if last:
            self.ddp.sync_gradients()

    def save_checkpoint(self, run_dir, step, state, config, keep, tokenizer) -> Path:
        """Every rank holds the same weights and optimizer state: rank 0 writes, the others wait."""
        if self.rank == 0:
            super().save_checkpoint(run_dir, step, state, config, keep, tokenizer)
        dist.barrier(group=self.group)
        return checkpoint.checkpoint_dir(run_dir, step)


# -- run by every rank under `minillm.parallel.launch.launch` ----------------------------------


def engine_vs_plain_worker(
    rank: int, world_size: int, config: GPTConfig, batch_size: int, grad_accum: int, steps: int
) -> dict[str, float]:
    """`DDPEngine` and one-process `PlainEngine` run the Trainer's calls on the same global
    batches: the largest weight and gradient-norm differences."""
    base, batches = model_and_batches(rank, config, batch_size, steps * grad_accum)
    train = TrainConfig(model=base.config, batch_size=batch_size, grad_accum=grad_accum)
    weights, norms = {}, {}
    for name, factory in (("plain", PlainEngine), ("ddp", DDPEngine)):
        model = copy.deepcopy(base)
        engine = factory(model, train, base.lm_head.weight.device)
        norms[name] = []
        for x, y in batches:
            engine.backward(engine.forward(*engine.shard(x, y)))
            norm = engine.step()
            if norm is not None:
                norms[name].append(norm)
        weights[name] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {
        "weights_vs_plain": (weights["ddp"] - weights["plain"]).abs().max().item(),
        "grad_norm_vs_plain": max(
            abs(a - b) for a, b in zip(norms["ddp"], norms["plain"], strict=True)
        ),
        "steps": len(norms["ddp"]),
    }
