"""Training the course GPT: typed configs, one Trainer, checkpoints that resume exactly.

The Trainer never touches the optimizer or the backward pass directly: it calls an *engine*
(`engine.forward`, `engine.backward(loss)`, `engine.step()`), the interface DeepSpeed's engine has.
`PlainEngine` is the single-process engine; data-parallel and DeepSpeed engines plug in the same
way, so the model and the loop do not know which one drives them.
"""

from __future__ import annotations

import contextlib
import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from minillm import checkpoint, data
from minillm.config import apply_overrides, build, load_yaml, to_dict
from minillm.errors import InputError, MiniLLMError, unknown_name
from minillm.model import GPT, GPTConfig
from minillm.sample import generate_text
from minillm.tokenizer import BPETokenizer, CharTokenizer, Tokenizer
from minillm.tokenizer import load as load_tokenizer

PRECISIONS = ("fp32", "bf16", "fp16")
TOKENIZERS = ("char", "bpe")


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


@dataclass
class TrainConfig:
    model: GPTConfig = field(default_factory=GPTConfig)
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

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.model.block_size


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """A `TrainConfig` from a YAML file (or the defaults) plus `key=value` overrides."""
    raw = load_yaml(path) if path else {}
    return build(TrainConfig, apply_overrides(raw, overrides or []))


def pick_device(name: str = "auto") -> torch.device:
    """`auto`: CUDA if present, then Apple's MPS, then the CPU; otherwise the named device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda was asked for but no CUDA GPU is available; use device=auto")
    return device


def lr_at(step: int, optim: OptimConfig, max_iters: int) -> float:
    """Linear warm-up to the peak learning rate, then cosine decay to `min_lr` at `max_iters`."""
    if step < optim.warmup_iters:
        return optim.learning_rate * (step + 1) / optim.warmup_iters
    progress = min(1.0, (step - optim.warmup_iters) / max(1, max_iters - optim.warmup_iters))
    return optim.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (
        optim.learning_rate - optim.min_lr
    )


class PlainEngine:
    """One process, one device: autocast, loss scaling for fp16, accumulation, clipping, AdamW.

    The interface every engine offers the Trainer: `rank`, `world_size`, `shard(x, y)` (this
    rank's rows of a global batch), `forward`, `backward`, `step`, `lr`, `mean(value)` (the
    average over ranks), `save_checkpoint` and `load_checkpoint`.
    """

    rank, world_size = 0, 1

    def __init__(self, model: nn.Module, config: TrainConfig, device: torch.device):
        self.module = model
        self.device = device
        self.config = config
        o = config.optim
        self.optimizer = torch.optim.AdamW(
            model.param_groups(o.weight_decay),
            lr=o.learning_rate,
            betas=(o.beta1, o.beta2),
            fused=device.type in ("cpu", "cuda"),  # one kernel for all parameters
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_at(step, o, config.max_iters) / o.learning_rate
        )
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


def _tensorboard_writer(run_dir: Path):
    """A TensorBoard writer into the run folder when the tensorboard package is installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


class TrainingDiverged(MiniLLMError):
    """The loss became NaN or infinite."""


def build_tokenizer(config: DataConfig, text: str) -> Tokenizer:
    if config.tokenizer == "char":
        return CharTokenizer.train(text)
    return BPETokenizer.train(text, config.bpe_vocab_size)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    train_loss: float  # mean of the last evaluation
    val_loss: float
    seconds: float
    tokens_per_s: float
    sample: str | None


class Trainer:
    """Trains a `GPT` on a corpus, evaluating, logging and checkpointing as the config says.

    `Trainer(config).fit()` resumes from the run folder's latest checkpoint when there is one, so a
    killed run started again with the same command continues exactly where it was saved.
    """

    METRICS = "metrics.csv"  # one row per optimizer step
    EVALS = "evals.csv"  # one row per evaluation
    FIELDS = ("step", "loss", "lr", "grad_norm", "tokens_per_s")
    EVAL_FIELDS = ("step", "train_loss", "val_loss")

    def __init__(self, config: TrainConfig, *, progress: bool = True, engine_factory=PlainEngine):
        self.config = c = config
        self.progress = progress
        self.run_dir = Path(c.out_dir)
        self.device = pick_device(c.device)
        torch.manual_seed(c.seed)
        text = data.load_text(c.data.corpus, progress=progress)
        self.tokenizer = self._tokenizer(text)
        if self.tokenizer.vocab_size > c.model.vocab_size:
            raise InputError(
                f"the {c.data.tokenizer} tokenizer of {c.data.corpus} has "
                f"{self.tokenizer.vocab_size} "
                f"tokens but model.vocab_size is {c.model.vocab_size}; set model.vocab_size="
                f"{self.tokenizer.vocab_size}"
            )
        self.model = GPT(c.model).to(self.device)
        self.model.set_activation_checkpointing(c.activation_checkpointing)
        self.engine = engine_factory(self.model, c, self.device)
        self.is_main = self.engine.rank == 0  # only rank 0 logs, prints and writes metrics
        self.progress = progress and self.is_main
        if self.is_main and not (self.run_dir / checkpoint.TOKENIZER).is_file():
            self.tokenizer.save(self.run_dir / checkpoint.TOKENIZER)
        self.train_batches, self.val_tokens, self.train_tokens = self._data(text)
        self.step = 0
        self.last_checkpoint: Path | None = None
        self._tensorboard = _tensorboard_writer(self.run_dir)

    # -- data and tokenizer ------------------------------------------------------------------
    def _tokenizer(self, text: str) -> Tokenizer:
        saved = self.run_dir / checkpoint.TOKENIZER
        if saved.is_file():  # a resumed run keeps the vocabulary it started with
            return load_tokenizer(saved)
        return build_tokenizer(self.config.data, text)  # rank 0 saves it once the engine is up

    def _data(self, text: str):
        c = self.config
        ids = data.load_tokens(c.data.corpus, self.tokenizer, progress=self.progress)
        train_ids, val_ids = data.train_val_split(ids, c.data.val_fraction)
        # Every rank draws the same global micro-batch and trains on its own rows of it, so the
        # run is the single-process run on batch_size x world_size sequences.
        sampler = data.TokenBatchSampler(
            train_ids,
            c.model.block_size,
            c.batch_size * self.engine.world_size,
            seed=c.seed,
            device=self.device,
        )
        return sampler, val_ids, train_ids

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        c = self.config
        self._resume_if_possible()
        start, start_step = time.perf_counter(), self.step
        evaluation = {}
        bar = tqdm(
            total=c.max_iters,
            initial=self.step,
            desc="training",
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        with bar:
            while self.step < c.max_iters:
                tick = time.perf_counter()
                loss, norm, lr = self._train_step()
                self.step += 1
                tokens_per_s = self.tokens_per_step / (time.perf_counter() - tick)
                self._log(
                    self.METRICS,
                    self.FIELDS,
                    (self.step, loss, lr, norm, round(tokens_per_s)),
                )
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
                bar.update()
                if self.step % c.eval_interval == 0 or self.step == c.max_iters:
                    evaluation = self.evaluate()
                    self._log(
                        self.EVALS,
                        self.EVAL_FIELDS,
                        (self.step, evaluation["train"], evaluation["val"]),
                    )
                    if self.is_main:
                        bar.write(
                            f"step {self.step}: train loss {evaluation['train']:.4f}, "
                            f"val loss {evaluation['val']:.4f}"
                        )
                if self.step % c.checkpoint_interval == 0 or self.step == c.max_iters:
                    self.save_checkpoint()
        seconds = time.perf_counter() - start
        if not evaluation:  # nothing left to train: report the finished run
            evaluation = self.evaluate()
        steps = self.step - start_step
        sample = self.sample(c.sample_prompt, c.sample_tokens) if c.sample_tokens else None
        return TrainResult(
            self.run_dir,
            self.step,
            evaluation["train"],
            evaluation["val"],
            seconds,
            steps * self.tokens_per_step / seconds if steps else 0.0,
            sample,
        )

    def _train_step(self) -> tuple[float, float, float]:
        """One optimizer step: (mean loss, gradient norm before clipping, learning rate used)."""
        c = self.config
        self.model.train()
        lr = self.engine.lr  # the rate this update uses; step() moves the schedule on
        if hasattr(self.engine, "train_batch"):  # a pipeline schedules the micro-batches itself
            batches = [self.engine.shard(*next(self.train_batches)) for _ in range(c.grad_accum)]
            loss, norm = self.engine.train_batch(batches)
            self._stop_if_diverged(loss)
            return loss, norm, lr
        total = 0.0
        for _ in range(c.grad_accum):
            x, y = self.engine.shard(*next(self.train_batches))
            loss = self.engine.forward(x, y)
            self._stop_if_diverged(loss.item())
            self.engine.backward(loss)
            total += loss.item()
        norm = self.engine.step()
        return self.engine.mean(total / c.grad_accum), norm, lr

    def _stop_if_diverged(self, loss: float) -> None:
        if not math.isfinite(loss):
            where = self.last_checkpoint or "none saved yet"
            raise TrainingDiverged(
                f"the loss became {loss} at step {self.step + 1}; stopped. Last good "
                f"checkpoint: {where}. Lower optim.learning_rate, keep optim.grad_clip on, or "
                "use precision=fp32, then run again."
            )

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over `eval_iters` batches of each split. The batches come from a generator
        seeded the same way every time, so evaluations compare like with like and never disturb
        the training batches."""
        self.model.eval()
        c = self.config
        result = {}
        for split, tokens in (("train", self.train_tokens), ("val", self.val_tokens)):
            sampler = data.TokenBatchSampler(
                tokens, c.model.block_size, c.batch_size, seed=c.seed + 1, device=self.device
            )
            losses = [self.engine.forward(*next(sampler)).item() for _ in range(c.eval_iters)]
            result[split] = sum(losses) / len(losses)
        self.model.train()
        return result

    def sample(
        self,
        prompt: str,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> str:
        return generate_text(
            self.model,
            self.tokenizer,
            prompt,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            seed=self.config.seed if seed is None else seed,
        )

    # -- metrics -----------------------------------------------------------------------------
    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimizer step trains on, over all ranks."""
        return self.config.tokens_per_step * self.engine.world_size

    def _log(self, name: str, fields: tuple[str, ...], row: tuple) -> None:
        if not self.is_main:
            return
        if self._tensorboard is not None:
            group = name.removesuffix(".csv")
            for key, value in zip(fields[1:], row[1:], strict=True):
                if value is not None:
                    self._tensorboard.add_scalar(f"{group}/{key}", value, row[0])
        path = self.run_dir / name
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(fields)
            writer.writerow(row)

    def _truncate_logs(self, step: int) -> None:
        """Drop rows logged after `step`: a resumed run logs those steps again."""
        for name in (self.METRICS, self.EVALS):
            path = self.run_dir / name
            if path.exists():
                rows = list(csv.reader(path.open()))
                kept = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= step]
                with open(path, "w", newline="") as f:
                    csv.writer(f).writerows(kept)

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        state = {
            "step": self.step,
            "data": self.train_batches.state_dict(),
            "rng": checkpoint.rng_state(),
        }
        path = self.engine.save_checkpoint(
            self.run_dir,
            self.step,
            state,
            to_dict(self.config),
            self.config.keep_checkpoints,
            self.tokenizer,
        )
        self.last_checkpoint = path
        return path

    def _resume_if_possible(self) -> None:
        latest = checkpoint.latest_checkpoint(self.run_dir)
        if latest is None:
            if self.is_main:
                for name in (self.METRICS, self.EVALS):  # logs of a run that never checkpointed
                    (self.run_dir / name).unlink(missing_ok=True)
            return
        saved = checkpoint.load_config(latest)
        if saved.get("model") != to_dict(self.config.model):
            raise checkpoint.CheckpointError(
                f"{self.run_dir} holds a run with another model config; pass --fresh to start "
                "over there, or choose another out_dir"
            )
        state = self.engine.load_checkpoint(latest)
        self.train_batches.load_state_dict(state["data"])
        checkpoint.set_rng_state(state["rng"])
        self.step = state["step"]
        self.last_checkpoint = latest
        if self.is_main:
            self._truncate_logs(self.step)
        if self.progress:
            print(f"resuming from {latest} (step {self.step})")


def read_metrics(run_dir: str | Path) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """The per-step rows of `metrics.csv` and the rows of `evals.csv`, as floats."""

    def rows(name: str) -> list[dict[str, float]]:
        path = Path(run_dir) / name
        if not path.exists():
            return []
        with open(path, newline="") as f:
            # An empty cell (DeepSpeed reports no gradient norm at ZeRO-0) reads as NaN.
            return [{k: float(v or "nan") for k, v in row.items()} for row in csv.DictReader(f)]

    return rows(Trainer.METRICS), rows(Trainer.EVALS)


def plot_curves(run_dir: str | Path, ax=None):
    """Training loss per step (light), its running mean, and the evaluated train and validation
    losses (markers)."""
    import matplotlib.pyplot as plt

    steps, evals = read_metrics(run_dir)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    if steps:
        x = [r["step"] for r in steps]
        y = [r["loss"] for r in steps]
        ax.plot(x, y, color="tab:blue", alpha=0.25, lw=0.8, label="train loss (each step)")
        window = max(1, len(y) // 50)
        # Trailing mean over the last `window` steps (fewer at the start), from a running sum.
        totals = np.concatenate(([0.0], np.cumsum(y)))
        ends = np.arange(1, len(y) + 1)
        starts = np.maximum(0, ends - window)
        smooth = (totals[ends] - totals[starts]) / (ends - starts)
        ax.plot(x, smooth, color="tab:blue", lw=1.5, label=f"train loss (mean of {window})")
    if evals:
        ax.plot(
            [r["step"] for r in evals],
            [r["train_loss"] for r in evals],
            "s--",
            color="tab:green",
            label="train loss (evaluated)",
        )
        ax.plot(
            [r["step"] for r in evals],
            [r["val_loss"] for r in evals],
            "o-",
            color="tab:orange",
            label="validation loss",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.legend()
    ax.grid(alpha=0.3)
    return ax
