"""The course's two models on the main job's budget: the GPT (configs/train/shakespeare_char.yaml)
and the Llama (configs/train/shakespeare_char_llama.yaml: RMSNorm, SwiGLU, rotary positions,
grouped-query attention, no biases) at the same parameter count, trained with the same data,
steps, batch, schedule, seed and optimizer: AdamW for both, the layouts compared at the optimizer
the saved run used (`--set optim.optimizer=muon` compares them under the main job's Muon).
Chapter 04 reads the saved results.

    python benchmarks/llama_vs_gpt.py                      # 2000 steps each, a few minutes each
    python benchmarks/llama_vs_gpt.py --steps 300 --set eval_interval=50   # a shorter budget

The two models train at the same time, in two processes of `--threads` torch threads each (one
by default: one core each on a 2-core machine), so that both see the same machine load. Saved
for each model: its parameter count, the validation loss at every evaluation (20 batches, as
the Trainer evaluates), the final validation loss over 200 batches, and the time per training
step (median and quartiles over the run). The step times are then measured a second time in
this process, with the models interleaved (`--repeats` rounds of `--timed-steps` steps of
each, one after the other, all threads): the ratio of those medians is the figure to compare.
Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from minillm.train import Trainer, read_metrics
from minillm.train_config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "gpt": "configs/train/shakespeare_char.yaml",
    "llama": "configs/train/shakespeare_char_llama.yaml",
}
DEFAULT_OUT = REPO / "benchmarks/results/llama_vs_gpt.json"
FINAL_EVAL_BATCHES = 200
SAME_SIZE = 0.03  # the two models' parameter counts may differ by at most this fraction


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4)
    return q1, median, q3


def trainer_for(name: str, out_dir: str, overrides: list[str]) -> Trainer:
    config = load_config(
        REPO / CONFIGS[name],
        [f"out_dir={out_dir}", "sample_tokens=0", "optim.optimizer=adamw", *overrides],
    )
    return Trainer(config, progress=False)


def train(name: str, out_dir: str, overrides: list[str], threads: int) -> dict:
    """Train one model as the main job does, on `threads` torch threads; its figures."""
    torch.set_num_threads(threads)
    trainer = trainer_for(name, out_dir, overrides)
    config = trainer.config
    result = trainer.fit()
    steps, evals = read_metrics(out_dir)
    step_ms = [1e3 * trainer.tokens_per_step / row["tokens_per_s"] for row in steps]
    q1, median, q3 = quartiles(step_ms)
    trainer.config.eval_iters = FINAL_EVAL_BATCHES
    final = trainer.evaluate()
    figures = {
        "config": CONFIGS[name],
        "parameters": trainer.model.num_parameters(),
        "steps": result.step,
        "val_curve": [[int(row["step"]), row["val_loss"]] for row in evals],
        "train_curve": [[int(row["step"]), row["train_loss"]] for row in evals],
        "eval_batches": config.eval_iters,
        "final_val_loss": final["val"],
        "final_train_loss": final["train"],
        "final_eval_batches": FINAL_EVAL_BATCHES,
        "step_ms_median": median,
        "step_ms_quartiles": [q1, q3],
        "train_seconds": result.seconds,
        "torch_threads": threads,
    }
    return figures


def interleaved_step_ms(trainers: dict[str, Trainer], repeats: int, steps: int) -> dict:
    """Median milliseconds per training step of each model, timed in alternation: round r times
    `steps` steps of every model back to back, so that both see the same machine load."""
    rounds = {name: [] for name in trainers}
    for _ in range(repeats):
        for name, trainer in trainers.items():
            engine = trainer.engine
            batches = [next(trainer.train_batches) for _ in range(steps)]
            start = time.perf_counter()
            for x, y in batches:
                engine.backward(engine.forward(x, y))
                engine.step()
            rounds[name].append(1e3 * (time.perf_counter() - start) / steps)
    return {name: {"rounds": r, "median": statistics.median(r)} for name, r in rounds.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="max_iters for both (default: the configs')")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="both")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training run")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--timed-steps", type=int, default=10, help="steps per timing round")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    overrides = ([] if args.steps is None else [f"max_iters={args.steps}"]) + args.set
    with tempfile.TemporaryDirectory() as tmp:
        # spawn: a fresh interpreter per run, so torch's thread settings are its own
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(len(CONFIGS), mp_context=spawn) as pool:
            runs = {
                name: pool.submit(train, name, f"{tmp}/{name}", overrides, args.threads)
                for name in CONFIGS
            }
            models = {name: run.result() for name, run in runs.items()}
        for name, m in models.items():
            print(
                f"{name:5s}: {m['parameters']:,} parameters, {m['steps']} steps, final val loss "
                f"{m['final_val_loss']:.4f} ({FINAL_EVAL_BATCHES} batches), step "
                f"{m['step_ms_median']:.1f} ms (median; quartiles {m['step_ms_quartiles'][0]:.1f}"
                f"-{m['step_ms_quartiles'][1]:.1f})"
            )
        trainers = {name: trainer_for(name, f"{tmp}/timing-{name}", []) for name in CONFIGS}
        timing = interleaved_step_ms(trainers, args.repeats, args.timed_steps)
    gpt, llama = models["gpt"]["parameters"], models["llama"]["parameters"]
    size_gap = abs(llama - gpt) / gpt
    if size_gap > SAME_SIZE:
        raise SystemExit(f"the models differ by {size_gap:.1%} in size (more than {SAME_SIZE:.0%})")
    ratio = timing["llama"]["median"] / timing["gpt"]["median"]
    print(
        f"sizes differ by {size_gap:.2%}; interleaved step time: gpt "
        f"{timing['gpt']['median']:.1f} ms, llama {timing['llama']['median']:.1f} ms "
        f"(llama/gpt {ratio:.2f}, medians of {args.repeats} rounds of {args.timed_steps} steps)"
    )
    results = {
        "command": " ".join(["python benchmarks/llama_vs_gpt.py", *(argv or sys.argv[1:])]),
        "models": models,
        "parameter_gap": size_gap,
        "interleaved_step_ms": timing,
        "interleaved": {"repeats": args.repeats, "steps_per_round": args.timed_steps},
        "llama_over_gpt_step_time": ratio,
        "machine": {
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "processor": platform.machine(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
