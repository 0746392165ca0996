"""Tensor parallelism, Megatron-style: every block's weight matrices split over the ranks of one
tensor-parallel group, so each rank stores and multiplies 1/t of them.

A linear layer y = x W^T + b can be split two ways (W is `(out, in)`):

- column-parallel: each rank keeps a slice of W's *output* rows and computes a slice of y; the
  slices side by side are y. Nothing to add up.
- row-parallel: each rank keeps a slice of W's *input* columns, reads the matching slice of x and
  computes a partial y; the partials *summed* are y (the bias is added once, after the sum).

An MLP is column-parallel up_proj, GELU (element-wise, so it works on the slices), row-parallel
down_proj. Attention is column-parallel q/k/v (a rank's slice is whole heads, and heads attend
independently), row-parallel o_proj. So each block communicates once going forward and once going
back, through two conjugate operators (Megatron's f and g):

- `f` at the block's entrance: identity forward; all-reduce backward (every rank's slice of the
  block contributed to the gradient of the shared input);
- `g` at the row-parallel exit: all-reduce forward (sum the partial outputs); identity backward.

Embeddings, LayerNorms and the LM head stay whole on every rank: after f's all-reduce their
gradients are already identical everywhere. `shard_gpt` splits a trained GPT; `run_demo` is the
worker the tests and chapter 08 launch to compare a split model with the unsplit one.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from minillm.errors import InputError
from minillm.model import GPT, MLP, Attention, Block, GPTConfig

# How many all-reduces f and g started, by direction: the tests count one per block each way.
ALL_REDUCES: Counter = Counter()

COLUMN = ("q_proj", "k_proj", "v_proj", "up_proj")  # split along the output features
ROW = ("o_proj", "down_proj")  # split along the input features


def _all_reduce(x: Tensor, group, direction: str) -> Tensor:
    ALL_REDUCES[direction] += 1
    x = x.contiguous().clone()  # autograd must not see its input changed in place
    dist.all_reduce(x, group=group)
    return x


class CopyToTensorRegion(torch.autograd.Function):
    """Megatron's f: identity forward, all-reduce of the gradient backward."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_reduce(grad, ctx.group, "backward"), None


class ReduceFromTensorRegion(torch.autograd.Function):
    """Megatron's g: all-reduce forward, identity backward (each rank's partial output got the
    same gradient as the sum)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        return _all_reduce(x, group, "forward")

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def shard(name: str, full: Tensor, rank: int, size: int) -> Tensor:
    """This rank's slice of the parameter (or gradient) `name` of an unsplit GPT.

    Column-parallel layers keep rows `rank*out/size : (rank+1)*out/size` of the weight `(out, in)`
    and of the bias; row-parallel layers keep that range of the weight's columns and the whole
    bias; every other parameter is kept whole.
    """
    layer = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
    if layer in COLUMN:
        return full.chunk(size, dim=0)[rank]
    if layer in ROW and name.endswith("weight"):
        return full.chunk(size, dim=1)[rank]
    return full


class ColumnParallelLinear(nn.Module):
    """`(..., in)` -> `(..., out/t)`: this rank's slice of the outputs. It communicates nothing
    itself; the f in front of the block it belongs to covers every column-parallel layer that
    reads the same input (q, k and v share one)."""

    def __init__(self, linear: nn.Linear, rank: int, size: int):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().chunk(size, dim=0)[rank].clone())
        self.bias = None
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().chunk(size, dim=0)[rank].clone())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """`(..., in/t)` (this rank's slice of the input) -> `(..., out)`: the partial products are
    summed across the group by g, then the bias is added once."""

    def __init__(self, linear: nn.Linear, rank: int, size: int, group):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(linear.weight.detach().chunk(size, dim=1)[rank].clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        y = ReduceFromTensorRegion.apply(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


class ParallelAttention(Attention):
    """`minillm.model.Attention` with H/t heads per rank: the model's code runs unchanged, since
    it infers the head count from the width of q_proj's output."""

    def __init__(self, attn: Attention, rank: int, size: int, group):
        nn.Module.__init__(self)  # take the sizes from `attn` instead of allocating full layers
        self.head_dim, self.dropout, self.manual = attn.head_dim, attn.dropout, attn.manual
        self.group = group
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(self, name, ColumnParallelLinear(getattr(attn, name), rank, size))
        self.o_proj = RowParallelLinear(attn.o_proj, rank, size, group)
        self.resid_dropout = attn.resid_dropout

    def forward(self, x: Tensor, context: Tensor | None = None, **kwargs) -> Tensor:
        if context is not None:
            raise NotImplementedError("tensor-parallel cross-attention is not part of chapter 08")
        return super().forward(CopyToTensorRegion.apply(x, self.group), **kwargs)


class ParallelMLP(MLP):
    """`minillm.model.MLP` with 4C/t hidden units per rank."""

    def __init__(self, mlp: MLP, rank: int, size: int, group):
        nn.Module.__init__(self)
        self.group = group
        self.up_proj = ColumnParallelLinear(mlp.up_proj, rank, size)
        self.down_proj = RowParallelLinear(mlp.down_proj, rank, size, group)
        self.dropout = mlp.dropout

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(CopyToTensorRegion.apply(x, self.group))


def _split_in_place(block: Block, group) -> Block:
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    heads = block.self_attn.q_proj.out_features // block.self_attn.head_dim
    if heads % size:  # Layout.check_model refuses this before launch; this guards direct calls
        raise InputError(f"{heads} attention heads cannot be split over {size} tensor ranks")
    block.self_attn = ParallelAttention(block.self_attn, rank, size, group)
    block.mlp = ParallelMLP(block.mlp, rank, size, group)
    return block


def shard_block(block: Block, group=None) -> Block:
    """A copy of `block` holding only this rank's share of its attention heads and MLP units, for
    the tensor-parallel `group` (default: every rank). Parameter names stay those of `Block`."""
    return _split_in_place(copy.deepcopy(block), group)


def shard_gpt(model: GPT, group=None) -> GPT:
    """A copy of `model` whose blocks are split over the tensor-parallel `group`; embeddings,
    LayerNorms and the (tied) LM head stay whole. Check the split first with
    `Layout.check_model(n_head=...)`, before any process starts."""
    split = copy.deepcopy(model)
    for block in split.blocks:
        _split_in_place(block, group)
    return split


def run_demo(
    rank: int,
    world_size: int,
    config: dict,
    tensor: int,
    batch_size: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> dict:
    """Worker for `launch`: one forward and backward of a GPT split over tensor groups of size
    `tensor` (the rest of the world is data parallelism: each data replica takes its share of the
    batch, and gradients are averaged over the data group), compared with the unsplit model on
    the whole batch, which every rank builds from the same seed.

    Returns the largest absolute differences of loss, logits and gradients, the all-reduces each
    direction took per transformer layer, and this rank's parameter count against the unsplit one.
    """
    from minillm.parallel.layout import Layout

    layout = Layout.for_world(world_size, tensor=tensor)
    groups = layout.new_groups(rank)
    coords = layout.coords(rank)
    torch.manual_seed(seed)
    full = GPT(GPTConfig.from_dict(config)).to(dtype)
    c = full.config
    idx = torch.randint(0, c.vocab_size, (batch_size, c.block_size + 1))
    x, y = idx[:, :-1], idx[:, 1:]
    logits_full, loss_full = full(x, y)
    loss_full.backward()

    split = shard_gpt(full, groups["tensor"])
    split.zero_grad()
    per_replica = batch_size // layout.data
    mine = slice(coords.data * per_replica, (coords.data + 1) * per_replica)
    ALL_REDUCES.clear()
    logits, loss = split(x[mine], y[mine])
    forward = ALL_REDUCES["forward"]
    loss.backward()
    for p in split.parameters():  # data parallelism: average the replicas' gradients
        dist.all_reduce(p.grad, group=groups["data"])
        p.grad /= layout.data
    loss_sum = loss.detach().clone()
    dist.all_reduce(loss_sum, group=groups["data"])

    full_params = dict(full.named_parameters())
    grad_diff = max(
        (p.grad - shard(name, full_params[name].grad, coords.tensor, tensor)).abs().max().item()
        for name, p in split.named_parameters()
    )
    q_shape = tuple(split.blocks[0].self_attn.q_proj.weight.shape)
    print(
        f"{coords}: q_proj {q_shape}, logits {tuple(logits.shape)}, "
        f"loss {loss_sum.item() / layout.data:.6f} vs unsplit {loss_full.item():.6f}"
    )
    return {
        "loss_diff": abs(loss_sum.item() / layout.data - loss_full.item()),
        "logits_diff": (logits - logits_full[mine]).abs().max().item(),
        "grad_diff": grad_diff,
        # per transformer layer: its attention block and its MLP block, one each way
        "all_reduces_per_layer": {
            "forward": forward / c.n_layer,
            "backward": ALL_REDUCES["backward"] / c.n_layer,
        },
        "params": sum(p.numel() for p in split.blocks.parameters()),
        "params_unsplit": sum(p.numel() for p in full.blocks.parameters()),
    }
