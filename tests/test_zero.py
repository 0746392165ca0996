"""ZeRO stages 0-3 from scratch in two real processes (gloo), against one process with AdamW on
the global batch, the byte formula, and a real DeepSpeed ZeRO-2 run of the same Trainer config."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from minillm.engines import zero as zero_engine
from minillm.errors import InputError
from minillm.memory import model_state_bytes
from minillm.model import GPTConfig
from minillm.parallel import zero
from minillm.parallel.launch import launch
from minillm.train_config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)  # unit sizes are even: no padding
TINY = [  # the Trainer config of tests/test_ds.py, fewer steps, no sampling
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=16",
    "batch_size=4",
    "max_iters=8",
    "eval_interval=8",
    "eval_iters=1",
    "checkpoint_interval=8",
    "sample_tokens=0",
    "optim.warmup_iters=3",
]


def test_shards_are_padded_to_equal_sizes_and_cover_the_buffer():
    assert [zero.shard_range(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert zero.shard_range(8, 1, 2) == (4, 8)


def test_formula_is_the_16_bytes_rule_divided_by_n():
    n, world = 1000, 4
    for precision in ("fp32", "bf16"):
        total = model_state_bytes(n, precision).total
        per_stage = [sum(zero.zero_state_bytes(n, s, world, precision).values()) for s in range(4)]
        assert per_stage[0] == total == 16 * n and per_stage[3] == total // world
    # mixed precision, ZeRO paper's 2 + 2 + 12: stage 1 = 4P + 12P/N, stage 2 = 2P + 14P/N
    assert sum(zero.zero_state_bytes(n, 1, world, "bf16").values()) == 4 * n + 12 * n // world
    assert sum(zero.zero_state_bytes(n, 2, world, "bf16").values()) == 2 * n + 14 * n // world
    with pytest.raises(InputError, match="stage must be one of"):
        zero.zero_state_bytes(n, 4, world)


@pytest.mark.multiprocess
def test_every_stage_matches_one_process_and_holds_what_the_formula_says():
    reports = launch(zero.equality_worker, 2, CONFIG, 8, 3, echo=False)
    for report in reports:  # both ranks
        for stage, r in report.items():
            # One process sums the batch in another order: float32 rounding, then 3 AdamW steps.
            assert r["loss_diff"] < 1e-5 and r["weight_diff"] < 2e-5, (stage, r)
            assert r["census"] == r["predicted"], (stage, r)  # exact, counted from the tensors
    held = reports[0]
    census = [held[s]["census"] for s in range(4)]
    assert census[1]["optimizer"] * 2 == census[0]["optimizer"]
    assert census[2]["gradients"] * 2 == census[1]["gradients"]
    assert census[3]["parameters"] * 2 == census[2]["parameters"]


def _deepspeed_losses(out_dir: Path) -> list[float]:
    from minillm.train import read_metrics

    overrides = [*TINY, f"out_dir={out_dir}"]
    command = [
        sys.executable,
        "-m",
        "minillm.cli",
        "train",
        "--deepspeed",
        str(REPO / "configs/deepspeed/zero2.json"),
        "--nproc",
        "2",
        *[a for o in overrides for a in ("--set", o)],
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return [row["loss"] for row in read_metrics(out_dir)[0]]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_our_zero2_and_zero3_match_deepspeed_zero2_under_the_trainer(tmp_path):
    expected = _deepspeed_losses(tmp_path / "ds")
    assert len(expected) == 8
    for stage in (2, 3):
        config = load_config(
            REPO / "configs/train/shakespeare_char.yaml",
            [*TINY, f"out_dir={tmp_path / str(stage)}"],
        )
        ours = launch(zero_engine.train_worker, 2, config, stage, echo=False)[0]
        # Both clip at the config's grad_clip=1.0 and follow the Trainer's schedule.
        assert ours == pytest.approx(expected, abs=1e-5), stage
