"""Graded tests for chapter 08 (tensor and pipeline parallelism): `minillm grade ch08`.

References are torch's `F.linear` on the unsplit layer (float64, atol 1e-12), the course's own
`minillm.parallel.layout.Layout` and `minillm.parallel.pipeline`, and hand-computed values.
"""

import pytest
import torch
import torch.nn.functional as F

from minillm.parallel.layout import Coords, Layout
from minillm.parallel.pipeline import schedule, split_layers

# What each exercise must not call: the library function it asks you to write (a call fails
# the test). A guard against the obvious shortcut; the stubs' docstrings name the same.
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
