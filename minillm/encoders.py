"""Chapter 04's two other transformer families, built from the GPT's pieces (`minillm.model`'s
`Attention`, `MLP` and pre-LayerNorm `Block`): a BERT-style masked-LM encoder and an
encoder-decoder.

1. `sinusoidal_positions`, the fixed position table of "Attention Is All You Need";
2. `EncoderConfig`, `BertStyleEncoder` with BERT's masking rule `mask_tokens`;
3. `Seq2Seq`, the original Transformer's encoder-decoder shape.

Shapes: B batch, S source and T target length, C = n_embd, V vocabulary. Every model's `forward`
returns `(logits, loss or None)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from minillm.errors import InputError, InputTypeError, require_positive
from minillm.model import (
    IGNORE_INDEX,
    Block,
    ModelConfig,
    check_token_ids,
    init_weights,
    lm_loss,
    position_angles,
)


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
    angles = position_angles(torch.arange(n_positions), dim, base)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # interleave sin, cos


@dataclass
class EncoderConfig(ModelConfig):
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
        init_weights(self, c.n_layer)

    def encode(self, idx: Tensor) -> Tensor:
        """Contextual vectors `(B, T, C)` for `idx` `(B, T)` (pad_id at padding)."""
        c = self.config
        check_token_ids(idx, c.vocab_size, c.block_size)
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
        init_weights(self, c.n_layer)

    def _embed(self, idx: Tensor) -> Tensor:
        # The paper scales token vectors by sqrt(C) so they are not drowned by the unit-size table.
        x = self.tok_emb(idx) * math.sqrt(self.config.n_embd) + self.pos_table[: idx.shape[1]]
        return self.drop(x)

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """Source ids `(B, S)` -> memory `(B, S, C)` and its padding mask `(B, S)`."""
        c = self.config
        check_token_ids(src, c.vocab_size, c.block_size, name="src")
        src_mask = src != c.pad_id
        x = self._embed(src)
        for block in self.encoder:
            x = block(x, padding_mask=src_mask)
        return self.ln_enc(x), src_mask

    def decode(self, tgt: Tensor, memory: Tensor, src_mask: Tensor) -> Tensor:
        """Target ids so far `(B, T)` and the encoder's memory -> logits `(B, T, V)`."""
        c = self.config
        check_token_ids(tgt, c.vocab_size, c.block_size, name="tgt")
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
