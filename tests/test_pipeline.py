"""Pipeline parallelism: schedules checked without processes, then GPipe and 1F1B run for real on
2 and 4 stages, with losses and gradients equal to the single-process GPT; DeepSpeed's pipeline
layers compose to the GPT (the DeepSpeed runs themselves are in tests/test_ds.py)."""

import pytest
import torch

from minillm.engines.pipeline import PipeBlock, pipeline_layers
from minillm.errors import InputError
from minillm.model import GPT, GPTConfig
from minillm.parallel.launch import launch
from minillm.parallel.layout import Layout
from minillm.parallel.pipeline import bubble_fraction, run_step, schedule, split_layers

EXACT = 1e-12  # float64: micro-batch sums differ from the whole batch only in rounding


def simulate(plans):
    """Finish time of every stage when F and B take one time unit each and each op starts as soon
    as its stage is free and its input has arrived (a deadlock raises)."""
    p = len(plans)
    done, clock, position = {}, [0] * p, [0] * p
    while any(position[s] < len(plans[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            if position[s] == len(plans[s]):
                continue
            op, i = plans[s][position[s]]
            needs = [("F", s - 1, i)] if op == "F" and s > 0 else []
            if op == "B":
                needs = [("F", s, i)] + ([("B", s + 1, i)] if s < p - 1 else [])
            if all(n in done for n in needs):
                clock[s] = max([clock[s]] + [done[n] for n in needs]) + 1
                done[(op, s, i)] = clock[s]
                position[s] += 1
                progressed = True
        assert progressed, "deadlock"
    return clock


@pytest.mark.parametrize("p,m", [(2, 4), (4, 4), (4, 8), (3, 2)])
def test_schedules_run_every_micro_batch_and_idle_by_the_bubble_formula(p, m):
    for kind in ("gpipe", "1f1b"):
        plans = schedule(kind, p, m)
        for plan in plans:
            assert sorted(plan) == sorted(
                [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
            )
            assert all(plan.index(("F", i)) < plan.index(("B", i)) for i in range(m))
        makespan = max(simulate(plans))
        assert makespan == 2 * (m + p - 1)
        assert 1 - 2 * m / makespan == pytest.approx(bubble_fraction(p, m))


def test_1f1b_warms_up_with_p_minus_1_minus_stage_forwards():
    plans = schedule("1f1b", 4, 6)
    assert [plan.index(("B", 0)) for plan in plans] == [4, 3, 2, 1]  # warm-up + one forward
    assert plans[3][:4] == [("F", 0), ("B", 0), ("F", 1), ("B", 1)]
    assert schedule("gpipe", 2, 2)[1] == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]


def test_layers_split_into_contiguous_stages_that_lose_none():
    assert split_layers(5, 3) == [range(0, 2), range(2, 4), range(4, 5)]
    assert [len(r) for r in split_layers(12, 5)] == [3, 3, 2, 2, 2]
    with pytest.raises(InputError, match="cannot fill 4 stages"):
        split_layers(3, 4)


def test_bad_splits_are_refused_before_launch():
    layout = Layout.for_world(4, pipeline=4)
    with pytest.raises(InputError, match="fewer than the 4 pipeline stages"):
        layout.check_model(n_head=4, n_layer=3)
    with pytest.raises(InputError, match="not divisible into 3 micro-batches"):
        layout.check_model(n_head=4, n_layer=4, batch_size=8, micro_batches=3)
    with pytest.raises(InputError, match="unknown pipeline schedule"):
        schedule("zigzag", 2, 2)


def _check_equal(results):
    for kind in ("gpipe", "1f1b"):
        for r in results:
            assert r[kind]["loss_diff"] < EXACT and r[kind]["grad_diff"] < EXACT


@pytest.mark.multiprocess
def test_two_stages_match_the_gpt_and_1f1b_holds_fewer_activations():
    config = dict(n_layer=3, n_head=4, n_embd=32, block_size=16, vocab_size=65)
    results = launch(run_step, 2, config, 8, 4, ("gpipe", "1f1b"), 0, torch.float64, echo=False)
    _check_equal(results)
    assert [r["gpipe"]["peak_micro_batches"] for r in results] == [4, 4]
    assert [r["1f1b"]["peak_micro_batches"] for r in results] == [2, 1]
    first = results[0]
    per_micro_batch = first["gpipe"]["peak_activation_bytes"] / 4
    assert first["1f1b"]["peak_activation_bytes"] == pytest.approx(2 * per_micro_batch)
    events = first["1f1b"]["events"]
    assert [e[:2] for e in events] == schedule("1f1b", 2, 4)[0]
    assert all(e[2] <= e[3] for e in events)


@pytest.mark.multiprocess
def test_four_stages_with_rotary_positions_and_an_uneven_split():
    config = dict(n_layer=5, n_head=4, n_embd=32, block_size=16, vocab_size=65, positions="rotary")
    Layout.for_world(4, pipeline=4).check_model(n_head=4, n_layer=5, batch_size=8, micro_batches=8)
    results = launch(run_step, 4, config, 8, 8, ("gpipe", "1f1b"), 0, torch.float64, echo=False)
    _check_equal(results)
    assert [r["1f1b"]["peak_micro_batches"] for r in results] == [4, 3, 2, 1]
    assert [r["gpipe"]["peak_micro_batches"] for r in results] == [8] * 4


@pytest.mark.parametrize("positions", ["learned", "rotary"])
@pytest.mark.parametrize("tie_weights", [True, False])
def test_deepspeed_pipeline_layers_compute_the_gpt_and_hold_its_parameters(positions, tie_weights):
    """Built and run one after another in one process, as the stages run them in turn."""
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=40,
        block_size=12,
        n_layer=3,
        n_head=4,
        n_embd=32,
        dropout=0.0,
        positions=positions,
        tie_weights=tie_weights,
    )
    gpt = GPT(config).double().eval()
    idx = torch.randint(0, 40, (2, 12))
    x, held = idx, {}
    specs = pipeline_layers(gpt)
    for spec in specs:
        layer = spec.build()
        forward_fn = getattr(spec, "forward_fn", None)
        x = forward_fn(layer, x) if forward_fn is not None else layer(x)
        held |= {id(p): p for p in layer.parameters()}
    torch.testing.assert_close(x, gpt(idx)[0], rtol=0, atol=0)
    assert held.keys() == {id(p) for p in gpt.parameters()}  # the GPT's own tensors, all of them
    assert [spec.typename for spec in specs].count(PipeBlock) == 3
