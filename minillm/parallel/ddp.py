"""Data parallelism from scratch: every rank holds the whole model and trains on its shard of the
batch; averaging the gradients over the ranks makes every rank take the step that one process
would take on the whole batch.

`DataParallel` wraps a model in one of three ways, each one of seed 001's tricks further:

- `naive`: after the backward pass, one all-reduce per gradient, then divide by the world size.
  Hundreds of small messages, each paying the per-message latency.
- `bucketed`: gradients flattened into buckets of at most `bucket_cap_mb`, one all-reduce per
  bucket: few large messages, which is where a ring all-reduce runs at full bandwidth.
- `overlapped`: a hook on every parameter (`register_post_accumulate_grad_hook`) notices when its
  gradient is final; when a bucket is complete its all-reduce starts (`async_op=True`) while the
  backward pass goes on computing the earlier layers' gradients. `sync_gradients` only waits.

and `no_sync()` skips the communication during gradient-accumulation micro-steps: gradients add up
locally and one all-reduce of their sum, on the last micro-step, gives the same average.

The Trainer's data-parallel engine built on `DataParallel` is `minillm.engines.ddp.DDPEngine`.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from minillm.errors import InputError, require_positive, unknown_name
from minillm.model import GPT, GPTConfig
from minillm.parallel.launch import device_for, launch
from minillm.parallel.layout import Layout

MODES = ("naive", "bucketed", "overlapped")


def shard_batch(batch: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank `rank`'s contiguous share of `batch` `(B, ...)`: rows `rank*B/p` to `(rank+1)*B/p`."""
    if batch.shape[0] % world_size:
        raise InputError(
            f"a batch of {batch.shape[0]} cannot be shared evenly by {world_size} data-parallel "
            f"ranks; choose a batch size divisible by {world_size}"
        )
    per_rank = batch.shape[0] // world_size
    return batch[rank * per_rank : (rank + 1) * per_rank]


def make_buckets(params: list[nn.Parameter], cap_bytes: float) -> list[list[nn.Parameter]]:
    """Group `params` into buckets of at most `cap_bytes` (a larger parameter gets a bucket of
    its own), last parameter first: backward produces the gradients of the last layers first.
    A bucket holds one dtype on one device, since it is reduced as one flat tensor."""
    require_positive(cap_bytes, "bucket cap")
    buckets: list[list[nn.Parameter]] = []
    open_bucket: dict[tuple, tuple[int, float]] = {}  # (dtype, device) -> (bucket index, bytes)
    for p in reversed(params):
        kind, nbytes = (p.dtype, p.device), p.numel() * p.element_size()
        index, size = open_bucket.get(kind, (-1, 0.0))
        if index < 0 or size + nbytes > cap_bytes:
            buckets.append([])
            index, size = len(buckets) - 1, 0.0
        buckets[index].append(p)
        open_bucket[kind] = (index, size + nbytes)
    return buckets


class DataParallel(nn.Module):
    """`module` replicated over the ranks of `group`; call `sync_gradients()` after the backward
    pass of the last micro-batch, before the optimizer step. `allreduce_calls` counts messages."""

    def __init__(
        self,
        module: nn.Module,
        mode: str = "overlapped",
        bucket_cap_mb: float = 1.0,
        group=None,
    ):
        super().__init__()
        if mode not in MODES:
            raise unknown_name("data-parallel mode", mode, MODES)
        self.module, self.mode, self.group = module, mode, group
        self.world_size = dist.get_world_size(group)
        self.allreduce_calls = 0
        self._sync = True
        self.params = [p for p in module.parameters() if p.requires_grad]
        # Every replica starts from rank 0's weights, or they would drift apart from step one.
        source = dist.get_global_rank(group, 0) if group is not None else 0
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=source, group=group)
        self.buckets = make_buckets(self.params, bucket_cap_mb * 2**20)
        self._in_flight: list[tuple[list[nn.Parameter], Tensor, dist.Work]] = []
        self._ready = [0] * len(self.buckets)
        if mode == "overlapped":
            self._bucket_of = {p: i for i, bucket in enumerate(self.buckets) for p in bucket}
            for p in self.params:
                p.register_post_accumulate_grad_hook(self._gradient_ready)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside only accumulate gradients locally (accumulation micro-steps)."""
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    def _gradient_ready(self, param: nn.Parameter) -> None:
        """Runs inside backward, once `param.grad` is final: starts its bucket when complete."""
        if not self._sync:
            return
        i = self._bucket_of[param]
        self._ready[i] += 1
        if self._ready[i] == len(self.buckets[i]):
            self._start(self.buckets[i])

    def _start(self, bucket: list[nn.Parameter]) -> None:
        """Start the all-reduce of `bucket`'s gradients, followed in the same message by one
        count per parameter of the ranks that have its gradient (a missing one counts as zeros
        there; where no rank has it, it stays None)."""
        first = bucket[0]
        has_grad = torch.tensor(
            [p.grad is not None for p in bucket], dtype=first.dtype, device=first.device
        )
        grads = [
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket
        ]
        flat = torch.cat([*grads, has_grad])
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self.allreduce_calls += 1
        self._in_flight.append((bucket, flat, work))

    def sync_gradients(self) -> None:
        """Average every gradient over the ranks."""
        if self.mode == "naive":
            for p in self.params:
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=self.group)
                    self.allreduce_calls += 1
                    p.grad /= self.world_size  # all-reduce sums; the step needs the mean
            return
        started = {id(bucket) for bucket, _, _ in self._in_flight}
        for bucket in self.buckets:  # bucketed: all of them; overlapped: any a hook missed
            if id(bucket) not in started:
                self._start(bucket)
        for bucket, flat, work in self._in_flight:
            work.wait()
            grads, counts = flat[: -len(bucket)], flat[-len(bucket) :].tolist()
            grads /= self.world_size
            pieces = grads.split([p.numel() for p in bucket])
            for p, grad, count in zip(bucket, pieces, counts, strict=True):
                p.grad = grad.view_as(p) if count > 0 else None  # a view of the bucket: no copy
        self._in_flight.clear()
        self._ready = [0] * len(self.buckets)


# -- checks and timings, run in every rank by `launch` -----------------------------------------


def model_and_batches(rank: int, config: GPTConfig, batch_size: int, count: int):
    """The same GPT and the same `count` random global batches (x, y) `(batch_size, block_size)`
    on every rank, on this rank's device."""
    device = device_for(rank)
    torch.manual_seed(0)
    model = GPT(config).to(device)
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(
        0, config.vocab_size, (count, batch_size, config.block_size + 1), generator=g
    )
    return model, [(t[:, :-1].to(device), t[:, 1:].to(device)) for t in tokens]


def _counting_torch_ddp(model: nn.Module) -> tuple[nn.Module, list[int]]:
    """torch's DDP whose buckets are reduced by torch's default all-reduce hook, counted."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    calls = [0]

    def counted(state, bucket):
        calls[0] += 1
        return allreduce_hook(state, bucket)

    ddp = nn.parallel.DistributedDataParallel(model)
    ddp.register_comm_hook(None, counted)
    return ddp, calls


def _train(kind, base, batches, grad_accum, bucket_cap_mb, rank, world_size):
    """`len(batches) // grad_accum` AdamW steps of a copy of `base` driven by `kind` ("single":
    one process on the global batch; "torch"; or a `MODES` entry). Returns per-step gradients and
    weights (flattened), all-reduce calls per step and seconds per step."""
    model = copy.deepcopy(base)
    calls = [0]
    if kind == "torch":
        wrapped, calls = _counting_torch_ddp(model)
    elif kind in MODES:
        wrapped = DataParallel(model, kind, bucket_cap_mb)
    else:
        wrapped = model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    grads, weights, step_calls, seconds = [], [], [], []
    for start in range(0, len(batches), grad_accum):
        tick, before = time.perf_counter(), (wrapped.allreduce_calls if kind in MODES else calls[0])
        for j, (x, y) in enumerate(batches[start : start + grad_accum]):
            if kind != "single":
                x, y = shard_batch(x, rank, world_size), shard_batch(y, rank, world_size)
            last = j == grad_accum - 1
            with contextlib.nullcontext() if last or kind == "single" else wrapped.no_sync():
                _, loss = wrapped(x, y)
                (loss / grad_accum).backward()
        if kind in MODES:
            wrapped.sync_gradients()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - tick)
        weights.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        step_calls.append((wrapped.allreduce_calls if kind in MODES else calls[0]) - before)
    return grads, weights, step_calls, seconds


def _max_difference(a: list[Tensor], b: list[Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def equality_worker(
    rank: int,
    world_size: int,
    config: GPTConfig,
    batch_size: int,
    grad_accum: int,
    steps: int,
    bucket_cap_mb: float,
) -> dict[str, dict]:
    """Trains copies of one GPT with each `MODES` entry, torch's DDP and one process on the global
    batch; returns, per mode, the largest gradient and weight differences from torch's DDP and
    from the single process over all steps, and the all-reduce calls of each step."""
    base, batches = model_and_batches(rank, config, batch_size, steps * grad_accum)
    run = {
        kind: _train(kind, base, batches, grad_accum, bucket_cap_mb, rank, world_size)
        for kind in ("single", "torch", *MODES)
    }
    report: dict[str, dict] = {"torch": {"calls_per_step": run["torch"][2]}}
    for mode in MODES:
        grads, weights, calls, _ = run[mode]
        report[mode] = {
            "grad_vs_torch": _max_difference(grads, run["torch"][0]),
            "weights_vs_torch": _max_difference(weights, run["torch"][1]),
            "grad_vs_single": _max_difference(grads, run["single"][0]),
            "weights_vs_single": _max_difference(weights, run["single"][1]),
            "calls_per_step": calls,
        }
    return report


def timing_worker(
    rank: int, world_size: int, config: GPTConfig, batch_size: int, steps: int, bucket_cap_mb
) -> dict[str, dict]:
    """Median seconds per step (after one warm-up step) and all-reduce calls per step of each
    `MODES` entry and torch's DDP, measured one after the other in the same processes."""
    base, batches = model_and_batches(rank, config, batch_size, steps + 1)
    report = {}
    for kind in (*MODES, "torch"):
        _, _, calls, seconds = _train(kind, base, batches, 1, bucket_cap_mb, rank, world_size)
        report[kind] = {"step_s": statistics.median(seconds[1:]), "calls_per_step": calls[-1]}
    return report


def compare_with_torch_ddp(
    world_size: int,
    config: GPTConfig,
    *,
    batch_size: int,
    grad_accum: int = 1,
    steps: int = 2,
    bucket_cap_mb: float = 1.0,
) -> dict[str, dict]:
    """Launch `equality_worker`; returns rank 0's report. Refuses, before starting any process,
    a batch the ranks cannot share evenly."""
    Layout.for_world(world_size).check_model(
        n_head=config.n_head, n_layer=config.n_layer, batch_size=batch_size
    )
    args = (config, batch_size, grad_accum, steps, bucket_cap_mb)
    return launch(equality_worker, world_size, *args)[0]


def time_data_parallel(
    world_size: int, config: GPTConfig, *, batch_size: int, steps: int, bucket_cap_mb: float
) -> dict[str, dict]:
    """Launch `timing_worker`; returns rank 0's report (each rank waits for the slowest anyway)."""
    Layout.for_world(world_size).check_model(
        n_head=config.n_head, n_layer=config.n_layer, batch_size=batch_size
    )
    return launch(timing_worker, world_size, config, batch_size, steps, bucket_cap_mb)[0]
