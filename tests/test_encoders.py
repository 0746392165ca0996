"""Tests of minillm.encoders: chapter 04's sinusoidal table, BERT's masking rule, the masked-LM
encoder and the encoder-decoder."""

import math

import pytest
import torch
from torch import nn

from minillm.encoders import (
    BertStyleEncoder,
    EncoderConfig,
    Seq2Seq,
    mask_tokens,
    sinusoidal_positions,
)
from minillm.errors import InputError, InputTypeError
from minillm.model import GPTConfig


def test_sinusoidal_table_interleaves_sin_and_cos():
    table = sinusoidal_positions(50, 6)
    pos, i = 7, 1  # column pair (2, 3)
    angle = pos / 10000 ** (2 * i / 6)
    assert table.shape == (50, 6)
    assert table[pos, 2].item() == pytest.approx(math.sin(angle), abs=1e-6)
    assert table[pos, 3].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_mask_tokens_follows_the_80_10_10_rule():
    vocab, mask_id = 1000, 999
    idx = torch.randint(1, 999, (200, 1000))
    idx[:, -100:] = 0  # padding, never chosen
    inputs, labels = mask_tokens(
        idx,
        mask_id=mask_id,
        vocab_size=vocab,
        special_ids=(0,),
        generator=torch.Generator().manual_seed(0),
    )
    chosen = labels != -100
    assert not chosen[:, -100:].any()
    assert chosen[:, :-100].float().mean().item() == pytest.approx(0.15, abs=0.005)
    assert torch.equal(labels[chosen], idx[chosen])
    assert torch.equal(inputs[~chosen], idx[~chosen])
    masked = (inputs[chosen] == mask_id).float().mean().item()
    kept = (inputs[chosen] == idx[chosen]).float().mean().item()
    assert masked == pytest.approx(0.8, abs=0.01)
    assert kept == pytest.approx(0.1, abs=0.01)
    assert 1 - masked - kept == pytest.approx(0.1, abs=0.01)  # replaced by a random token


def test_encoder_adds_positions_once_and_attends_both_ways():
    torch.manual_seed(0)
    encoder = BertStyleEncoder(EncoderConfig()).eval()
    tables = [m for m in encoder.modules() if isinstance(m, nn.Embedding)]
    assert tables == [encoder.tok_emb, encoder.pos_emb]  # no position layer inside the blocks
    idx = torch.randint(1, 32, (1, 10))
    changed = idx.clone()
    changed[0, 9] = idx[0, 9] % 31 + 1
    assert not torch.allclose(encoder.encode(idx)[:, 0], encoder.encode(changed)[:, 0])


def test_encoder_ignores_padding():
    """A padded sequence encodes its real tokens exactly as the unpadded one does."""
    torch.manual_seed(0)
    encoder = BertStyleEncoder(EncoderConfig()).eval()
    idx = torch.randint(1, 32, (1, 6))
    padded = torch.cat([idx, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    torch.testing.assert_close(encoder.encode(padded)[:, :6], encoder.encode(idx))


def train(model, batch, steps: int, lr: float = 3e-3) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        _, loss = model(*batch())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_bert_style_encoder_learns_to_fill_in_masked_tokens():
    torch.manual_seed(0)
    encoder = BertStyleEncoder(EncoderConfig(block_size=16))

    def batch():  # counting sequences: a masked token follows from its neighbours
        x = (torch.randint(0, 30, (64, 1)) + torch.arange(16)) % 30 + 2  # ids 2..31
        return mask_tokens(x, mask_id=1, vocab_size=32)

    losses = train(encoder, batch, 40)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_seq2seq_learns_to_reverse_and_decodes_greedily():
    torch.manual_seed(0)
    model = Seq2Seq(EncoderConfig(block_size=16))

    def batch():
        src = torch.randint(3, 32, (64, 8))
        target = src.flip(1)
        start = torch.ones(64, 1, dtype=torch.long)
        return src, torch.cat([start, target[:, :-1]], dim=1), target

    losses = train(model, batch, 60)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    out = model.eval().generate(torch.randint(3, 32, (2, 8)), 8, start_id=1)
    assert out.shape == (2, 9) and (out[:, 0] == 1).all()


def test_seq2seq_decoder_is_causal_and_reads_the_source():
    torch.manual_seed(0)
    model = Seq2Seq(EncoderConfig()).eval()
    src, tgt = torch.randint(1, 32, (2, 1, 7))
    logits = model(src, tgt)[0]
    changed_tgt = tgt.clone()
    changed_tgt[0, 4] = tgt[0, 4] % 31 + 1
    torch.testing.assert_close(model(src, changed_tgt)[0][:, :4], logits[:, :4])
    changed_src = src.clone()
    changed_src[0, 6] = src[0, 6] % 31 + 1
    assert not torch.allclose(model(changed_src, tgt)[0][:, 0], logits[:, 0])


def test_bad_configs_and_inputs_get_one_clear_sentence():
    with pytest.raises(InputError, match=r"pad_id must be a token id in \[0, 32\)"):
        EncoderConfig(pad_id=32)
    with pytest.raises(InputTypeError, match="BertStyleEncoder takes an EncoderConfig"):
        BertStyleEncoder(GPTConfig())
    with pytest.raises(InputTypeError, match="Seq2Seq takes an EncoderConfig, got GPTConfig"):
        Seq2Seq(GPTConfig())
    with pytest.raises(InputError, match=r"token id 40 in src is outside the vocabulary"):
        Seq2Seq(EncoderConfig())(torch.tensor([[40]]), torch.tensor([[1]]))
    with pytest.raises(InputError, match="dim must be even"):
        sinusoidal_positions(4, 3)
    with pytest.raises(InputError, match=r"mask_prob must be in \(0, 1\]"):
        mask_tokens(torch.ones(1, 4, dtype=torch.long), mask_id=1, vocab_size=8, mask_prob=0.0)
