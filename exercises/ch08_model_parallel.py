"""Chapter 08 exercises: the arithmetic of tensor and pipeline parallelism, from torch primitives.

Replace each `raise NotImplementedError` with your code; `minillm grade ch08` grades them (the
tests are in tests/exercises/test_ch08_model_parallel.py). Most of it runs in one process: a
"rank" is an index into a list, so you can check each idea without starting processes. Megatron's
f and g (`copy_to_tensor_region`, `reduce_from_tensor_region`) and the parallel layers built on
them run inside every rank of a real process group (the tests start 2 processes with
`minillm.parallel.launch.launch`). Do not import `minillm.parallel.tensor` or
`minillm.parallel.pipeline`: building these is the point.

Conventions as in the chapter: a linear layer is y = x W^T + b with W `(out, in)`; a pipeline
schedule is, for each stage, its ordered list of ("F", i) and ("B", i) for micro-batch i; ranks
lie on a (pipeline, data, tensor) grid with the tensor coordinate changing fastest.
"""

from __future__ import annotations

import torch  # noqa: F401  (the examples use it)
import torch.distributed as dist  # noqa: F401  (you will want it)
import torch.nn.functional as F  # noqa: F401
from torch import Tensor


def column_parallel_outputs(x: Tensor, weight: Tensor, bias: Tensor, parts: int) -> list[Tensor]:
    """What each of `parts` ranks computes in a column-parallel linear layer.

    Rank r keeps rows r*out/parts to (r+1)*out/parts of `weight` `(out, in)` and of `bias`
    `(out,)`, reads the whole input `x` `(..., in)` and returns its slice of the output,
    `(..., out/parts)`. Side by side (concatenated on the last axis) the slices are the full
    output x W^T + b.

    Example:
        >>> w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])  # out=4, in=2
        >>> column_parallel_outputs(torch.tensor([[1.0, 2.0]]), w, torch.zeros(4), 2)
        [tensor([[1., 2.]]), tensor([[3., 2.]])]

    Off limits: `minillm.parallel.tensor.shard`,
    `minillm.parallel.tensor.ColumnParallelLinear` (this exercise asks you to write it; a
    call fails the test).
    """
    raise NotImplementedError


def row_parallel_outputs(x: Tensor, weight: Tensor, bias: Tensor, parts: int) -> list[Tensor]:
    """What each of `parts` ranks computes in a row-parallel linear layer, before the all-reduce.

    Rank r keeps columns r*in/parts to (r+1)*in/parts of `weight` `(out, in)`, reads only the
    matching slice of `x` `(..., in)` and returns a partial output `(..., out)`. The partials
    summed (what the all-reduce does) are the full output x W^T + b, so the bias must be counted
    once: rank 0 adds it, the others do not.

    Example:
        >>> w = torch.tensor([[1.0, 1.0], [0.0, 2.0]])  # out=2, in=2
        >>> row_parallel_outputs(torch.tensor([[1.0, 3.0]]), w, torch.tensor([10.0, 0.0]), 2)
        [tensor([[11.,  0.]]), tensor([[3., 6.]])]

    Off limits: `minillm.parallel.tensor.shard`,
    `minillm.parallel.tensor.RowParallelLinear` (this exercise asks you to write it; a call
    fails the test).
    """
    raise NotImplementedError


def copy_to_tensor_region(x: Tensor) -> Tensor:
    """Megatron's f, at the entrance of a tensor-parallel block: the identity going forward, an
    all-reduce (sum over every rank of the default process group) of the gradient going back.

    Every rank's slice of the block read the same input `x`, so the gradient of `x` is the sum of
    what each rank's slice sends back; without the all-reduce each rank keeps only its own share.
    Write it as a `torch.autograd.Function` (`forward` returns `x` unchanged, e.g. `x.view_as(x)`;
    `backward` all-reduces a copy of the gradient with `dist.all_reduce`) and return `.apply(x)`.

    Example, 2 ranks: forward returns x on both; if backward brings gradient 1.0 on rank 0 and
    2.0 on rank 1, x.grad is 3.0 on both.

    Off limits: `minillm.parallel.tensor.CopyToTensorRegion` (this exercise asks you to write
    it; a call fails the test).
    """
    raise NotImplementedError


def reduce_from_tensor_region(x: Tensor) -> Tensor:
    """Megatron's g, at the exit of a row-parallel layer: an all-reduce (sum over every rank of the
    default process group) going forward, the identity going back.

    The ranks' partial outputs summed are the layer's output, and the sum passes its gradient
    unchanged to every partial, so backward must not communicate (an all-reduce there would count
    the gradient once per rank). Write it as a `torch.autograd.Function` (`forward` all-reduces a
    copy of `x`, never `x` itself in place; `backward` returns the gradient as it is) and return
    `.apply(x)`.

    Example, 2 ranks: rank 0 holds [1., 2.], rank 1 holds [10., 20.]: both get [11., 22.].

    Off limits: `minillm.parallel.tensor.ReduceFromTensorRegion` (this exercise asks you to write
    it; a call fails the test).
    """
    raise NotImplementedError


def column_parallel_linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """This rank's slice of a column-parallel linear layer: `f(x) W_r^T + b_r`, where `weight`
    `(out/t, in)` and `bias` `(out/t,)` are this rank's rows of the full layer's W and b, and `x`
    `(..., in)` is the whole input, the same on every rank. Returns `(..., out/t)`.

    `x` must pass through `copy_to_tensor_region` first, so that backward all-reduces the
    gradient of `x`: each rank's `x.grad` is then the full layer's, not its own share.

    Off limits: `minillm.parallel.tensor.ColumnParallelLinear` (a call fails the test).
    """
    raise NotImplementedError


def row_parallel_linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """A row-parallel linear layer on this rank: `g(x_r W_r^T) + b`, where `x` `(..., in/t)` is this
    rank's slice of the input features, `weight` `(out, in/t)` its columns of the full W and `bias`
    `(out,)` the whole bias. Returns the full output `(..., out)`, the same on every rank.

    The partial products are summed by `reduce_from_tensor_region`; the bias is added once, after
    the sum (added before it, it would be counted once per rank).

    Off limits: `minillm.parallel.tensor.RowParallelLinear` (a call fails the test).
    """
    raise NotImplementedError


def split_layers(n_layer: int, stages: int) -> list[tuple[int, int]]:
    """The layers each pipeline stage runs, as `(start, stop)` (stop excluded): contiguous, in
    order, covering all `n_layer` layers, sizes differing by at most one, the earlier stages
    taking the extra layers.

    Example:
        >>> split_layers(5, 3)
        [(0, 2), (2, 4), (4, 5)]

    Off limits: `minillm.parallel.pipeline.split_layers` (this exercise asks you to write it; a call
    fails the test).
    """
    raise NotImplementedError


def gpipe_schedule(stages: int, micro_batches: int) -> list[list[tuple[str, int]]]:
    """GPipe: every stage runs the forwards of micro-batches 0..m-1, then their backwards in the
    same order. One list per stage.

    Example:
        >>> gpipe_schedule(2, 2)
        [[('F', 0), ('F', 1), ('B', 0), ('B', 1)], [('F', 0), ('F', 1), ('B', 0), ('B', 1)]]

    Off limits: `minillm.parallel.pipeline.schedule` (this exercise asks you to write it; a call
    fails the test).
    """
    raise NotImplementedError


def one_f_one_b_schedule(stages: int, micro_batches: int) -> list[list[tuple[str, int]]]:
    """1F1B: stage s first runs min(p - 1 - s, m) warm-up forwards, then alternates one forward
    and one backward (oldest micro-batch first) while forwards remain, then runs the remaining
    backwards. The last stage starts backward right after its first forward.

    Example:
        >>> one_f_one_b_schedule(2, 3)
        [[('F', 0), ('F', 1), ('B', 0), ('F', 2), ('B', 1), ('B', 2)],
         [('F', 0), ('B', 0), ('F', 1), ('B', 1), ('F', 2), ('B', 2)]]

    Off limits: `minillm.parallel.pipeline.schedule` (this exercise asks you to write it; a call
    fails the test).
    """
    raise NotImplementedError


def bubble_fraction(stages: int, micro_batches: int) -> float:
    """The share of a pipeline step that each stage spends idle, when a forward and a backward
    take the same time on every stage: the pipe fills and drains over p - 1 slots out of the
    m + p - 1 that the step lasts.

    Example:
        >>> bubble_fraction(4, 12)  # 3 / 15
        0.2

    Off limits: `minillm.parallel.pipeline.bubble_fraction` (this exercise asks you to write it; a
    call fails the test).
    """
    raise NotImplementedError


def grid_coords(rank: int, tensor: int, pipeline: int, data: int) -> tuple[int, int, int]:
    """`(pipeline, data, tensor)` coordinates of `rank` on a grid of tensor x pipeline x data
    ranks, tensor changing fastest, then data, then pipeline.

    Example:
        >>> grid_coords(5, tensor=2, pipeline=2, data=2)  # 5 = (1 * 2 + 0) * 2 + 1
        (1, 0, 1)

    Off limits: `minillm.parallel.layout.Layout.coords` (this exercise asks you to write it; a call
    fails the test).
    """
    raise NotImplementedError


def group_ranks(rank: int, kind: str, tensor: int, pipeline: int, data: int) -> list[int]:
    """The ranks, in increasing order, that share every coordinate with `rank` except `kind`
    ("tensor", "pipeline" or "data"): the group `rank` all-reduces or sends within.

    Example:
        >>> group_ranks(5, "data", tensor=2, pipeline=2, data=2)
        [5, 7]

    Off limits: `minillm.parallel.layout.Layout.group_of` (this exercise asks you to write it; a
    call fails the test).
    """
    raise NotImplementedError


def communication_per_step(
    kind: str,
    *,
    size: int,
    n_params: int,
    n_layer: int,
    tokens: int,
    d_model: int,
    bytes_per_value: int = 2,
) -> float:
    """Bytes one rank sends in one training step for one kind of parallelism of `size` ranks.

    A ring all-reduce of N values sends 2 (size - 1) / size * N values from every rank.

    - "data": the gradients (`n_params` values) are all-reduced once per step.
    - "tensor": each of the `n_layer` layers all-reduces an activation of `tokens` x `d_model`
      values twice going forward (attention, MLP) and twice going back. `tokens` = the batch's
      tokens that this tensor group processes.
    - "pipeline": a middle stage sends its output activation (`tokens` x `d_model`) forward and
      the gradient of its input (the same size) back, point to point; `size` does not matter.

    Example:
        >>> communication_per_step("data", size=4, n_params=1000, n_layer=2, tokens=8,
        ...                        d_model=16, bytes_per_value=2)
        3000.0
    """
    raise NotImplementedError
