"""Graded tests for chapter 09 (ZeRO and DeepSpeed): `minillm grade ch09`.

The ZeRO-1, -2 and -3 steps run in two real processes: `launch` starts them inside the sandboxed
worker (tests/exercises/in_worker.py), and this process checks what they return.
References: hand-counted bytes (the ZeRO paper's 2 + 2 + 12 layout), torch.optim.AdamW on the
averaged gradient in float64 (atol 1e-12), and DeepSpeed's own config parser.
"""

import pytest
import torch

from minillm.engines import ds_config
from minillm.memory import STATE_PARTS
from minillm.train_config import OptimConfig, TrainConfig
from tests.exercises import in_worker

# What each exercise must not call: the library function it asks you to write (a call fails
# the test). A guard against the obvious shortcut; the stubs' docstrings name the same.
OFF_LIMITS = {
    "shard_range": ("minillm.parallel.zero.shard_range",),
    "bytes_per_rank": ("minillm.parallel.zero.zero_state_bytes",),
    "max_params": ("minillm.parallel.zero.zero_state_bytes",),
    "deepspeed_config": ("minillm.engines.ds_config.prepare_config",),
}


def adamw_reference(start, grads_per_step):
    """torch.optim.AdamW (lr 0.1, weight decay 0.1, as the rank helpers use) from `start`, one
    step per gradient: the parameters after each step."""
    reference = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.AdamW([reference], lr=0.1, weight_decay=0.1, foreach=False)
    after = []
    for grad in grads_per_step:
        reference.grad = grad
        optimizer.step()
        after.append(reference.detach().clone())
    return after


@pytest.mark.points(2)
def test_shard_range(impl):
    """Catches a missing padding (`numel // world_size`, which drops the last values, or a last
    shard of another size): every slice has ceil(n / N) values and together they cover n."""
    ex = impl("ch09_zero")
    assert [ex.shard_range(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 12)]
    for n, world in ((8, 2), (7, 3), (1, 4), (1000, 7)):
        ranges = [ex.shard_range(n, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] >= n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        assert {end - start for start, end in ranges} == {-(-n // world)}


@pytest.mark.points(3)
def test_bytes_per_rank(impl):
    """Catches sharding the parameters already at stage 2 (only stage 3 does), sharding the
    gradients at stage 1, and forgetting the fp32 master copy in mixed precision (4 bytes a
    parameter, sharded with the optimizer states). Hand-counted: P = 1000, N = 4."""
    ex = impl("ch09_zero")
    P, N = 1000, 4

    def parts(parameters, gradients, master_weights, optimizer_states):
        values = (parameters, gradients, master_weights, optimizer_states)
        return dict(zip(STATE_PARTS, values, strict=True))

    mixed = [ex.bytes_per_rank(P, s, N, "bf16") for s in range(4)]
    assert mixed[0] == parts(2 * P, 2 * P, 4 * P, 8 * P)
    assert mixed[1] == parts(2 * P, 2 * P, P, 2 * P)
    assert mixed[2] == parts(2 * P, P // 2, P, 2 * P)
    assert mixed[3] == parts(P // 2, P // 2, P, 2 * P)
    assert ex.bytes_per_rank(P, 2, N, "fp32") == parts(4 * P, P, 0, 2 * P)
    assert ex.bytes_per_rank(10, 3, 4, "fp16")["parameters"] == 2 * 3  # ceil(10 / 4) values


@pytest.mark.points(2)
def test_max_params(impl):
    """Catches counting only the weights (2 bytes, not 16, a parameter), dividing everything by
    N at every stage, and an off-by-one at the boundary: the answer must fit and one more
    parameter must not."""
    ex = impl("ch09_zero")
    assert ex.max_params(80e9, 0, 8) == 5_000_000_000
    assert ex.max_params(80e9, 3, 8) == 40_000_000_000
    for stage in range(4):
        n = ex.max_params(1e6, stage, 4, "bf16")
        assert sum(ex.bytes_per_rank(n, stage, 4, "bf16").values()) <= 1e6
        assert sum(ex.bytes_per_rank(n + 1, stage, 4, "bf16").values()) > 1e6
    assert ex.max_params(1e6, 1, 4, "fp32") == 100_000  # fp32 stage 1: 4 + 4 + 8 / 4 bytes


@pytest.mark.points(4)
@pytest.mark.multiprocess
def test_zero1_adamw_step(impl):
    """Two processes, 3 steps on a vector of 7 values (padded to 8): catches a summed instead of
    averaged gradient, a missing all-gather (each rank keeps only its own update), a slice
    without padding, bias correction or decoupled weight decay done differently from AdamW, and
    optimizer states kept for the whole vector instead of the rank's slice."""
    ex = impl("ch09_zero")
    world, n, steps = 2, 7, 3
    start, grads = in_worker.zero1_problem(world, n, steps)
    reference = adamw_reference(start, [g.mean(0) for g in grads])[-1]
    for param, sizes in ex.run_helper(in_worker.zero1_on_ranks, world, n, steps):
        assert param.shape == (n,)
        gap = (param - reference).abs().max().item()
        assert gap < 1e-12, f"parameters differ from AdamW on the averaged gradient by {gap:.3g}"
        assert sizes == {"exp_avg": 4, "exp_avg_sq": 4}


@pytest.mark.points(4)
@pytest.mark.multiprocess
def test_zero2_adamw_step(impl):
    """Two processes, 3 steps on a vector of 7 values (padded to 8): each rank must receive only
    the averaged gradient of its own slice (a reduce-scatter), step it and all-gather the
    parameters, which must equal one process's AdamW on the averaged gradient (atol 1e-12).
    Catches the ZeRO-1 shortcut (dist.all_reduce of the whole gradient: every rank then holds
    all of it), a summed instead of averaged gradient, the slice of the wrong rank, and a
    missing all-gather."""
    ex = impl("ch09_zero")
    world, n, steps = 2, 7, 3
    start, grads = in_worker.zero1_problem(world, n, steps)
    reference = adamw_reference(start, [g.mean(0) for g in grads])[-1]
    averaged = [torch.cat([g.mean(0), torch.zeros(1, dtype=g.dtype)]) for g in grads]  # padded
    ranks = ex.run_helper(in_worker.zero2_on_ranks, world, n, steps)
    assert len(ranks) == world
    for rank, (param, returned, sizes, all_reduces) in enumerate(ranks):
        assert all_reduces == 0, (
            f"rank {rank} called dist.all_reduce {all_reduces} times: ZeRO-2 reduce-scatters the "
            "gradients, so that no rank ever holds the whole averaged gradient"
        )
        for step, got in enumerate(returned):
            expected = averaged[step][4 * rank : 4 * rank + 4]
            assert isinstance(got, torch.Tensor) and got.shape == (4,), (
                f"rank {rank} returned a gradient of shape {tuple(got.shape)}, expected its "
                "slice of ceil(7 / 2) = 4 values"
            )
            gap = (got - expected).abs().max().item()
            assert gap < 1e-12, (
                f"rank {rank}, step {step}: gradient slice {got.tolist()} instead of the average "
                f"over the ranks of its slice, {expected.tolist()}"
            )
        gap = (param - reference).abs().max().item()
        assert gap < 1e-12, (
            f"rank {rank}: parameters differ from AdamW on the averaged gradient by {gap:.3g}"
        )
        assert sizes == {"exp_avg": 4, "exp_avg_sq": 4}, (
            f"optimizer state sizes {sizes}: each moment should hold the rank's 4 values"
        )


@pytest.mark.points(4)
@pytest.mark.multiprocess
def test_zero3_adamw_step(impl):
    """Two processes, 3 steps of a small regression on 7 parameters of which each rank holds 4
    (the last padded): the losses each rank reports and the shards it ends with must equal one
    process training on both ranks' data with AdamW (atol 1e-12). Catches a forward on the
    rank's own shard with the rest zero (no all-gather), an all-reduced full gradient, a summed
    instead of averaged gradient, and the shard not updated in place."""
    ex = impl("ch09_zero")
    world, n, steps = 2, 7, 3
    start, data = in_worker.zero3_problem(world, n)
    w = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.AdamW([w], lr=0.1, weight_decay=0.1, foreach=False)
    losses = []
    for _ in range(steps):
        per_rank = [in_worker.zero3_loss(w, x, y) for x, y in data]
        losses.append([loss.item() for loss in per_rank])
        optimizer.zero_grad()
        (sum(per_rank) / world).backward()  # the loss of both ranks' data together
        optimizer.step()
    ranks = ex.run_helper(in_worker.zero3_on_ranks, world, n, steps)
    assert len(ranks) == world
    for rank, (_, got_losses, sizes, all_reduces) in enumerate(ranks):
        assert all_reduces == 0, (
            f"rank {rank} called dist.all_reduce {all_reduces} times: ZeRO-3 reduce-scatters the "
            "gradient into each rank's slice"
        )
        expected = [step_losses[rank] for step_losses in losses]
        assert len(got_losses) == steps, f"rank {rank} returned {len(got_losses)} losses"
        assert abs(got_losses[0] - expected[0]) < 1e-12, (
            f"rank {rank}: first loss {got_losses[0]} instead of {expected[0]}, the loss of the "
            "whole parameter vector (all-gathered from the shards) on this rank's data"
        )
        drift = max(abs(a - b) for a, b in zip(got_losses, expected, strict=True))
        assert drift < 1e-12, (
            f"rank {rank}: losses {got_losses} instead of {expected}: the first matches, so the "
            f"update differs from AdamW on the gradient averaged over the ranks (by {drift:.3g} "
            "in loss): a summed gradient, another rank's slice, or the shard not updated in place?"
        )
        assert sizes == {"exp_avg": 4, "exp_avg_sq": 4}, (
            f"optimizer state sizes {sizes}: each moment should hold the rank's 4 values"
        )
    shards = [shard for shard, *_ in ranks]
    assert all(s.shape == (4,) for s in shards), [tuple(s.shape) for s in shards]
    gap = (torch.cat(shards)[:n] - w.detach()).abs().max().item()
    assert gap < 1e-12, (
        f"the ranks' shards put together differ from one process's AdamW by {gap:.3g} (was each "
        "shard updated in place, from the gradient averaged over the ranks?)"
    )


@pytest.mark.points(3)
def test_deepspeed_config(impl):
    """Catches batch sizes that do not multiply out, a missing `gradient_clipping` (DeepSpeed
    0.19 would silently clip at 1.0), fp16 (refused on a CPU), and a misspelt section such as
    `zero_optimisation` (DeepSpeed ignores it silently; `minillm.engines.ds_config.prepare_config`
    refuses it)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    ex = impl("ch09_zero")
    for world, micro, accum, stage in ((2, 4, 1, 2), (8, 2, 4, 3), (4, 3, 2, 1)):
        config = ex.deepspeed_config(
            world, micro, accum, stage, lr=3e-4, weight_decay=0.1, grad_clip=0.5
        )
        assert config["gradient_clipping"] == 0.5
        assert config["bf16"]["enabled"] is True and not config.get("fp16", {}).get("enabled")
        train = TrainConfig(
            batch_size=micro,
            grad_accum=accum,
            precision="bf16",
            optim=OptimConfig(learning_rate=3e-4, weight_decay=0.1, grad_clip=0.5),
        )
        checked = ds_config.prepare_config(config, train, world, "cpu")  # refuses unknown keys
        assert checked["train_batch_size"] == micro * accum * world
        assert checked["zero_optimization"]["stage"] == stage
        assert checked["optimizer"]["params"]["lr"] == 3e-4
        # DeepSpeed's own parser, in this one process: a world of 1.
        parsed = DeepSpeedConfig({**checked, "train_batch_size": micro * accum})
        assert parsed.zero_optimization_stage == stage and parsed.gradient_clipping == 0.5
