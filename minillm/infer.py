"""Inference and compression (chapter 11): serving the course GPT faster and smaller.

1. quantisation: absmax and zero-point, per tensor and per channel, 8 and 4 bits, weight-only;
2. pruning: unstructured by magnitude, structured by attention head, whole layers dropped;
3. knowledge distillation: the soft-target loss;
4. weight sharing (ALBERT's cross-layer sharing) and low-rank approximation (truncated SVD);
5. memory scheduling: running a model whose blocks live on disk, one block in memory at a time.

Decoding (temperature, top-k, top-p, stop tokens) and generation with a KV cache are
`minillm.generate`.

`evaluate_loss` and `model_bytes` measure what each method costs in quality and in size.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from minillm.errors import InputError, require_positive, unknown_name
from minillm.model import GPT

# ---------------------------------------------------------------------------------------------
# 1. Quantisation
# ---------------------------------------------------------------------------------------------

SCHEMES = ("absmax", "zeropoint")


@dataclass
class QuantizedTensor:
    """Integers `q` with a `scale` (and `zero_point`) per tensor or per row: the value is
    (q - zero_point) * scale. 4-bit values are packed two to a byte."""

    q: Tensor  # uint8: the stored integers, offset to be non-negative, packed when bits == 4
    scale: Tensor  # float32, shape (1, 1) per tensor or (rows, 1) per channel
    zero_point: Tensor  # int32, same shape: 2^(bits-1) for absmax (its offset), fitted otherwise
    bits: int
    shape: tuple[int, ...]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scale, self.zero_point))


def quantize(
    w: Tensor, bits: int = 8, scheme: str = "absmax", per_channel: bool = False
) -> QuantizedTensor:
    """Round the 2-D `w` to `bits`-bit integers.

    absmax (symmetric): scale = max|w| / (2^(bits-1) - 1), q = round(w / scale), zero at 0;
    zeropoint (asymmetric): scale = (max - min) / (2^bits - 1) and an integer zero point, so
    that the range [min, max] (widened to hold 0) uses every level. `per_channel` fits one scale
    per row (output channel) instead of one for the whole matrix: a row of small weights is then
    not rounded on the scale of the largest row.
    """
    if bits not in (4, 8):
        raise InputError(f"bits must be 4 or 8, got {bits!r}")
    if scheme not in SCHEMES:
        raise unknown_name("quantisation scheme", scheme, SCHEMES)
    if w.dim() != 2:
        raise InputError(f"quantize takes a 2-D weight, got shape {tuple(w.shape)}")
    w = w.detach().float()
    dims = 1 if per_channel else (0, 1)
    if scheme == "absmax":
        top = 2 ** (bits - 1) - 1
        scale = w.abs().amax(dim=dims, keepdim=True).clamp(min=1e-12) / top
        zero = torch.full_like(scale, 2 ** (bits - 1), dtype=torch.int32)
        q = torch.round(w / scale).clamp(-top, top) + zero
    else:
        top = 2**bits - 1
        low = w.amin(dim=dims, keepdim=True).clamp(max=0)
        high = w.amax(dim=dims, keepdim=True).clamp(min=0)
        scale = ((high - low) / top).clamp(min=1e-12)
        zero = torch.round(-low / scale).clamp(0, top).to(torch.int32)
        q = (torch.round(w / scale) + zero).clamp(0, top)
    q = q.to(torch.uint8)
    if bits == 4:
        flat = q.flatten()
        flat = torch.cat((flat, flat.new_zeros(flat.numel() % 2)))
        q = flat[0::2] | (flat[1::2] << 4)
    scale = scale.expand(w.shape[0], 1).contiguous() if per_channel else scale.reshape(1, 1)
    zero = zero.expand(w.shape[0], 1).contiguous() if per_channel else zero.reshape(1, 1)
    return QuantizedTensor(q, scale, zero, bits, tuple(w.shape))


def dequantize(qt: QuantizedTensor) -> Tensor:
    """The float32 matrix `qt` stands for."""
    q = qt.q
    if qt.bits == 4:
        q = torch.stack((q & 0x0F, q >> 4), dim=1).flatten()[: math.prod(qt.shape)]
    q = q.reshape(qt.shape).to(torch.int32)
    return (q - qt.zero_point).float() * qt.scale


class QuantizedLinear(nn.Module):
    """Weight-only quantisation of an `nn.Linear`: integer weights in memory (buffers, so they
    move with `.to(device)` and are saved in the state dict), dequantised when the layer runs;
    activations stay in floating point."""

    def __init__(self, linear: nn.Linear, bits: int = 8, scheme: str = "absmax", per_channel=True):
        super().__init__()
        qt = quantize(linear.weight, bits, scheme, per_channel)
        self.bits, self.shape = qt.bits, qt.shape
        self.register_buffer("weight_q", qt.q)
        self.register_buffer("weight_scale", qt.scale)
        self.register_buffer("weight_zero", qt.zero_point)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def weight(self) -> Tensor:
        qt = QuantizedTensor(
            self.weight_q, self.weight_scale, self.weight_zero, self.bits, self.shape
        )
        return dequantize(qt)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight().to(x.dtype), self.bias)


def quantize_model(
    model: GPT, bits: int = 8, scheme: str = "absmax", per_channel: bool = True
) -> GPT:
    """A copy of `model` whose blocks' linear layers are `QuantizedLinear`. The embeddings (and
    the tied output layer, the same matrix) and LayerNorms stay in float32."""
    quantized = copy.deepcopy(model)
    for name, module in list(quantized.blocks.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            layer = QuantizedLinear(module, bits, scheme, per_channel)
            setattr(quantized.blocks.get_submodule(parent), child, layer)
    return quantized


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's weights as stored: parameters and buffers, each tensor once (the
    integers and scales of a `QuantizedLinear` are its buffers)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------------------------------
# 2. Pruning
# ---------------------------------------------------------------------------------------------


def block_linears(model: GPT) -> list[tuple[str, nn.Linear]]:
    """The linear layers inside the blocks: the weights pruning and low-rank methods act on."""
    return [(f"blocks.{n}", m) for n, m in model.blocks.named_modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def magnitude_prune(model: GPT, sparsity: float, scope: str = "global") -> GPT:
    """A copy of `model` with the smallest-magnitude `sparsity` fraction of the blocks' linear
    weights set to zero: ranked across all those layers together ("global") or within each
    layer ("layer"). Unstructured: the matrices keep their shape, so it saves memory and time
    only with sparse storage and kernels."""
    if not 0 <= sparsity < 1:
        raise InputError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if scope not in ("global", "layer"):
        raise InputError(f"scope must be 'global' or 'layer', got {scope!r}")
    pruned = copy.deepcopy(model)
    weights = [m.weight for _, m in block_linears(pruned)]
    groups = [weights] if scope == "global" else [[w] for w in weights]
    for group in groups:
        magnitudes = torch.cat([w.abs().flatten() for w in group])
        n_zero = int(sparsity * magnitudes.numel())
        if n_zero == 0:
            continue
        threshold = magnitudes.kthvalue(n_zero).values
        for w in group:
            w.masked_fill_(w.abs() <= threshold, 0.0)
    return pruned


def sparsity_of(model: GPT) -> float:
    """Fraction of the blocks' linear weights that are exactly zero."""
    weights = [m.weight for _, m in block_linears(model)]
    return sum((w == 0).sum().item() for w in weights) / sum(w.numel() for w in weights)


@torch.no_grad()
def head_importance(model: GPT, idx: Tensor, targets: Tensor) -> Tensor:
    """`(n_layer, n_head)`: how much the loss on (`idx`, `targets`) rises when each head alone is
    removed (its slice of o_proj's input set to zero). Low values are heads to prune."""
    model.eval()
    c = model.config
    base = model(idx, targets)[1].item()
    rises = torch.zeros(c.n_layer, c.n_head)
    for layer, block in enumerate(model.blocks):
        for head in range(c.n_head):
            cols = slice(head * c.head_dim, (head + 1) * c.head_dim)

            def zero_head(_module, args, cols=cols):
                x = args[0].clone()
                x[..., cols] = 0
                return (x,)

            handle = block.self_attn.o_proj.register_forward_pre_hook(zero_head)
            rises[layer, head] = model(idx, targets)[1].item() - base
            handle.remove()
    return rises


@torch.no_grad()
def prune_heads(model: GPT, heads: dict[int, list[int]]) -> GPT:
    """A copy of `model` without the given heads (`{layer: [head, ...]}`): their rows of q, k, v
    and their columns of o_proj are cut out, so the matrices really shrink. Attention infers its
    head count from q_proj's size, so nothing else changes."""
    c = model.config
    pruned = copy.deepcopy(model)
    for layer, dropped in heads.items():
        if not 0 <= layer < c.n_layer or any(not 0 <= h < c.n_head for h in dropped):
            raise InputError(
                f"layer {layer} / heads {dropped} out of range ({c.n_layer} x {c.n_head})"
            )
        keep = [h for h in range(c.n_head) if h not in set(dropped)]
        if not keep:
            raise InputError(
                f"pruning every head of layer {layer} leaves no attention; drop the layer"
            )
        rows = torch.cat([torch.arange(h * c.head_dim, (h + 1) * c.head_dim) for h in keep])
        attn = pruned.blocks[layer].self_attn
        for name in ("q_proj", "k_proj", "v_proj"):
            old = getattr(attn, name)
            new = nn.Linear(c.n_embd, len(rows), bias=old.bias is not None)
            new.weight.copy_(old.weight[rows])
            if old.bias is not None:
                new.bias.copy_(old.bias[rows])
            setattr(attn, name, new)
        old = attn.o_proj
        new = nn.Linear(len(rows), c.n_embd, bias=old.bias is not None)
        new.weight.copy_(old.weight[:, rows])
        if old.bias is not None:
            new.bias.copy_(old.bias)
        attn.o_proj = new
    return pruned


def drop_layers(model: GPT, keep: list[int]) -> GPT:
    """A copy of `model` with only the blocks in `keep` (LayerDrop's pruning at inference): the
    residual stream lets a block be skipped, at some cost in quality."""
    if (
        not keep
        or sorted(set(keep)) != sorted(keep)
        or not all(0 <= i < model.config.n_layer for i in keep)
    ):
        raise InputError(
            f"keep must be distinct block indices in [0, {model.config.n_layer}), got {keep}"
        )
    smaller = copy.deepcopy(model)
    smaller.blocks = nn.ModuleList(smaller.blocks[i] for i in keep)
    smaller.config = dataclasses.replace(model.config, n_layer=len(keep))
    return smaller


# ---------------------------------------------------------------------------------------------
# 3. Knowledge distillation
# ---------------------------------------------------------------------------------------------


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> Tensor:
    """Hinton et al.'s loss: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(targets),
    where _T is the softmax at temperature T. Softened targets show the student which wrong
    tokens the teacher finds nearly right; T^2 keeps their gradient on the scale of the CE's."""
    require_positive(temperature, "temperature")
    if not 0 <= alpha <= 1:
        raise InputError(f"alpha must be in [0, 1], got {alpha!r}")
    v = student_logits.shape[-1]
    soft = F.kl_div(
        F.log_softmax(student_logits.reshape(-1, v) / temperature, dim=-1),
        F.log_softmax(teacher_logits.reshape(-1, v) / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    hard = F.cross_entropy(student_logits.reshape(-1, v), targets.reshape(-1))
    return alpha * temperature**2 * soft + (1 - alpha) * hard


# ---------------------------------------------------------------------------------------------
# 4. Weight sharing and low rank
# ---------------------------------------------------------------------------------------------


def share_blocks(model: GPT) -> GPT:
    """A copy of `model` whose every block is block 0 (ALBERT's cross-layer sharing): the same
    compute, 1/n_layer of the block parameters. Trained this way from the start, not applied to
    a model trained without it."""
    shared = copy.deepcopy(model)
    shared.blocks = nn.ModuleList([shared.blocks[0]] * model.config.n_layer)
    return shared


@torch.no_grad()
def low_rank(linear: nn.Linear, rank: int) -> nn.Sequential:
    """`linear` as two thinner layers, in -> rank -> out, from its truncated SVD W ~ U_r S_r V_r^T:
    the best rank-`rank` approximation (Eckart-Young), rank * (in + out) weights instead of
    in * out."""
    require_positive(rank, "rank", integer=True)
    w = linear.weight.double()
    if rank > min(w.shape):
        raise InputError(f"rank {rank} exceeds the layer's smaller side {min(w.shape)}")
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    first = nn.Linear(linear.in_features, rank, bias=False)
    second = nn.Linear(rank, linear.out_features, bias=linear.bias is not None)
    first.weight.copy_((s[:rank, None] * vh[:rank]).float())
    second.weight.copy_(u[:, :rank].float())
    if linear.bias is not None:
        second.bias.copy_(linear.bias)
    return nn.Sequential(first, second)


def low_rank_model(
    model: GPT, rank: int, targets: tuple[str, ...] = ("up_proj", "down_proj")
) -> GPT:
    """A copy of `model` whose linear layers named in `targets` are replaced by `low_rank`."""
    smaller = copy.deepcopy(model)
    for name, module in block_linears(smaller):
        if name.rsplit(".", 1)[-1] in targets:
            parent, _, child = name.rpartition(".")
            setattr(smaller.get_submodule(parent), child, low_rank(module, rank))
    return smaller


# ---------------------------------------------------------------------------------------------
# 5. Memory scheduling: blocks on disk
# ---------------------------------------------------------------------------------------------


class _BlockOnDisk(nn.Module):
    """Stands in for block i: loads its weights from disk into the one shared block, then runs
    it. The shared block is held in a list so that it is not registered (and counted) again."""

    def __init__(self, path: Path, slot: nn.Module, owner: DiskOffloadedGPT):
        super().__init__()
        self.path, self._slot, self._owner = path, [slot], [owner]

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        slot = self._slot[0]
        slot.load_state_dict(load_file(str(self.path), device=str(x.device)))
        self._owner[0].bytes_read += self.path.stat().st_size
        return slot(x, **kwargs)


class DiskOffloadedGPT(nn.Module):
    """A GPT whose blocks are kept on disk, one safetensors file each, with one block in memory
    at a time (the scheduling FlexGen and BMInf do between GPU, CPU and disk, here between disk
    and the compute device). Peak weight memory falls from every block to one, at the price of
    reading every block's weights on every forward pass. It computes what `model` computes, with
    the GPT's own forward pass."""

    def __init__(self, model: GPT, folder: str | Path):
        super().__init__()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.gpt = copy.deepcopy(model).eval()  # embeddings, final LayerNorm, head
        self.slot = self.gpt.blocks[0]  # the one block that stays in memory
        paths = []
        for i, block in enumerate(model.blocks):
            paths.append(folder / f"block{i:03d}.safetensors")
            save_file(
                {k: v.detach().contiguous() for k, v in block.state_dict().items()}, str(paths[-1])
            )
        self.gpt.blocks = nn.ModuleList(_BlockOnDisk(p, self.slot, self) for p in paths)
        self.bytes_read = 0

    def resident_bytes(self) -> int:
        """Weight bytes in memory while it runs: embeddings, head and one block."""
        return model_bytes(self)

    @torch.no_grad()
    def forward(self, idx: Tensor) -> Tensor:
        """Logits `(B, T, V)` for `idx`, each block read from disk just before it runs."""
        return self.gpt(idx)[0]


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_loss(
    model, tokens: np.ndarray, block_size: int, n_batches: int = 8, batch_size: int = 16
) -> float:
    """Mean next-token loss of `model` (a GPT or anything returning `(logits, ...)` or logits)
    on `n_batches` x `batch_size` windows taken at evenly spaced places in `tokens`: the same
    windows every call, so that methods are compared on the same text."""
    n = n_batches * batch_size
    starts = np.linspace(0, len(tokens) - block_size - 2, n).astype(np.int64)
    windows = torch.from_numpy(
        np.stack([tokens[s : s + block_size + 1] for s in starts]).astype(np.int64)
    )
    if hasattr(model, "eval"):
        model.eval()
    total = 0.0
    for batch in windows.split(batch_size):
        out = model(batch[:, :-1])
        logits = out[0] if isinstance(out, tuple) else out
        total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()
    return total / n_batches
