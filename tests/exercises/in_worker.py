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

from minillm.model import GPT, GPTConfig
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


OVERLAP_CAP_BYTES = 160  # small_net's four float64 tensors (120, 40, 120, 24 bytes): 2 buckets


def _overlap_rank(rank, world_size, package, steps):
    from minillm.parallel import ddp

    phase, calls, refused = ["backward"], [], [0]
    real = dist.all_reduce, ddp.DataParallel, nn.parallel.DistributedDataParallel

    def recorded(*args, **kwargs):
        calls.append((phase[0], bool(kwargs.get("async_op", False))))
        return real[0](*args, **kwargs)

    class Refused:
        def __init__(self, *args, **kwargs):
            refused[0] += 1
            raise AssertionError("build the buckets and hooks yourself, not a DDP class")

    # Before the student's module is imported, so that no name it imports escapes.
    dist.all_reduce = recorded
    ddp.DataParallel = nn.parallel.DistributedDataParallel = Refused
    try:
        ex = importlib.import_module(f"{package}.ch07_data_parallel")
        model = small_net()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        wait = ex.overlap_gradient_buckets(model, OVERLAP_CAP_BYTES)
        grads = []
        for x, y in batches(rank, steps):
            phase[0] = "backward"
            nn.functional.mse_loss(model(x), y).backward()
            phase[0] = "wait"
            wait()
            grads.append([p.grad.clone() for p in model.parameters()])
            optimizer.step()
            optimizer.zero_grad()
    finally:
        dist.all_reduce, ddp.DataParallel, nn.parallel.DistributedDataParallel = real
    return grads, calls, refused[0]


def overlap_gradient_buckets_on_ranks(ex, world_size, steps):
    """Per rank: the gradients after each of `steps` backward + wait() (an SGD step between, on
    `batches(rank, steps)`), every dist.all_reduce call as ("backward" or "wait", async_op), and
    how often a DDP class of minillm's or torch's was built (off limits)."""
    return launch(
        _overlap_rank, world_size, ex.__name__.split(".")[0], steps, backend="gloo", echo=False
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


# -- chapter 08 --------------------------------------------------------------------------------


def megatron_problem():
    """A two-layer MLP's weights, its input and the gradient that arrives at its output, float64:
    x `(3, 4, 8)`, up W1 `(12, 8)` b1 `(12,)`, a hidden input for the down layer `(3, 4, 12)`,
    down W2 `(6, 12)` b2 `(6,)`, and the gradients that reach the up layer's output `(3, 4, 12)`
    and the down layer's `(3, 4, 6)`."""
    g = torch.Generator().manual_seed(8)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return {
        "x": randn(3, 4, 8),
        "hidden": randn(3, 4, 12),
        "w1": randn(12, 8),
        "b1": randn(12),
        "w2": randn(6, 12),
        "b2": randn(6),
        "up_grad": randn(3, 4, 12),
        "down_grad": randn(3, 4, 6),
    }


def _leaf(t):
    return t.clone().requires_grad_()


def _megatron_rank(rank, world_size, package, layer):
    from minillm.parallel import tensor

    calls = [0]

    def refuse(*args, **kwargs):
        calls[0] += 1
        raise AssertionError("build f, g and the parallel layers yourself, not minillm's")

    class Refused:
        apply = staticmethod(refuse)

        def __init__(self, *args, **kwargs):
            refuse()

    names = ("CopyToTensorRegion", "ReduceFromTensorRegion", "ColumnParallelLinear")
    names += ("RowParallelLinear", "_all_reduce")
    real = {name: getattr(tensor, name) for name in names}
    # Before the student's module is imported, so that no name it imports escapes.
    for name in names:
        setattr(tensor, name, Refused)
    try:
        ex = importlib.import_module(f"{package}.ch08_model_parallel")
        p = megatron_problem()
        w1 = _leaf(p["w1"].chunk(world_size, dim=0)[rank])
        b1 = _leaf(p["b1"].chunk(world_size)[rank])
        w2 = _leaf(p["w2"].chunk(world_size, dim=1)[rank])
        b2 = _leaf(p["b2"])
        if layer == "column":
            x = _leaf(p["x"])
            out = ex.column_parallel_linear(x, w1, b1)
            leaves = {"x": x, "weight": w1, "bias": b1}
            out_grad = p["up_grad"].chunk(world_size, dim=-1)[rank]
        elif layer == "row":
            x = _leaf(p["hidden"].chunk(world_size, dim=-1)[rank])  # this rank's features
            out = ex.row_parallel_linear(x, w2, b2)
            leaves = {"x": x, "weight": w2, "bias": b2}
            out_grad = p["down_grad"]
        else:  # the whole MLP: f, column-parallel up, GELU on the slice, row-parallel down, g
            x = _leaf(p["x"])
            hidden = torch.nn.functional.gelu(ex.column_parallel_linear(x, w1, b1))
            out = ex.row_parallel_linear(hidden, w2, b2)
            leaves = {"x": x, "w1": w1, "b1": b1, "w2": w2, "b2": b2}
            out_grad = p["down_grad"]
        out.backward(out_grad)
        grads = {name: t.grad for name, t in leaves.items()}
    finally:
        for name, value in real.items():
            setattr(tensor, name, value)
    return out.detach(), grads, calls[0]


def megatron_layer_on_ranks(ex, world_size, layer):
    """Per rank: the output of the student's `layer` ("column", "row" or "mlp") on this rank's
    shard of `megatron_problem()`, the gradients of its input and parameters after backward from
    the problem's output gradient, and how often it called minillm's f, g or parallel layers."""
    return launch(
        _megatron_rank, world_size, ex.__name__.split(".")[0], layer, backend="gloo", echo=False
    )


def _watched_collectives(package, topic):
    """Import `package.topic` with dist.all_reduce counted and minillm's `Zero` refused; the
    counts (a dict) fill in while the caller runs, the real all-reduce still does its work."""
    from minillm.parallel import zero

    calls = {"all_reduce": 0}
    real = dist.all_reduce

    def counted(*args, **kwargs):
        calls["all_reduce"] += 1
        return real(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("this exercise must be built from collectives, not minillm's Zero")

    dist.all_reduce, zero.Zero = counted, refuse  # before the import: no name escapes
    return importlib.import_module(f"{package}.{topic}"), calls


def _zero2_rank(rank, world_size, package, n, steps):
    ex, calls = _watched_collectives(package, "ch09_zero")
    start, grads = zero1_problem(world_size, n, steps)
    param, state, returned = start.clone(), {}, []
    for step_grads in grads:
        returned.append(
            ex.zero2_adamw_step(param, step_grads[rank].clone(), state, lr=0.1, weight_decay=0.1)
        )
    sizes = {k: v.numel() for k, v in state.items() if isinstance(v, torch.Tensor)}
    return param, returned, sizes, calls["all_reduce"]


def zero2_on_ranks(ex, world_size, n, steps):
    """Per rank: the parameters after `steps` ZeRO-2 steps on `zero1_problem`, the gradient
    slice each step returned, the numel of each tensor of the optimizer state, and how many
    times dist.all_reduce was called."""
    return launch(
        _zero2_rank, world_size, ex.__name__.split(".")[0], n, steps, backend="gloo", echo=False
    )


def zero3_problem(world_size, n):
    """The start vector and each rank's regression data (inputs `(4, n)`, targets `(4,)`)."""
    g = torch.Generator().manual_seed(3)
    start = torch.randn(n, generator=g, dtype=torch.float64)
    data = []
    for _ in range(world_size):
        x = torch.randn(4, n, generator=g, dtype=torch.float64)
        data.append((x, torch.randn(4, generator=g, dtype=torch.float64)))
    return start, data


def zero3_loss(w, x, y):
    """One rank's loss: a small non-linear regression, so the gradient depends on w."""
    return (torch.tanh(x @ w) - y).square().mean()


def _zero3_rank(rank, world_size, package, n, steps):
    from minillm.parallel.zero import shard_range

    ex, calls = _watched_collectives(package, "ch09_zero")
    start, data = zero3_problem(world_size, n)
    lo, hi = shard_range(n, rank, world_size)
    padded = torch.zeros((hi - lo) * world_size, dtype=torch.float64)
    padded[:n] = start
    shard, state, losses = padded[lo:hi].clone(), {}, []
    x, y = data[rank]
    for _ in range(steps):
        losses.append(
            ex.zero3_adamw_step(
                shard, n, lambda w: zero3_loss(w, x, y), state, lr=0.1, weight_decay=0.1
            )
        )
    sizes = {k: v.numel() for k, v in state.items() if isinstance(v, torch.Tensor)}
    return shard, losses, sizes, calls["all_reduce"]


def zero3_on_ranks(ex, world_size, n, steps):
    """Per rank: its parameter shard after `steps` ZeRO-3 steps on `zero3_problem`, the loss
    each step returned, the numel of each tensor of the optimizer state, and how many times
    dist.all_reduce was called."""
    return launch(
        _zero3_rank, world_size, ex.__name__.split(".")[0], n, steps, backend="gloo", echo=False
    )


# -- chapter 10 --------------------------------------------------------------------------------


def sum_and_backward(ex, name, *args):
    """`ex.name(*args)`, then backward from the sum of its result: the result and the gradient
    of every argument that requires one."""
    result = getattr(ex, name)(*args)
    result.sum().backward()
    return result.detach(), [
        a.grad for a in args if isinstance(a, torch.Tensor) and a.requires_grad
    ]


# -- chapters 05 and 06 -------------------------------------------------------------------------


def _randint(high, *shape, seed=0):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


# -- chapter 05 --------------------------------------------------------------------------------


def evaluate_in_worker(ex, model, batches, training):
    """In the worker: `ex.evaluate` on `model` (put in train mode `training` first), recording
    at every forward call whether gradients were enabled and whether any module was in train
    mode; and the model's mode afterwards."""
    calls = []

    def record(module, args):
        calls.append((torch.is_grad_enabled(), any(m.training for m in module.modules())))

    model.train(training)
    model.register_forward_pre_hook(record)
    loss = ex.evaluate(model, batches)
    return loss, calls, model.training


def resume_problem():
    """A small GPT, its AdamW, and 10 fixed batches: one per step."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2, betas=(0.9, 0.95), weight_decay=0.1)
    batches = [(_randint(11, 4, 8, seed=s), _randint(11, 4, 8, seed=100 + s)) for s in range(10)]
    return model, optimizer, batches


def train_on(model, optimizer, batches):
    for x, y in batches:
        model(x, y)[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def resume_in_worker(ex, stop):
    """In the worker: train `stop` steps, save with ex.save_checkpoint, build a fresh model and
    optimizer (other initial weights, as a new process would), load with ex.load_checkpoint and
    train the remaining steps from the step it returns. The final weights and that step."""
    model, optimizer, batches = resume_problem()
    train_on(model, optimizer, batches[:stop])
    ex.save_checkpoint("checkpoint.pt", model, optimizer, stop)
    torch.manual_seed(1)  # a fresh start: other initial weights than the interrupted run's
    fresh = GPT(model.config)
    fresh_optimizer = torch.optim.AdamW(
        fresh.parameters(), lr=3e-2, betas=(0.9, 0.95), weight_decay=0.1
    )
    step = ex.load_checkpoint("checkpoint.pt", fresh, fresh_optimizer)
    train_on(fresh, fresh_optimizer, batches[step:] if isinstance(step, int) else [])
    return step, {k: v.detach().clone() for k, v in fresh.state_dict().items()}


# -- chapter 06 --------------------------------------------------------------------------------


def checkpoint_blocks():
    """Three course blocks with dropout, in train mode, and an input that requires a gradient."""
    from minillm.model import Block

    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(Block(32, 4, dropout=0.1) for _ in range(3)).double()
    x = torch.randn(2, 16, 32, dtype=torch.float64, requires_grad=True)
    return blocks, x


def saved_bytes(forward):
    """Bytes of the distinct storages autograd saves while `forward()` runs, parameters left out,
    and forward's result."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return storages, out


def checkpointed_in_worker(ex):
    """In the worker: ex.checkpointed_forward on `checkpoint_blocks()` (random state seeded as the
    trusted plain run seeds it), then backward of the output's sum of squares. The output, the
    gradients of the input and of every parameter, and the bytes saved for backward."""
    blocks, x = checkpoint_blocks()
    params = {p.untyped_storage().data_ptr() for p in blocks.parameters()}
    torch.manual_seed(1)
    storages, out = saved_bytes(lambda: ex.checkpointed_forward(blocks, x))
    out.pow(2).sum().backward()
    saved = sum(n for ptr, n in storages.items() if ptr not in params)
    return out.detach(), x.grad, [p.grad for p in blocks.parameters()], saved
