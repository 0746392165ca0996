"""Helpers that run inside the sandboxed worker, next to the student's code, for the checks that
need objects there: autograd through a student function, and processes started with `launch`.

A graded test calls `ex.run_helper(helper, *args)`; the helper gets the student's module (`ex`)
and must return plain data (tensors, numbers, lists), never a verdict: the student's code runs
in this process and could change anything computed here, so the trusted test computes every
reference itself and compares. Processes talk over gloo, on the CPU, even where there are GPUs:
the tensors of these tests live on the CPU.
"""

import importlib

import torch
import torch.distributed as dist
from torch import nn

from minillm.parallel.launch import launch


def call_and_backward(ex, name, *args):
    """`ex.name(*args)`, then backward from its (scalar) result: the result and the gradient of
    every argument that requires one."""
    result = getattr(ex, name)(*args)
    result.backward()
    return result.detach(), [
        a.grad for a in args if isinstance(a, torch.Tensor) and a.requires_grad
    ]


# -- chapter 07 --------------------------------------------------------------------------------


def ring_input(rank, n):
    return torch.arange(n, dtype=torch.float64) * 10**rank + rank


def _ring_rank(rank, world_size, package, lengths):
    from minillm.parallel import collectives

    calls = [0]

    def refuse(*args, **kwargs):
        calls[0] += 1
        raise AssertionError("ring_all_reduce must be built from isend/irecv")

    # Before the student's module is imported, so that no name it imports escapes.
    real = dist.all_reduce, collectives.ring_all_reduce
    dist.all_reduce = collectives.ring_all_reduce = refuse
    try:
        ex = importlib.import_module(f"{package}.ch07_data_parallel")
        results = [ex.ring_all_reduce(ring_input(rank, n)) for n in lengths]
    finally:
        dist.all_reduce, collectives.ring_all_reduce = real
    return results, calls[0]


def ring_all_reduce_on_ranks(ex, world_size, lengths):
    """Per rank: ring_all_reduce of `ring_input(rank, n)` for each n, and how often it called
    dist.all_reduce or minillm's own ring_all_reduce (both off limits)."""
    return launch(
        _ring_rank, world_size, ex.__name__.split(".")[0], lengths, backend="gloo", echo=False
    )


def _average_rank(rank, world_size, package):
    torch.manual_seed(0)
    model = nn.Linear(3, 2, dtype=torch.float64)
    model.weight.grad = torch.full_like(model.weight, rank + 1.0)  # rank 0: 1.0, rank 1: 2.0
    model.bias.grad = torch.tensor([rank * 4.0, -2.0], dtype=torch.float64)
    importlib.import_module(f"{package}.ch07_data_parallel").average_gradients(model)
    return model.weight.grad, model.bias.grad


def average_gradients_on_ranks(ex, world_size):
    """Per rank: the weight and bias gradients after average_gradients."""
    return launch(_average_rank, world_size, ex.__name__.split(".")[0], backend="gloo", echo=False)


def batches(rank, k):
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(4, 3, generator=g, dtype=torch.float64),) * 2 for _ in range(k)]


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _accumulate_rank(rank, world_size, package, k, steps):
    ex = importlib.import_module(f"{package}.ch07_data_parallel")
    model = small_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = [0]
    real = dist.all_reduce

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    dist.all_reduce = counted
    try:
        for _ in range(steps):
            ex.accumulate_and_step(model, optimizer, batches(rank, k), nn.functional.mse_loss)
    finally:
        dist.all_reduce = real
    return [p.detach() for p in model.parameters()], calls[0]


def accumulate_and_step_on_ranks(ex, world_size, k, steps):
    """Per rank: the parameters after `steps` calls of accumulate_and_step on `batches(rank,
    k)`, and how many all-reduces those calls made."""
    return launch(
        _accumulate_rank,
        world_size,
        ex.__name__.split(".")[0],
        k,
        steps,
        backend="gloo",
        echo=False,
    )


# -- chapter 09 --------------------------------------------------------------------------------


def zero1_problem(world_size, n, steps):
    """The start vector and, per step, one gradient per rank."""
    g = torch.Generator().manual_seed(0)
    start = torch.randn(n, generator=g, dtype=torch.float64)
    grads = [torch.randn(world_size, n, generator=g, dtype=torch.float64) for _ in range(steps)]
    return start, grads


def _zero1_rank(rank, world_size, package, n, steps):
    ex = importlib.import_module(f"{package}.ch09_zero")
    start, grads = zero1_problem(world_size, n, steps)
    param, state = start.clone(), {}
    for step_grads in grads:
        ex.zero1_adamw_step(param, step_grads[rank].clone(), state, lr=0.1, weight_decay=0.1)
    sizes = {k: v.numel() for k, v in state.items() if isinstance(v, torch.Tensor)}
    return param, sizes


def zero1_on_ranks(ex, world_size, n, steps):
    """Per rank: the parameters after `steps` ZeRO-1 steps, and the numel of each tensor the
    optimizer state holds."""
    return launch(
        _zero1_rank, world_size, ex.__name__.split(".")[0], n, steps, backend="gloo", echo=False
    )
