"""What a training run is told: the model, the data, the optimizer and the loop, as typed
configs read from YAML with `key=value` overrides (`minillm train --set ...`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from minillm.config import apply_overrides, build, load_yaml
from minillm.errors import InputError, InputTypeError, unknown_name
from minillm.llama import Llama, LlamaConfig
from minillm.model import GPT, GPTConfig

PRECISIONS = ("fp32", "bf16", "fp16")
TOKENIZERS = ("char", "bpe")
# architecture -> (its model config, its model)
MODELS = {"gpt": (GPTConfig, GPT), "llama": (LlamaConfig, Llama)}
OPTIMIZERS = ("adamw", "muon")  # optim.optimizer; minillm.engines.common.build_optimizer


@dataclass
class DataConfig:
    corpus: str = "tinyshakespeare"
    tokenizer: str = "char"  # "char" (one id per character) or "bpe" (byte-level BPE)
    bpe_vocab_size: int = 512  # only for tokenizer: bpe
    val_fraction: float = 0.1  # the last 10% of the token stream is held out


@dataclass
class OptimConfig:
    learning_rate: float = 1e-3  # peak, reached after warm-up
    min_lr: float = 1e-4  # the cosine decays to this
    warmup_iters: int = 100
    weight_decay: float = 0.1  # on 2-D weights only (GPT.param_groups)
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    # "adamw", or "muon": Muon on the hidden matrices, AdamW (the settings above) on the rest
    optimizer: str = "adamw"
    muon_learning_rate: float = 0.02  # Muon's peak rate; the schedule scales it like the other

    def __post_init__(self) -> None:
        """Every setting checked before any training: each would otherwise surface as a torch
        traceback (a beta of 1.5, a NaN rate), a ZeroDivisionError (a rate of 0) or a schedule
        that silently rises (min_lr above the peak)."""
        _in_range("optim.learning_rate", self.learning_rate, low=0, low_open=True)
        _in_range("optim.min_lr", self.min_lr, low=0)
        if self.min_lr > self.learning_rate:
            raise InputError(
                f"optim.min_lr ({self.min_lr:g}) is above optim.learning_rate "
                f"({self.learning_rate:g}): the cosine would rise; set min_lr <= learning_rate"
            )
        _in_range("optim.warmup_iters", self.warmup_iters, low=0)
        _in_range("optim.weight_decay", self.weight_decay, low=0)
        for name in ("beta1", "beta2"):
            _in_range(f"optim.{name}", getattr(self, name), low=0, high=1)
        _in_range("optim.grad_clip", self.grad_clip, low=0)
        if self.optimizer not in OPTIMIZERS:
            raise unknown_name("optim.optimizer", self.optimizer, OPTIMIZERS)
        _in_range("optim.muon_learning_rate", self.muon_learning_rate, low=0, low_open=True)

    def require_adamw(self, engine: str, why: str) -> None:
        """Refuse an optimizer other than AdamW for an engine that cannot run it, saying why."""
        if self.optimizer != "adamw":
            raise InputError(
                f"optim.optimizer is {self.optimizer!r}, which {engine} cannot run: {why}. "
                "Train with --set optim.optimizer=adamw, or with one process or --ddp, which "
                "run it"
            )


def _in_range(name: str, value: float, *, low: float, high: float = math.inf, low_open=False):
    """Refuse NaN, infinity and values outside [low, high) ((low, high) when `low_open`)."""
    if not math.isfinite(value) or value < low or value >= high or (low_open and value == low):
        lower = f"> {low:g}" if low_open else f">= {low:g}"
        upper = "" if high == math.inf else f" and < {high:g}"
        raise InputError(f"{name} must be a finite number {lower}{upper}, got {value!r}")


@dataclass
class TrainConfig:
    architecture: str = "gpt"  # "gpt" (minillm.model.GPT) or "llama" (minillm.llama.Llama)
    model: GPTConfig | LlamaConfig | None = None  # None: the architecture's defaults
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch_size: int = 12  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_iters: int = 2000  # optimizer steps
    eval_interval: int = 250
    eval_iters: int = 20  # batches per split in each evaluation
    checkpoint_interval: int = 250
    keep_checkpoints: int = 2
    out_dir: str = "runs/shakespeare-char"
    seed: int = 1337
    device: str = "auto"  # "auto" picks cuda, then mps, then cpu
    precision: str = "fp32"  # "fp32", "bf16" (autocast) or "fp16" (autocast + loss scaling, CUDA)
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each block in backward: less memory
    sample_tokens: int = 300  # printed after training; 0 for none
    sample_prompt: str = "\n"

    def __post_init__(self) -> None:
        if self.architecture not in MODELS:
            raise unknown_name("architecture", self.architecture, tuple(MODELS))
        kind = MODELS[self.architecture][0]
        if self.model is None or isinstance(self.model, Mapping):  # build() leaves it a dict
            self.model = build(kind, self.model, "model")
        elif not isinstance(self.model, kind):
            raise InputTypeError(
                f"architecture {self.architecture!r} takes a {kind.__name__} as model, got "
                f"{type(self.model).__name__}"
            )
        for name in (
            "batch_size",
            "grad_accum",
            "max_iters",
            "eval_interval",
            "eval_iters",
            "checkpoint_interval",
        ):
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise unknown_name("precision", self.precision, PRECISIONS)
        if self.data.tokenizer not in TOKENIZERS:
            raise unknown_name("tokenizer", self.data.tokenizer, TOKENIZERS)
        _in_range("keep_checkpoints", self.keep_checkpoints, low=0)
        _in_range("sample_tokens", self.sample_tokens, low=0)
        if self.sample_tokens and not self.sample_prompt:
            raise InputError(
                "sample_prompt is empty; give at least one character (e.g. a newline), or set "
                "sample_tokens=0 for no sample"
            )

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.model.block_size


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A `TrainConfig` from a YAML file (or the defaults) plus `key=value` overrides."""
    raw = load_yaml(path) if path else {}
    return build(TrainConfig, apply_overrides(raw, overrides or []))
