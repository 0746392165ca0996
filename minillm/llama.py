"""The Llama family, the course's second decoder-only model: the GPT's shape with the pieces that
today's open models use instead of GPT-2's.

| GPT-2 (`minillm.model.GPT`)            | Llama (here)                                          |
|----------------------------------------|-------------------------------------------------------|
| LayerNorm (mean and variance, a bias)  | `RMSNorm`: root mean square only, a gain, no bias     |
| MLP: C -> 4C, GELU, 4C -> C            | `SwiGLU`: down(silu(gate(x)) * up(x)), hidden ~ 8C/3  |
| learned position table, added once     | rotary positions: q and k rotated in every layer      |
| as many key/value heads as query heads | grouped-query attention: n_kv_head <= n_head          |
| biases in every layer                  | no biases                                             |

Read it top to bottom:

1. `RMSNorm` and `SwiGLU`;
2. rotary positions in their two pairings, and the permutation between them;
3. grouped-query attention (`share_kv_heads`, `LlamaAttention`) and `LlamaBlock`;
4. `LlamaConfig` and `Llama`.

`Llama` is a `GPT` subclass with other parts: it inherits the GPT's forward pass in parts
(`embed`, `run_blocks`, `head`, `part`), its loss, KV cache, optimizer groups and activation
checkpointing, so that `minillm.generate.generate`, the Trainer's engines and the pipeline stages
drive it unchanged. Conversion to and from transformers' `LlamaForCausalLM` is `minillm.hf_llama`.

Shapes: B batch, T sequence length, C = n_embd, H query heads, G = n_kv_head key/value heads,
D = C // H features per head, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm.attention import merge_heads
from minillm.attention import scaled_dot_product_attention as manual_attention
from minillm.errors import InputError, InputTypeError, require_positive, unknown_name
from minillm.flash_attention import flash_attention
from minillm.model import (
    GPT,
    KVCache,
    ModelConfig,
    apply_rotary,
    init_weights,
    position_angles,
    rotary_cos_sin,
)

PAIRINGS = ("half", "interleaved")
LLAMA_ATTENTION = ("sdpa", "manual", "flash")

# ---------------------------------------------------------------------------------------------
# 1. RMSNorm and SwiGLU
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, over the last dimension.

    LayerNorm subtracts the mean and divides by the standard deviation, then adds a bias; RMSNorm
    keeps only the division by the root mean square (re-centring turned out not to matter), which
    is cheaper and has half the parameters. The statistics are computed in float32 at least (the
    squares of half-precision activations overflow), then cast back to `x`'s dtype before the gain,
    as transformers does.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """`(..., dim)` -> `(..., dim)`."""
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def swiglu_hidden_size(n_embd: int, multiple_of: int = 32) -> int:
    """Llama's MLP width: 8C/3 rounded up to a multiple of `multiple_of`. Three C x h matrices
    with h = 8C/3 hold as many weights as the GPT's two C x 4C ones."""
    return multiple_of * -(-(8 * n_embd // 3) // multiple_of)


class SwiGLU(nn.Module):
    """The gated feed-forward network: down_proj(silu(gate_proj(x)) * up_proj(x)).

    The gate is a second projection whose SiLU (x * sigmoid(x)) scales each hidden feature of
    up_proj(x) element by element: the layer chooses per token which features pass.
    """

    def __init__(self, n_embd: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.gate_proj = nn.Linear(n_embd, hidden, bias=False)
        self.up_proj = nn.Linear(n_embd, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, n_embd, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """`(B, T, C)` -> `(B, T, C)`."""
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


# ---------------------------------------------------------------------------------------------
# 2. Rotary positions in two pairings
# ---------------------------------------------------------------------------------------------
# Rotary embeddings rotate pairs of features of q and k by position-dependent angles. Which
# features form a pair is a convention:
# - "half" (transformers, GPT-NeoX): feature i pairs with feature i + D/2 (`minillm.model`);
# - "interleaved" (the RoFormer paper, Meta's reference Llama code): feature 2i with 2i + 1.
# Both compute the same attention once q_proj's and k_proj's output rows are permuted to match
# (`interleaved_to_half`): this is how Meta's checkpoints are converted to transformers'.


def rotary_cos_sin_interleaved(
    positions: Tensor, head_dim: int, base: float = 10000.0
) -> tuple[Tensor, Tensor]:
    """Cosine and sine tables `(T, head_dim)` for the interleaved pairing: columns 2i and 2i + 1
    both hold the angle pos * base^(-2i/head_dim)."""
    angles = position_angles(positions, head_dim, base).repeat_interleave(2, dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary_interleaved(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate every feature pair (2i, 2i + 1) of `x` `(..., T, D)` by its position's angle:
    (a, b) -> (a cos - b sin, b cos + a sin). Returns `x`'s shape and dtype."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return (x * cos + rotated * sin).type_as(x)


def interleaved_to_half(weight: Tensor, n_heads: int) -> Tensor:
    """Permute a q_proj or k_proj weight `(n_heads * D, C)` written for the interleaved pairing
    into the rotate-half pairing: within each head, output rows 0, 2, 4, ... (the first feature of
    each pair) come first, then rows 1, 3, 5, ... A model with the permuted weights and
    `rope_pairing="half"` computes the same logits."""
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def half_to_interleaved(weight: Tensor, n_heads: int) -> Tensor:
    """The inverse of `interleaved_to_half`."""
    rows, cols = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# ---------------------------------------------------------------------------------------------
# 3. Grouped-query attention
# ---------------------------------------------------------------------------------------------


def share_kv_heads(x: Tensor, n_rep: int) -> Tensor:
    """Keys or values `(B, G, S, D)` -> `(B, G * n_rep, S, D)`: query head h reads key/value
    head h // n_rep, so each group of n_rep consecutive query heads shares one head."""
    if n_rep == 1:
        return x
    return x.repeat_interleave(n_rep, dim=1)


class LlamaAttention(nn.Module):
    """Causal self-attention with `n_kv_head` key/value heads shared by `n_head` query heads.

    n_kv_head = n_head is multi-head attention, 1 < n_kv_head < n_head grouped-query (GQA),
    n_kv_head = 1 multi-query (MQA). Fewer key/value heads shrink k_proj, v_proj and above all the
    KV cache (it stores the G heads, not the H), at little cost in quality.
    """

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        n_kv_head: int,
        *,
        pairing: str = "half",
        attention: str = "sdpa",
        dropout: float = 0.0,
    ):
        super().__init__()
        self.head_dim = n_embd // n_head
        self.n_rep = n_head // n_kv_head
        self.pairing, self.attention, self.dropout = pairing, attention, dropout
        self.q_proj = nn.Linear(n_embd, n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(n_embd, n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(n_embd, n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_head * self.head_dim, n_embd, bias=False)
        self.resid_dropout = nn.Dropout(dropout)

    def _heads(self, x: Tensor) -> Tensor:
        return x.view(*x.shape[:2], -1, self.head_dim).transpose(1, 2)  # (B, T, h*D) -> (B,h,T,D)

    def forward(
        self,
        x: Tensor,
        *,
        rotary: tuple[Tensor, Tensor],
        is_causal: bool = True,
        attn_mask: Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        """`x` `(B, T, C)` at the positions of `rotary`'s `(cos, sin)` tables -> `(B, T, C)`.
        `attn_mask` `(B, 1, T, T)`, True = may attend, replaces the causal mask (packed
        documents' `document_mask`).

        With a `cache`, the G key/value heads of this call are appended to `cache.layers[layer]`
        (as `minillm.model.Attention` does): a filled cache takes one new token per call."""
        rotate = apply_rotary if self.pairing == "half" else apply_rotary_interleaved
        q = rotate(self._heads(self.q_proj(x)), *rotary)  # (B, H, T, D)
        k = rotate(self._heads(self.k_proj(x)), *rotary)  # (B, G, T, D)
        v = self._heads(self.v_proj(x))
        if cache is not None:
            k, v, extended = cache.extend(layer, k, v)
            is_causal = is_causal and not extended
        k, v = share_kv_heads(k, self.n_rep), share_kv_heads(v, self.n_rep)
        dropout_p = self.dropout if self.training else 0.0
        if self.attention == "flash":
            if dropout_p:
                raise InputError("attention='flash' has no attention dropout; set dropout=0")
            if attn_mask is not None:
                raise InputError(
                    "attention='flash' takes no attention mask (packed documents); use 'sdpa'"
                )
            y = flash_attention(q, k, v, causal=is_causal)
        elif self.attention == "manual":
            y = manual_attention(q, k, v, mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal
            )
        return self.resid_dropout(self.o_proj(merge_heads(y)))


class LlamaBlock(nn.Module):
    """x = x + self_attn(ln_1(x)); x = x + mlp(ln_2(x)), with RMSNorms (pre-norm, as GPT-2)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        c = config
        self.ln_1 = RMSNorm(c.n_embd, c.norm_eps)
        self.self_attn = LlamaAttention(
            c.n_embd,
            c.n_head,
            c.n_kv_head,
            pairing=c.rope_pairing,
            attention=c.attention,
            dropout=c.dropout,
        )
        self.ln_2 = RMSNorm(c.n_embd, c.norm_eps)
        self.mlp = SwiGLU(c.n_embd, c.intermediate_size, c.dropout)

    def forward(
        self,
        x: Tensor,
        *,
        rotary: tuple[Tensor, Tensor],
        is_causal: bool = True,
        attn_mask: Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> Tensor:
        """`(B, T, C)` -> `(B, T, C)`; the keyword arguments are `LlamaAttention.forward`'s."""
        a = self.self_attn(
            self.ln_1(x),
            rotary=rotary,
            is_causal=is_causal,
            attn_mask=attn_mask,
            cache=cache,
            layer=layer,
        )
        x = x + a
        return x + self.mlp(self.ln_2(x))


# ---------------------------------------------------------------------------------------------
# 4. The Llama model
# ---------------------------------------------------------------------------------------------


@dataclass
class LlamaConfig(ModelConfig):
    """Sizes and options of `Llama`. The defaults are a model for character-level tiny Shakespeare
    of about the course GPT's default size (0.8M parameters), with grouped-query attention."""

    vocab_size: int = 65
    block_size: int = 64  # the context: the longest input the model reads
    n_layer: int = 4
    n_head: int = 4  # query heads
    n_kv_head: int = 2  # key/value heads: n_head (multi-head), fewer (grouped), 1 (multi-query)
    n_embd: int = 128
    intermediate_size: int = 0  # SwiGLU width; 0 picks swiglu_hidden_size(n_embd)
    norm_eps: float = 1e-5
    rope_base: float = 10000.0  # theta of the rotary angles (Llama 3 uses 500000)
    rope_pairing: str = "half"  # "half" (transformers) or "interleaved" (RoFormer, Meta's code)
    attention: str = "sdpa"  # "sdpa" (torch), "manual" (minillm.attention), "flash" (tiled)
    dropout: float = 0.0
    tie_weights: bool = False  # lm_head reuses the token embedding matrix (Llama 3.2 1B/3B do)

    # Not fields: what every Llama is (ModelConfig's checks and GPT's code read them).
    bias = False
    positions = "rotary"

    def __post_init__(self) -> None:
        self._check_sizes()
        require_positive(self.n_kv_head, "n_kv_head", integer=True)
        if self.n_head % self.n_kv_head:
            raise InputError(
                f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head}: each key/"
                "value head serves the same number of query heads"
            )
        if self.head_dim % 2:
            raise InputError(
                f"rotary positions rotate pairs of features, so n_embd // n_head must be even; "
                f"got {self.n_embd} // {self.n_head} = {self.head_dim}"
            )
        if isinstance(self.intermediate_size, bool) or not isinstance(self.intermediate_size, int):
            raise InputTypeError(
                f"intermediate_size must be an int, got {self.intermediate_size!r}"
            )
        if self.intermediate_size < 0:
            raise InputError(f"intermediate_size must be >= 0, got {self.intermediate_size}")
        if self.intermediate_size == 0:
            self.intermediate_size = swiglu_hidden_size(self.n_embd)
        require_positive(self.norm_eps, "norm_eps")
        require_positive(self.rope_base, "rope_base")
        if self.rope_pairing not in PAIRINGS:
            raise unknown_name("rope_pairing", self.rope_pairing, PAIRINGS)
        if self.attention not in LLAMA_ATTENTION:
            raise unknown_name("attention", self.attention, LLAMA_ATTENTION)
        if self.attention == "flash" and self.dropout:
            raise InputError("attention='flash' has no attention dropout; set dropout=0")
        if not isinstance(self.tie_weights, bool):
            raise InputTypeError(f"tie_weights must be True or False, got {self.tie_weights!r}")


class Llama(GPT):
    """Decoder-only language model of the Llama family: token embeddings (no position table),
    `n_layer` `LlamaBlock`s, a final RMSNorm and an output head, none with biases.

    The GPT's interface exactly: `forward(idx, targets, cache) -> (logits, loss)`,
    `hidden_states`, the parts `embed`, `run_blocks`, `head` and `part`, `param_groups`
    (no weight decay on the RMSNorm gains, which are 1-D), `set_activation_checkpointing`.
    """

    def __init__(self, config: LlamaConfig):
        nn.Module.__init__(self)  # not GPT.__init__, which builds GPT-2's layers
        if not isinstance(config, LlamaConfig):
            raise InputTypeError(
                f"Llama takes a LlamaConfig, got {type(config).__name__}; for a dict use "
                "LlamaConfig.from_dict(d)"
            )
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(LlamaBlock(c) for _ in range(c.n_layer))
        self.ln_f = RMSNorm(c.n_embd, c.norm_eps)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        init_weights(self, c.n_layer)
        self.activation_checkpoint = None

    def add_positions(self, x: Tensor, start: int = 0, positions: Tensor | None = None) -> Tensor:
        """Nothing is added (attention rotates q and k); only the embedding dropout."""
        return self.drop(x)

    def rotary(
        self, start: int, length: int, device: torch.device, positions: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The `(cos, sin)` tables `(length, D)` of positions start..start+length-1, in this
        model's pairing; of `positions` `(B, T)` instead, `(B, 1, T, D)` (each row its own)."""
        c = self.config
        rows = positions
        if rows is None:
            positions = torch.arange(start, start + length, device=device)
        tables = rotary_cos_sin if c.rope_pairing == "half" else rotary_cos_sin_interleaved
        cos, sin = tables(positions, c.head_dim, c.rope_base)
        return (cos, sin) if rows is None else (cos[:, None], sin[:, None])

    def run_blocks(
        self,
        x: Tensor,
        start: int = 0,
        cache: KVCache | None = None,
        positions: Tensor | None = None,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        """`x` `(B, T, C)` at positions start..start+T-1 through every block this model holds,
        causally; `cache` collects each block's G key/value heads. Packed documents give their
        own `positions` `(B, T)` and `attn_mask` (`GPT.run_blocks`)."""
        # the same tables for every layer
        rotary = self.rotary(start, x.shape[1], x.device, positions)
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
