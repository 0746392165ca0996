"""ZeRO from scratch: data parallelism that stops keeping N copies of the training state.

Plain data parallelism (stage 0) holds on every rank the full fp32 weights (4 bytes a parameter),
gradients (4) and AdamW's two moments (8). ZeRO shards them over the N ranks, one more at each
stage:

- stage 1 shards the optimizer states: each rank runs AdamW on its 1/N slice of the flattened
  parameters only, then an all-gather gives every rank the whole updated model;
- stage 2 also shards the gradients: a reduce-scatter instead of an all-reduce leaves each rank
  only the averaged gradient of its own slice;
- stage 3 also shards the parameters: each layer's weights are all-gathered just before its
  forward (and again before its backward) and freed right after.

The model is cut into *units* (each transformer block, plus one for the embeddings and final
LayerNorm); every unit's parameters live in one flat buffer, padded to a multiple of N, which a
rank owns a contiguous slice of (`shard_range`). Gradients are reduced unit by unit as soon as the
backward pass has produced them (`register_post_accumulate_grad_hook`), as DeepSpeed does.

`census` counts the bytes each rank really holds; `zero_state_bytes` predicts them from chapter
06's byte counts (`minillm.memory.model_state_bytes`): 4 + 4 + 8 bytes in fp32, 2 + 2 + 12 (the
16-bytes rule) in mixed precision, the sharded parts divided by N.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from minillm.errors import InputError, require_positive
from minillm.memory import model_state_bytes
from minillm.model import GPT, GPTConfig

STAGES = (0, 1, 2, 3)


def shard_range(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """The slice `[start, end)` of a flat buffer of `numel` values, padded to a multiple of
    `world_size`, that `rank` owns: every shard has `ceil(numel / world_size)` values."""
    size = math.ceil(numel / world_size)
    return rank * size, (rank + 1) * size


def zero_state_bytes(
    n_params: int, stage: int, world_size: int, precision: str = "fp32"
) -> dict[str, int]:
    """Predicted bytes per rank of `parameters`, `gradients` and `optimizer` states (fp32 master
    weights in mixed precision, and Adam's m and v) at ZeRO `stage` over `world_size` ranks.
    A sharded part holds `ceil(n_params / world_size)` values (the padding of `shard_range`)."""
    if stage not in STAGES:
        raise InputError(f"ZeRO stage must be one of {STAGES}, got {stage!r}")
    require_positive(world_size, "world_size", integer=True)
    per = model_state_bytes(1, precision)  # bytes per parameter of each part
    shard = math.ceil(n_params / world_size)
    return {
        "parameters": per.weights * (shard if stage >= 3 else n_params),
        "gradients": per.gradients * (shard if stage >= 2 else n_params),
        "optimizer": (per.master_weights + per.adam_m + per.adam_v)
        * (shard if stage >= 1 else n_params),
    }


class _Unit:
    """The parameters of one module flattened into one padded buffer, and this rank's slice."""

    def __init__(self, params: list[nn.Parameter], parts: int, rank: int, stage: int):
        self.params = params
        self.numel = sum(p.numel() for p in params)
        self.start, self.end = shard_range(self.numel, rank if parts > 1 else 0, parts)
        self.flat = torch.zeros(parts * (self.end - self.start))
        offset = 0
        for p in params:  # the parameters become views of the flat buffer
            self.flat[offset : offset + p.numel()] = p.detach().reshape(-1)
            p.data = self.flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        # Stage 3 keeps its slice in a tensor of its own; the flat buffer is then freed.
        self.shard = self.flat[self.start : self.end]
        if stage == 3:
            self.shard = self.shard.clone()
            self.release()
        self.grad: Tensor | None = None  # the full gradient (stages 0-1) or this rank's slice
        self.ready = 0

    def gather(self) -> None:
        """All-gather the full weights into the flat buffer (stage 3, before they are used)."""
        if self.flat.untyped_storage().nbytes() == 0:
            self.flat.untyped_storage().resize_(self.flat.numel() * self.flat.element_size())
            dist.all_gather_single(self.flat, self.shard)

    def release(self) -> None:
        self.flat.untyped_storage().resize_(0)  # the views stay, their memory goes


class Zero:
    """`model` trained data-parallel with AdamW at ZeRO `stage` over the default process group.

    Call `backward` on the loss of this rank's shard of the batch (any number of times to
    accumulate), then `step()`, which clips to `grad_clip` (0: off) by the global norm and updates
    the weights; it returns the norm before clipping.
    """

    def __init__(
        self,
        model: nn.Module,
        stage: int,
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        grad_clip: float = 0.0,
    ):
        if stage not in STAGES:
            raise InputError(f"ZeRO stage must be one of {STAGES}, got {stage!r}")
        self.model, self.stage, self.grad_clip = model, stage, grad_clip
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        for tensor in model.state_dict().values():  # every rank starts from rank 0's weights
            dist.broadcast(tensor, src=0)
        parts = 1 if stage == 0 else self.world_size
        decay = {id(p) for p in model.param_groups(weight_decay)[0]["params"]}
        blocks = list(getattr(model, "blocks", []))
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        modules = [[p for p in model.parameters() if id(p) not in in_blocks]]
        modules += [list(b.parameters()) for b in blocks]
        self.units = []
        groups: dict[bool, list[Tensor]] = {True: [], False: []}
        self._pieces: list[tuple[Tensor, int, int, int]] = []  # (tensor, unit, start, end)
        for params in modules:
            params = sorted(params, key=lambda p: id(p) not in decay)  # decayed ones first
            unit = _Unit(params, parts, self.rank, stage)
            self.units.append(unit)
            n_decay = sum(p.numel() for p in params if id(p) in decay)
            # AdamW sees only this rank's slice, split where weight decay stops applying.
            cut = min(max(n_decay - unit.start, 0), unit.end - unit.start)
            for is_decay, lo, hi in ((True, 0, cut), (False, cut, unit.end - unit.start)):
                if hi > lo:
                    piece = unit.shard[lo:hi]
                    groups[is_decay].append(piece)
                    self._pieces.append((piece, len(self.units) - 1, lo, hi))
            for p in params:
                p.register_post_accumulate_grad_hook(lambda _, unit=unit: self._grad_ready(unit))
        self.optimizer = torch.optim.AdamW(
            [
                {"params": groups[True], "weight_decay": weight_decay},
                {"params": groups[False], "weight_decay": 0.0},
            ],
            lr=lr,
            betas=betas,
        )
        if stage == 3:
            self._gather_around(model, self.units[0])
            for block, unit in zip(blocks, self.units[1:], strict=True):
                self._gather_around(block, unit)

    def _gather_around(self, module: nn.Module, unit: _Unit) -> None:
        """Stage 3: gather `unit` before `module`'s forward, free it after; gather it again when
        the gradient of the module's output arrives, i.e. just before its backward."""

        def after(_module, _args, output):
            first = output[0] if isinstance(output, tuple) else output
            if first.requires_grad:
                first.register_hook(lambda grad: unit.gather())
            unit.release()

        module.register_forward_pre_hook(lambda *_: unit.gather())
        module.register_forward_hook(after)

    def _grad_ready(self, unit: _Unit) -> None:
        """Runs in the backward pass after each gradient of `unit`; once all are there, average
        them over the ranks: all-reduce (stages 0-1) or reduce-scatter into this rank's slice."""
        unit.ready += 1
        if unit.ready < len(unit.params):
            return
        unit.ready = 0
        flat = torch.zeros_like(unit.flat) if self.stage < 3 else torch.zeros(unit.flat.numel())
        torch.cat([p.grad.reshape(-1) for p in unit.params], out=flat[: unit.numel])
        for p in unit.params:
            p.grad = None
        if self.stage <= 1:
            dist.all_reduce(flat)
            reduced = flat
        else:
            reduced = torch.empty(unit.end - unit.start)
            dist.reduce_scatter_single(reduced, flat)
            del flat  # the full gradient lived only for this unit
        reduced /= self.world_size
        unit.grad = reduced if unit.grad is None else unit.grad.add_(reduced)  # accumulation
        if self.stage == 3:
            unit.release()

    def _my_grads(self) -> list[Tensor]:
        return [u.grad[u.start : u.end] if self.stage <= 1 else u.grad for u in self.units]

    def step(self) -> float:
        mine = self._my_grads()
        squares = torch.stack([g.double().square().sum() for g in mine]).sum()
        if self.stage > 0:  # each rank holds the squares of its slice only
            dist.all_reduce(squares)
        norm = squares.sqrt().item()
        scale = min(1.0, self.grad_clip / (norm + 1e-6)) if self.grad_clip > 0 else 1.0
        for piece, unit, lo, hi in self._pieces:
            piece.grad = mine[unit][lo:hi] * scale
        self.optimizer.step()
        for piece, *_ in self._pieces:
            piece.grad = None
        for unit in self.units:
            unit.grad = None
            if 0 < self.stage < 3:  # everyone needs every updated slice for the next forward
                dist.all_gather_single(unit.flat, unit.shard.clone())
        return norm

    def full_state_dict(self) -> dict[str, Tensor]:
        """The whole model's weights on every rank (a collective: every rank must call it)."""
        for unit in self.units:
            unit.gather()
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if self.stage == 3:
            for unit in self.units:
                unit.release()
        return state

    def census(self) -> dict[str, int]:
        """Bytes of parameters, gradients and optimizer states this rank holds right now,
        counted from the storages of its tensors (views of one storage count once)."""

        def nbytes(tensors) -> int:
            storages = {
                t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tensors
                if t is not None
            }
            return sum(storages.values())

        params = [*self.model.parameters(), *(u.shard for u in self.units)]
        grads = [*(p.grad for p in self.model.parameters()), *(u.grad for u in self.units)]
        # AdamW's m and v; its per-tensor `step` counters (4 bytes each) are left out.
        moments = [v for s in self.optimizer.state.values() for k, v in s.items() if k != "step"]
        return {
            "parameters": nbytes(params),
            "gradients": nbytes(grads),
            "optimizer": nbytes(moments),
        }


# -- run by every rank under `launch` ----------------------------------------------------------


def _batches(config: GPTConfig, batch_size: int, count: int) -> list[tuple[Tensor, Tensor]]:
    """The same `count` random global batches (x, y) `(batch_size, block_size)` on every rank."""
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(
        0, config.vocab_size, (count, batch_size, config.block_size + 1), generator=g
    )
    return [(t[:, :-1], t[:, 1:]) for t in tokens]


def equality_worker(
    rank: int,
    world_size: int,
    config: GPTConfig,
    batch_size: int,
    steps: int,
    lr: float = 3e-3,
    weight_decay: float = 0.1,
    grad_clip: float = 1.0,
) -> dict[int, dict]:
    """Trains one GPT `steps` AdamW steps at every ZeRO stage and once in this process alone on
    the global batch; per stage: the largest loss and weight differences from that reference,
    the bytes this rank held after the last backward (`census`, Adam's states exist by then)
    and those `zero_state_bytes` predicts."""
    import copy

    torch.manual_seed(0)
    base = GPT(config)
    batches = _batches(config, batch_size, steps)
    reference = copy.deepcopy(base)
    optimizer = torch.optim.AdamW(reference.param_groups(weight_decay), lr=lr)
    ref_losses = []
    for x, y in batches:
        loss = reference(x, y)[1]
        loss.backward()
        nn.utils.clip_grad_norm_(reference.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ref_losses.append(loss.item())
    rows = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
    report = {}
    for stage in STAGES:
        model = copy.deepcopy(base)
        zero = Zero(model, stage, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip)
        losses = []
        for x, y in batches:
            loss = model(x[rows], y[rows])[1]
            loss.backward()
            held = zero.census()
            zero.step()
            total = loss.detach().double().reshape(1)
            dist.all_reduce(total)
            losses.append(total.item() / world_size)
        weights = zero.full_state_dict()
        report[stage] = {
            "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)),
            "weight_diff": max(
                (weights[k] - v).abs().max().item() for k, v in reference.state_dict().items()
            ),
            "census": held,
            "predicted": zero_state_bytes(base.num_parameters(), stage, world_size),
        }
        if rank == 0 and stage == 0:
            print(f"losses: {[round(v, 4) for v in losses]}")
        print(f"stage {stage}: holds {held}")
    return report
