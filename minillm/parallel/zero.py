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
from minillm.parallel.ddp import shard_batch

STAGES = (0, 1, 2, 3)


def shard_range(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """The slice `[start, end)` of a flat buffer of `numel` values, padded to a multiple of
    `world_size`, that `rank` owns: every shard has `ceil(numel / world_size)` values."""
    size = math.ceil(numel / world_size)
    return rank * size, (rank + 1) * size


def zero_state_bytes(
    n_params: int, stage: int, world_size: int, precision: str = "fp32"
) -> dict[str, int]:
    """Predicted bytes per rank of each of `minillm.memory.STATE_PARTS` (the fp32 master
    weights exist in mixed precision only; the optimizer states are Adam's m and v) at ZeRO
    `stage` over `world_size` ranks. A sharded part holds `ceil(n_params / world_size)` values
    (the padding of `shard_range`)."""
    if stage not in STAGES:
        raise InputError(f"ZeRO stage must be one of {STAGES}, got {stage!r}")
    require_positive(world_size, "world_size", integer=True)
    per = model_state_bytes(1, precision)  # bytes per parameter of each part
    shard = math.ceil(n_params / world_size)
    optimizer_values = shard if stage >= 1 else n_params
    return {
        "parameters": per.parameters * (shard if stage >= 3 else n_params),
        "gradients": per.gradients * (shard if stage >= 2 else n_params),
        "master_weights": per.master_weights * optimizer_values,
        "optimizer_states": per.optimizer_states * optimizer_values,
    }


# Optimizers whose update of one element depends on other elements of the same tensor: run on
# a slice of a parameter they would compute something else than on the whole parameter.
_NOT_ELEMENTWISE = tuple(
    getattr(torch.optim, name)
    for name in ("LBFGS", "Adafactor", "SparseAdam", "Muon")
    if hasattr(torch.optim, name)
)


class _Unit:
    """Trainable parameters of one module and one dtype and device, flattened into one padded
    buffer (of that dtype, on that device), and this rank's slice of it."""

    def __init__(self, params: list[nn.Parameter], parts: int, rank: int, stage: int):
        self.params = params
        self.numel = sum(p.numel() for p in params)
        self.start, self.end = shard_range(self.numel, rank if parts > 1 else 0, parts)
        first = params[0]
        self.flat = torch.zeros(
            parts * (self.end - self.start), dtype=first.dtype, device=first.device
        )
        self.offsets = []
        offset = 0
        for p in params:  # the parameters become views of the flat buffer
            self.flat[offset : offset + p.numel()] = p.detach().reshape(-1)
            p.data = self.flat[offset : offset + p.numel()].view_as(p)
            self.offsets.append(offset)
            offset += p.numel()
        # Stage 3 keeps its slice in a tensor of its own; the flat buffer is then freed.
        self.shard = self.flat[self.start : self.end]
        if stage == 3:
            self.shard = self.shard.clone()
            self.release()
        self.grad: Tensor | None = None  # the full gradient (stages 0-1) or this rank's slice
        self.reduced = False  # in this backward pass
        self.ready = 0

    def gather(self) -> None:
        """All-gather the full weights into the flat buffer (stage 3, before they are used)."""
        if self.flat.untyped_storage().nbytes() == 0:
            self.flat.untyped_storage().resize_(self.flat.numel() * self.flat.element_size())
            dist.all_gather_single(self.flat, self.shard)

    def release(self) -> None:
        self.flat.untyped_storage().resize_(0)  # the views stay, their memory goes


def _param_groups(params) -> list[dict]:
    """`params` as torch optimizers take them: a module, tensors, or dicts of group options."""
    if isinstance(params, nn.Module):
        params = params.parameters()
    params = list(params)
    if not params:
        raise InputError("ZeRO was given no parameters to train")
    groups = params if isinstance(params[0], dict) else [{"params": params}]
    return [{**g, "params": list(g["params"])} for g in groups]


class Zero:
    """Data-parallel training at ZeRO `stage` over the default process group, with any
    element-wise `torch.optim` optimizer (`optimizer_class(params, **optimizer_kwargs)`).

    `params` is what a torch optimizer takes (a module's parameters, a list, or parameter groups
    with their own options); pass the module as `module` (or as `params`) for stage 3, whose
    weights are gathered around each unit's forward. Parameters that do not require a gradient
    stay whole on every rank and are neither reduced nor handed to the optimizer. Call
    `backward(loss)` on the loss of this rank's shard of the batch (any number of times to
    accumulate), then `step()`, which clips to `grad_clip` (0: off) by the
    global norm and updates the weights; it returns the norm before clipping. A parameter that
    received no gradient (unused in the forward, on every rank) keeps `grad None` and is not
    updated, as in one process.
    """

    def __init__(
        self,
        params,
        stage: int,
        optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW,
        *,
        module: nn.Module | None = None,
        grad_clip: float = 0.0,
        **optimizer_kwargs,
    ):
        if stage not in STAGES:
            raise InputError(f"ZeRO stage must be one of {STAGES}, got {stage!r}")
        if issubclass(optimizer_class, _NOT_ELEMENTWISE):
            raise InputError(
                f"{optimizer_class.__name__} updates an element from others of its tensor, so "
                "it cannot run on a slice of a parameter; use an element-wise optimizer such as "
                "AdamW, Adam, SGD, RMSprop or Adagrad"
            )
        module = (
            module if module is not None else (params if isinstance(params, nn.Module) else None)
        )
        if stage == 3 and module is None:
            raise InputError("ZeRO-3 gathers weights around a module's forward: pass module=")
        self.module, self.stage, self.grad_clip = module, stage, grad_clip
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        groups = _param_groups(params)
        self.params = [p for g in groups for p in g["params"]]
        if module is not None:
            for tensor in module.state_dict().values():  # every rank starts from rank 0's
                dist.broadcast(tensor, src=0)
        else:
            for group in groups:
                for p in group["params"]:
                    dist.broadcast(p.detach(), src=0)
        group_of = {}
        for i, group in enumerate(groups):
            for p in group["params"]:
                if id(p) in group_of:
                    raise InputError("a parameter appears twice in the parameter groups")
                group_of[id(p)] = i
        trained = [p for g in groups for p in g["params"] if p.requires_grad]
        if not trained:
            raise InputError("every parameter is frozen (requires_grad=False): nothing to train")
        self.units: list[_Unit] = []
        for params_of_module in self._modules_params(trained, module):
            by_kind: dict[tuple, list[nn.Parameter]] = {}
            for p in params_of_module:
                by_kind.setdefault((p.dtype, p.device), []).append(p)
            for same_kind in by_kind.values():
                same_kind.sort(key=lambda p: group_of[id(p)])
                self.units.append(
                    _Unit(same_kind, 1 if stage == 0 else self.world_size, self.rank, stage)
                )
        # The optimizer sees, per parameter, the part of it inside this rank's slice.
        self._pieces: list[tuple[Tensor, nn.Parameter, _Unit, int, int]] = []
        pieces_of_group: list[list[Tensor]] = [[] for _ in groups]
        for unit in self.units:
            for p, offset in zip(unit.params, unit.offsets, strict=True):
                lo = max(offset, unit.start) - unit.start
                hi = min(offset + p.numel(), unit.end) - unit.start
                if hi > lo:
                    piece = unit.shard[lo:hi]
                    pieces_of_group[group_of[id(p)]].append(piece)
                    self._pieces.append((piece, p, unit, lo, hi))
            for p in unit.params:
                p.register_post_accumulate_grad_hook(lambda p, unit=unit: self._grad_ready(unit, p))
        self._used: set[int] = set()  # parameters that received a gradient in this window
        self.optimizer = optimizer_class(
            [
                {**g, "params": pieces}
                for g, pieces in zip(groups, pieces_of_group, strict=True)
                if pieces
            ],
            **optimizer_kwargs,
        )
        if stage == 3:
            blocks = list(getattr(module, "blocks", []))
            in_blocks = {id(p) for b in blocks for p in b.parameters()}
            for owner, wanted in [(module, None), *((b, b) for b in blocks)]:
                ids = (
                    {id(p) for p in owner.parameters()}
                    if wanted is not None
                    else {id(p) for p in module.parameters()} - in_blocks
                )
                units = [u for u in self.units if id(u.params[0]) in ids]
                if units:
                    self._gather_around(owner, units)

    @staticmethod
    def _modules_params(trained: list[nn.Parameter], module: nn.Module | None):
        """The trainable parameters cut into units: one per transformer block of `module` (its
        `blocks`), and one for all the others."""
        blocks = list(getattr(module, "blocks", [])) if module is not None else []
        ids = {id(p) for p in trained}
        units, in_blocks = [], set()
        for block in blocks:
            mine = [p for p in block.parameters() if id(p) in ids and id(p) not in in_blocks]
            in_blocks |= {id(p) for p in mine}
            units.append(mine)
        rest = [p for p in trained if id(p) not in in_blocks]
        return [u for u in [rest, *units] if u]

    def _gather_around(self, module: nn.Module, units: list[_Unit]) -> None:
        """Stage 3: gather `units` before `module`'s forward, free them after; gather them again
        when the gradient of the module's output arrives, i.e. just before its backward."""

        def gather(*_):
            for unit in units:
                unit.gather()

        def after(_module, _args, output):
            first = output[0] if isinstance(output, tuple) else output
            if first.requires_grad:
                first.register_hook(lambda grad: gather())
            for unit in units:
                unit.release()

        module.register_forward_pre_hook(gather)
        module.register_forward_hook(after)

    def _grad_ready(self, unit: _Unit, param: nn.Parameter) -> None:
        """Runs in the backward pass after each gradient of `unit`; once all are there, average
        them over the ranks."""
        self._used.add(id(param))
        unit.ready += 1
        if unit.ready == len(unit.params):
            self._reduce(unit)

    def _reduce(self, unit: _Unit) -> None:
        """Average `unit`'s gradients over the ranks: all-reduce (stages 0-1) or reduce-scatter
        into this rank's slice. A missing gradient (an unused parameter) counts as zeros here;
        `step` leaves that parameter alone."""
        unit.ready, unit.reduced = 0, True
        flat = torch.zeros(unit.flat.numel(), dtype=unit.flat.dtype, device=unit.flat.device)
        for p, offset in zip(unit.params, unit.offsets, strict=True):
            if p.grad is not None:
                flat[offset : offset + p.numel()] = p.grad.reshape(-1)
                p.grad = None
        if self.stage <= 1:
            dist.all_reduce(flat)
            reduced = flat
        else:
            reduced = torch.empty_like(unit.shard)
            dist.reduce_scatter_single(reduced, flat)
            del flat  # the full gradient lived only for this unit
        reduced /= self.world_size
        unit.grad = reduced if unit.grad is None else unit.grad.add_(reduced)  # accumulation
        if self.stage == 3:
            unit.release()

    def backward(self, loss: Tensor) -> None:
        """`loss.backward()`, then the reduction of the units whose parameters did not all get a
        gradient (the others were reduced during the pass)."""
        loss.backward()
        self.finish_backward()

    def finish_backward(self) -> None:
        """Reduce what the backward pass left unreduced (units holding an unused parameter), in
        unit order, the same on every rank."""
        for unit in self.units:
            if not unit.reduced:
                self._reduce(unit)
            unit.reduced = False

    def _my_grads(self) -> list[Tensor | None]:
        return [
            None if u.grad is None else (u.grad[u.start : u.end] if self.stage <= 1 else u.grad)
            for u in self.units
        ]

    def step(self) -> float:
        if any(u.reduced or u.ready for u in self.units):
            self.finish_backward()
        mine = dict(zip(map(id, self.units), self._my_grads(), strict=True))
        present = [g for g in mine.values() if g is not None]
        device = self.units[0].flat.device
        squares = (
            torch.stack([g.double().square().sum() for g in present]).sum()
            if present
            else torch.zeros((), dtype=torch.float64, device=device)
        )
        if self.stage > 0:  # each rank holds the squares of its slice only
            dist.all_reduce(squares)
        norm = squares.sqrt().item()
        scale = min(1.0, self.grad_clip / (norm + 1e-6)) if self.grad_clip > 0 else 1.0
        for piece, param, unit, lo, hi in self._pieces:
            grad = mine[id(unit)]
            used = id(param) in self._used and grad is not None
            piece.grad = grad[lo:hi] * scale if used else None
        self.optimizer.step()
        for piece, *_ in self._pieces:
            piece.grad = None
        for unit in self.units:
            unit.grad = None
            if 0 < self.stage < 3:  # everyone needs every updated slice for the next forward
                dist.all_gather_single(unit.flat, unit.shard.clone())
        self._used.clear()
        return norm

    def full_state_dict(self) -> dict[str, Tensor]:
        """The whole module's weights on every rank (a collective: every rank must call it)."""
        for unit in self.units:
            unit.gather()
        state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        if self.stage == 3:
            for unit in self.units:
                unit.release()
        return state

    def load_full_state_dict(self, weights: dict[str, Tensor]) -> None:
        """Load the whole module's weights (the same on every rank) into the shards."""
        for unit in self.units:
            unit.flat.untyped_storage().resize_(unit.flat.numel() * unit.flat.element_size())
        self.module.load_state_dict(weights)
        for unit in self.units:
            unit.shard.copy_(unit.flat[unit.start : unit.end])
            if self.stage == 3:
                unit.release()

    def state_dict(self) -> dict:
        """This rank's optimizer state (its slices), with the layout it is valid for."""
        return {
            "stage": self.stage,
            "world_size": self.world_size,
            "rank": self.rank,
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        saved = (state["stage"], state["world_size"], state["rank"])
        if saved != (self.stage, self.world_size, self.rank):
            raise InputError(
                f"this optimizer state was saved at ZeRO-{saved[0]} by rank {saved[2]} of "
                f"{saved[1]}; resume it with the same stage and number of processes"
            )
        self.optimizer.load_state_dict(state["optimizer"])

    def census(self) -> dict[str, int]:
        """Bytes this rank holds right now by `minillm.memory.STATE_PARTS`, counted from the
        storages of its tensors (views of one storage count once). This ZeRO trains in fp32 and
        steps its shards of the parameters themselves: it keeps no master weights."""

        def nbytes(tensors) -> int:
            storages = {
                t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tensors
                if t is not None
            }
            return sum(storages.values())

        params = [*self.params, *(u.shard for u in self.units)]
        grads = [*(p.grad for p in self.params), *(u.grad for u in self.units)]
        # The optimizer's per-element states (AdamW's m and v); its 0-d `step` counters left out.
        moments = [
            v
            for s in self.optimizer.state.values()
            for v in s.values()
            if isinstance(v, Tensor) and v.dim() > 0
        ]
        return {
            "parameters": nbytes(params),
            "gradients": nbytes(grads),
            "master_weights": 0,
            "optimizer_states": nbytes(moments),
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
    report = {}
    for stage in STAGES:
        model = copy.deepcopy(base)
        groups = model.param_groups(weight_decay)
        zero = Zero(groups, stage, module=model, lr=lr, grad_clip=grad_clip)
        losses = []
        for x, y in batches:
            loss = model(shard_batch(x, rank, world_size), shard_batch(y, rank, world_size))[1]
            zero.backward(loss)
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
