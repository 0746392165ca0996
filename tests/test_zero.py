"""ZeRO stages 0-3 from scratch in two real processes (gloo), against one process with AdamW on
the global batch, the byte formula, and a real DeepSpeed ZeRO-2 run of the same Trainer config."""

from functools import partial
from pathlib import Path

import pytest

from minillm.engines import ZeroEngine
from minillm.errors import InputError
from minillm.memory import STATE_PARTS, model_state_bytes
from minillm.model import GPT, GPTConfig
from minillm.parallel import zero
from minillm.parallel.launch import in_turn, launch
from minillm.train import train_worker
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
    "optim.optimizer=adamw",  # ZeRO and DeepSpeed cut parameters into slices: AdamW only
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
    assert census[1]["optimizer_states"] * 2 == census[0]["optimizer_states"]
    assert tuple(census[0]) == STATE_PARTS and census[0]["master_weights"] == 0  # fp32
    assert census[2]["gradients"] * 2 == census[1]["gradients"]
    assert census[3]["parameters"] * 2 == census[2]["parameters"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_our_zero2_and_zero3_match_deepspeed_zero2_under_the_trainer(tmp_path):
    """The same Trainer config with DeepSpeed's ZeRO-2 and with ours at stages 2 and 3, one
    after another in the same two processes (one start-up for the three)."""
    from minillm.engines import deepspeed_engine, ds_config

    def config(name: str):
        return load_config(
            REPO / "configs/train/shakespeare_char.yaml", [*TINY, f"out_dir={tmp_path / name}"]
        )

    deepspeed_zero2 = ds_config.load_config(REPO / "configs/deepspeed/zero2.json")
    calls = [
        (train_worker, (config("deepspeed"), partial(deepspeed_engine, ds_config=deepspeed_zero2))),
        *((train_worker, (config(f"ours{s}"), partial(ZeroEngine, stage=s))) for s in (2, 3)),
    ]
    (expected, _), *ours = launch(in_turn, 2, calls, echo=False, timeout_s=600)[0]
    assert len(expected) == 8
    for stage, (losses, _) in zip((2, 3), ours, strict=True):
        # Both clip at the config's grad_clip=1.0 and follow the Trainer's schedule.
        assert losses == pytest.approx(expected, abs=1e-5), stage


# -- correct on every model: frozen, tied, unused, float64; any optimizer; resume ---------------

ODD = GPTConfig(n_layer=2, n_head=2, n_embd=12, block_size=8, vocab_size=37)  # odd sizes: padding


def _awkward_gpt() -> GPT:
    """A float64 GPT (tied embedding) with its first block and final LayerNorm frozen and one
    trainable parameter the forward never uses."""
    import torch

    torch.manual_seed(0)
    model = GPT(ODD).double()
    for p in [*model.blocks[0].parameters(), *model.ln_f.parameters()]:
        p.requires_grad_(False)
    model.unused = torch.nn.Parameter(torch.randn(3, 5, dtype=torch.float64))
    return model


def _global_batches(steps: int, micro: int, rows: int):
    import torch

    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, ODD.vocab_size, (steps, micro, rows, ODD.block_size + 1), generator=g)
    return [[(t[:, :-1], t[:, 1:]) for t in step] for step in tokens]


def awkward_worker(rank: int, world_size: int, steps: int, clip: float) -> dict:
    """Every stage against one process with torch's AdamW on the global batch (float64, two
    accumulated micro-batches a step, clipping, weight decay on the 2-D weights)."""
    import copy

    import torch

    base = _awkward_gpt()
    batches = _global_batches(steps, 2, 4)
    reference = copy.deepcopy(base)
    optimizer = torch.optim.AdamW(reference.param_groups(0.1), lr=1e-2)
    for micro in batches:
        for x, y in micro:
            (reference(x, y)[1] / len(micro)).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    rows = slice(rank * 4 // world_size, (rank + 1) * 4 // world_size)
    report = {}
    for stage in zero.STAGES:
        model = copy.deepcopy(base)
        z = zero.Zero(
            model.param_groups(0.1), stage, torch.optim.AdamW, module=model, grad_clip=clip, lr=1e-2
        )
        for micro in batches:
            for x, y in micro:
                z.backward(model(x[rows], y[rows])[1] / len(micro))
            unused_grad = model.unused.grad
            z.step()
        weights = z.full_state_dict()
        stepped = [t for g in z.optimizer.param_groups for t in g["params"]]
        report[stage] = {
            "weight_diff": max(
                (weights[k] - v).abs().max().item() for k, v in reference.state_dict().items()
            ),
            "dtypes": {str(u.flat.dtype) for u in z.units} | {str(t.dtype) for t in stepped},
            "unused_grad": unused_grad,
            "unused_moved": (weights["unused"] - base.unused).abs().max().item(),
            "frozen_in_units": sum(not p.requires_grad for u in z.units for p in u.params),
            "units": len(z.units),
            "stepped_numel": sum(t.numel() for t in stepped),
        }
    return report


@pytest.mark.multiprocess
def test_frozen_tied_unused_float64_model_trains_as_one_process_at_every_stage():
    reports = launch(awkward_worker, 2, 3, 0.5, echo=False)
    trainable = sum(p.numel() for p in _awkward_gpt().parameters() if p.requires_grad)
    for rank, report in enumerate(reports):
        for stage, r in report.items():
            # float64 throughout: a float32 buffer anywhere would leave differences near 1e-7.
            assert r["weight_diff"] < 1e-12, (rank, stage, r)
            assert r["dtypes"] == {"torch.float64"}, (rank, stage)
            assert r["unused_grad"] is None and r["unused_moved"] == 0.0, (rank, stage)
            # block 0 and ln_f are frozen: one unit for block 1, one for the rest; none reduced
            # or stepped for the frozen parameters.
            assert r["frozen_in_units"] == 0 and r["units"] == 2, (rank, stage)
    for stage in zero.STAGES:  # each trainable value is stepped by one rank (by all at stage 0)
        stepped = [reports[rank][stage]["stepped_numel"] for rank in range(2)]
        assert sum(stepped) == trainable * (2 if stage == 0 else 1), (stage, stepped)


OPTIMIZERS = [
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("Adam", {"lr": 1e-2, "betas": (0.8, 0.9), "weight_decay": 0.01}),
    ("AdamW", {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}),
    ("RMSprop", {"lr": 1e-3, "momentum": 0.5}),
    ("Adagrad", {"lr": 0.05}),
]


def against_torch_worker(rank: int, world_size: int, steps: int) -> dict:
    """Our ZeRO 1-3 (given a parameter list at 1-2, the module at 3) against torch's
    ZeroRedundancyOptimizer under torch's DDP, with each optimizer of `OPTIMIZERS`."""
    import copy

    import torch
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    base = GPT(ODD).double()
    batches = [micro[0] for micro in _global_batches(steps, 1, 4)]
    rows = slice(rank * 4 // world_size, (rank + 1) * 4 // world_size)
    report = {}
    for name, kwargs in OPTIMIZERS:
        cls = getattr(torch.optim, name)
        theirs = copy.deepcopy(base)
        ddp = DistributedDataParallel(theirs)
        zro = ZeroRedundancyOptimizer(theirs.parameters(), optimizer_class=cls, **kwargs)
        for x, y in batches:
            ddp(x[rows], y[rows])[1].backward()
            zro.step()
            zro.zero_grad(set_to_none=True)
        for stage in (1, 2, 3):
            ours = copy.deepcopy(base)
            params = ours if stage == 3 else list(ours.parameters())
            z = zero.Zero(params, stage, cls, module=ours if stage == 3 else None, **kwargs)
            for x, y in batches:
                z.backward(ours(x[rows], y[rows])[1])
                z.step()
            if stage == 3:
                weights = z.full_state_dict()
            else:
                weights = ours.state_dict()
            report[(name, stage)] = max(
                (weights[k] - v).abs().max().item() for k, v in theirs.state_dict().items()
            )
    return report


@pytest.mark.multiprocess
def test_any_elementwise_torch_optimizer_matches_torch_zero_redundancy_optimizer():
    for report in launch(against_torch_worker, 2, 3, echo=False):
        for key, diff in report.items():
            assert diff < 1e-12, (key, diff)  # float64: the same updates, summed in another order


def test_refusals_before_any_communication():
    import torch

    model = GPT(ODD)
    with pytest.raises(InputError, match="LBFGS updates an element from others of its tensor"):
        zero.Zero(model, 1, torch.optim.LBFGS)
    with pytest.raises(InputError, match="ZeRO-3 gathers weights around a module's forward"):
        zero.Zero(list(model.parameters()), 3)
    with pytest.raises(InputError, match="ZeRO stage must be one of"):
        zero.Zero(model, 4)


def against_fsdp2_worker(rank: int, world_size: int, steps: int) -> float:
    """Our ZeRO-3 against torch's FSDP2 (`fully_shard` on each block, then on the whole GPT: the
    same units), AdamW with weight decay on the 2-D weights, float64: the largest difference."""
    import copy

    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    base = GPT(ODD).double()
    batches = [micro[0] for micro in _global_batches(steps, 1, 4)]
    rows = slice(rank * 4 // world_size, (rank + 1) * 4 // world_size)
    theirs = copy.deepcopy(base)
    mesh = init_device_mesh("cpu", (world_size,))
    for block in theirs.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(theirs, mesh=mesh)
    optimizer = torch.optim.AdamW(theirs.param_groups(0.1), lr=1e-2)
    ours = copy.deepcopy(base)
    z = zero.Zero(ours.param_groups(0.1), 3, torch.optim.AdamW, module=ours, lr=1e-2)
    for x, y in batches:
        theirs(x[rows], y[rows])[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        z.backward(ours(x[rows], y[rows])[1])
        z.step()
    full = {k: v.full_tensor() for k, v in theirs.state_dict().items()}
    return max((w - full[k]).abs().max().item() for k, w in z.full_state_dict().items())


@pytest.mark.multiprocess
def test_zero3_matches_torch_fsdp2_on_cpu_gloo():
    assert max(launch(against_fsdp2_worker, 2, 3, echo=False)) < 1e-12


def crashing_worker(rank: int, world_size: int, config, stage: int, crash_at: int) -> None:
    """The Trainer with `ZeroEngine`, killed (an exception in every rank) in step `crash_at`."""
    from minillm.train import Trainer

    class Crash(RuntimeError):
        pass

    class CrashingEngine(ZeroEngine):
        def step(self):
            if self.scheduler.last_epoch + 1 == crash_at:
                raise Crash
            return super().step()

    with pytest.raises(Crash):
        Trainer(config, progress=False, engine_factory=partial(CrashingEngine, stage=stage)).fit()


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [1, 3])
def test_killed_zero_engine_run_resumes_exactly(stage, tmp_path):
    from minillm.parallel.launch import LaunchError

    def config(name):
        return load_config(None, [*TINY, "checkpoint_interval=4", f"out_dir={tmp_path / name}"])

    engine = partial(ZeroEngine, stage=stage)
    # The uninterrupted run and the crashed one share a launch; the resumed run starts afresh.
    calls = [
        (train_worker, (config("whole"), engine)),
        (crashing_worker, (config("killed"), stage, 7)),
    ]
    (whole, _), _ = launch(in_turn, 2, calls, echo=False)[0]
    resumed = launch(train_worker, 2, config("killed"), engine, echo=False)[0]
    assert len(whole) == 8 and resumed == whole  # bitwise: weights, AdamW slices, schedule, data
    with pytest.raises(LaunchError, match="saved by 2 ZeRO ranks; resume it with 2 processes"):
        launch(train_worker, 1, config("killed"), engine, echo=False)
