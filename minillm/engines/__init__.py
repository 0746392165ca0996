"""Engines: what drives the model's training under the Trainer, one module per way of doing it.

The Trainer never touches an optimizer or a backward pass: it calls an engine, the interface
DeepSpeed's engine has. `Engine` states every member the Trainer uses; any class with them plugs
in (`Trainer(config, engine_factory=...)`, the factory called as `(model, config, device)`).

- `plain.PlainEngine`: one process, one device (the reference);
- `ddp.DDPEngine`: data parallelism from scratch (`minillm.parallel.ddp`);
- `zero.ZeroEngine`: ZeRO 0-3 from scratch (`minillm.parallel.zero`);
- `deepspeed.DeepSpeedTrainEngine`: real DeepSpeed, configs checked by `ds_config`;
- `pipeline.PipelineTrainEngine`: DeepSpeed's pipeline engine, which schedules a step's
  micro-batches itself (`schedules_micro_batches`, `train_batch`).

`common` holds what they share; `ds_memory` measures what DeepSpeed holds per rank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from minillm.engines.ddp import DDPEngine
from minillm.engines.deepspeed import DeepSpeedTrainEngine
from minillm.engines.pipeline import PipelineTrainEngine
from minillm.engines.plain import PlainEngine
from minillm.engines.zero import ZeroEngine
from minillm.tokenizer import Tokenizer
from minillm.train_config import TrainConfig


@runtime_checkable
class Engine(Protocol):
    """What the Trainer calls, in the order it calls it.

    `rank` and `world_size` are the data-parallel ones: `world_size` ranks split each global
    batch (`shard`), and only rank 0 logs and prints. An engine whose `schedules_micro_batches`
    is true trains through `train_batch` (see `MicroBatchEngine`) instead of `forward`/`backward`
    /`step`; it still evaluates with `forward` under `torch.no_grad()`.
    """

    rank: int
    world_size: int
    schedules_micro_batches: ClassVar[bool]

    def shard(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's rows of a global batch."""
        ...

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """The mean loss over this rank's rows."""
        ...

    def backward(self, loss: Tensor) -> None:
        """Gradients of one micro-batch's loss (accumulated over the window)."""
        ...

    def step(self) -> float | None:
        """The update at the end of an accumulation window: the gradient norm before clipping
        (None inside the window, or where the engine does not compute it)."""
        ...

    @property
    def lr(self) -> float:
        """The learning rate the next update uses."""
        ...

    def mean(self, value: float) -> float:
        """The average of a per-rank number over the data-parallel ranks."""
        ...

    def save_checkpoint(
        self,
        run_dir: Path,
        step: int,
        state: dict[str, Any],
        config: dict[str, Any],
        keep: int,
        tokenizer: Tokenizer,
    ) -> Path:
        """Write checkpoint `step` (weights, engine state, the Trainer's `state`); a collective."""
        ...

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Load weights and engine state from `path`; return the Trainer's state."""
        ...


@runtime_checkable
class MicroBatchEngine(Engine, Protocol):
    """An engine that runs a whole step's micro-batches in its own schedule (a pipeline)."""

    def train_batch(self, micro_batches: list[tuple[Tensor, Tensor]]) -> tuple[float, float | None]:
        """One optimizer step: (the mean loss over the micro-batches and the data-parallel
        ranks, the gradient norm before clipping)."""
        ...


def deepspeed_engine(
    model: nn.Module, config: TrainConfig, device: torch.device, *, ds_config: dict
) -> DeepSpeedTrainEngine:
    """The DeepSpeed engine `ds_config` asks for: the pipeline engine where it has a `pipeline`
    section. `functools.partial(deepspeed_engine, ds_config=...)` is a Trainer's factory."""
    engine = PipelineTrainEngine if "pipeline" in ds_config else DeepSpeedTrainEngine
    return engine(model, config, device, ds_config=ds_config)


__all__ = [
    "DDPEngine",
    "DeepSpeedTrainEngine",
    "Engine",
    "MicroBatchEngine",
    "PipelineTrainEngine",
    "PlainEngine",
    "ZeroEngine",
    "deepspeed_engine",
]
