"""Quality and throughput of the main job: the small CPU configuration on character-level tiny
Shakespeare (configs/train/shakespeare_char.yaml, what `./course run` trains).

The budget is fixed: context 64, batch 12, 2000 iterations (the same tokens seen: 12 x 64 x 2000),
no dropout, the budget of nanoGPT's well-known CPU example, which reaches a validation loss of
about 1.88. The model may change shape within 5% of the first main job's 809,856 parameters
(GPT-2's layout: 4 layers, 4 heads, width 128, biases, learned positions). minillm's target is a
validation loss of at most 1.70; the exit status is 0 only when it is met at that size. The final
loss is printed over 200 batches and over the run's own 20.

Measured (validation loss over 200 batches after 2000 steps, one thread on a shared 2-core CPU):
the main job, with Muon on the blocks' matrices (minillm.muon), 1.602: the target met at the
first main job's shape and size (Muon's rate 0.012 gave 1.605; 3 Newton-Schulz steps instead of
5 gave 1.612). With AdamW alone: the first main job 1.754; its cosine decaying to 0 instead of
1e-4, 1.759; rotary positions and no biases 1.736 (with an untied lm_head 1.741); that model 6
layers deep and 104 wide (786,864 parameters) 1.714, not adopted: its steps take 1.3-1.5x as long
and it no longer converts to GPT-2. Stopped early, behind the run each varies at its last two
evaluations (20 batches): weight decay 0.3 (step 1500) and 0 (step 750) against 0.1, and 7 layers
x 96 against 6 x 104 (step 1750). The course's Llama reaches 1.696 on this budget with AdamW
(benchmarks/llama_vs_gpt.py).

    python benchmarks/train_quality.py [--set key=value ...]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from minillm.train import Trainer
from minillm.train_config import load_config

REPO = Path(__file__).resolve().parents[1]
TARGET, REFERENCE = 1.70, 1.88
# the first main job (4 layers x 128, biases, learned positions); the target allows +-5% of it
BASELINE_PARAMETERS = 809_856


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(
            REPO / "configs/train/shakespeare_char.yaml",
            [f"out_dir={tmp}", "sample_tokens=0", *args.set],
        )
        c, m = config, config.model
        # the budget is fixed (the tokens seen, no dropout); the model's shape may change within
        # 5% of the baseline's parameters
        budget = (m.block_size, c.batch_size, c.grad_accum, c.max_iters, m.dropout)
        assert budget == (64, 12, 1, 2000, 0.0), "this benchmark is defined for the CPU budget"
        trainer = Trainer(config, progress=False)
        n_params = trainer.model.num_parameters()
        start = time.perf_counter()
        result = trainer.fit()
        seconds = time.perf_counter() - start
        run_eval_iters, trainer.config.eval_iters = c.eval_iters, 200
        final = trainer.evaluate()
    print(
        f"machine: {torch.get_num_threads()} torch threads; {n_params:,} parameters "
        f"({n_params / BASELINE_PARAMETERS - 1:+.1%} against {BASELINE_PARAMETERS:,}), "
        f"{m.n_layer} layers, {m.n_head} heads, width {m.n_embd}, positions {m.positions}, "
        f"bias {m.bias}, tied {m.tie_weights}; optimizer {c.optim.optimizer} (Muon's rate "
        f"{c.optim.muon_learning_rate}), lr {c.optim.learning_rate}, "
        f"warm-up {c.optim.warmup_iters}, min lr {c.optim.min_lr}, betas "
        f"({c.optim.beta1}, {c.optim.beta2}), weight decay {c.optim.weight_decay}"
    )
    print(
        f"validation loss after {c.max_iters} steps: {final['val']:.4f} over 200 batches, "
        f"{result.val_loss:.4f} over the run's {run_eval_iters} (train {final['train']:.4f}); "
        f"target <= {TARGET}, reference {REFERENCE}"
    )
    print(
        f"main job: {seconds:.0f} s wall time for {c.max_iters} steps, "
        f"{result.tokens_per_s:,.0f} tokens/s ({c.tokens_per_step} tokens per step)"
    )
    same_size = abs(n_params / BASELINE_PARAMETERS - 1) <= 0.05
    return 0 if final["val"] <= TARGET and same_size else 1


if __name__ == "__main__":
    sys.exit(main())
