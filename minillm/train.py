"""Training the course GPT: typed configs, one Trainer, checkpoints that resume exactly.

The Trainer never touches the optimizer or the backward pass directly: it calls an *engine*
(`engine.forward`, `engine.backward(loss)`, `engine.step()`), the interface DeepSpeed's engine has
(`minillm.engines.Engine`). `PlainEngine` is the single-process engine; data-parallel and
DeepSpeed engines plug in the same way, so the model and the loop do not know which one drives
them. The configs are `minillm.train_config`'s.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minillm import checkpoint, data, rundir
from minillm.config import to_dict
from minillm.engines import PlainEngine
from minillm.errors import InputError, MiniLLMError
from minillm.sample import generate_text
from minillm.tokenizer import BPETokenizer, CharTokenizer, Tokenizer
from minillm.tokenizer import load as load_tokenizer
from minillm.train_config import MODELS, DataConfig, TrainConfig
from minillm.utils import progress_bar


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
    killed run started again with the same command continues exactly where it was saved. The run
    folder is locked for this run while it trains (`minillm.rundir`), and every file in it is
    replaced atomically or grows by whole lines, so a kill at any moment leaves a folder that
    resumes. A read-only folder whose run is finished is evaluated and sampled, never written.
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
        self.model = MODELS[c.architecture][1](c.model).to(self.device)
        self.model.set_activation_checkpointing(c.activation_checkpointing)
        self.engine = engine_factory(self.model, c, self.device)
        self.is_main = self.engine.rank == 0  # only rank 0 logs, prints and writes metrics
        self.progress = progress and self.is_main
        self._check_sample_prompt()
        self.train_batches, self.val_tokens, self.train_tokens = self._data(text)
        self.step = 0
        self.last_checkpoint: Path | None = None
        self.read_only = False
        self._lock: rundir.RunLock | None = None  # held by rank 0 while fit() runs
        self._tensorboard = None

    def _check_sample_prompt(self) -> None:
        """The end-of-training sample's settings, checked before training rather than after."""
        c = self.config
        if not c.sample_tokens:
            return
        try:
            ids = self.tokenizer.encode(c.sample_prompt)
        except InputError as exc:
            raise InputError(f"sample_prompt cannot be encoded: {exc}") from None
        if len(ids) > c.model.block_size:
            raise InputError(
                f"sample_prompt is {len(ids)} tokens, longer than model.block_size="
                f"{c.model.block_size}; shorten it or set sample_tokens=0"
            )

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
        """Train to `max_iters` (resuming first), holding the run folder's lock meanwhile."""
        self.read_only = self.run_dir.is_dir() and not rundir.is_writable(self.run_dir)
        if self.is_main and not self.read_only:
            self._lock = rundir.acquire(self.run_dir)  # one run per folder, named in refusals
            if not (self.run_dir / checkpoint.TOKENIZER).is_file():
                with rundir.atomic_path(self.run_dir / checkpoint.TOKENIZER) as tmp:
                    self.tokenizer.save(tmp)
            self._tensorboard = _tensorboard_writer(self.run_dir)
        try:
            return self._fit()
        finally:
            if self._lock is not None:
                self._lock.release()  # the next run (or a resume in this process) may start
                self._lock = None
            if self._tensorboard is not None:
                self._tensorboard.close()
                self._tensorboard = None

    def _fit(self) -> TrainResult:
        c = self.config
        self._resume_if_possible()
        start, start_step = time.perf_counter(), self.step
        evaluation = {}
        bar = progress_bar(
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
                # refresh=False: the bar redraws on update(), at most every mininterval (a log)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
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
        if self.engine.schedules_micro_batches:  # a pipeline runs the micro-batches itself
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
        """Mean loss over `eval_iters` global batches of each split, the rows the training
        batches have (batch_size per data-parallel rank), each rank evaluating its own: every
        engine evaluates the same sequences for the same config. The batches come from a
        generator seeded the same way every time, so evaluations compare like with like and
        never disturb the training batches."""
        self.model.eval()
        c, engine = self.config, self.engine
        result = {}
        for split, tokens in (("train", self.train_tokens), ("val", self.val_tokens)):
            sampler = data.TokenBatchSampler(
                tokens,
                c.model.block_size,
                c.batch_size * engine.world_size,
                seed=c.seed + 1,
                device=self.device,
            )
            total = sum(
                engine.forward(*engine.shard(*next(sampler))).item() for _ in range(c.eval_iters)
            )
            result[split] = engine.mean(total / c.eval_iters)
        self.model.train()
        return result

    def sample(
        self,
        prompt: str,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> str:
        """`prompt` continued by the model being trained (`minillm.sample.generate_text`); the
        seed defaults to the run's."""
        return generate_text(
            self.model,
            self.tokenizer,
            prompt,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
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
        rundir.append_line(self.run_dir / name, _csv_line(row), header=_csv_line(fields))

    def _truncate_logs(self, step: int) -> None:
        """Keep the whole rows logged up to `step` (a resumed run logs later steps again), and
        replace each log atomically: a kill here leaves the old file or the new one."""
        for name, fields in ((self.METRICS, self.FIELDS), (self.EVALS, self.EVAL_FIELDS)):
            path = self.run_dir / name
            if path.exists():
                kept = [r for r in _rows(path, fields) if int(r[0]) <= step]
                text = "".join(_csv_line(r) + "\n" for r in [fields, *kept])
                rundir.write_atomic(path, text)

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
            if self.read_only:
                raise rundir.RunFolderError(
                    f"{self.run_dir} is read-only and holds no checkpoint, so there is nothing "
                    "to evaluate and nowhere to train; choose another out_dir"
                )
            if self._lock:
                for name in (self.METRICS, self.EVALS):  # logs of a run that never checkpointed
                    (self.run_dir / name).unlink(missing_ok=True)
            return
        saved = checkpoint.load_config(latest)
        if saved["model"] != to_dict(self.config.model):
            raise checkpoint.CheckpointError(
                f"{self.run_dir} holds a run with another model config; pass --fresh to start "
                "over there, or choose another out_dir"
            )
        # runs saved before optim.optimizer existed trained with AdamW
        optimizer = saved.get("optim", {}).get("optimizer", "adamw")
        if optimizer != self.config.optim.optimizer:
            raise checkpoint.CheckpointError(
                f"{self.run_dir} holds a run trained with optim.optimizer={optimizer}, and this "
                f"config says {self.config.optim.optimizer}: one's state cannot continue the "
                f"other. Pass --set optim.optimizer={optimizer} to finish that run, --fresh to "
                "start over there, or choose another out_dir"
            )
        checkpoint.verify(latest)  # every file as it was saved, before any engine reads one
        state = self.engine.load_checkpoint(latest)
        checkpoint.check_state(state, latest, self.config.max_iters)
        self.train_batches.load_state_dict(state["data"])
        checkpoint.set_rng_state(state["rng"])
        self.step = state["step"]
        self.last_checkpoint = latest
        if self.read_only and self.step < self.config.max_iters:
            raise rundir.RunFolderError(
                f"{self.run_dir} is read-only and its run stopped at step {self.step} of "
                f"max_iters={self.config.max_iters}; make it writable (or copy it) to finish"
            )
        if self._lock:
            self._truncate_logs(self.step)
        if self.progress:
            print(f"resuming from {latest} (step {self.step})")


def _csv_line(values) -> str:
    """One CSV row as text without its newline (None is an empty cell)."""
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(values)
    return out.getvalue()


def _rows(path: Path, fields: tuple[str, ...]) -> list[list[str]]:
    """The whole data rows of a log: its header, a torn last line, and a line torn by a kill and
    then continued (a wrong number of cells) are left out."""
    rows = csv.reader(rundir.read_lines(path))
    return [r for r in rows if len(r) == len(fields) and r[0].isdigit()]


def train_worker(rank: int, world_size: int, config: TrainConfig, engine_factory) -> list[float]:
    """For `minillm.parallel.launch.launch`: the Trainer with `engine_factory` (such as
    `functools.partial(ZeroEngine, stage=2)`) in every rank; rank 0 returns the loss of every
    step (averaged over the ranks), the others an empty list."""
    Trainer(config, progress=False, engine_factory=engine_factory).fit()
    return [row["loss"] for row in read_metrics(config.out_dir)[0]] if rank == 0 else []


def read_metrics(run_dir: str | Path) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """The per-step rows of `metrics.csv` and the rows of `evals.csv`, as floats."""

    def rows(name: str, fields: tuple[str, ...]) -> list[dict[str, float]]:
        # An empty cell (DeepSpeed reports no gradient norm at ZeRO-0) reads as NaN.
        return [
            {k: float(v or "nan") for k, v in zip(fields, row, strict=True)}
            for row in _rows(Path(run_dir) / name, fields)
        ]

    return rows(Trainer.METRICS, Trainer.FIELDS), rows(Trainer.EVALS, Trainer.EVAL_FIELDS)


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
