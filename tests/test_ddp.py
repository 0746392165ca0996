"""Data parallelism from scratch against torch's DistributedDataParallel and one process on the
global batch, in two real processes (gloo)."""

import pytest
import torch
from torch import nn

from minillm.errors import InputError
from minillm.model import GPT, GPTConfig
from minillm.parallel import ddp
from minillm.parallel.ddp import DataParallel, make_buckets, shard_batch
from minillm.parallel.launch import launch

CONFIG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)
CAP_MB = 0.02  # about 20 KB: the test GPT's 120 KB of gradients fill several buckets


def test_shards_are_contiguous_and_cover_the_batch():
    batch = torch.arange(12).view(6, 2)
    shards = [shard_batch(batch, r, 3) for r in range(3)]
    assert torch.equal(torch.cat(shards), batch) and shards[1].tolist() == [[4, 5], [6, 7]]
    with pytest.raises(InputError, match="a batch of 6 cannot be shared evenly by 4"):
        shard_batch(batch, 0, 4)


def test_buckets_keep_every_parameter_once_last_first_within_the_cap():
    params = [nn.Parameter(torch.zeros(n)) for n in (10, 300, 20, 30, 40)]  # 4 bytes each
    buckets = make_buckets(params, cap_bytes=240)
    assert [[p.numel() for p in b] for b in buckets] == [[40], [30, 20], [300], [10]]
    assert [id(p) for b in buckets for p in b] == [id(p) for p in reversed(params)]
    assert make_buckets(params, cap_bytes=1e9) == [list(reversed(params))]


def test_unknown_mode_and_bad_batch_are_refused_before_any_process_starts(monkeypatch):
    with pytest.raises(InputError, match="unknown data-parallel mode 'ring'"):
        DataParallel(nn.Linear(2, 2), mode="ring")

    def no_launch(*args, **kwargs):
        raise AssertionError("launched processes for a batch that cannot be shared")

    monkeypatch.setattr(ddp, "launch", no_launch)
    with pytest.raises(InputError, match="batch size 5 cannot be shared evenly by 2"):
        ddp.compare_with_torch_ddp(2, CONFIG, batch_size=5)


def _expected_calls() -> dict[str, int]:
    params = [p for p in GPT(CONFIG).parameters() if p.requires_grad]
    buckets = len(make_buckets(params, CAP_MB * 2**20))
    return {"naive": len(params), "bucketed": buckets, "overlapped": buckets}


@pytest.mark.multiprocess
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_every_mode_matches_torch_ddp_and_one_process_each_step(grad_accum):
    report = ddp.compare_with_torch_ddp(
        2, CONFIG, batch_size=8, grad_accum=grad_accum, steps=2, bucket_cap_mb=CAP_MB
    )
    expected = _expected_calls()
    assert 1 < expected["bucketed"] < expected["naive"]
    for mode in ddp.MODES:
        r = report[mode]
        # Two ranks: the same two addends and a division by 2 (exact), so bit-equal to torch.
        assert r["grad_vs_torch"] == 0.0 and r["weights_vs_torch"] == 0.0, mode
        # One process adds the batch up in another order: float32 rounding, then two AdamW steps.
        assert r["grad_vs_single"] < 1e-6 and r["weights_vs_single"] < 5e-6, mode
        # One message per gradient or bucket per step, none in accumulation micro-steps.
        assert r["calls_per_step"] == [expected[mode]] * 2, mode
    assert report["torch"]["calls_per_step"][0] >= 1


@pytest.mark.multiprocess
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_ddp_engine_matches_the_plain_engine_on_the_global_batch(grad_accum):
    from minillm.engines.ddp import engine_vs_plain_worker

    engine = launch(engine_vs_plain_worker, 2, CONFIG, 8, grad_accum, 2, echo=False)[0]
    assert engine["steps"] == 2
    assert engine["weights_vs_plain"] < 1e-6 and engine["grad_norm_vs_plain"] < 1e-5


@pytest.mark.multiprocess
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_trainer_with_the_ddp_engine_equals_the_single_process_trainer(optimizer, tmp_path):
    """The unchanged Trainer, driven by DDPEngine on 2 processes, logs the losses of one process
    training on both ranks' rows (batch 2 x 4 = 8), to float32 rounding; with Muon too, which
    every rank runs on the whole averaged gradient of every matrix."""
    from functools import partial

    from minillm.engines import DDPEngine
    from minillm.train import Trainer, read_metrics, train_worker
    from minillm.train_config import load_config

    overrides = [
        "model.n_layer=1",
        "model.n_head=2",
        "model.n_embd=32",
        "model.block_size=16",
        "max_iters=6",
        "eval_interval=6",
        "eval_iters=1",
        "checkpoint_interval=6",
        "sample_tokens=0",
        "optim.warmup_iters=2",
        f"optim.optimizer={optimizer}",
    ]
    ddp = load_config(None, [*overrides, "batch_size=4", f"out_dir={tmp_path / 'ddp'}"])
    engine = partial(DDPEngine, mode="overlapped")
    losses = launch(train_worker, 2, ddp, engine, echo=False)[0]
    single = load_config(None, [*overrides, "batch_size=8", f"out_dir={tmp_path / 'single'}"])
    Trainer(single, progress=False).fit()
    expected = [row["loss"] for row in read_metrics(single.out_dir)[0]]
    assert losses == pytest.approx(expected, abs=1e-5)


class MixedModel(nn.Module):
    """float64 and float32 layers, an embedding tied to the output layer, and a trainable
    parameter the forward never uses."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6, dtype=torch.float64)
        self.a = nn.Linear(6, 8, dtype=torch.float64)
        self.b = nn.Linear(8, 6)  # float32
        self.unused = nn.Parameter(torch.ones(3, 3))

    def forward(self, idx, targets):
        h = torch.tanh(self.a(self.emb(idx)))
        logits = nn.functional.linear(self.b(h.float()).double(), self.emb.weight)  # tied
        return nn.functional.cross_entropy(logits, targets)


def test_buckets_hold_one_dtype_each():
    params = [nn.Parameter(torch.zeros(4, dtype=d)) for d in (torch.float32, torch.float64) * 3]
    buckets = make_buckets(params, cap_bytes=1e9)
    assert [[p.dtype for p in b] for b in buckets] == [[torch.float64] * 3, [torch.float32] * 3]


def mixed_worker(rank: int, world_size: int, mode: str, steps: int) -> dict:
    """`mode` on 2 ranks against one process on the global batch: the largest gradient and
    weight differences per dtype, and what became of the unused parameter."""
    import copy

    torch.manual_seed(0)
    base = MixedModel()
    g = torch.Generator().manual_seed(3)
    batches = [
        (torch.randint(0, 10, (8,), generator=g), torch.randint(0, 10, (8,), generator=g))
        for _ in range(steps)
    ]
    single, ours = copy.deepcopy(base), copy.deepcopy(base)
    wrapped = DataParallel(ours, mode, bucket_cap_mb=100 / 2**20)  # 100-byte buckets: several
    opt_single = torch.optim.AdamW(single.parameters(), lr=1e-2, weight_decay=0.5)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-2, weight_decay=0.5)
    grad_diff = 0.0
    for x, y in batches:
        single(x, y).backward()
        wrapped(shard_batch(x, rank, world_size), shard_batch(y, rank, world_size)).backward()
        wrapped.sync_gradients()
        unused_grad = ours.unused.grad
        for p, q in zip(single.parameters(), ours.parameters(), strict=True):
            if p.grad is not None:
                assert q.grad.dtype == p.dtype
                grad_diff = max(grad_diff, (p.grad - q.grad).abs().max().item())
        for optimizer in (opt_single, opt_ours):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {
        "buckets": len(wrapped.buckets),
        "grad_diff": grad_diff,
        "weight_diff": max(
            (p - q).abs().max().item()
            for p, q in zip(single.parameters(), ours.parameters(), strict=True)
        ),
        "unused_grad": unused_grad,
        "unused": ours.unused.detach().clone(),
    }


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ddp.MODES)
def test_mixed_dtypes_tied_and_unused_parameters_train_as_one_process(mode):
    for report in launch(mixed_worker, 2, mode, 3, echo=False):
        assert report["buckets"] >= 3
        # The float32 layer rounds at 1e-7; the float64 ones carry it on.
        assert report["grad_diff"] < 1e-6 and report["weight_diff"] < 1e-6, report
        assert report["unused_grad"] is None  # as in one process: no gradient, so no decay
        assert torch.equal(report["unused"], torch.ones(3, 3))
