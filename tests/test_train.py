"""The Trainer: configs that reject mistakes, repeatable runs, exact resume after SIGKILL,
NaN detection, precision options, checkpoints that refuse corrupt files, and sampling."""

import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from minillm import checkpoint
from minillm.config import build, to_dict
from minillm.engines import PlainEngine
from minillm.engines.common import lr_at
from minillm.errors import InputError, InputTypeError
from minillm.sample import generate_text, load_for_sampling
from minillm.train import Trainer, TrainingDiverged, pick_device, read_metrics
from minillm.train_config import TrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=16",
    "batch_size=4",
    "max_iters=30",
    "eval_interval=15",
    "eval_iters=2",
    "checkpoint_interval=10",
    "sample_tokens=0",
    "optim.warmup_iters=5",
]


def tiny(tmp_path: Path, *extra: str) -> TrainConfig:
    return load_config(
        REPO / "configs/train/shakespeare_char.yaml", [*TINY, f"out_dir={tmp_path / 'run'}", *extra]
    )


def losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(run_dir)[0]]


# -- configs ---------------------------------------------------------------------------------


def test_default_config_file_is_the_main_job():
    config = load_config(REPO / "configs/train/shakespeare_char.yaml")
    assert (config.model.n_layer, config.model.n_head, config.model.n_embd) == (4, 4, 128)
    assert (config.model.positions, config.model.bias) == ("learned", True)
    assert (config.model.block_size, config.batch_size, config.max_iters) == (64, 12, 2000)
    assert config.data.tokenizer == "char" and config.model.dropout == 0.0


def test_unknown_key_is_rejected_with_the_valid_names():
    with pytest.raises(InputError, match=r"unknown config key 'model.n_layers'.*n_layer"):
        load_config(None, ["model.n_layers=6"])
    with pytest.raises(InputError, match=r"unknown config key 'max_iter'.*max_iters"):
        load_config(None, ["max_iter=6"])


def test_mistyped_values_are_rejected():
    with pytest.raises(InputTypeError, match="batch_size must be int"):
        load_config(None, ["batch_size=twelve"])
    with pytest.raises(InputTypeError, match="model.n_layer must be int"):
        load_config(None, ["model.n_layer=2.5"])
    with pytest.raises(InputError, match="precision"):
        load_config(None, ["precision=fp8"])
    with pytest.raises(InputError, match="key=value"):
        load_config(None, ["max_iters"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.learning_rate=0", "optim.learning_rate must be a finite number > 0, got 0.0"),
        ("optim.learning_rate=-1e-3", "optim.learning_rate must be a finite number > 0"),
        ("optim.learning_rate=.nan", "optim.learning_rate must be a finite number > 0, got nan"),
        ("optim.learning_rate=.inf", "optim.learning_rate must be a finite number > 0, got inf"),
        ("optim.beta1=1.5", "optim.beta1 must be a finite number >= 0 and < 1, got 1.5"),
        ("optim.beta2=1.0", "optim.beta2 must be a finite number >= 0 and < 1, got 1.0"),
        ("optim.beta1=-0.1", "optim.beta1 must be a finite number >= 0 and < 1"),
        ("optim.warmup_iters=-5", "optim.warmup_iters must be a finite number >= 0, got -5"),
        ("optim.min_lr=0.1", "optim.min_lr (0.1) is above optim.learning_rate (0.001)"),
        ("optim.min_lr=-1e-4", "optim.min_lr must be a finite number >= 0"),
        ("optim.weight_decay=-0.1", "optim.weight_decay must be a finite number >= 0"),
        ("optim.grad_clip=-1", "optim.grad_clip must be a finite number >= 0"),
        ("optim.grad_clip=.nan", "optim.grad_clip must be a finite number >= 0, got nan"),
        ("sample_tokens=-1", "sample_tokens must be a finite number >= 0, got -1"),
        ("sample_prompt=", "sample_prompt is empty"),
        ("keep_checkpoints=-1", "keep_checkpoints must be a finite number >= 0"),
    ],
)
def test_every_optimizer_and_sampling_setting_is_checked_in_one_sentence(override, message):
    with pytest.raises(InputError) as refused:
        load_config(None, ["optim.learning_rate=1e-3", "optim.min_lr=1e-4", override])
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_sample_prompt_the_tokenizer_cannot_encode_is_refused_before_training(tmp_path):
    for prompt, message in (
        ("ROMEO€", "sample_prompt cannot be encoded: character '€'"),
        ("x" * 17, "sample_prompt is 17 tokens, longer than model.block_size=16"),
    ):
        config = tiny(tmp_path, "sample_tokens=10", f"sample_prompt={prompt}")
        with pytest.raises(InputError, match=message):
            Trainer(config, progress=False)
        assert not (tmp_path / "run" / "metrics.csv").exists()  # not one step was trained
    Trainer(tiny(tmp_path, "sample_tokens=0", "sample_prompt=€"), progress=False)  # no sample


def test_overrides_parse_yaml_values_and_round_trip():
    config = load_config(None, ["optim.learning_rate=3e-4", "compile=true", "model.n_layer=6"])
    assert config.optim.learning_rate == 3e-4 and config.compile is True
    assert config.model.n_layer == 6
    assert build(TrainConfig, to_dict(config)) == config
    assert build(TrainConfig, yaml.safe_load(yaml.safe_dump(to_dict(config)))) == config


def test_missing_or_invalid_config_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(InputError, match="not valid YAML"):
        load_config(bad)


def test_learning_rate_warms_up_then_decays_to_min_lr():
    optim = load_config(
        None, ["optim.warmup_iters=10", "optim.learning_rate=1e-3", "optim.min_lr=1e-4"]
    ).optim
    assert lr_at(0, optim, 100) == pytest.approx(1e-4)
    assert lr_at(9, optim, 100) == pytest.approx(1e-3)
    assert lr_at(55, optim, 100) == pytest.approx((1e-3 + 1e-4) / 2)  # half-way down the cosine
    assert lr_at(100, optim, 100) == pytest.approx(1e-4)


def test_device_choice():
    expected = (
        "cuda"
        if torch.cuda.is_available()
        else ("mps" if torch.backends.mps.is_available() else "cpu")
    )
    assert pick_device("auto").type == expected
    assert pick_device("cpu").type == "cpu"
    with pytest.raises(InputError, match="unknown device"):
        pick_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            pick_device("cuda")


# -- training --------------------------------------------------------------------------------


def test_same_seed_gives_identical_losses_and_training_learns(tmp_path):
    first = Trainer(tiny(tmp_path / "a"), progress=False).fit()
    second = Trainer(tiny(tmp_path / "b"), progress=False).fit()
    assert losses(first.run_dir) == losses(second.run_dir)
    assert len(losses(first.run_dir)) == 30
    assert losses(first.run_dir)[-1] < losses(first.run_dir)[0] - 0.3  # from ~ln(65) = 4.17
    evals = read_metrics(first.run_dir)[1]
    assert [row["step"] for row in evals] == [15, 30]


def test_gradient_accumulation_matches_the_big_batch(tmp_path):
    """4 micro-batches of 2 equal 1 batch of 8 when the sampler gives the same sequences."""
    big = Trainer(tiny(tmp_path / "big", "batch_size=8", "max_iters=3"), progress=False)
    small = Trainer(
        tiny(tmp_path / "small", "batch_size=2", "grad_accum=4", "max_iters=3"), progress=False
    )
    x, y = next(big.train_batches)
    small.train_batches = iter([(x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2)])
    big.train_batches = iter([(x, y)])
    loss_big, norm_big, _ = big._train_step()
    loss_small, norm_small, _ = small._train_step()
    assert loss_small == pytest.approx(loss_big, abs=1e-6)
    assert norm_small == pytest.approx(norm_big, rel=1e-5)
    for p, q in zip(big.model.parameters(), small.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_nan_loss_stops_with_the_step_and_last_good_checkpoint(tmp_path):
    class PoisonAtStep13(PlainEngine):
        def forward(self, x, y):
            loss = super().forward(x, y)
            return loss * float("nan") if self._micro == 12 else loss

    trainer = Trainer(tiny(tmp_path), progress=False, engine_factory=PoisonAtStep13)
    with pytest.raises(TrainingDiverged, match=r"at step 13.*step_0000010"):
        trainer.fit()


def test_bf16_autocast_trains_on_this_device(tmp_path):
    result = Trainer(tiny(tmp_path, "precision=bf16", "max_iters=15"), progress=False).fit()
    assert all(torch.isfinite(torch.tensor(losses(result.run_dir))))
    assert losses(result.run_dir)[-1] < losses(result.run_dir)[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is allowed on CUDA")
def test_fp16_without_cuda_is_refused(tmp_path):
    with pytest.raises(InputError, match="fp16 needs a CUDA GPU"):
        Trainer(tiny(tmp_path, "precision=fp16"), progress=False)


def test_vocabulary_larger_than_the_model_is_refused(tmp_path):
    with pytest.raises(InputError, match="model.vocab_size=65"):
        Trainer(tiny(tmp_path, "model.vocab_size=50"), progress=False)


# -- checkpoints and resume ------------------------------------------------------------------


def _train_command(run_dir: Path) -> list[str]:
    overrides = [*TINY, "max_iters=40", f"out_dir={run_dir}"]
    return [
        sys.executable,
        "-m",
        "minillm.cli",
        "train",
        "--config",
        str(REPO / "configs/train/shakespeare_char.yaml"),
        *[arg for o in overrides for arg in ("--set", o)],
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in every run: same floats


@pytest.mark.slow
def test_killed_run_resumes_bitwise_identical_to_an_uninterrupted_one(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_train_command(whole), env=_env(), check=True, capture_output=True)

    kill_after = random.Random().randint(12, 35)  # anywhere, including between checkpoints
    process = subprocess.Popen(
        _train_command(killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        metrics = killed / "metrics.csv"
        if metrics.exists() and len(metrics.read_text().splitlines()) > kill_after:
            break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"

    resumed = subprocess.run(_train_command(killed), env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert losses(killed) == losses(whole)  # every step, bitwise
    final_whole = checkpoint.latest_checkpoint(whole) / checkpoint.WEIGHTS
    final_killed = checkpoint.latest_checkpoint(killed) / checkpoint.WEIGHTS
    assert final_whole.read_bytes() == final_killed.read_bytes()


def test_checkpoint_is_complete_and_old_ones_are_pruned(tmp_path):
    result = Trainer(tiny(tmp_path), progress=False).fit()
    names = [p.name for p in checkpoint.list_checkpoints(result.run_dir)]
    assert names == ["step_0000020", "step_0000030"]  # keep_checkpoints = 2
    latest = checkpoint.latest_checkpoint(result.run_dir)
    assert {p.name for p in latest.iterdir()} == {
        "model.safetensors",
        "state.pt",
        "config.yaml",
        "tokenizer.json",
        "manifest.json",  # written last: the checkpoint is complete
    }
    (latest.parent / ".tmp-step_0000040").mkdir()  # a save killed half-way
    assert checkpoint.latest_checkpoint(result.run_dir) == latest


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("finished")
    return Trainer(tiny(path, "max_iters=10"), progress=False).fit().run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(checkpoint.latest_checkpoint(run_dir), tmp_path / "ckpt"))


def test_truncated_weights_give_a_clear_error(finished_run, tmp_path):
    ckpt = _copy(finished_run, tmp_path)
    weights = ckpt / checkpoint.WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(checkpoint.CheckpointError, match="corrupt or truncated"):
        load_for_sampling(ckpt)


def test_weights_of_another_model_give_a_clear_error(finished_run, tmp_path):
    ckpt = _copy(finished_run, tmp_path)
    config = yaml.safe_load((ckpt / checkpoint.CONFIG).read_text())
    config["model"]["n_embd"] = 64
    (ckpt / checkpoint.CONFIG).write_text(yaml.safe_dump(config))
    with pytest.raises(checkpoint.CheckpointError, match="does not fit this model"):
        load_for_sampling(ckpt)


def test_truncated_state_gives_a_clear_error(finished_run, tmp_path):
    ckpt = _copy(finished_run, tmp_path)
    state = ckpt / checkpoint.STATE
    state.write_bytes(state.read_bytes()[:200])
    with pytest.raises(checkpoint.CheckpointError, match="corrupt, truncated"):
        checkpoint.load_state(ckpt)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_state_file_never_unpickles_arbitrary_objects(finished_run, tmp_path):
    ckpt = _copy(finished_run, tmp_path)
    torch.save({"step": 1, "payload": _Exploit()}, ckpt / checkpoint.STATE)
    with pytest.raises(checkpoint.CheckpointError, match="not a minillm training state"):
        checkpoint.load_state(ckpt)


def test_not_a_checkpoint_says_what_to_pass(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="Pass a run folder"):
        load_for_sampling(tmp_path)


def test_resume_after_a_kill_that_left_empty_or_torn_logs(finished_run, tmp_path):
    """A kill while a log was being created or appended: an empty metrics.csv (it used to be an
    IndexError on resume) and an evals.csv whose last line is torn."""
    run_dir = Path(shutil.copytree(finished_run, tmp_path / "run"))
    (run_dir / "metrics.csv").write_text("")
    evals = run_dir / "evals.csv"
    evals.write_text(evals.read_text() + "20,3.1")  # no newline: torn mid-write
    config = tiny(tmp_path, "max_iters=20")  # the copy in tmp_path / "run", finished_run's model
    Trainer(config, progress=False).fit()
    steps, evaluations = read_metrics(run_dir)
    assert [int(r["step"]) for r in steps] == list(range(11, 21))
    assert [int(r["step"]) for r in evaluations] == [10, 15, 20]  # the torn row is gone
    assert (run_dir / "metrics.csv").read_text().startswith("step,loss,lr,grad_norm,")


def test_a_trainer_writes_nothing_until_it_fits(tmp_path):
    config = tiny(tmp_path, "max_iters=5")
    first = Trainer(config, progress=False)
    assert not (tmp_path / "run").exists()
    Trainer(config, progress=False).fit()  # a second Trainer on the folder: no lock held
    first.fit()  # resumes the finished run: nothing left to train
    assert [int(r["step"]) for r in read_metrics(tmp_path / "run")[0]] == [1, 2, 3, 4, 5]


def test_resume_into_a_run_with_another_model_is_refused(finished_run):
    config = load_config(None, [*TINY, f"out_dir={finished_run}", "model.n_layer=2"])
    with pytest.raises(checkpoint.CheckpointError, match="another model config"):
        Trainer(config, progress=False).fit()


# -- sampling --------------------------------------------------------------------------------


def test_sampling_is_repeatable_and_checks_the_prompt(finished_run):
    model, tokenizer = load_for_sampling(finished_run)
    first = generate_text(model, tokenizer, "ROMEO:", 40, seed=3)
    assert first.startswith("ROMEO:") and len(first) == len("ROMEO:") + 40
    assert generate_text(model, tokenizer, "ROMEO:", 40, seed=3) == first
    greedy = generate_text(model, tokenizer, "ROMEO:", 20, temperature=0)
    assert greedy == generate_text(model, tokenizer, "ROMEO:", 20, temperature=0, seed=99)
    with pytest.raises(InputError, match="longer than the model's context of 16"):
        generate_text(model, tokenizer, "x" * 17, 5)
    with pytest.raises(InputError, match="prompt is empty"):
        generate_text(model, tokenizer, "", 5)


def test_cli_sample_and_bad_key(finished_run):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "minillm.cli",
            "sample",
            "--checkpoint",
            str(finished_run),
            "--prompt",
            "KING:",
            "--tokens",
            "30",
            "--top-k",
            "5",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("KING:")
    bad = subprocess.run(
        [sys.executable, "-m", "minillm.cli", "train", "--set", "optim.lr=1"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert bad.returncode == 2 and "learning_rate" in bad.stderr and "Traceback" not in bad.stderr


def test_metrics_rows_have_the_documented_columns(finished_run):
    with open(finished_run / "metrics.csv") as f:
        assert next(csv.reader(f)) == list(Trainer.FIELDS)


def test_logged_learning_rate_is_the_one_each_update_used(finished_run):
    config = load_config(finished_run / "checkpoints" / "step_0000010" / "config.yaml")
    rows = read_metrics(finished_run)[0]
    expected = [lr_at(int(r["step"]) - 1, config.optim, config.max_iters) for r in rows]
    assert [r["lr"] for r in rows] == pytest.approx(expected, rel=1e-12)


@pytest.mark.slow
def test_torch_compile_option_trains_like_eager(tmp_path):
    eager = Trainer(tiny(tmp_path / "eager", "max_iters=3"), progress=False).fit()
    compiled = Trainer(tiny(tmp_path / "compiled", "max_iters=3", "compile=true"), progress=False)
    assert compiled.engine.forward_model is not compiled.model  # really the compiled module
    compiled.fit()
    assert losses(compiled.run_dir) == pytest.approx(losses(eager.run_dir), abs=1e-4)


def test_activation_checkpointing_trains_the_same_losses(tmp_path):
    plain = Trainer(tiny(tmp_path / "plain", "max_iters=3"), progress=False).fit()
    checkpointed = Trainer(
        tiny(tmp_path / "ckpt", "max_iters=3", "activation_checkpointing=true"), progress=False
    )
    assert checkpointed.model.activation_checkpoint is not None
    checkpointed.fit()
    assert losses(checkpointed.run_dir) == pytest.approx(losses(plain.run_dir), abs=1e-6)
