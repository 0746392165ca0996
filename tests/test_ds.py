"""DeepSpeed under the Trainer: configs checked before launch, and real 2-process runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minillm.engines import ds_config
from minillm.errors import InputError
from minillm.llama import Llama
from minillm.sample import generate_text, load_for_sampling
from minillm.train import Trainer, read_metrics
from minillm.train_config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "deepspeed"
GPT_JOB = REPO / "configs/train/shakespeare_char.yaml"
LLAMA_JOB = REPO / "configs/train/shakespeare_char_llama.yaml"
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
    "optim.optimizer=adamw",  # ZeRO and DeepSpeed cut parameters into slices: AdamW only
]


def train_config(*extra, job: Path = GPT_JOB):
    return load_config(job, [*TINY, *extra])


def test_auto_values_are_filled_from_the_training_config():
    loaded = ds_config.load_config(CONFIGS / "zero2.json")
    config = ds_config.prepare_config(loaded, train_config(), 2, "cpu")
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
        ds_config.prepare_config(config, train_config(), 2, "cpu")


@pytest.mark.parametrize(
    "config, message",
    [
        ({"train_batch_size": 16}, r"16 != micro batch 4 x accumulation 1 x data-parallel 2"),
        ({"train_micro_batch_size_per_gpu": 8}, "make them agree"),
        ({"fp16": {"enabled": True}}, "fp16 is not supported by DeepSpeed on a CPU"),
        ({"pipeline": {"stages": 2}, "zero_optimization": {"stage": 2}}, "cannot be combined"),
        ({"pipeline": {"stages": 2}}, "clips gradients by the first stage's norm"),
        ({"pipeline": {"stages": 3}, "zero_optimization": {"stage": 1}}, "cannot form 3"),
        ({"pipeline": {"stages": "auto"}}, "'pipeline.stages' must be a whole number"),
    ],
)
def test_bad_configs_are_refused_before_launch(config, message):
    with pytest.raises(InputError, match=message):
        ds_config.prepare_config(config, train_config(), 2, "cpu")


CPU_CONFIGS = sorted(p for p in CONFIGS.glob("*.json") if "fp16" not in p.name)


@pytest.mark.parametrize("path", CPU_CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_are_valid_for_two_cpu_processes(path):
    config = ds_config.prepare_config(ds_config.load_config(path), train_config(), 2, "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig

    DeepSpeedConfig({**config, "train_batch_size": 4, "gradient_accumulation_steps": 1})


def test_the_fp16_config_is_for_gpus_only():
    config = ds_config.load_config(CONFIGS / "zero2_fp16.json")
    with pytest.raises(InputError, match="fp16 is not supported by DeepSpeed on a CPU"):
        ds_config.prepare_config(config, train_config(), 2, "cpu")
    assert ds_config.prepare_config(config, train_config(), 2, "cuda")["fp16"]["enabled"] is True


def _command(run_dir: Path, config: str, *extra: str, job: Path = GPT_JOB) -> list[str]:
    overrides = [*TINY, f"out_dir={run_dir}", *extra]
    return [
        sys.executable,
        "-m",
        "minillm.cli",
        "train",
        "--config",
        str(job),
        "--deepspeed",
        str(CONFIGS / config),
        "--nproc",
        "2",
        *[a for o in overrides for a in ("--set", o)],
    ]


def _launch(
    run_dir: Path, config: str, *extra: str, job: Path = GPT_JOB, warnings: str = "ignore"
) -> subprocess.CompletedProcess:
    run = subprocess.run(
        _command(run_dir, config, *extra, job=job),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": warnings},
        cwd=REPO,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)[0]]


def _evals(run_dir: Path) -> list[float]:
    return [loss for r in read_metrics(run_dir)[1] for loss in (r["train_loss"], r["val_loss"])]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The single-process Trainer on the same sequences: 2 ranks x 4 = 8 per step; with
    accumulation, 2 micro-steps of 2 ranks x 2 = one process's 2 micro-steps of 4."""
    folder = tmp_path_factory.mktemp("single")
    runs = {
        "plain": ("batch_size=8",),
        "accumulated": ("batch_size=4", "grad_accum=2", "optim.grad_clip=0.05"),
    }
    losses = {}
    for name, extra in runs.items():
        trainer = Trainer(train_config(*extra, f"out_dir={folder / name}"), progress=False)
        run_dir = trainer.fit().run_dir
        losses[name], losses[f"{name} evals"] = _losses(run_dir), _evals(run_dir)
    return losses


# fp32 losses of ZeRO 0-3 agree with the single process to float32 rounding (measured <= 5e-7).
PARITY = 1e-5
# Runs that need no launcher of their own, each (DeepSpeed config, overrides). Activation
# checkpointing configures deepspeed.checkpointing for the whole process: it runs last.
IN_TURN = {
    "zero0": ("zero0.json", ()),
    "zero1": ("zero1.json", ()),
    "zero3": ("zero3.json", ()),
    "accumulated": ("zero2.json", ("batch_size=2", "grad_accum=2", "optim.grad_clip=0.05")),
    "activation checkpointing": ("zero2_activation_checkpointing.json", ()),
}


@pytest.fixture(scope="module")
def in_turn_runs(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """The runs of IN_TURN one after another in one launch of two processes, which share one
    start-up (about 20 s of importing DeepSpeed per launch here), started by
    `minillm.parallel.launch` as chapter 09 starts them: their process group is up before the
    engine is built, which must join it (an engine that did not would count one rank and refuse
    train_batch_size 8). Each run's folder and what rank 0 printed."""
    from functools import partial

    from minillm.engines import deepspeed_engine
    from minillm.parallel.launch import in_turn, launch
    from minillm.train import train_worker

    folder = tmp_path_factory.mktemp("in_turn")
    calls = [
        (
            train_worker,
            (
                train_config(*extra, f"out_dir={folder / name}"),
                partial(deepspeed_engine, ds_config=ds_config.load_config(CONFIGS / config)),
            ),
        )
        for name, (config, extra) in IN_TURN.items()
    ]
    rank0 = launch(in_turn, 2, calls, echo=False, timeout_s=600)[0]
    return {
        name: (folder / name, printed) for name, (_, printed) in zip(IN_TURN, rank0, strict=True)
    }


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.xdist_group("ds_in_turn")
@pytest.mark.parametrize("stage", [0, 1, 3])
def test_zero_stages_match_the_single_process_trainer(stage, in_turn_runs, single_process):
    run_dir, _ = in_turn_runs[f"zero{stage}"]
    assert _losses(run_dir) == pytest.approx(single_process["plain"], abs=PARITY)
    # Evaluated on the same global rows (each rank its half), the evaluations agree too.
    assert _evals(run_dir) == pytest.approx(single_process["plain evals"], abs=PARITY)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.xdist_group("ds_in_turn")
def test_accumulation_and_clipping_match_the_trainer(in_turn_runs, single_process):
    """2 ranks x 2 micro-batches of 2 sequences, clipped at 0.05."""
    run_dir, _ = in_turn_runs["accumulated"]
    assert _losses(run_dir) == pytest.approx(single_process["accumulated"], abs=PARITY)
    norms = [r["grad_norm"] for r in read_metrics(run_dir)[0]]
    assert min(norms) > 0.05  # every step's norm was above the limit, so every step was clipped


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.xdist_group("ds_in_turn")
def test_deepspeed_activation_checkpointing_matches(in_turn_runs, single_process):
    run_dir, printed = in_turn_runs["activation checkpointing"]
    assert "1 block(s) recomputed in backward by deepspeed.checkpointing" in printed
    assert _losses(run_dir) == pytest.approx(single_process["plain"], abs=PARITY)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_cpu_offload_trains_and_matches(tmp_path, single_process, monkeypatch):
    """Launched by `cli.main(argv)` in this process while `sys.argv` says something else: the
    ranks run `argv` (before, the launcher re-ran `sys.argv[1:]`)."""
    from minillm import cli

    monkeypatch.setattr(sys, "argv", ["pytest", "--not-a-minillm-option"])
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    monkeypatch.chdir(REPO)
    assert cli.main(_command(tmp_path / "ds", "zero2_offload.json")[3:]) == 0
    assert _losses(tmp_path / "ds") == pytest.approx(single_process["plain"], abs=PARITY)


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory) -> tuple[Path, str]:
    """A ZeRO-2 run launched as a user launches it (`minillm train --deepspeed`): its folder and
    what it printed; the uninterrupted run that a killed one must end as, too."""
    run_dir = tmp_path_factory.mktemp("zero2") / "ds"
    return run_dir, _launch(run_dir, "zero2.json").stdout


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.timeout(900)  # two launches, over 300 s on a shared 2-core machine
@pytest.mark.parametrize(
    "stage",
    [
        pytest.param(2, marks=pytest.mark.xdist_group("ds_zero2")),
        pytest.param(3, marks=pytest.mark.xdist_group("ds_in_turn")),
    ],
)
def test_killed_zero_run_resumes_where_an_uninterrupted_one_ends(stage, tmp_path, request):
    """Killed and resumed as a user launches it (`minillm train --deepspeed`), it must end as
    the uninterrupted run of the same job ends, bit for bit: ZeRO-2's launched the same way,
    ZeRO-3's the in-turn fixture's (launched by `minillm.parallel.launch`)."""
    import signal
    import time

    config = f"zero{stage}.json"
    killed = tmp_path / "killed"
    if stage == 2:
        whole = request.getfixturevalue("zero2_run")[0]
    else:
        whole = request.getfixturevalue("in_turn_runs")["zero3"][0]
    process = subprocess.Popen(
        _command(killed, config),
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        metrics = killed / "metrics.csv"
        if metrics.exists() and len(metrics.read_text().splitlines()) > 8:  # past step 6's save
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and both ranks, at once
    process.wait()
    resumed = _launch(killed, config)
    assert "resuming from" in resumed.stdout
    assert _losses(killed) == _losses(whole)  # bitwise
    final = "checkpoints/step_0000012/model.safetensors"
    assert (killed / final).read_bytes() == (whole / final).read_bytes()


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.xdist_group("ds_zero2")
def test_zero2_matches_the_single_process_trainer_and_exports_a_sampleable_checkpoint(
    zero2_run, single_process
):
    run_dir, printed = zero2_run
    assert _losses(run_dir) == pytest.approx(single_process["plain"], abs=PARITY)
    live_sample = printed.split("--- sample ---\n", 1)[1]  # printed by rank 0's live model
    model, tokenizer = load_for_sampling(run_dir)
    config = train_config()
    exported = generate_text(
        model, tokenizer, config.sample_prompt, config.sample_tokens, seed=config.seed
    )
    assert live_sample.startswith(exported + "\n")


class _Payload:
    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.xdist_group("ds_zero2")
def test_deepspeed_resume_never_runs_a_payload_in_its_files(zero2_run, tmp_path):
    """A real ZeRO-2 checkpoint: every file DeepSpeed wrote reads back weights-only; a payload
    put into its model-states file, with the manifest rewritten to match (an attacker who can
    write the folder), is refused on resume and never runs."""
    import json
    import shutil

    from minillm import checkpoint
    from minillm.engines.deepspeed import load_file_weights_only

    run_dir = Path(shutil.copytree(zero2_run[0], tmp_path / "run"))
    ckpt = checkpoint.latest_checkpoint(run_dir)
    shards = sorted(ckpt.glob("*.pt"))
    assert any("optim_states" in p.name for p in shards)
    for shard in shards:
        load_file_weights_only(shard)  # DeepSpeed's real files need no unpickling of code

    marker = tmp_path / "PWNED"
    _Payload.marker = marker
    states = ckpt / "mp_rank_00_model_states.pt"
    original = torch.load(states, weights_only=False)  # the test's own file: trusted here
    torch.save({**original, "client_state_payload": _Payload()}, states)
    with pytest.raises(checkpoint.CheckpointError, match="is not a DeepSpeed checkpoint file"):
        load_file_weights_only(states)
    manifest = json.loads((ckpt / checkpoint.MANIFEST).read_text())
    checkpoint.write_manifest(ckpt)  # the attacker also rewrote the manifest
    assert json.loads((ckpt / checkpoint.MANIFEST).read_text()) != manifest
    resumed = subprocess.run(
        _command(run_dir, "zero2.json", "max_iters=20"),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        cwd=REPO,
        timeout=600,
    )
    assert resumed.returncode != 0
    assert "is not a DeepSpeed checkpoint file minillm will read" in resumed.stdout + resumed.stderr
    assert not marker.exists(), "the payload ran"


@pytest.mark.multiprocess
@pytest.mark.slow
def test_the_llama_trains_under_zero3_as_one_process_does_and_samples(tmp_path):
    """The course's second model through the same DeepSpeed engine: ZeRO-3 partitions its
    parameters (no biases, tied embeddings, grouped key/value heads) and the losses are the
    single-process Trainer's; the exported checkpoint rebuilds as a Llama and samples."""
    single = Trainer(
        train_config("batch_size=8", f"out_dir={tmp_path / 'one'}", job=LLAMA_JOB), progress=False
    )
    assert isinstance(single.model, Llama)
    expected = _losses(single.fit().run_dir)
    _launch(tmp_path / "ds", "zero3.json", job=LLAMA_JOB)
    assert _losses(tmp_path / "ds") == pytest.approx(expected, abs=PARITY)
    model, tokenizer = load_for_sampling(tmp_path / "ds")
    assert isinstance(model, Llama) and model.config == single.config.model
    for name, tensor in single.model.state_dict().items():
        assert torch.allclose(model.state_dict()[name], tensor, atol=1e-5), name
    assert generate_text(model, tokenizer, "ROMEO:", 20, seed=0)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_torchrun_launches_the_same_job(tmp_path, single_process):
    overrides = [*TINY, f"out_dir={tmp_path / 'tr'}"]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "minillm.cli",
        "train",
        "--deepspeed",
        str(CONFIGS / "zero2.json"),
        *[a for o in overrides for a in ("--set", o)],
    ]
    run = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _losses(tmp_path / "tr") == pytest.approx(single_process["plain"], abs=PARITY)
    # The exported checkpoint also converts to transformers' GPT-2 with the same logits.
    import torch

    from minillm.hf import to_hf

    model, _ = load_for_sampling(tmp_path / "tr")
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    torch.testing.assert_close(to_hf(model)(ids).logits, model(ids)[0], atol=1e-5, rtol=0)


def test_pipeline_at_zero0_is_allowed_when_clipping_is_off():
    config = {"pipeline": {"stages": 2}, "gradient_clipping": 0.0}
    filled = ds_config.prepare_config(config, train_config("optim.grad_clip=0"), 2, "cpu")
    assert filled["train_batch_size"] == 4  # 2 processes = 2 stages x 1 data-parallel rank


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_stage_pipeline_matches_the_single_process_model(tmp_path):
    """2 processes = 2 stages (1 block each), one data-parallel rank: each step trains the same 4
    sequences as one process would, with the tied embedding split across the stages."""
    two_blocks = ("model.n_layer=2",)
    single = Trainer(train_config(*two_blocks, f"out_dir={tmp_path / 'single'}"), progress=False)
    single_result = single.fit()
    run = _launch(tmp_path / "pipe", "pipeline2.json", *two_blocks, warnings="default")
    assert "stage=1 layers=" in run.stdout  # DeepSpeed's own partition report: really 2 stages
    # The user sees no autograd warning about DeepSpeed's broadcast of the tied embedding.
    assert "c10d::broadcast_" not in run.stderr
    assert _losses(tmp_path / "pipe") == pytest.approx(_losses(single_result.run_dir), abs=PARITY)
    evals = read_metrics(tmp_path / "pipe")[1]
    assert [r["val_loss"] for r in evals] == pytest.approx(
        [r["val_loss"] for r in read_metrics(single_result.run_dir)[1]], abs=PARITY
    )
    live_sample = run.stdout.split("--- sample ---\n", 1)[1]
    assert live_sample.startswith(single_result.sample + "\n")  # weights gathered from both stages
    # The exported file holds both stages' weights: it samples what the live model sampled.
    model, tokenizer = load_for_sampling(tmp_path / "pipe")
    config = train_config()
    exported = generate_text(
        model, tokenizer, config.sample_prompt, config.sample_tokens, seed=config.seed
    )
    assert exported == single_result.sample
    # Starting the finished run again loads DeepSpeed's per-layer checkpoint and trains nothing.
    again = _launch(tmp_path / "pipe", "pipeline2.json", *two_blocks)
    assert "resuming from" in again.stdout
    assert again.stdout.split("--- sample ---\n", 1)[1].startswith(single_result.sample + "\n")
