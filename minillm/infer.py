"""Inference and compression (chapter 11): serving the course GPT faster and smaller.

1. quantisation: absmax and zero-point, per tensor and per channel, 8 and 4 bits, weight-only;
2. pruning: unstructured by magnitude, structured by attention head, whole layers dropped;
3. knowledge distillation: the soft-target loss;
4. weight sharing (ALBERT's cross-layer sharing) and low-rank approximation (truncated SVD);
5. memory scheduling: running a model whose blocks live on disk, one block in memory at a time;
6. speculative decoding: a draft model proposes tokens, the target keeps its own distribution;
7. training the chapter's models (plain, distilled, with LayerDrop), cached between runs.

Decoding (temperature, top-k, top-p, stop tokens) and generation with a KV cache are
`minillm.generate`.

`evaluate_loss`, `model_bytes` and `step_seconds` measure what each method costs in quality, size
and time.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from minillm.errors import InputError, require_positive, unknown_name
from minillm.generate import filter_logits
from minillm.model import GPT, KVCache

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


@torch.no_grad()
def step_seconds(model: GPT, position: int, use_cache: bool, repeats: int = 5) -> float:
    """Seconds to compute the next token's logits when `position` tokens come before it (the
    fastest of `repeats`: other work only ever adds time): with the KV cache, one token's
    forward pass against `position` cached keys and values; without, the forward pass of all
    `position + 1` tokens. On a CPU it is this process's CPU time, which other processes on a
    shared machine do not inflate; on a GPU, wall time after synchronising."""
    import time

    c = model.config
    if not 0 <= position < c.block_size:
        raise InputError(f"position must be in [0, block_size={c.block_size}), got {position}")
    model.eval()
    device = next(model.parameters()).device
    on_gpu = device.type == "cuda"
    clock = time.perf_counter if on_gpu else time.process_time
    idx = torch.randint(
        0, c.vocab_size, (1, position + 1), generator=torch.Generator().manual_seed(0)
    )
    idx = idx.to(device)
    cache = KVCache(c.n_layer)
    if use_cache and position:
        model(idx[:, :-1], cache=cache)
    filled = list(cache.layers)
    times = []
    for _ in range(repeats):
        cache.layers = list(filled)  # the same cache every time, not one a token longer
        if on_gpu:
            torch.cuda.synchronize(device)
        start = clock()
        if use_cache:
            model(idx[:, -1:], cache=cache)
        else:
            model(idx)
        if on_gpu:
            torch.cuda.synchronize(device)
        times.append(clock() - start)
    return min(times)


# ---------------------------------------------------------------------------------------------
# 6. Speculative decoding
# ---------------------------------------------------------------------------------------------


def speculative_accept(
    p: Tensor, q: Tensor, drafted: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """The rejection rule of speculative sampling (Leviathan et al. and Chen et al., 2023) for N
    independent positions: `p` and `q` `(N, V)` are the target's and the draft's probabilities
    there and `drafted` `(N,)` tokens drawn from `q`. Each is kept with probability
    min(1, p/q); a rejected one is replaced by a draw from max(0, p - q), renormalised.
    Returns the tokens `(N,)` and whether each draft was accepted `(N,)`.

    Whatever q is, the token that comes out is distributed exactly as p: the accepted part
    gives min(p, q) and the resampled part the rest, p - min(p, q)."""
    if p.shape != q.shape or p.dim() != 2 or drafted.shape != p.shape[:1]:
        raise InputError(
            f"p and q must be (N, V) and drafted (N,), got {tuple(p.shape)}, {tuple(q.shape)}, "
            f"{tuple(drafted.shape)}"
        )
    rows = torch.arange(len(drafted))
    ratio = p[rows, drafted] / q[rows, drafted]
    accepted = torch.rand(len(drafted), generator=generator, device=p.device) < ratio
    residual = (p - q).clamp(min=0)
    # where p == q everywhere, the residual is zero and a draft is always accepted anyway
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
    resampled = torch.multinomial(residual, 1, generator=generator).squeeze(1)
    return torch.where(accepted, drafted, resampled), accepted


@dataclass
class SpeculativeStats:
    """What a speculative run did: tokens drafted and accepted, and target forward passes."""

    drafted: int = 0
    accepted: int = 0
    target_calls: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(1, self.drafted)


@torch.no_grad()
def speculative_generate(
    target: GPT,
    draft: GPT,
    idx: Tensor,
    max_new_tokens: int,
    *,
    k: int = 4,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, SpeculativeStats]:
    """Append `max_new_tokens` tokens to `idx` `(1, T)` with the `draft` model proposing `k`
    tokens at a time and one forward pass of the `target` checking all of them: the tokens
    follow the target's distribution exactly (`speculative_accept`); at temperature 0 they are
    the target's greedy tokens. Both models read the whole sequence on each call (no KV cache),
    so the sequence must fit the smaller context: T + max_new_tokens <= block_size.

    Returns the tokens `(1, T + max_new_tokens)` and the `SpeculativeStats`."""
    require_positive(k, "k", integer=True)
    if idx.dim() != 2 or idx.shape[0] != 1:
        raise InputError(f"speculative_generate takes one prompt (1, T), got {tuple(idx.shape)}")
    if target.config.vocab_size != draft.config.vocab_size:
        raise InputError("the draft and the target must share a vocabulary")
    room = min(target.config.block_size, draft.config.block_size)
    if idx.shape[1] + max_new_tokens > room:
        raise InputError(
            f"{idx.shape[1]} prompt + {max_new_tokens} new tokens exceed the context of {room}"
        )
    target.eval(), draft.eval()

    def probs(logits: Tensor) -> Tensor:
        if temperature == 0:
            return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        return filter_logits(logits, temperature).softmax(-1)

    stats = SpeculativeStats()
    end = idx.shape[1] + max_new_tokens
    while idx.shape[1] < end:
        n = min(k, end - idx.shape[1])
        proposal, q = idx, []
        for _ in range(n):
            q.append(probs(draft(proposal)[0][:, -1]))
            token = torch.multinomial(q[-1], 1, generator=generator)
            proposal = torch.cat((proposal, token), dim=1)
        p = probs(target(proposal)[0][0, idx.shape[1] - 1 :])  # (n + 1, V)
        stats.target_calls += 1
        drafted = proposal[0, idx.shape[1] :]
        out, kept = [], True
        for i in range(n):
            token, ok = speculative_accept(p[i : i + 1], q[i], drafted[i : i + 1], generator)
            stats.drafted += 1
            stats.accepted += int(ok)
            out.append(token)
            if not ok:
                kept = False
                break
        if kept and idx.shape[1] + n < end:  # every draft kept: the target's next token is free
            out.append(torch.multinomial(p[n : n + 1], 1, generator=generator).squeeze(1))
        idx = torch.cat((idx, torch.cat(out)[None]), dim=1)
    return idx, stats


# ---------------------------------------------------------------------------------------------
# 7. Training the chapter's models: plain, distilled, with LayerDrop; cached between runs
# ---------------------------------------------------------------------------------------------


@contextmanager
def blocks_kept(model: GPT, keep: list[int]):
    """Run `model` with only the blocks in `keep`, sharing their parameters (LayerDrop's step:
    the skipped blocks get no gradient). The full list of blocks is back on exit."""
    every = model.blocks
    model.blocks = nn.ModuleList(every[i] for i in keep)
    try:
        yield model
    finally:
        model.blocks = every


def train_lm(
    model: GPT,
    tokens: np.ndarray,
    steps: int,
    *,
    batch_size: int = 16,
    learning_rate: float = 1e-2,
    seed: int = 0,
    teacher: GPT | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    layerdrop: float = 0.0,
) -> list[float]:
    """Train `model` on next-token prediction over `tokens` for `steps` AdamW steps (warm-up
    over the first tenth, then a cosine decay to a tenth of `learning_rate`); returns each
    step's loss.

    With a `teacher`, the loss is `distillation_loss` against the teacher's logits on the same
    batch. With `layerdrop` = p, every block is skipped with probability p at each step (at
    least one always runs), so that the model learns to work with blocks missing (Fan et al.,
    2019). The batches depend on `seed` only, so two runs with one seed see the same text.
    """
    from minillm.data import TokenBatchSampler

    require_positive(steps, "steps", integer=True)
    if not 0 <= layerdrop < 1:
        raise InputError(f"layerdrop must be in [0, 1), got {layerdrop!r}")
    batches = TokenBatchSampler(tokens, model.config.block_size, batch_size, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    warmup = max(1, steps // 10)

    def rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    dice = torch.Generator().manual_seed(seed)
    n_layer = model.config.n_layer
    losses = []
    model.train()
    for _ in range(steps):
        x, y = next(batches)
        keep = list(range(n_layer))
        if layerdrop:
            keep = [i for i in keep if torch.rand((), generator=dice).item() >= layerdrop]
            keep = keep or [int(torch.randint(n_layer, (), generator=dice))]
        with blocks_kept(model, keep):
            logits, loss = model(x, y)
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher.eval()(x)[0]
            loss = distillation_loss(logits, teacher_logits, y, temperature, alpha)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses


def cached_model(model: GPT, train, key: dict, folder: str | Path | None = None) -> GPT:
    """`model` trained by `train(model)`, or, when a run with the same `key` (every setting the
    training depends on) has been cached, `model` with the cached weights: the chapter trains
    each model once and reads it back on later runs. Kept in the data cache's `models` folder
    (`minillm.data.data_dir()`), never in the repository."""
    import hashlib
    import json

    from minillm.data import data_dir

    folder = Path(folder) if folder is not None else data_dir() / "models"
    described = json.dumps(
        {"key": key, "config": model.config.to_dict(), "torch": torch.__version__},
        sort_keys=True,
        default=str,
    )
    path = folder / f"{hashlib.sha256(described.encode()).hexdigest()[:16]}.pt"
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    train(model)
    folder.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".part")
    torch.save(model.state_dict(), part)
    part.replace(path)  # whole or absent, even if interrupted
    return model.eval()


# ---------------------------------------------------------------------------------------------
# 8. A compressed checkpoint: quantised weights that sample like any other checkpoint
# ---------------------------------------------------------------------------------------------

COMPRESSION = "compression.json"  # marks a checkpoint folder whose weights are quantised


def folder_bytes(folder: str | Path) -> int:
    """Bytes of every file under `folder`: what a checkpoint costs on disk."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def write_compressed(
    source: str | Path,
    out: str | Path,
    bits: int = 8,
    scheme: str = "absmax",
    per_channel: bool = True,
) -> Path:
    """Write the checkpoint `source` (a checkpoint folder, or a run folder's latest checkpoint)
    to the folder `out` with its blocks' linear weights quantised (`quantize_model`): the run
    config and tokenizer beside the weights, `COMPRESSION` naming the scheme, and a manifest of
    every file, as in any checkpoint. `load_compressed` reads it back. Returns `out`."""
    import json
    import shutil

    from safetensors.torch import save_model

    from minillm import checkpoint
    from minillm.sample import load_for_sampling

    folder = checkpoint.resolve(Path(source))
    model, _ = load_for_sampling(folder)
    quantized = quantize_model(model, bits, scheme, per_channel)  # checks bits and scheme
    out = Path(out)
    if out.resolve() == folder.resolve():
        raise InputError(f"write the compressed checkpoint to a new folder, not over {folder}")
    out.mkdir(parents=True, exist_ok=True)
    save_model(quantized, str(out / checkpoint.WEIGHTS))
    shutil.copyfile(folder / checkpoint.CONFIG, out / checkpoint.CONFIG)
    if (folder / checkpoint.TOKENIZER).is_file():
        shutil.copyfile(folder / checkpoint.TOKENIZER, out / checkpoint.TOKENIZER)
    described = {"bits": bits, "scheme": scheme, "per_channel": per_channel}
    (out / COMPRESSION).write_text(json.dumps(described) + "\n")
    checkpoint.write_manifest(out)
    return out


def load_compressed(folder: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, object]:
    """The quantised GPT and the tokenizer of a folder `write_compressed` wrote, checked against
    its manifest first."""
    import json

    from safetensors.torch import load_model

    from minillm import checkpoint
    from minillm.tokenizer import load as load_tokenizer
    from minillm.train_config import MODELS  # imported here: train_config imports the models

    folder = Path(folder)
    if not (folder / COMPRESSION).is_file():
        raise InputError(f"{folder} has no {COMPRESSION}: it is not a compressed checkpoint")
    checkpoint.verify(folder)
    described = json.loads((folder / COMPRESSION).read_text())
    if (
        not isinstance(described, dict)
        or set(described) != {"bits", "scheme", "per_channel"}
        or not isinstance(described["per_channel"], bool)
    ):
        raise InputError(
            f"{folder / COMPRESSION} is not what write_compressed writes "
            '({"bits": 8 or 4, "scheme": ..., "per_channel": true or false}); write it again'
        )
    config = checkpoint.load_config(folder)
    architecture = config.get("architecture", "gpt")
    if not isinstance(architecture, str) or architecture not in MODELS:
        raise unknown_name("checkpoint architecture", str(architecture), MODELS)
    config_class, model_class = MODELS[architecture]
    skeleton = model_class(config_class.from_dict(config["model"]))
    model = quantize_model(
        skeleton, described["bits"], described["scheme"], described["per_channel"]
    ).to(device)
    load_model(model, str(folder / checkpoint.WEIGHTS), strict=True, device=str(device))
    tokenizer_file = folder / checkpoint.TOKENIZER
    tokenizer = load_tokenizer(tokenizer_file) if tokenizer_file.is_file() else None
    return model.eval(), tokenizer
