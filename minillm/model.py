"""The course's transformers in one file: the GPT that every later chapter trains, parallelises,
fine-tunes and compresses, and chapter 04's two other families (a BERT-style masked-LM encoder
and an encoder-decoder).

Read it top to bottom:

1. positions: the sinusoidal table and rotary embeddings;
2. the pieces every family shares: `Attention` (self or cross, causal or padded), `MLP`, and the
   pre-LayerNorm `Block`;
3. `GPTConfig` and `GPT`, the decoder-only language model (nanoGPT's layout, with llama-style module
   names `self_attn.{q,k,v,o}_proj` and `mlp.{up,down}_proj` so that tensor-parallel code and
   DeepSpeed's AutoTP find the layers);
4. `EncoderConfig`, `BertStyleEncoder` with `mask_tokens`, and `Seq2Seq`.

Shapes: B batch, T sequence length, C = n_embd, H heads, D = C // H features per head, V vocabulary.
Every model's `forward` returns `(logits, loss or None)` and knows nothing of what drives it (a
plain loop, DDP, DeepSpeed).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Self

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from minillm.attention import merge_heads
from minillm.attention import scaled_dot_product_attention as manual_attention
from minillm.errors import InputError, InputTypeError, require_positive, unknown_name

POSITIONS = ("learned", "rotary")
ATTENTION = ("sdpa", "manual")
IGNORE_INDEX = -100  # targets equal to this are left out of the loss (padding, unmasked tokens)


# ---------------------------------------------------------------------------------------------
# 1. Positions
# ---------------------------------------------------------------------------------------------


def _angles(positions: Tensor, dim: int, base: float) -> Tensor:
    """`pos * base^(-2i/dim)` for each position and each i < dim/2: `(len(positions), dim // 2)`."""
    even = torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = base ** (-even / dim)
    return positions.float()[:, None] * inv_freq


def sinusoidal_positions(n_positions: int, dim: int, base: float = 10000.0) -> Tensor:
    """The fixed position table of "Attention Is All You Need": `(n_positions, dim)`.

    Column 2i holds sin(pos / base^(2i/dim)) and column 2i+1 the cosine of the same angle: each
    pair of columns is a clock turning at its own speed, fast in the first columns, slow in the
    last, so every position gets a distinct code and nearby positions get similar ones.

    >>> sinusoidal_positions(2, 4)
    tensor([[0.0000, 1.0000, 0.0000, 1.0000],
            [0.8415, 0.5403, 0.0100, 0.9999]])
    """
    require_positive(n_positions, "n_positions", integer=True)
    require_positive(dim, "dim", integer=True)
    if dim % 2:
        raise InputError(f"dim must be even (sin and cos columns come in pairs), got {dim}")
    angles = _angles(torch.arange(n_positions), dim, base)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # interleave sin, cos


def rotary_cos_sin(
    positions: Tensor, head_dim: int, base: float = 10000.0
) -> tuple[Tensor, Tensor]:
    """Cosine and sine tables for rotary embeddings at `positions` `(T,)`: two `(T, head_dim)`.

    Llama's layout: feature i is paired with feature i + head_dim/2, and both columns of a pair hold
    the same angle pos * base^(-2i/head_dim).
    """
    angles = _angles(positions, head_dim, base)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate every feature pair (i, i + D/2) of `x` `(..., T, D)` by its position's angle.

    Rotating queries by angle m*theta and keys by n*theta makes their dot product depend on m - n
    only, so attention sees relative positions. Applied to queries and keys, never to values.
    Returns a tensor of `x`'s shape and dtype.
    """
    x1, x2 = x.chunk(2, dim=-1)
    rotated_half = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated_half * sin).type_as(x)  # cos/sin are float32; keep x's dtype


# ---------------------------------------------------------------------------------------------
# 2. Shared pieces
# ---------------------------------------------------------------------------------------------


class KVCache:
    """The keys and values every layer has computed so far, for generating one token at a time
    (chapter 11). Without it, each new token recomputes the keys and values of the whole prefix:
    T tokens cost O(T^2) projections instead of O(T).

    `layers[i]` is layer i's `(k, v)`, each `(B, H, S, D)`; `length` is S, the tokens cached.
    """

    def __init__(self, n_layer: int):
        self.layers: list[tuple[Tensor, Tensor] | None] = [None] * n_layer

    @property
    def length(self) -> int:
        return 0 if self.layers[0] is None else self.layers[0][0].shape[2]

    def nbytes(self) -> int:
        """Bytes held: 2 x n_layer x B x S x C x bytes per value."""
        return sum(t.numel() * t.element_size() for kv in self.layers if kv for t in kv)


class Attention(nn.Module):
    """Multi-head attention with projections `q_proj`, `k_proj`, `v_proj`, `o_proj`.

    Self-attention when `context` is None; cross-attention otherwise (queries from `x`, keys and
    values from `context`). `manual=True` computes it with `minillm.attention`'s written-out
    softmax(q k^T / sqrt(D)) v; the default calls `F.scaled_dot_product_attention`, which picks a
    fused kernel (flash or memory-efficient) where the hardware has one.
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        manual: bool = False,
    ):
        super().__init__()
        self.head_dim, self.dropout, self.manual = n_embd // n_head, dropout, manual
        self.q_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.k_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.v_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.o_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def _heads(self, x: Tensor) -> Tensor:
        # (B, T, C) -> (B, H, T, D). The head count is inferred (-1): under tensor parallelism a
        # rank's q_proj produces only its share of the heads.
        return x.view(*x.shape[:2], -1, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        is_causal: bool = False,
        key_padding_mask: Tensor | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        """Attend from `x` `(B, T, C)` to `context` `(B, S, C)` (`x` itself when None).

        `key_padding_mask` `(B, S)` is True at real tokens and False at padding; `rotary` is the
        `(cos, sin)` pair from `rotary_cos_sin`, each `(T, D)`. Returns `(B, T, C)`.

        With a `cache` (causal self-attention), this call's keys and values are appended to
        `cache.layers[layer]` and the queries attend to all of them: either the cache was empty
        (the prompt, causal as usual) or `x` is one new token, which may see every cached one.
        """
        context = x if context is None else context
        q = self._heads(self.q_proj(x))  # (B, H, T, D)
        k = self._heads(self.k_proj(context))  # (B, H, S, D)
        v = self._heads(self.v_proj(context))
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if cache is not None:
            past = cache.layers[layer]
            if past is not None:
                if x.shape[1] != 1:
                    raise InputError("a filled KV cache takes one new token per call")
                k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
                is_causal = False  # the one new query may attend to every cached key
            cache.layers[layer] = (k, v)
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        dropout_p = self.dropout if self.training else 0.0
        if self.manual:
            y = manual_attention(q, k, v, mask=mask, is_causal=is_causal, dropout_p=dropout_p)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal
            )
        return self.resid_dropout(self.o_proj(merge_heads(y)))  # (B, H, T, D) -> (B, T, C)


_GELU_C = 2 * math.sqrt(2 / math.pi)  # tanh(z) = 2 sigmoid(2z) - 1, with z = sqrt(2/pi)(x + ...)


class _GeluTanhCPU(torch.autograd.Function):
    """GPT-2's tanh GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), written as
    x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3)). The same function; but CPUs evaluate sigmoid
    several times faster than tanh, which makes forward + backward about 1.6x faster here than
    `F.gelu(approximate="tanh")`. Equal to it within float32 rounding (tests/test_model.py)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        s = x * x
        s.mul_(0.044715 * _GELU_C).add_(_GELU_C).mul_(x).sigmoid_()
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        x, s = ctx.saved_tensors
        # d/dx [x s(x)] = s + x s (1 - s) C (1 + 3 * 0.044715 x^2), computed in place: fresh
        # activation-sized buffers cost page faults on a CPU.
        d = x * x
        d.mul_(3 * 0.044715 * _GELU_C).add_(_GELU_C).mul_(x).mul_(s)
        return d.addcmul_(d, s, value=-1).add_(s).mul_(grad)


def gelu_tanh(x: Tensor) -> Tensor:
    """GPT-2's GELU (`gelu_new` in transformers). GPUs run torch's fused kernel; CPUs the faster
    sigmoid form above."""
    if x.device.type == "cpu":
        return _GeluTanhCPU.apply(x)
    return F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    """Position-wise feed-forward network: C -> 4C, GELU, 4C -> C.

    The GELU is the tanh approximation, GPT-2's `gelu_new`, so that GPT-2 weights give the same
    outputs here as in `transformers`.
    """

    def __init__(self, n_embd: int, *, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.up_proj = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.down_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """`(B, T, C)` -> `(B, T, C)`."""
        return self.dropout(self.down_proj(gelu_tanh(self.up_proj(x))))


class Block(nn.Module):
    """One pre-LayerNorm transformer block:

        x = x + self_attn(ln_1(x))
        x = x + cross_attn(ln_cross(x), memory)      (decoder of an encoder-decoder only)
        x = x + mlp(ln_2(x))

    The residual stream `x` is never normalised itself, so the gradient reaches early blocks
    through the additions undiminished; that is why GPT-2 moved LayerNorm in front of each
    sublayer. The original Transformer and BERT normalise after each addition (post-LN), which
    needs learning-rate warm-up to train deep stacks.
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        *,
        bias: bool = True,
        dropout: float = 0.0,
        manual: bool = False,
        cross_attention: bool = False,
    ):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.self_attn = Attention(n_embd, n_head, bias=bias, dropout=dropout, manual=manual)
        if cross_attention:
            self.ln_cross = nn.LayerNorm(n_embd, bias=bias)
            self.cross_attn = Attention(n_embd, n_head, bias=bias, dropout=dropout, manual=manual)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, bias=bias, dropout=dropout)

    def forward(
        self,
        x: Tensor,
        *,
        is_causal: bool = False,
        padding_mask: Tensor | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
        memory: Tensor | None = None,
        memory_padding_mask: Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        """`x` `(B, T, C)` -> `(B, T, C)`; `memory` `(B, S, C)` is the encoder output that a
        decoder block cross-attends to. Masks are `(B, T)` / `(B, S)`, True at real tokens.
        `cache` and `layer`: this block's place in a `KVCache` (see `Attention.forward`)."""
        x = x + self.self_attn(
            self.ln_1(x),
            is_causal=is_causal,
            key_padding_mask=padding_mask,
            rotary=rotary,
            cache=cache,
            layer=layer,
        )
        if memory is not None:
            x = x + self.cross_attn(self.ln_cross(x), memory, key_padding_mask=memory_padding_mask)
        return x + self.mlp(self.ln_2(x))


def _init_weights(model: nn.Module, n_layer: int) -> None:
    """GPT-2's initialisation: weights and embeddings N(0, 0.02), biases 0, LayerNorm (1, 0), and
    the projections that write into the residual stream (`o_proj`, `down_proj`) scaled by
    1/sqrt(2 n_layer), so that the stream's variance does not grow with depth."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("o_proj", "down_proj")) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


def _check_token_ids(idx: Any, vocab_size: int, block_size: int | None, name: str = "idx") -> None:
    """Raise a one-sentence error unless `idx` is a `(B, T)` integer tensor of ids in
    [0, vocab_size) with 1 <= T <= block_size (any T >= 1 when block_size is None)."""
    if not isinstance(idx, Tensor):
        got = type(idx).__name__
        raise InputTypeError(f"{name} must be a torch.Tensor of token ids, got {got}")
    if idx.dtype not in (torch.long, torch.int):
        raise InputTypeError(
            f"{name} must hold integer token ids (torch.long), got {idx.dtype}; use {name}.long()"
        )
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise InputError(
            f"{name} must have shape (batch, seq) with seq >= 1, got {tuple(idx.shape)}; "
            f"a single sequence needs a batch dimension: {name}[None]"
        )
    if block_size is not None and idx.shape[1] > block_size:
        raise InputError(
            f"input of {idx.shape[1]} tokens is longer than the context (block_size={block_size});"
            f" keep the last {block_size} tokens, as generate() does"
        )
    outside = (idx < 0) | (idx >= vocab_size)
    if outside.any():
        raise InputError(
            f"token id {int(idx[outside][0])} in {name} is outside the vocabulary [0, {vocab_size})"
        )


def lm_loss(logits: Tensor, targets: Tensor | None) -> Tensor | None:
    """Mean cross-entropy of `logits` `(B, T, V)` against `targets` `(B, T)`, skipping -100."""
    if targets is None:
        return None
    if not isinstance(targets, Tensor) or targets.shape != logits.shape[:-1]:
        got = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise InputError(f"targets must be a tensor of shape {tuple(logits.shape[:-1])}, got {got}")
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------
# 3. The course GPT
# ---------------------------------------------------------------------------------------------


class _Config:
    """What the model configs share: `from_dict`, `to_dict` and the size checks."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        """Build the config from a dict (a JSON/YAML file, a checkpoint), rejecting unknown keys
        so that a misspelt field fails instead of silently keeping its default."""
        if not isinstance(d, Mapping):
            raise InputTypeError(f"{cls.__name__}.from_dict takes a dict, got {type(d).__name__}")
        valid = [f.name for f in fields(cls)]
        unknown = [key for key in d if key not in valid]
        if unknown:
            raise InputError(
                f"unknown {cls.__name__} field(s) {', '.join(map(repr, unknown))}; "
                f"valid fields are: {', '.join(valid)}"
            )
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict; `from_dict(config.to_dict())` gives the config back."""
        return asdict(self)

    def _check_sizes(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            setattr(self, name, int(require_positive(getattr(self, name), name, integer=True)))
        if self.n_embd % self.n_head:
            raise InputError(
                f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}: every head gets "
                "n_embd // n_head features"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.bias, bool):
            raise InputTypeError(f"bias must be True or False, got {self.bias!r}")

    @property
    def head_dim(self) -> int:
        """Features per attention head, n_embd // n_head."""
        return self.n_embd // self.n_head


@dataclass
class GPTConfig(_Config):
    """Sizes and options of the course GPT. The defaults are a 0.8M-parameter model for
    character-level tiny Shakespeare (65 characters)."""

    vocab_size: int = 65
    block_size: int = 64  # the context: the longest input the model reads
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases in the Linear and LayerNorm layers, as in GPT-2
    positions: str = "learned"  # "learned" (GPT-2's table) or "rotary" (rotated q and k)
    attention: str = "sdpa"  # "sdpa" (torch's fused kernels) or "manual" (minillm.attention)
    tie_weights: bool = True  # lm_head reuses the token embedding matrix

    def __post_init__(self) -> None:
        self._check_sizes()
        if self.positions not in POSITIONS:
            raise unknown_name("positions", self.positions, POSITIONS)
        if self.attention not in ATTENTION:
            raise unknown_name("attention", self.attention, ATTENTION)
        if not isinstance(self.tie_weights, bool):
            raise InputTypeError(f"tie_weights must be True or False, got {self.tie_weights!r}")
        if self.positions == "rotary" and self.head_dim % 2:
            raise InputError(
                f"rotary positions rotate pairs of features, so n_embd // n_head must be even; "
                f"got {self.n_embd} // {self.n_head} = {self.head_dim}"
            )


class GPT(nn.Module):
    """Decoder-only language model: GPT-2's architecture, optionally with rotary positions.

    `idx` `(B, T)` token ids -> logits `(B, T, V)`: at every position, scores for the next token,
    computed from that position and the ones before it only (causal self-attention).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise InputTypeError(
                f"GPT takes a GPTConfig, got {type(config).__name__}; for a dict use "
                "GPTConfig.from_dict(d)"
            )
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.n_embd)
        if c.positions == "learned":
            self.pos_emb = nn.Embedding(c.block_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        manual = c.attention == "manual"
        self.blocks = nn.ModuleList(
            Block(c.n_embd, c.n_head, bias=c.bias, dropout=c.dropout, manual=manual)
            for _ in range(c.n_layer)
        )
        self.ln_f = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_weights:
            # One matrix both reads tokens in and scores them out (GPT-2, and V*C fewer parameters).
            self.lm_head.weight = self.tok_emb.weight
        _init_weights(self, c.n_layer)
        self.activation_checkpoint = None  # the function wrapping each block; see below

    def set_activation_checkpointing(self, enabled: bool = True, checkpoint=None) -> None:
        """Keep only each block's input during training and recompute the block's activations
        in the backward pass (chapter 06): activation memory falls from every layer's tensors to
        one tensor per block, for about one extra forward pass of compute.

        `checkpoint(block, x, **kwargs)` is the function that wraps a block: torch's
        non-reentrant `torch.utils.checkpoint.checkpoint` by default; the DeepSpeed engine passes
        `deepspeed.checkpointing.checkpoint`, which can also partition or offload the kept inputs.
        """
        if not enabled:
            self.activation_checkpoint = None
        elif checkpoint is None:
            self.activation_checkpoint = functools.partial(
                torch.utils.checkpoint.checkpoint, use_reentrant=False
            )
        else:
            self.activation_checkpoint = checkpoint

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, cache: KVCache | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """`idx` `(B, T)` integer token ids, T <= block_size; `targets` `(B, T)` the token that
        follows each position (-100 where nothing should be learned); `cache` a `KVCache` that
        holds the tokens before `idx` (chapter 11: generating with a cache).

        Returns logits `(B, T, V)` and the mean cross-entropy over the targets (None without).
        """
        logits = self.lm_head(self.hidden_states(idx, cache=cache))
        return logits, lm_loss(logits, targets)

    def hidden_states(
        self, idx: Tensor, prefix: Tensor | None = None, cache: KVCache | None = None
    ) -> Tensor:
        """The final LayerNorm's output `(B, T, C)`: what `lm_head` scores, and what a
        classification or reward head reads (chapter 10).

        `prefix` `(B or 1, P, C)` are vectors placed before the token embeddings, as if they were
        P more tokens (the learned soft prompt of prompt tuning): they take positions 0..P-1,
        every token attends to them, and the output is `(B, P + T, C)`.
        """
        c = self.config
        n_before = 0 if prefix is None else prefix.shape[1]
        if cache is not None:
            if prefix is not None or len(cache.layers) != c.n_layer:
                raise InputError(f"a KV cache needs no prefix and KVCache({c.n_layer}) layers")
            n_before = cache.length
        _check_token_ids(idx, c.vocab_size, c.block_size - n_before)
        x = self.tok_emb(idx)  # (B, T, C)
        if prefix is not None:
            if prefix.dim() != 3 or prefix.shape[2] != c.n_embd:
                raise InputError(
                    f"prefix must have shape (batch or 1, P, n_embd={c.n_embd}), "
                    f"got {tuple(prefix.shape)}"
                )
            x = torch.cat((prefix.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        positions = torch.arange(x.shape[1], device=idx.device)
        if cache is not None:
            positions = positions + cache.length  # the new tokens follow the cached ones
        rotary = None
        if c.positions == "learned":
            x = x + self.pos_emb(positions)  # added once, here, never again
        else:
            rotary = rotary_cos_sin(positions, c.head_dim)  # used inside every attention layer
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            if self.activation_checkpoint is not None and torch.is_grad_enabled():
                x = self.activation_checkpoint(block, x, is_causal=True, rotary=rotary)
            else:
                x = block(x, is_causal=True, rotary=rotary, cache=cache, layer=i)
        return self.ln_f(x)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameters, each counted once (a tied lm_head is tok_emb's matrix). `non_embedding`
        leaves out the token and position tables: the N of scaling laws."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            tables = [m.weight for m in self.modules() if isinstance(m, nn.Embedding)]
            total -= sum(p.numel() for p in tables)
        return total

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW parameter groups: weight decay on the 2-D weights of linear layers; none on biases,
        LayerNorm parameters and the embedding tables (a tied lm_head is tok_emb). Frozen
        parameters are left out. Engines that build their own optimizer (DeepSpeed) take these."""
        if weight_decay < 0:
            raise InputError(f"weight_decay must be >= 0, got {weight_decay!r}")
        tables = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 and id(p) not in tables else no_decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def configure_optimizers(
        self, weight_decay: float, learning_rate: float, betas: tuple[float, float] = (0.9, 0.95)
    ) -> torch.optim.AdamW:
        """torch's AdamW over `param_groups(weight_decay)`."""
        require_positive(learning_rate, "learning_rate")
        return torch.optim.AdamW(self.param_groups(weight_decay), lr=learning_rate, betas=betas)

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Append `max_new_tokens` tokens to each prompt in `idx` `(B, T)`: `(B, T + new)`.

        Each step reads the last block_size tokens, divides the last position's logits by
        `temperature` (0 means greedy: always the most likely token), keeps the `top_k` largest
        if given, and samples from the softmax with `generator` (a `torch.Generator` on the
        model's device, for repeatable samples). Call `model.eval()` first so dropout is off.
        """
        c = self.config
        _check_token_ids(idx, c.vocab_size, block_size=None)  # longer prompts are cropped below
        if (
            isinstance(max_new_tokens, bool)
            or not isinstance(max_new_tokens, int)
            or (max_new_tokens < 0)
        ):
            raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)) or (
            temperature < 0
        ):
            raise InputError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
        if top_k is not None:
            require_positive(top_k, "top_k", integer=True)
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -c.block_size :])
            logits = logits[:, -1, :]  # (B, V): only the last position predicts a new token
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth_largest = logits.topk(min(top_k, c.vocab_size), dim=-1).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth_largest, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, next_id), dim=1)
        return idx


# ---------------------------------------------------------------------------------------------
# 4. The other families: encoder-only (masked LM) and encoder-decoder
# ---------------------------------------------------------------------------------------------


@dataclass
class EncoderConfig(_Config):
    """Sizes of `BertStyleEncoder`, and of both halves of `Seq2Seq` (which share one vocabulary).
    Token `pad_id` marks padding: it is masked out as a key and never predicted."""

    vocab_size: int = 32
    block_size: int = 32
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    dropout: float = 0.0
    bias: bool = True
    pad_id: int = 0

    def __post_init__(self) -> None:
        self._check_sizes()
        if not isinstance(self.pad_id, int) or not 0 <= self.pad_id < self.vocab_size:
            raise InputError(
                f"pad_id must be a token id in [0, {self.vocab_size}), got {self.pad_id!r}"
            )


def mask_tokens(
    idx: Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    mask_prob: float = 0.15,
    special_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT's masking rule for a masked-language-model batch.

    Each token is chosen with probability `mask_prob` (tokens in `special_ids`, such as padding,
    never are). Of the chosen, 80% become `mask_id`, 10% a uniformly random token and 10% stay as
    they are: the model cannot tell which unmasked-looking tokens it will be asked about, so it
    must represent every token well, not only [MASK] positions (which fine-tuning never shows).

    Args:
        idx: `(B, T)` integer token ids.
    Returns:
        `(inputs, labels)`, both `(B, T)`: `inputs` with the replacements made, `labels` the
        original id at chosen positions and -100 (ignored by the loss) elsewhere.
    """
    if not isinstance(idx, Tensor) or idx.dtype not in (torch.long, torch.int):
        raise InputTypeError("idx must be a tensor of integer token ids (torch.long)")
    if not 0.0 < mask_prob <= 1.0:
        raise InputError(f"mask_prob must be in (0, 1], got {mask_prob!r}")
    if not 0 <= mask_id < vocab_size:
        raise InputError(f"mask_id must be a token id in [0, {vocab_size}), got {mask_id!r}")
    draw = torch.rand((2, *idx.shape), generator=generator, device=idx.device)
    chosen = draw[0] < mask_prob
    if special_ids:
        chosen &= ~torch.isin(idx, torch.tensor(list(special_ids), device=idx.device))
    labels = torch.where(chosen, idx, IGNORE_INDEX)
    random_ids = torch.randint(
        vocab_size, idx.shape, generator=generator, device=idx.device, dtype=idx.dtype
    )
    inputs = torch.where(chosen & (draw[1] < 0.8), mask_id, idx)
    inputs = torch.where(chosen & (draw[1] >= 0.8) & (draw[1] < 0.9), random_ids, inputs)
    return inputs, labels


class BertStyleEncoder(nn.Module):
    """Encoder-only masked language model: BERT's recipe at toy size.

    Every token attends to every real token on both sides (no causal mask; padding is masked out as
    a key). Positions are learned and added once, to the token embeddings; no layer adds them
    again (seed 000 claims every BERT layer has a positional-encoding layer: it does not).
    Blocks are pre-LN like the GPT's (BERT itself is post-LN). The MLM head scores every position
    with the tied embedding matrix; the loss counts only the positions `mask_tokens` chose.
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        if not isinstance(config, EncoderConfig):
            got = type(config).__name__
            raise InputTypeError(f"BertStyleEncoder takes an EncoderConfig, got {got}")
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.n_embd)
        self.pos_emb = nn.Embedding(c.block_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.n_embd, c.n_head, bias=c.bias, dropout=c.dropout) for _ in range(c.n_layer)
        )
        self.ln_f = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.mlm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.mlm_head.weight = self.tok_emb.weight
        _init_weights(self, c.n_layer)

    def encode(self, idx: Tensor) -> Tensor:
        """Contextual vectors `(B, T, C)` for `idx` `(B, T)` (pad_id at padding)."""
        c = self.config
        _check_token_ids(idx, c.vocab_size, c.block_size)
        padding_mask = idx != c.pad_id  # (B, T), True at real tokens
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x, padding_mask=padding_mask)
        return self.ln_f(x)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """`idx` `(B, T)` masked inputs, `targets` `(B, T)` from `mask_tokens` (-100 where
        unmasked). Returns logits `(B, T, V)` and the mean cross-entropy over masked positions."""
        logits = self.mlm_head(self.encode(idx))
        return logits, lm_loss(logits, targets)


class Seq2Seq(nn.Module):
    """Encoder-decoder transformer, the original Transformer's shape (T5 and BART follow it).

    The encoder reads the source with bidirectional self-attention. Each decoder block attends
    causally to the target so far, then cross-attends to the encoder's output (queries from the
    decoder, keys and values from the encoder), then applies its MLP. Positions come from the fixed
    sinusoidal table, added once on each side. Source and target share the vocabulary and one
    embedding matrix, tied to the output head.
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        if not isinstance(config, EncoderConfig):
            raise InputTypeError(f"Seq2Seq takes an EncoderConfig, got {type(config).__name__}")
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.n_embd)
        table = sinusoidal_positions(c.block_size, c.n_embd)
        self.register_buffer("pos_table", table, persistent=False)  # (block_size, C), not learned
        self.drop = nn.Dropout(c.dropout)
        self.encoder = nn.ModuleList(
            Block(c.n_embd, c.n_head, bias=c.bias, dropout=c.dropout) for _ in range(c.n_layer)
        )
        self.ln_enc = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.decoder = nn.ModuleList(
            Block(c.n_embd, c.n_head, bias=c.bias, dropout=c.dropout, cross_attention=True)
            for _ in range(c.n_layer)
        )
        self.ln_f = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight
        _init_weights(self, c.n_layer)

    def _embed(self, idx: Tensor) -> Tensor:
        # The paper scales token vectors by sqrt(C) so they are not drowned by the unit-size table.
        x = self.tok_emb(idx) * math.sqrt(self.config.n_embd) + self.pos_table[: idx.shape[1]]
        return self.drop(x)

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """Source ids `(B, S)` -> memory `(B, S, C)` and its padding mask `(B, S)`."""
        c = self.config
        _check_token_ids(src, c.vocab_size, c.block_size, name="src")
        src_mask = src != c.pad_id
        x = self._embed(src)
        for block in self.encoder:
            x = block(x, padding_mask=src_mask)
        return self.ln_enc(x), src_mask

    def decode(self, tgt: Tensor, memory: Tensor, src_mask: Tensor) -> Tensor:
        """Target ids so far `(B, T)` and the encoder's memory -> logits `(B, T, V)`."""
        c = self.config
        _check_token_ids(tgt, c.vocab_size, c.block_size, name="tgt")
        x = self._embed(tgt)
        for block in self.decoder:
            x = block(x, is_causal=True, memory=memory, memory_padding_mask=src_mask)
        return self.lm_head(self.ln_f(x))

    def forward(
        self, src: Tensor, tgt: Tensor, targets: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """`src` `(B, S)`, decoder input `tgt` `(B, T)` (a start token, then the target shifted
        right), `targets` `(B, T)`. Returns logits `(B, T, V)` and the mean cross-entropy."""
        logits = self.decode(tgt, *self.encode(src))
        return logits, lm_loss(logits, targets)

    @torch.no_grad()
    def generate(self, src: Tensor, max_new_tokens: int, start_id: int) -> Tensor:
        """Greedy decoding: `(B, 1 + max_new_tokens)` target ids beginning with `start_id`. The
        source is encoded once; the decoder reruns on the growing target."""
        memory, src_mask = self.encode(src)
        tgt = torch.full((src.shape[0], 1), start_id, dtype=torch.long, device=src.device)
        for _ in range(max_new_tokens):
            next_id = self.decode(tgt, memory, src_mask)[:, -1].argmax(dim=-1, keepdim=True)
            tgt = torch.cat((tgt, next_id), dim=1)
        return tgt
