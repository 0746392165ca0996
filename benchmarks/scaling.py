"""A scaling experiment sized for a CPU: tiny character-level GPTs on tiny Shakespeare, 5 model
sizes by 3 token budgets, each trained by minillm's Trainer with its cosine schedule set to its own
budget; then the fit L(N, D) = E + A/N^alpha + B/D^beta (`minillm.compute.fit_scaling_law`), the
compute-optimal size read off it, and the comparison with Hoffmann et al.'s (2022) Chinchilla fit.

In the same run: this machine's fp32 matmul peak (median of 7) and the model FLOP utilisation
(MFU) of the main job (configs/train/shakespeare_char.yaml) and of every sweep run.

    python benchmarks/scaling.py [--threads 1] [--out benchmarks/results/scaling.json]

N counts the non-embedding parameters (as Kaplan et al. and chapter 06 do), D the training tokens
(batch x context x steps), L the validation loss in nats per character over 40 batches. The
figures are written to the JSON file that chapter 06 reads, with the run's wall time in
`seconds`: the 15 runs are 5.4M tokens of small models, a few minutes on an idle CPU core (the
committed results took 32 minutes of wall time on a 2-core machine shared with other jobs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from minillm import compute
from minillm.train import Trainer, read_metrics
from minillm.train_config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILE = REPO / "configs/train/shakespeare_char.yaml"
SIZES = [(1, 16), (2, 24), (2, 32), (3, 48), (4, 64)]  # (n_layer, n_embd); 16 features per head
STEPS = [150, 300, 600]  # token budgets: steps x 16 sequences x 64 characters
SWEEP = ["batch_size=16", "model.block_size=64", "optim.learning_rate=3e-3", "optim.min_lr=3e-4"]
EVAL_ITERS = 40
MAIN_JOB_STEPS = 60  # enough steps of the main job for a median step time


def step_tokens_per_s(run_dir: Path, skip: int = 5) -> float:
    """Median per-step throughput from the run's metrics.csv, leaving out the first steps."""
    steps, _ = read_metrics(run_dir)
    return statistics.median(r["tokens_per_s"] for r in steps[skip:])


def train(overrides: list[str], out_dir: Path) -> tuple[Trainer, object]:
    config = load_config(CONFIG_FILE, [*overrides, f"out_dir={out_dir}", "sample_tokens=0"])
    trainer = Trainer(config, progress=False)
    return trainer, trainer.fit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/scaling.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    peak = compute.matmul_peak()
    print(f"matmul peak: {peak}")
    results = {"peak": {**peak.__dict__}, "threads": args.threads, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        main_steps = [f"max_iters={MAIN_JOB_STEPS}", f"eval_interval={MAIN_JOB_STEPS}"]
        main_steps += ["eval_iters=1", f"checkpoint_interval={MAIN_JOB_STEPS}", "device=cpu"]
        trainer, _ = train(main_steps, Path(tmp) / "main")
        per_token = compute.flops_per_token(trainer.config.model)
        tokens_per_s = step_tokens_per_s(Path(tmp) / "main")
        main_mfu = compute.mfu(per_token, tokens_per_s, peak.median)
        results["main_job"] = {
            "flops_per_token": per_token,
            "tokens_per_s": tokens_per_s,
            "mfu": main_mfu,
        }
        print(
            f"main job (809,856 parameters): {per_token:,} FLOPs per token, median "
            f"{tokens_per_s:,.0f} tokens/s over {MAIN_JOB_STEPS - 5} steps -> "
            f"{per_token * tokens_per_s / 1e9:.2f} GFLOP/s, MFU {main_mfu:.1%}"
        )
        runs = []
        print(f"{'layers':>6} {'width':>5} {'N':>8} {'D':>9} {'val loss':>8} {'MFU':>6} {'s':>5}")
        for (n_layer, n_embd), steps in ((s, t) for s in SIZES for t in STEPS):
            folder = Path(tmp) / f"L{n_layer}C{n_embd}S{steps}"
            overrides = [
                *SWEEP,
                f"model.n_layer={n_layer}",
                f"model.n_embd={n_embd}",
                f"model.n_head={n_embd // 16}",
                f"max_iters={steps}",
                f"optim.warmup_iters={steps // 10}",
                f"eval_interval={steps}",
                f"checkpoint_interval={steps}",
                f"eval_iters={EVAL_ITERS}",
                "device=cpu",
            ]
            tick = time.perf_counter()
            trainer, result = train(overrides, folder)
            seconds = time.perf_counter() - tick
            rate = step_tokens_per_s(folder)
            run = {
                "n_layer": n_layer,
                "n_embd": n_embd,
                "n_params": trainer.model.num_parameters(non_embedding=True),
                "steps": steps,
                "tokens": steps * trainer.config.tokens_per_step,
                "val_loss": result.val_loss,
                "train_loss": result.train_loss,
                "seconds": seconds,
                "mfu": compute.mfu(
                    compute.flops_per_token(trainer.config.model), rate, peak.median
                ),
            }
            runs.append(run)
            print(
                f"{n_layer:>6} {n_embd:>5} {run['n_params']:>8,} {run['tokens']:>9,} "
                f"{run['val_loss']:>8.4f} {run['mfu']:>6.1%} {seconds:>5.1f}"
            )
    results["runs"] = runs
    n, d, loss = (
        np.array([r[k] for r in runs], dtype=float) for k in ("n_params", "tokens", "val_loss")
    )
    fit = compute.fit_scaling_law(n, d, loss)
    law = fit.law
    results["fit"] = {
        **law.__dict__,
        "rms_log_residual": fit.rms,
        "max_abs_log_residual": fit.max_abs,
    }
    print(
        f"fit: L = {law.E:.3f} + {law.A:.4g}/N^{law.alpha:.3f} + {law.B:.4g}/D^{law.beta:.3f}; "
        f"log residuals rms {fit.rms:.4f}, largest {fit.max_abs:.4f} (about relative errors)"
    )
    budget = 6 * n.max() * d.max()  # the largest run's compute
    n_opt, d_opt = law.compute_optimal(budget)
    chin_n, chin_d = compute.CHINCHILLA.compute_optimal(budget)
    results["compute_optimal"] = {
        "flops": budget,
        "n_params": n_opt,
        "tokens": d_opt,
        "tokens_per_param": d_opt / n_opt,
        "n_exponent": law.beta / (law.alpha + law.beta),
        "chinchilla_n_params": chin_n,
        "chinchilla_tokens_per_param": chin_d / chin_n,
        "chinchilla_n_exponent": compute.CHINCHILLA.beta
        / (compute.CHINCHILLA.alpha + compute.CHINCHILLA.beta),
    }
    co = results["compute_optimal"]
    print(
        f"compute-optimal at C = 6 N D = {budget:.3g} FLOPs (the largest run's): N = {n_opt:,.0f}, "
        f"D = {d_opt:,.0f} ({co['tokens_per_param']:.1f} tokens per parameter); N_opt grows as "
        f"C^{co['n_exponent']:.2f}"
    )
    print(
        f"Chinchilla's law at the same C: N = {chin_n:,.0f} "
        f"({co['chinchilla_tokens_per_param']:.1f} tokens per parameter), N_opt grows as "
        f"C^{co['chinchilla_n_exponent']:.2f} "
        "(its tokens are SentencePiece tokens of web text, ours characters of one play)"
    )
    results["seconds"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{results['seconds']:.0f} s in all; results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
