"""Chapter 04 exercises: the pieces of a transformer, from torch primitives.

Replace each `raise NotImplementedError` with your code; `minillm grade ch04` grades them (the
tests are in tests/exercises/test_ch04_transformer.py). Use torch operations, not minillm.model:
building these yourself is the point. `F.scaled_dot_product_attention` is allowed (chapter 03).

Shapes: B batch, T sequence length, S memory (source) length, C model width, H heads,
D = C // H features per head, V vocabulary.
"""

from __future__ import annotations

import math  # noqa: F401  (you will want these)
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: F401
from torch import Tensor


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """Layer normalisation over the last dimension.

    Each vector x[..., :] is shifted to mean 0 and scaled to variance 1 (the population variance,
    dividing by C, not C - 1), then multiplied by `weight` and shifted by `bias`:

        y = (x - mean) / sqrt(var + eps) * weight + bias

    Args:
        x: `(..., C)`.
        weight, bias: `(C,)`.
    Returns:
        `(..., C)`.

    Example:
        >>> layer_norm(torch.tensor([[1.0, 3.0]]), torch.ones(2), torch.zeros(2))
        tensor([[-1.0000,  1.0000]])

    Off limits: `torch.nn.functional.layer_norm`, `torch.layer_norm` (this exercise asks you to
    write it; a call fails the test).
    """
    raise NotImplementedError


def sinusoidal_positions(n_positions: int, dim: int) -> Tensor:
    """The sinusoidal position table of "Attention Is All You Need".

        PE[pos, 2i]     = sin(pos / 10000^(2i / dim))
        PE[pos, 2i + 1] = cos(pos / 10000^(2i / dim))

    Sines in the even columns, cosines in the odd ones, interleaved.

    Args:
        n_positions: number of rows (positions 0 .. n_positions - 1).
        dim: number of columns, even.
    Returns:
        `(n_positions, dim)` float32.

    Example:
        >>> sinusoidal_positions(2, 4)
        tensor([[0.0000, 1.0000, 0.0000, 1.0000],
                [0.8415, 0.5403, 0.0100, 0.9999]])

    Off limits: `minillm.encoders.sinusoidal_positions` (this exercise asks you to write it; a call
    fails the test).
    """
    raise NotImplementedError


def apply_rotary(
    x: Tensor, positions: Tensor, base: float = 10000.0, pairing: str = "half"
) -> Tensor:
    """Rotary position embedding, in either of its two pairings.

    RoPE rotates pairs of features by the angle p * theta_i at position p, with
    theta_i = base^(-2i / D) for pair i = 0 .. D/2 - 1. Which two features form pair i is a
    convention:

    - `pairing="half"` (transformers' Llama, GPT-NeoX): features i and i + D/2,
          out[i]       = x[i] * cos(p theta_i) - x[i + D/2] * sin(p theta_i)
          out[i + D/2] = x[i + D/2] * cos(p theta_i) + x[i] * sin(p theta_i)
    - `pairing="interleaved"` (the RoFormer paper, Meta's reference Llama code): features 2i and
      2i + 1, rotated by the same formula with (2i, 2i + 1) in place of (i, i + D/2).

    Args:
        x: `(..., T, D)` queries or keys, D even.
        positions: `(T,)` integer position of each row.
        pairing: "half" or "interleaved".
    Returns:
        `(..., T, D)`, same dtype as `x`.

    Example:
        >>> apply_rotary(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))  # D = 2: theta_0 = 1
        tensor([[0.5403, 0.8415]])
        >>> x = torch.tensor([[1.0, 0.0, 0.0, 0.0]])  # D = 4: pair 0 is (0, 2) or (0, 1)
        >>> apply_rotary(x, torch.tensor([1]), pairing="interleaved")
        tensor([[0.5403, 0.8415, 0.0000, 0.0000]])

    Off limits: `minillm.model.apply_rotary`, `minillm.model.rotary_cos_sin`,
    `minillm.llama.apply_rotary_interleaved`, `minillm.llama.rotary_cos_sin_interleaved` (this
    exercise asks you to write it; a call fails the test).
    """
    raise NotImplementedError


def rotary_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention with rotary positions 0 .. T-1 applied to the queries and keys.

    Rotate q and k with `apply_rotary` (the values carry content, not position: they are not
    rotated), then softmax(q k^T / sqrt(D)) v with position t attending to positions <= t.
    Either pairing is accepted (this exercise does not fix one); use the same one for q and k.

    Args:
        q, k, v: `(B, H, T, D)`.
    Returns:
        `(B, H, T, D)`.

    Example:
        >>> q = k = v = torch.randn(1, 2, 5, 8)
        >>> rotary_attention(q, k, v).shape
        torch.Size([1, 2, 5, 8])

    Off limits: `minillm.model.apply_rotary`, `minillm.model.rotary_cos_sin`,
    `minillm.llama.apply_rotary_interleaved`, `minillm.llama.rotary_cos_sin_interleaved` (this
    exercise asks you to write it; a call fails the test).
    """
    raise NotImplementedError


def interleaved_to_half(weight: Tensor, n_heads: int) -> Tensor:
    """Permute a q_proj or k_proj weight written for the interleaved RoPE pairing so that the
    rotate-half pairing computes the same attention (how Meta's Llama checkpoints are converted
    for transformers).

    The weight is `(n_heads * D, C)` in `nn.Linear`'s layout: output rows h*D .. (h+1)*D - 1
    are head h's features. Within every head, the interleaved pairing rotates rows (2i, 2i + 1)
    together and the half pairing rows (i, i + D/2); so put each head's even rows 0, 2, 4, ...
    first and its odd rows 1, 3, 5, ... after them. Heads stay where they are.

    Args:
        weight: `(n_heads * D, C)`, D even.
        n_heads: the number of heads the rows are cut into.
    Returns:
        `(n_heads * D, C)`: the same rows, reordered within each head.

    Example:
        >>> interleaved_to_half(torch.arange(8.0)[:, None], n_heads=2).flatten()
        tensor([0., 2., 1., 3., 4., 6., 5., 7.])

    Off limits: `minillm.llama.interleaved_to_half`, `minillm.llama.half_to_interleaved`
    (this exercise asks you to write it; a call fails the test).
    """
    raise NotImplementedError


def gpt_block(x: Tensor, weights: dict[str, Tensor], n_head: int) -> Tensor:
    """One pre-LayerNorm GPT block (GPT-2's), with the given weights:

        x = x + o_proj(causal_attention(q_proj(h), k_proj(h), v_proj(h)))   where h = ln_1(x)
        x = x + down_proj(gelu_tanh(up_proj(ln_2(x))))

    Weights use minillm's names and `nn.Linear`'s layout (`(out, in)`, y = h W^T + b):
    "ln_1.weight", "ln_1.bias", "self_attn.q_proj.weight", "self_attn.q_proj.bias" (and k_proj,
    v_proj, o_proj), "ln_2.weight", "ln_2.bias", "mlp.up_proj.weight" `(4C, C)`,
    "mlp.up_proj.bias", "mlp.down_proj.weight" `(C, 4C)`, "mlp.down_proj.bias". LayerNorm eps is
    1e-5; the GELU is the tanh approximation; head h owns features h*D .. (h+1)*D - 1.

    Args:
        x: `(B, T, C)`.
        weights: the tensors above, e.g. `dict(GPT(config).blocks[0].state_dict())`.
        n_head: number of heads H.
    Returns:
        `(B, T, C)`.

    Example:
        >>> from minillm.model import GPT, GPTConfig
        >>> block = GPT(GPTConfig(n_embd=16, n_head=2)).blocks[0]
        >>> gpt_block(torch.randn(1, 3, 16), block.state_dict(), n_head=2).shape
        torch.Size([1, 3, 16])

    Off limits: `minillm.model.Block.forward`, `torch.nn.functional.layer_norm`, `torch.layer_norm`,
    `torch.nn.LayerNorm.forward` (use your `layer_norm`; this exercise asks you to write it; a
    call fails the test).
    """
    raise NotImplementedError


def gpt_forward(idx: Tensor, weights: dict[str, Tensor], n_layer: int, n_head: int) -> Tensor:
    """The course GPT's forward pass (GPT-2's architecture) from its weights: token ids to logits.

        x = tok_emb[idx] + pos_emb[0 .. T-1]        (learned positions, added once)
        x = block_i(x)  for i = 0 .. n_layer - 1     (your `gpt_block`, causal)
        logits = ln_f(x) @ lm_head^T                 (no bias)

    Weights: "tok_emb.weight" `(V, C)`, "pos_emb.weight" `(block_size, C)`, every block's
    tensors under "blocks.{i}." with the names `gpt_block` takes (e.g.
    "blocks.0.ln_1.weight"), "ln_f.weight", "ln_f.bias" and "lm_head.weight" `(V, C)` (the
    same matrix as tok_emb's when the weights are tied, another one when not).

    Args:
        idx: `(B, T)` token ids, T <= block_size.
        weights: the tensors above.
        n_layer, n_head: the number of blocks and of heads per block.
    Returns:
        `(B, T, V)` logits: at every position, scores for the next token.

    Example:
        >>> from minillm.model import GPT, GPTConfig
        >>> model = GPT(GPTConfig(n_layer=2, n_embd=16, n_head=2))
        >>> gpt_forward(torch.zeros(1, 3, dtype=torch.long), model.state_dict(), 2, 2).shape
        torch.Size([1, 3, 65])

    Off limits: `minillm.model.GPT.forward`, `minillm.model.GPT.hidden_states`,
    `minillm.model.Block.forward`, `torch.nn.functional.layer_norm`, `torch.layer_norm`,
    `torch.nn.LayerNorm.forward` (this exercise asks you to write it; a call fails the test).
    """
    raise NotImplementedError


def gpt_parameter_count(config: Any) -> int:
    """Number of parameters of the course GPT, from its config alone.

    `config` has the fields of `minillm.model.GPTConfig`: vocab_size V, block_size, n_layer,
    n_embd C, bias (biases in every Linear and LayerNorm except lm_head, which never has one),
    positions ("learned": a (block_size, C) table; "rotary": no parameters) and tie_weights
    (lm_head reuses the token embedding matrix: count it once). Each block has ln_1, q/k/v/o
    projections (C x C), ln_2, and an MLP C -> 4C -> C; a final ln_f follows the blocks.

    Example:
        >>> from minillm.model import GPTConfig
        >>> gpt_parameter_count(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12,
        ...                               n_head=12, n_embd=768))  # GPT-2 small
        124439808

    Off limits: `minillm.model.GPT`, `minillm.memory.parameter_count` (this exercise asks
    you to write it; a call fails the test).
    """
    raise NotImplementedError


def mask_tokens(
    idx: Tensor,
    mask_id: int,
    vocab_size: int,
    mask_prob: float = 0.15,
    special_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT's masking for masked-language-model training.

    Choose each token independently with probability `mask_prob`, never one whose id is in
    `special_ids`. Of the chosen tokens, replace 80% by `mask_id`, 10% by a token drawn uniformly
    from [0, vocab_size), and leave 10% unchanged. Unchosen tokens stay as they are.

    Args:
        idx: `(B, T)` token ids (torch.long).
        generator: pass it to every random call, for repeatable masks.
    Returns:
        `(inputs, labels)`, both `(B, T)` torch.long: the modified ids, and the original id at
        chosen positions with -100 everywhere else (the loss ignores -100).

    Example:
        >>> inputs, labels = mask_tokens(torch.full((1, 1000), 7), mask_id=3, vocab_size=10)
        >>> ((labels == 7).float().mean() - 0.15).abs() < 0.05
        tensor(True)

    Off limits: `minillm.encoders.mask_tokens` (this exercise asks you to write it; a call fails the
    test).
    """
    raise NotImplementedError


def cross_attention(
    x: Tensor,
    memory: Tensor,
    weights: dict[str, Tensor],
    n_head: int,
    memory_padding_mask: Tensor | None = None,
) -> Tensor:
    """Multi-head cross-attention, as in an encoder-decoder's decoder.

    Queries come from the decoder states `x`, keys and values from the encoder output `memory`;
    every decoder position may attend to every real memory position (no causal mask):

        out = o_proj(softmax(q k^T / sqrt(D)) v),  q = q_proj(x), k = k_proj(memory),
                                                   v = v_proj(memory)

    Weights: "q_proj.weight", "q_proj.bias" and the same for k_proj, v_proj, o_proj, each
    `nn.Linear` layout `(C, C)` and `(C,)`.

    Args:
        x: `(B, T, C)` decoder states.
        memory: `(B, S, C)` encoder output.
        n_head: number of heads H; head h owns features h*D .. (h+1)*D - 1.
        memory_padding_mask: `(B, S)` bool, True at real memory tokens, False at padding.
    Returns:
        `(B, T, C)`.

    Example:
        >>> w = {f"{p}_proj.{n}": torch.randn(8, 8) if n == "weight" else torch.zeros(8)
        ...      for p in "qkvo" for n in ("weight", "bias")}
        >>> cross_attention(torch.randn(2, 3, 8), torch.randn(2, 5, 8), w, n_head=2).shape
        torch.Size([2, 3, 8])

    Off limits: `torch.nn.functional.multi_head_attention_forward`,
    `torch.nn.MultiheadAttention.forward` (this exercise asks you to write it; a call fails the
    test).
    """
    raise NotImplementedError


# -- The Llama family (minillm.llama) ------------------------------------------------------------


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """RMSNorm over the last dimension, Llama's LayerNorm without the mean and the bias:

        y = x / sqrt(mean(x^2) + eps) * weight

    Args:
        x: `(..., C)`.
        weight: `(C,)`.
    Returns:
        `(..., C)`.

    Example:
        >>> rms_norm(torch.tensor([3.0, -4.0]), torch.ones(2), eps=0.0)  # rms = sqrt(12.5)
        tensor([ 0.8485, -1.1314])

    Off limits: `torch.nn.functional.rms_norm`, `torch.rms_norm`, `minillm.llama.RMSNorm.forward`
    (this exercise asks you to write it; a call fails the test).
    """
    raise NotImplementedError


def swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """Llama's gated feed-forward network:

        y = down(silu(gate(x)) * up(x)),   silu(z) = z * sigmoid(z)

    where gate, up and down are bias-free linear layers with `nn.Linear`'s layout (`x @ w.T`).

    Args:
        x: `(..., C)`.
        w_gate, w_up: `(hidden, C)`.
        w_down: `(C, hidden)`.
    Returns:
        `(..., C)`.

    Example:
        >>> one = torch.ones(1, 1)
        >>> swiglu(one, 2 * one, 3 * one, 0.5 * one)  # 0.5 * silu(2) * 3
        tensor([[2.6424]])

    Off limits: `minillm.llama.SwiGLU.forward` (this exercise asks you to write it; a call fails
    the test).
    """
    raise NotImplementedError


def grouped_query_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal grouped-query attention: `H` query heads share `G` key/value heads.

    Each group of H // G consecutive query heads reads one key/value head: query head h uses
    key/value head h // (H // G). G = H is ordinary multi-head attention, G = 1 multi-query.
    Within a head, attention is the usual causal softmax(q k^T / sqrt(D)) v.

    Args:
        q: `(B, H, T, D)` queries.
        k, v: `(B, G, T, D)` keys and values, H divisible by G.
    Returns:
        `(B, H, T, D)`.

    Example:
        >>> q, kv = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
        >>> grouped_query_attention(q, kv, kv).shape
        torch.Size([1, 4, 3, 8])

    Off limits: `torch.nn.functional.scaled_dot_product_attention`,
    `minillm.llama.share_kv_heads` (this exercise asks you to write it; a call fails the test).
    """
    raise NotImplementedError
