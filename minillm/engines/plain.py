"""The single-process engine: one device, autocast, fp16 loss scaling, accumulation, clipping,
the optimizer (AdamW or Muon) and the learning-rate schedule."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minillm import checkpoint
from minillm.engines.common import build_optimizer, lr_schedule
from minillm.errors import InputError
from minillm.tokenizer import Tokenizer
from minillm.train_config import TrainConfig


class PlainEngine:
    """One process, one device: autocast, loss scaling for fp16, accumulation, clipping, the
    optimizer `optim.optimizer` names.

    The reference the other engines are checked against (`minillm.engines.Engine` lists what the
    Trainer calls).
    """

    rank, world_size = 0, 1
    schedules_micro_batches = False

    def __init__(self, model: nn.Module, config: TrainConfig, device: torch.device):
        self.module = model
        self.device = device
        self.config = config
        self.optimizer = build_optimizer(model, config.optim, device)
        self.scheduler = lr_schedule(self.optimizer, config)
        if config.precision == "fp16" and device.type != "cuda":
            raise InputError(
                "precision fp16 needs a CUDA GPU (loss scaling); on a CPU use bf16 or fp32"
            )
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
        self._autocast = (
            torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        )
        self.forward_model = torch.compile(model) if config.compile else model
        self._micro = 0

    def shard(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y

    def mean(self, value: float) -> float:
        return value

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self._autocast:
            _, loss = self.forward_model(x, y)
        return loss

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.config.grad_accum).backward()
        self._micro += 1

    def step(self) -> float | None:
        """At the end of an accumulation window: unscale, clip, step, zero; returns the gradient
        norm before clipping (None inside the window)."""
        if self._micro % self.config.grad_accum:
            return None
        self.scaler.unscale_(self.optimizer)
        clip = self.config.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(
            self.module.parameters(), clip if clip > 0 else math.inf
        )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return float(norm)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def save_checkpoint(
        self, run_dir: Path, step: int, state: dict, config: dict, keep: int, tokenizer: Tokenizer
    ) -> Path:
        state = {**state, "engine": self.state_dict()}
        return checkpoint.save(run_dir, step, self.module, state, config, keep, tokenizer)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Load weights and engine state from checkpoint `path`; return the Trainer's state."""
        checkpoint.load_weights(path, self.module)
        state = checkpoint.load_state(path)
        self.load_state_dict(state["engine"])
        return state
