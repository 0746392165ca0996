"""The course GPT, the decoder-only language model that every later chapter trains, parallelises,
fine-tunes and compresses, and the pieces it is built from (chapter 04's other families,
`minillm.encoders`, reuse them).

Read it top to bottom:

1. positions: rotary embeddings (the GPT's other option, a learned table, is `GPT.pos_emb`);
2. the pieces every family shares: `KVCache`, `Attention` (self or cross, causal or padded),
   `MLP`, the pre-LayerNorm `Block`, the weight initialisation and the loss;
3. `GPTConfig` and `GPT` (nanoGPT's layout, with llama-style module names `self_attn.{q,k,v,o}_proj`
   and `mlp.{up,down}_proj` so that tensor-parallel code and DeepSpeed's AutoTP find the layers).
   Its forward pass is three parts, `embed`, `run_blocks` and `head`; a pipeline stage is the GPT
   with some parts absent (`GPT.part`) and runs the same code.

Shapes: B batch, T sequence length, C = n_embd, H heads, D = C // H features per head, V vocabulary.
`forward` returns `(logits, loss or None)` and knows nothing of what drives it (a plain loop, DDP,
DeepSpeed). Generating text is `minillm.generate`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Self

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from minillm.attention import combine_masks, document_mask, document_positions, merge_heads
from minillm.attention import scaled_dot_product_attention as manual_attention
from minillm.errors import InputError, InputTypeError, require_positive, unknown_name

POSITIONS = ("learned", "rotary")
ATTENTION = ("sdpa", "manual")
IGNORE_INDEX = -100  # targets equal to this are left out of the loss (padding, unmasked tokens)


# ---------------------------------------------------------------------------------------------
# 1. Positions
# ---------------------------------------------------------------------------------------------


def position_angles(positions: Tensor, dim: int, base: float) -> Tensor:
    """`pos * base^(-2i/dim)` for each position and each i < dim/2: `(*positions.shape, dim // 2)`
    (positions `(T,)`, or `(B, T)` when every row has its own, as packed documents do)."""
    even = torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = base ** (-even / dim)
    return positions.float()[..., None] * inv_freq


def rotary_cos_sin(
    positions: Tensor, head_dim: int, base: float = 10000.0
) -> tuple[Tensor, Tensor]:
    """Cosine and sine tables for rotary embeddings at `positions` `(T,)`: two `(T, head_dim)`.

    Llama's layout: feature i is paired with feature i + head_dim/2, and both columns of a pair hold
    the same angle pos * base^(-2i/head_dim).
    """
    angles = position_angles(positions, head_dim, base)
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

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, bool]:
        """Append one call's keys and values `(B, H, T, D)` to layer `layer`'s and return all of
        them, with whether any were cached before: then the call is one new token, whose query
        may attend to every cached key (no causal mask)."""
        past = self.layers[layer]
        if past is not None:
            if k.shape[2] != 1:
                raise InputError("a filled KV cache takes one new token per call")
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        self.layers[layer] = (k, v)
        return k, v, past is not None


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
        attn_mask: Tensor | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        """Attend from `x` `(B, T, C)` to `context` `(B, S, C)` (`x` itself when None).

        `key_padding_mask` `(B, S)` is True at real tokens and False at padding; `attn_mask` a
        boolean `(B, 1, T, S)` (True = may attend; e.g. `document_mask`, which is causal itself);
        `rotary` is the `(cos, sin)` pair from `rotary_cos_sin`, each `(T, D)`. Returns `(B, T, C)`.

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
            k, v, extended = cache.extend(layer, k, v)
            is_causal = is_causal and not extended
        padding = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        mask = combine_masks(padding, attn_mask)
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
        attn_mask: Tensor | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
        memory: Tensor | None = None,
        memory_padding_mask: Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        """`x` `(B, T, C)` -> `(B, T, C)`; `memory` `(B, S, C)` is the encoder output that a
        decoder block cross-attends to. Masks are `(B, T)` / `(B, S)`, True at real tokens;
        `attn_mask` `(B, 1, T, T)` is a whole self-attention mask (`Attention.forward`).
        `cache` and `layer`: this block's place in a `KVCache` (see `Attention.forward`)."""
        x = x + self.self_attn(
            self.ln_1(x),
            is_causal=is_causal,
            key_padding_mask=padding_mask,
            attn_mask=attn_mask,
            rotary=rotary,
            cache=cache,
            layer=layer,
        )
        if memory is not None:
            x = x + self.cross_attn(self.ln_cross(x), memory, key_padding_mask=memory_padding_mask)
        return x + self.mlp(self.ln_2(x))


def init_weights(model: nn.Module, n_layer: int) -> None:
    """GPT-2's initialisation: weights and embeddings N(0, 0.02), biases 0, LayerNorm (1, 0), and
    the projections that write into the residual stream (`o_proj`, `down_proj`) scaled by
    1/sqrt(2 n_layer), so that the stream's variance does not grow with depth."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("o_proj", "down_proj")) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


def check_token_ids(idx: Any, vocab_size: int, block_size: int | None, name: str = "idx") -> None:
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


class ModelConfig:
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
class GPTConfig(ModelConfig):
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
        init_weights(self, c.n_layer)
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
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        cache: KVCache | None = None,
        doc_ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """`idx` `(B, T)` integer token ids, T <= block_size; `targets` `(B, T)` the token that
        follows each position (-100 where nothing should be learned); `cache` a `KVCache` that
        holds the tokens before `idx` (generating with a cache, `minillm.generate`); `doc_ids`
        `(B, T)` numbers the documents packed into each row (`minillm.data.pack_documents`):
        each document then attends only to itself, from position 0, as if it ran alone.

        Returns logits `(B, T, V)` and the mean cross-entropy over the targets (None without).
        """
        logits = self.lm_head(self.hidden_states(idx, cache=cache, doc_ids=doc_ids))
        return logits, lm_loss(logits, targets)

    def hidden_states(
        self,
        idx: Tensor,
        prefix: Tensor | None = None,
        cache: KVCache | None = None,
        doc_ids: Tensor | None = None,
    ) -> Tensor:
        """The final LayerNorm's output `(B, T, C)`: what `lm_head` scores, and what a
        classification or reward head reads (chapter 10).

        `prefix` `(B or 1, P, C)` are vectors placed before the token embeddings, as if they were
        P more tokens (the learned soft prompt of prompt tuning): they take positions 0..P-1,
        every token attends to them, and the output is `(B, P + T, C)`. `doc_ids`: see `forward`.
        """
        c = self.config
        if doc_ids is not None:
            if prefix is not None or cache is not None:
                raise InputError("packed documents (doc_ids) take no prefix and no KV cache")
            check_token_ids(idx, c.vocab_size, c.block_size)
            if not isinstance(doc_ids, Tensor) or doc_ids.shape != idx.shape:
                got = tuple(doc_ids.shape) if isinstance(doc_ids, Tensor) else type(doc_ids)
                raise InputError(f"doc_ids must have idx's shape {tuple(idx.shape)}, got {got}")
            positions = document_positions(doc_ids)
            x = self.add_positions(self.embed_tokens(idx), positions=positions)
            x = self.run_blocks(x, positions=positions, attn_mask=document_mask(doc_ids))
            return self.ln_f(x)
        start = 0  # the position of idx's first token
        if cache is not None:
            if prefix is not None or len(cache.layers) != c.n_layer:
                raise InputError(f"a KV cache needs no prefix and KVCache({c.n_layer}) layers")
            start = cache.length  # the new tokens follow the cached ones
        n_before = start if prefix is None else prefix.shape[1]
        check_token_ids(idx, c.vocab_size, c.block_size - n_before)
        x = self.embed(idx, prefix, start=start)
        return self.ln_f(self.run_blocks(x, start=start, cache=cache))

    # -- the forward pass in parts: embed, run_blocks, head ------------------------------------
    # Each part takes `start`, the position of its first row, so that a part can run on its own:
    # a pipeline stage (minillm.parallel.pipeline, minillm.engines.pipeline) is a `part` of the
    # GPT and runs these methods; a KV cache feeds tokens that start after the cached ones.

    def embed(self, idx: Tensor, prefix: Tensor | None = None, start: int = 0) -> Tensor:
        """Token ids `(B, T)` -> the residual stream's input `(B, T, C)`: `embed_tokens`, then
        `add_positions`. Ids are not checked here (`hidden_states` checks them)."""
        return self.add_positions(self.embed_tokens(idx, prefix), start)

    def embed_tokens(self, idx: Tensor, prefix: Tensor | None = None) -> Tensor:
        """The token vectors `(B, T, C)`, after `prefix` `(B or 1, P, C)` if given."""
        x = self.tok_emb(idx)
        if prefix is None:
            return x
        if prefix.dim() != 3 or prefix.shape[2] != self.config.n_embd:
            raise InputError(
                f"prefix must have shape (batch or 1, P, n_embd={self.config.n_embd}), "
                f"got {tuple(prefix.shape)}"
            )
        return torch.cat((prefix.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)

    def add_positions(self, x: Tensor, start: int = 0, positions: Tensor | None = None) -> Tensor:
        """Add the learned position vectors of positions start..start+T-1 (or of `positions`
        `(B, T)`, each row its own) to `x` `(B, T, C)`, once, here (with rotary positions nothing
        is added: attention rotates q and k), then apply dropout."""
        if self.config.positions == "learned":
            if positions is None:
                positions = torch.arange(start, start + x.shape[1], device=x.device)
            x = x + self.pos_emb(positions)
        return self.drop(x)

    def run_blocks(
        self,
        x: Tensor,
        start: int = 0,
        cache: KVCache | None = None,
        positions: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """`x` `(B, T, C)` at positions start..start+T-1 through every block this GPT holds, in
        order, causally; `cache` collects each block's keys and values. Packed documents give
        their own `positions` `(B, T)` and `attn_mask` (`document_mask`) instead."""
        rotary = None
        if self.config.positions == "rotary":  # the same tables for every layer
            if positions is None:
                positions = torch.arange(start, start + x.shape[1], device=x.device)
            rotary = rotary_cos_sin(positions, self.config.head_dim)
            if positions.dim() == 2:  # (B, T, D) -> (B, 1, T, D): each row's table, every head
                rotary = (rotary[0][:, None], rotary[1][:, None])
        causal = attn_mask is None  # a document mask is causal itself
        for i, block in enumerate(self.blocks):
            if self.activation_checkpoint is not None and torch.is_grad_enabled():
                x = self.activation_checkpoint(
                    block, x, is_causal=causal, attn_mask=attn_mask, rotary=rotary
                )
            else:
                x = block(
                    x, is_causal=causal, attn_mask=attn_mask, rotary=rotary, cache=cache, layer=i
                )
        return x

    def head(self, x: Tensor) -> Tensor:
        """The last blocks' output `(B, T, C)` -> logits `(B, T, V)`: `ln_f`, then `lm_head`."""
        return self.lm_head(self.ln_f(x))

    def part(
        self,
        layers: Iterable[int] = (),
        *,
        tokens: bool = False,
        positions: bool = False,
        head: bool = False,
    ) -> GPT:
        """This GPT with parts absent: a GPT that holds only the blocks in `layers` (under their
        names in the whole model: block 5 stays `blocks.5`), `tok_emb` if `tokens`, `pos_emb`
        and the embedding dropout if `positions`, `ln_f` and `lm_head` if `head`.

        The modules are this model's own, not copies (`copy.deepcopy` the part for separate
        weights). A pipeline stage is such a part and runs the methods above on what it holds;
        `forward` and `hidden_states` need every part. Activation checkpointing is off in a part
        (the pipeline engines decide it).
        """
        layers = list(layers)
        n_layer = self.config.n_layer
        if any(not isinstance(i, int) or not 0 <= i < n_layer for i in layers) or (
            len(set(layers)) != len(layers)
        ):
            raise InputError(
                f"layers must be distinct block indices in [0, {n_layer}), got {layers}"
            )
        part = type(self).__new__(type(self))  # not __init__: the part builds no modules of its own
        nn.Module.__init__(part)
        part.config, part.activation_checkpoint = self.config, None
        if tokens:
            part.tok_emb = self.tok_emb
        if positions:
            if self.config.positions == "learned":
                part.pos_emb = self.pos_emb
            part.drop = self.drop
        part.blocks = nn.ModuleList()
        for i in layers:
            # named as in the whole model: iterate over it (part.blocks[0] is block 0 or absent)
            part.blocks.add_module(str(i), self.blocks[i])
        if head:
            part.ln_f, part.lm_head = self.ln_f, self.lm_head
        return part

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
