"""DeepSpeed under the Trainer: configs checked before launch, and real 2-process runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from minillm import ds
from minillm.errors import InputError
from minillm.sample import generate_text, load_for_sampling
from minillm.train import Trainer, load_config, read_metrics

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "deepspeed"
TINY = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=16",
    "batch_size=4",
    "max_iters=12",
    "eval_interval=6",
    "eval_iters=2",
    "checkpoint_interval=6",
    "sample_tokens=40",
    "optim.warmup_iters=3",
]


def train_config(*extra):
    return load_config(REPO / "configs/train/shakespeare_char.yaml", [*TINY, *extra])


def test_auto_values_are_filled_from_the_training_config():
    config = ds.prepare_config(ds.load_config(CONFIGS / "zero2.json"), train_config(), 2, "cpu")
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 1
    assert config["train_batch_size"] == 8  # micro 4 x accumulation 1 x 2 ranks
    assert config["gradient_clipping"] == 1.0  # written explicitly, never DeepSpeed's default
    params = config["optimizer"]["params"]
    assert params["lr"] == 4e-3 and params["betas"] == [0.9, 0.99] and params["weight_decay"] == 0.1
    assert config["bf16"]["enabled"] is False and config["fp16"]["enabled"] is False


def test_misspelt_top_level_key_is_refused_with_a_suggestion():
    config = {"zero_optimisation": {"stage": 3}}
    with pytest.raises(InputError, match="did you mean 'zero_optimization'"):
        ds.prepare_config(config, train_config(), 2, "cpu")


@pytest.mark.parametrize(
    "config, message",
    [
        ({"train_batch_size": 16}, r"16 != micro batch 4 x accumulation 1 x data-parallel 2"),
        ({"train_micro_batch_size_per_gpu": 8}, "make them agree"),
        ({"fp16": {"enabled": True}}, "fp16 is not supported by DeepSpeed on a CPU"),
        ({"pipeline": {"stages": 2}, "zero_optimization": {"stage": 2}}, "cannot be combined"),
    ],
)
def test_bad_configs_are_refused_before_launch(config, message):
    with pytest.raises(InputError, match=message):
        ds.prepare_config(config, train_config(), 2, "cpu")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.json")), ids=lambda p: p.stem)
def test_shipped_configs_are_valid_for_two_cpu_processes(path):
    config = ds.prepare_config(ds.load_config(path), train_config(), 2, "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig

    DeepSpeedConfig({**config, "train_batch_size": 4, "gradient_accumulation_steps": 1})


def _launch(tmp_path: Path, config: str, *extra: str) -> subprocess.CompletedProcess:
    overrides = [*TINY, f"out_dir={tmp_path / 'ds'}", *extra]
    command = [
        sys.executable,
        "-m",
        "minillm.cli",
        "train",
        "--deepspeed",
        str(CONFIGS / config),
        "--nproc",
        "2",
        *[a for o in overrides for a in ("--set", o)],
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_zero2_matches_the_single_process_trainer_and_exports_a_sampleable_checkpoint(tmp_path):
    run = _launch(tmp_path, "zero2.json")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    reference = Trainer(
        train_config("batch_size=8", f"out_dir={tmp_path / 'single'}"), progress=False
    ).fit()
    ds_losses = [r["loss"] for r in read_metrics(tmp_path / "ds")[0]]
    single = [r["loss"] for r in read_metrics(reference.run_dir)[0]]
    assert len(ds_losses) == 12
    assert ds_losses == pytest.approx(single, abs=1e-5)
    live_sample = run.stdout.split("--- sample ---\n", 1)[1]  # printed by rank 0's live model
    model, tokenizer = load_for_sampling(tmp_path / "ds")
    config = train_config()
    exported = generate_text(
        model, tokenizer, config.sample_prompt, config.sample_tokens, seed=config.seed
    )
    assert live_sample.startswith(exported + "\n")
