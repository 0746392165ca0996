"""The pieces every engine shares, written once: the optimizer, the learning-rate schedule, the
mean of a number over the ranks, this rank's rows of a global batch, and a GPT rebuilt from a
checkpoint."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from minillm import checkpoint
from minillm.errors import InputError, unknown_name
from minillm.model import GPT
from minillm.muon import Muon
from minillm.parallel.ddp import shard_batch
from minillm.parallel.launch import default_backend
from minillm.train_config import MODELS, OptimConfig, TrainConfig


def lr_at(step: int, optim: OptimConfig, max_iters: int) -> float:
    """Linear warm-up to the peak learning rate, then cosine decay to `min_lr` at `max_iters`."""
    if step < optim.warmup_iters:
        return optim.learning_rate * (step + 1) / optim.warmup_iters
    progress = min(1.0, (step - optim.warmup_iters) / max(1, max_iters - optim.warmup_iters))
    return optim.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (
        optim.learning_rate - optim.min_lr
    )


def build_optimizer(
    model: torch.nn.Module, optim: OptimConfig, device: torch.device
) -> torch.optim.Optimizer:
    """`optim.optimizer` over `model.param_groups`: torch's AdamW, or `Muon` with the decayed
    2-D weights (the blocks' matrices) on Muon and the rest, an untied output layer included, on
    AdamW. AdamW's groups come first, so `param_groups[0]["lr"]` follows `optim.learning_rate`."""
    decay, no_decay = model.param_groups(optim.weight_decay)
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(
            [decay, no_decay],
            lr=optim.learning_rate,
            betas=(optim.beta1, optim.beta2),
            fused=device.type in ("cpu", "cuda"),  # one kernel for all parameters
        )
    head = getattr(model, "lm_head", None)
    output = {id(head.weight)} if head is not None else set()
    matrices = [p for p in decay["params"] if id(p) not in output]
    heads = [p for p in decay["params"] if id(p) in output]
    groups = [
        no_decay,
        {"params": heads, "weight_decay": optim.weight_decay},
        {
            "params": matrices,
            "weight_decay": optim.weight_decay,
            "muon": True,
            "lr": optim.muon_learning_rate,
        },
    ]
    return Muon(
        [g for g in groups if g["params"]],
        lr=optim.learning_rate,
        betas=(optim.beta1, optim.beta2),
    )


def lr_schedule(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """`optimizer`'s rate follows `lr_at`: one `step()` of the scheduler per optimizer step."""
    o = config.optim
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, o, config.max_iters) / o.learning_rate
    )


def rank_device() -> str:
    """The device of this launched process: its own GPU where there are GPUs, else the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def join_process_group() -> None:
    """Join the process group that a launcher (torchrun, on one machine or several) describes in
    the environment, unless this process is in one already."""
    if dist.is_initialized():
        return
    missing = [
        k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ
    ]
    if missing:
        raise InputError(
            f"this engine runs in processes started by a launcher, and {', '.join(missing)} "
            "is not set; start it with torchrun, e.g. torchrun --nproc-per-node 2 -m minillm.cli "
            "train --ddp"
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(default_backend())


def mean_over_ranks(value: float, device: torch.device, group=None) -> float:
    """The average of a per-rank number (a loss) over the ranks of `group`. The tensor lives on
    `device`, the engine's own, because NCCL reduces only GPU tensors and gloo only CPU ones."""
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total, group=group)
    return total.item() / dist.get_world_size(group)


def shard_pair(x: Tensor, y: Tensor, rank: int, world_size: int) -> tuple[Tensor, Tensor]:
    """This rank's rows of a global batch of inputs and targets (refused unless they divide)."""
    return shard_batch(x, rank, world_size), shard_batch(y, rank, world_size)


def rebuild_model(
    config: Mapping, weights: Mapping[str, Tensor] | Path, device: str | torch.device = "cpu"
) -> GPT:
    """The model (GPT or Llama) a checkpoint's `config` (the run's whole config) describes,
    holding `weights`: a state dict, or a checkpoint folder to read `model.safetensors` from."""
    architecture = config.get("architecture", "gpt")  # runs saved before the Llama are GPTs
    if not isinstance(architecture, str) or architecture not in MODELS:
        raise unknown_name("checkpoint architecture", str(architecture), MODELS)
    config_class, model_class = MODELS[architecture]
    model = model_class(config_class.from_dict(config["model"])).to(device)
    if isinstance(weights, Path):
        checkpoint.load_weights(weights, model)
    else:
        model.load_state_dict(weights)
    return model
