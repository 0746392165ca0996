"""Graded tests for chapter 08 (tensor and pipeline parallelism): `minillm grade ch08`.

References are torch's `F.linear` on the unsplit layer (float64, atol 1e-12), the course's own
`minillm.parallel.layout.Layout` and `minillm.parallel.pipeline`, and hand-computed values.
Megatron's f and g and the parallel layers built on them run in 2 real processes (`launch`
inside the sandboxed worker, tests/exercises/in_worker.py); this process computes the unsplit
layer's output and gradients with autograd and compares every rank's with them.
"""

import pytest
import torch
import torch.nn.functional as F

from minillm.parallel.layout import Coords, Layout
from minillm.parallel.pipeline import schedule, split_layers
from tests.exercises import in_worker

# What each exercise must not call: the library function it asks you to write (a call fails
# the test). A guard against the obvious shortcut; the stubs' docstrings name the same. f, g and
# the parallel layers run in launched processes, where in_worker refuses minillm's versions.
OFF_LIMITS = {
    "column_parallel_outputs": (
        "minillm.parallel.tensor.shard",
        "minillm.parallel.tensor.ColumnParallelLinear.__init__",
    ),
    "row_parallel_outputs": (
        "minillm.parallel.tensor.shard",
        "minillm.parallel.tensor.RowParallelLinear.__init__",
    ),
    "split_layers": ("minillm.parallel.pipeline.split_layers",),
    "gpipe_schedule": ("minillm.parallel.pipeline.schedule",),
    "one_f_one_b_schedule": ("minillm.parallel.pipeline.schedule",),
    "bubble_fraction": ("minillm.parallel.pipeline.bubble_fraction",),
    "grid_coords": ("minillm.parallel.layout.Layout.coords",),
    "group_ranks": ("minillm.parallel.layout.Layout.group_of",),
}

F64 = {"atol": 1e-12, "rtol": 0.0}


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.points(2)
def test_column_parallel_slices_concatenate_into_the_full_output(impl):
    """Catches a column-parallel layer that splits W's input columns instead of its output rows
    (column and row split confused), or drops the bias slice."""
    ex = impl("ch08_model_parallel")
    x, w, b = randn(3, 5, 8), randn(12, 8, seed=1), randn(12, seed=2)
    parts = ex.column_parallel_outputs(x, w, b, 4)
    assert len(parts) == 4 and all(p.shape == (3, 5, 3) for p in parts)
    torch.testing.assert_close(torch.cat(parts, dim=-1), F.linear(x, w, b), **F64)


@pytest.mark.points(2)
def test_row_parallel_partials_sum_to_the_full_output_with_the_bias_once(impl):
    """Catches the bias added on every rank (the sum then holds it `parts` times), and a row split
    that slices W's rows instead of its input columns."""
    ex = impl("ch08_model_parallel")
    x, w, b = randn(2, 4, 8), randn(6, 8, seed=1), randn(6, seed=2)
    parts = ex.row_parallel_outputs(x, w, b, 2)
    assert len(parts) == 2 and all(p.shape == (2, 4, 6) for p in parts)
    torch.testing.assert_close(sum(parts), F.linear(x, w, b), **F64)
    # Each partial is the product of one input slice alone.
    torch.testing.assert_close(parts[1], x[..., 4:] @ w[:, 4:].T, **F64)


@pytest.mark.points(1)
def test_layers_are_split_contiguously_without_losing_one(impl):
    """Catches an uneven split that loses the remainder (n_layer // stages layers each) or gives
    the extra layers to the last stage."""
    ex = impl("ch08_model_parallel")
    assert ex.split_layers(5, 3) == [(0, 2), (2, 4), (4, 5)]
    for n_layer, stages in [(12, 5), (24, 8), (70, 12), (3, 3)]:
        expected = [(r.start, r.stop) for r in split_layers(n_layer, stages)]
        assert ex.split_layers(n_layer, stages) == expected


@pytest.mark.points(1)
def test_gpipe_runs_all_forwards_then_all_backwards(impl):
    """Catches a GPipe schedule that interleaves forwards and backwards, or reverses the
    backwards on some stages only."""
    ex = impl("ch08_model_parallel")
    assert ex.gpipe_schedule(3, 4) == schedule("gpipe", 3, 4)


@pytest.mark.points(2)
def test_1f1b_warms_up_by_stage_then_alternates(impl):
    """Catches a wrong warm-up count (p instead of p - 1 - stage forwards, or the same count on
    every stage), and a cool-down that skips or repeats a backward."""
    ex = impl("ch08_model_parallel")
    assert ex.one_f_one_b_schedule(2, 3) == [
        [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("B", 2)],
        [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2)],
    ]
    for p, m in [(4, 8), (4, 2), (3, 3)]:
        assert ex.one_f_one_b_schedule(p, m) == schedule("1f1b", p, m)


@pytest.mark.points(1)
def test_bubble_fraction(impl):
    """Catches the formula with m and p swapped, (m-1)/(m+p-1), and (p-1)/m (the bubble's share
    of the useful time, not of the step)."""
    ex = impl("ch08_model_parallel")
    assert ex.bubble_fraction(4, 12) == pytest.approx(0.2, abs=1e-12)
    assert ex.bubble_fraction(2, 8) == pytest.approx(1 / 9, abs=1e-12)
    assert ex.bubble_fraction(12, 4) == pytest.approx(11 / 15, abs=1e-12)
    assert ex.bubble_fraction(1, 5) == 0


@pytest.mark.points(2)
def test_grid_coordinates_and_groups_match_the_layout(impl):
    """Catches a grid with the pipeline coordinate fastest instead of the tensor one (tensor
    groups would then span machines), and groups that vary the wrong coordinate."""
    ex = impl("ch08_model_parallel")
    for t, p, d in [(2, 2, 2), (4, 3, 2), (1, 2, 3)]:
        layout = Layout(tensor=t, pipeline=p, data=d)
        for rank in range(layout.world_size):
            c = layout.coords(rank)
            got = ex.grid_coords(rank, tensor=t, pipeline=p, data=d)
            assert Coords(*got) == c
            for kind in ("tensor", "data", "pipeline"):
                assert ex.group_ranks(rank, kind, tensor=t, pipeline=p, data=d) == sorted(
                    layout.group_of(rank, kind)
                )


@pytest.mark.points(2)
def test_communication_per_step_for_each_parallelism(impl):
    """Catches a ring all-reduce counted as N instead of 2 (n-1)/n N, tensor parallelism counted
    forward only (2 instead of 4 all-reduces per layer), and pipeline sends without the gradient
    going back."""
    ex = impl("ch08_model_parallel")
    sizes = dict(n_params=10**6, n_layer=24, tokens=2048, d_model=1024, bytes_per_value=2)
    assert ex.communication_per_step("data", size=8, **sizes) == pytest.approx(2 * 7 / 8 * 1e6 * 2)
    assert ex.communication_per_step("tensor", size=4, **sizes) == pytest.approx(
        24 * 4 * 2 * 3 / 4 * 2048 * 1024 * 2
    )
    assert ex.communication_per_step("pipeline", size=12, **sizes) == pytest.approx(
        2 * 2048 * 1024 * 2
    )
    assert ex.communication_per_step("data", size=1, **sizes) == 0


# -- Megatron's f and g, in real processes ------------------------------------------------------


def unsplit_layer(layer):
    """The unsplit layer's output and the gradients of its input and parameters, by autograd in
    this process: the reference for every rank."""
    p = in_worker.megatron_problem()
    leaves = {k: p[k].clone().requires_grad_() for k in ("x", "hidden", "w1", "b1", "w2", "b2")}
    x, hidden = leaves["x"], leaves["hidden"]
    up = F.linear(x, leaves["w1"], leaves["b1"])
    if layer == "column":
        up.backward(p["up_grad"])
        return up.detach(), {"x": x.grad, "weight": leaves["w1"].grad, "bias": leaves["b1"].grad}
    if layer == "row":
        out = F.linear(hidden, leaves["w2"], leaves["b2"])
        out.backward(p["down_grad"])
        return out.detach(), {
            "x": hidden.grad,
            "weight": leaves["w2"].grad,
            "bias": leaves["b2"].grad,
        }
    out = F.linear(F.gelu(up), leaves["w2"], leaves["b2"])
    out.backward(p["down_grad"])
    return out.detach(), {k: leaves[k].grad for k in ("x", "w1", "b1", "w2", "b2")}


def check_ranks(ranks, expected_out, expected_grads, shard_of, hints):
    """Compare each rank's output and gradients with the unsplit layer's: `shard_of(name, full,
    rank)` is the part of a full tensor that the rank holds; `hints` names the typical mistake
    behind a wrong value of each name ("out" included)."""
    assert len(ranks) == 2, f"{len(ranks)} ranks answered instead of 2"
    for rank, (out, grads, minillm_calls) in enumerate(ranks):
        assert minillm_calls == 0, (
            "build f, g and the parallel layers from torch.autograd.Function and dist.all_reduce, "
            "not minillm.parallel.tensor's"
        )
        want = shard_of("out", expected_out, rank)
        assert isinstance(out, torch.Tensor) and out.shape == want.shape, (
            f"rank {rank}: output of shape {getattr(out, 'shape', out)} instead of "
            f"{tuple(want.shape)}"
        )
        gap = (out - want).abs().max().item()
        assert gap < F64["atol"], f"rank {rank}: output off by {gap:.3g}; {hints['out']}"
        for name, full in expected_grads.items():
            want, got = shard_of(name, full, rank), grads.get(name)
            assert isinstance(got, torch.Tensor), (
                f"rank {rank}: no gradient reached {name} (got {got!r}); is the autograd graph "
                "cut (detach, .data, torch.no_grad)?"
            )
            ratio = (got.flatten() @ want.flatten() / (want.flatten() @ want.flatten())).item()
            gap = (got - want).abs().max().item()
            assert gap < F64["atol"], (
                f"rank {rank}: the gradient of {name} is off by {gap:.3g} (it is {ratio:.2f} "
                f"times the unsplit layer's, projected); {hints[name]}"
            )


PARTIAL_X = (
    "each rank's x.grad must be the whole gradient, the sum of every rank's share: f's backward "
    "must all-reduce it (without it a rank keeps only its slice's contribution)"
)


@pytest.mark.points(3)
@pytest.mark.multiprocess
@pytest.mark.timeout(120)  # 2 processes start and import torch: slow on a busy machine
def test_column_parallel_layer_all_reduces_the_input_gradient(impl):
    """Two processes, each holding half of a layer's output rows: each rank's output must be its
    slice of the unsplit layer's, and each rank's x.grad the unsplit layer's whole x.grad.
    Catches f without the all-reduce in backward (each rank's x.grad is only its own share,
    about half of the right one), f that all-reduces going forward too (outputs doubled), and
    a column split taken along the wrong axis."""
    ex = impl("ch08_model_parallel")
    out, grads = unsplit_layer("column")
    ranks = ex.run_helper(in_worker.megatron_layer_on_ranks, 2, "column")

    def shard_of(name, full, rank):
        return full if name == "x" else full.chunk(2, dim=-1 if name == "out" else 0)[rank]

    hints = {
        "out": "f must be the identity going forward; the weight is this rank's rows",
        "x": PARTIAL_X,
        "weight": "this rank's weight rows see the whole input and their own output slice",
        "bias": "this rank's bias slice gets its output slice's gradient",
    }
    check_ranks(ranks, out, grads, shard_of, hints)


@pytest.mark.points(3)
@pytest.mark.multiprocess
@pytest.mark.timeout(120)  # 2 processes start and import torch: slow on a busy machine
def test_row_parallel_layer_all_reduces_the_output(impl):
    """Two processes, each holding half of a layer's input columns and reading half of the input
    features: each rank's output must be the whole unsplit output, and its gradients its slice of
    the unsplit layer's. Catches g without the all-reduce going forward (a partial output), the
    bias added before the sum (counted twice), and g that all-reduces going back too (every
    gradient doubled)."""
    ex = impl("ch08_model_parallel")
    out, grads = unsplit_layer("row")
    ranks = ex.run_helper(in_worker.megatron_layer_on_ranks, 2, "row")

    def shard_of(name, full, rank):
        return full if name in ("out", "bias") else full.chunk(2, dim=-1)[rank]

    doubled = "g must pass the gradient back unchanged (an all-reduce in backward doubles it)"
    hints = {
        "out": "g must all-reduce (sum) the partial outputs, and the bias is added once, after",
        "x": doubled,
        "weight": doubled,
        "bias": "the bias is added once, after g, and gets the output's gradient",
    }
    check_ranks(ranks, out, grads, shard_of, hints)


@pytest.mark.points(2)
@pytest.mark.multiprocess
@pytest.mark.timeout(120)  # 2 processes start and import torch: slow on a busy machine
def test_megatron_mlp_matches_the_unsplit_mlp(impl):
    """Two processes run column-parallel up, GELU on each rank's hidden slice, row-parallel down:
    the output must be the unsplit MLP's on both ranks, x.grad the whole unsplit x.grad and every
    parameter gradient its slice of the unsplit one. Catches the f/g pair swapped or missing in
    one direction, which the single layers may hide when both mistakes cancel out."""
    ex = impl("ch08_model_parallel")
    out, grads = unsplit_layer("mlp")
    ranks = ex.run_helper(in_worker.megatron_layer_on_ranks, 2, "mlp")

    def shard_of(name, full, rank):
        if name in ("out", "x", "b2"):
            return full
        return full.chunk(2, dim=1 if name == "w2" else 0)[rank]

    hints = {
        "out": "f is the identity and g the sum going forward",
        "x": PARTIAL_X,
        "w1": "the gradient reaching the hidden slice must not be all-reduced by g's backward",
        "b1": "the gradient reaching the hidden slice must not be all-reduced by g's backward",
        "w2": "g must pass the gradient back unchanged",
        "b2": "the bias is added once, after g",
    }
    check_ranks(ranks, out, grads, shard_of, hints)
