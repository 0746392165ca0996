"""Tests of minillm.model: the course GPT, its positions and options, and the encoder and
encoder-decoder families."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minillm.errors import InputError, InputTypeError, MiniLLMError
from minillm.model import (
    GPT,
    BertStyleEncoder,
    EncoderConfig,
    GPTConfig,
    Seq2Seq,
    apply_rotary,
    mask_tokens,
    rotary_cos_sin,
    sinusoidal_positions,
)

SMALL = dict(vocab_size=17, block_size=12, n_layer=2, n_head=2, n_embd=16)


def small_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**SMALL, **overrides})).eval()


def test_forward_gives_logits_for_every_position():
    model = small_gpt()
    idx = torch.randint(0, 17, (3, 12))
    logits, loss = model(idx)
    assert logits.shape == (3, 12, 17)
    assert loss is None


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_loss_at_initialisation_is_close_to_log_vocab(positions):
    """Small initial weights give near-uniform predictions: cross-entropy ~ ln(V)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(positions=positions))
    idx, targets = torch.randint(0, 65, (2, 8, 64))
    _, loss = model(idx, targets)
    assert loss.item() == pytest.approx(math.log(65), abs=0.1)


def test_loss_is_mean_cross_entropy_and_skips_minus_100():
    model = small_gpt()
    idx, targets = torch.randint(0, 17, (2, 2, 12))
    targets[:, :5] = -100
    logits, loss = model(idx, targets)
    expected = F.cross_entropy(logits[:, 5:].reshape(-1, 17), targets[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_changing_a_future_token_never_changes_earlier_logits(positions, attention):
    model = small_gpt(positions=positions, attention=attention)
    idx = torch.randint(0, 17, (1, 12))
    changed = idx.clone()
    changed[0, 7] = (idx[0, 7] + 1) % 17
    before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(before[:, :7], after[:, :7], rtol=0, atol=0)
    assert not torch.allclose(before[:, 7:], after[:, 7:])


@pytest.mark.parametrize("positions", ["learned", "rotary"])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_sdpa_and_manual_attention_paths_agree(positions, dtype, tol):
    fused = small_gpt(positions=positions).to(dtype)
    manual = small_gpt(positions=positions, attention="manual").to(dtype)
    manual.load_state_dict(fused.state_dict())
    idx = torch.randint(0, 17, (4, 12))
    torch.testing.assert_close(manual(idx)[0], fused(idx)[0], rtol=0, atol=tol)


def test_rotary_matches_llama_in_transformers():
    """Same layout as Llama's rotate-half rotary embedding, an independent implementation."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = torch.randn(2, 2, 3, 10, 8, dtype=torch.float64)
    cos, sin = rotary_cos_sin(torch.arange(10), 8)
    cos, sin = cos.double(), sin.double()
    want_q, want_k = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    torch.testing.assert_close(apply_rotary(q, cos, sin), want_q)
    torch.testing.assert_close(apply_rotary(k, cos, sin), want_k)


def test_rotary_scores_depend_only_on_relative_position():
    """q at position m and k at n score the same as at m + s and n + s; norms are unchanged.
    (Tolerance: the angles are float32, whose rounding grows with the position.)"""
    q, k = torch.randn(2, 6, 8)
    positions = torch.tensor([0, 3, 5, 9, 10, 20])

    def scores(shift: int) -> torch.Tensor:
        cos, sin = rotary_cos_sin(positions + shift, 8)
        return apply_rotary(q, cos, sin) @ apply_rotary(k, cos, sin).T

    torch.testing.assert_close(scores(0), scores(37), rtol=0, atol=1e-5)
    torch.testing.assert_close(scores(0), scores(1000), rtol=0, atol=1e-3)
    cos, sin = rotary_cos_sin(positions, 8)
    torch.testing.assert_close(apply_rotary(q, cos, sin).norm(dim=-1), q.norm(dim=-1))


def test_sinusoidal_table_interleaves_sin_and_cos():
    table = sinusoidal_positions(50, 6)
    pos, i = 7, 1  # column pair (2, 3)
    angle = pos / 10000 ** (2 * i / 6)
    assert table.shape == (50, 6)
    assert table[pos, 2].item() == pytest.approx(math.sin(angle), abs=1e-6)
    assert table[pos, 3].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_rotary_model_has_no_position_table():
    model = small_gpt(positions="rotary")
    assert not hasattr(model, "pos_emb")
    assert not any(isinstance(m, nn.Embedding) and m is not model.tok_emb for m in model.modules())


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_forward_runs_under_bfloat16_autocast(positions):
    """Rotary tables are float32: q and k must keep the autocast dtype that v has."""
    model = small_gpt(positions=positions)
    idx = torch.randint(0, 17, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, idx)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)


def test_tied_weights_share_storage_and_untied_do_not():
    model = small_gpt()
    assert model.lm_head.weight is model.tok_emb.weight
    model = model.to(torch.float64)
    assert model.lm_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    untied = small_gpt(tie_weights=False)
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()


@pytest.mark.parametrize(
    ("bias", "tie_weights", "positions"),
    [
        (True, True, "learned"),
        (False, True, "learned"),
        (True, False, "rotary"),
        (False, False, "rotary"),
    ],
)
def test_parameter_count_equals_the_formula(bias, tie_weights, positions):
    V, T, L, C = 17, 12, 2, 16
    model = small_gpt(bias=bias, tie_weights=tie_weights, positions=positions)
    per_block = 12 * C * C + (13 * C if bias else 2 * C)  # weights; biases and LayerNorm gains
    expected = (
        V * C
        + (T * C if positions == "learned" else 0)
        + L * per_block
        + (2 * C if bias else C)  # ln_f
        + (0 if tie_weights else V * C)
    )
    assert model.num_parameters() == expected
    tables = V * C + (T * C if positions == "learned" else 0)
    assert model.num_parameters(non_embedding=True) == expected - tables


def test_gpt2_small_sizes_give_124m_parameters():
    """Counted on the meta device: the formula, without allocating 124M floats."""
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768))
    assert model.num_parameters() == 124_439_808


def test_initialisation_follows_gpt2():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_embd=256, n_head=4))
    block = model.blocks[3]
    assert block.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.02)
    residual_std = 0.02 / math.sqrt(2 * 8)
    assert block.self_attn.o_proj.weight.std().item() == pytest.approx(residual_std, rel=0.02)
    assert block.mlp.down_proj.weight.std().item() == pytest.approx(residual_std, rel=0.02)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert all(
        (m.bias == 0).all()
        for m in model.modules()
        if isinstance(m, nn.Linear) and m.bias is not None
    )


def test_configure_optimizers_decays_only_linear_weights():
    model = small_gpt(tie_weights=False)
    model.blocks[0].mlp.up_proj.weight.requires_grad_(False)
    optimizer = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95))
    assert isinstance(optimizer, torch.optim.AdamW)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    linear_weights = {
        f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)
    } - {"blocks.0.mlp.up_proj.weight"}
    assert decayed == linear_weights
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | {names[id(p)] for p in no_decay["params"]} == trainable
    tied = small_gpt()  # its lm_head is the embedding table, which is not decayed
    assert all(p is not tied.tok_emb.weight for p in tied.param_groups(0.1)[0]["params"])


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_gpt_learns_a_repeating_pattern(positions):
    model = small_gpt(positions=positions).train()
    optimizer = model.configure_optimizers(0.0, 1e-2)
    pattern = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6] * 4)
    starts = torch.arange(8)
    x = torch.stack([pattern[s : s + 12] for s in starts])
    y = torch.stack([pattern[s + 1 : s + 13] for s in starts])
    losses = []
    for _ in range(30):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]


def test_generate_is_repeatable_with_a_seeded_generator():
    model = small_gpt()
    prompt = torch.randint(0, 17, (2, 3))

    def sample(seed: int) -> torch.Tensor:
        return model.generate(prompt, 20, generator=torch.Generator().manual_seed(seed))

    first = sample(0)
    assert first.shape == (2, 23)
    assert torch.equal(first[:, :3], prompt)
    assert torch.equal(first, sample(0))
    assert not torch.equal(first, sample(1))


def test_generate_keeps_to_the_top_k_tokens():
    """Near-uniform predictions at initialisation: without the top-k cut, some of the 40 samples
    would almost surely fall outside the 3 best of 17."""
    model = small_gpt()
    prompt = torch.zeros(4, 1, dtype=torch.long)
    out = model.generate(prompt, 10, top_k=3, generator=torch.Generator().manual_seed(0))
    logits, _ = model(out[:, :-1])
    allowed = logits.topk(3, dim=-1).indices  # (B, T, 3): the 3 best at each step
    assert (allowed == out[:, 1:, None]).any(dim=-1).all()
    greedy = model.generate(prompt, 10, temperature=0)
    assert torch.equal(greedy, model.generate(prompt, 10, top_k=1))
    assert torch.equal(greedy[:, 1:], model(greedy[:, :-1])[0].argmax(-1))


def test_generate_crops_the_context_to_block_size():
    model = small_gpt()
    out = model.generate(torch.randint(0, 17, (1, 30)), 5, temperature=0)
    assert out.shape == (1, 35)


@pytest.mark.parametrize(
    ("idx", "error", "message"),
    [
        (
            torch.zeros(1, 13, dtype=torch.long),
            InputError,
            r"input of 13 tokens is longer than the context \(block_size=12\)",
        ),
        (torch.tensor([[1, 17]]), InputError, r"token id 17 .* outside the vocabulary \[0, 17\)"),
        (torch.tensor([[-1, 2]]), InputError, "token id -1"),
        (torch.zeros(1, 4), InputTypeError, "integer token ids .* got torch.float32"),
        (torch.zeros(4, dtype=torch.long), InputError, r"shape \(batch, seq\)"),
        ([[1, 2]], InputTypeError, "must be a torch.Tensor"),
    ],
)
def test_bad_inputs_get_one_clear_sentence(idx, error, message):
    with pytest.raises(error, match=message):
        small_gpt()(idx)


def test_bad_targets_and_generate_arguments():
    model = small_gpt()
    idx = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(InputError, match=r"targets must be a tensor of shape \(2, 5\)"):
        model(idx, idx[:, :4])
    with pytest.raises(InputError, match="temperature"):
        model.generate(idx, 3, temperature=-1.0)
    with pytest.raises(InputError, match="max_new_tokens"):
        model.generate(idx, -2)


def test_config_from_dict_round_trips_and_rejects_unknown_fields():
    config = GPTConfig(n_layer=3, positions="rotary")
    assert GPTConfig.from_dict(config.to_dict()) == config
    with pytest.raises(
        InputError,
        match="unknown GPTConfig field.*'n_layers'.*valid fields are: "
        "vocab_size, block_size, n_layer",
    ):
        GPTConfig.from_dict({"n_layers": 6})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(n_embd=130, n_head=4), "n_embd=130 must be divisible by n_head=4"),
        (dict(positions="alibi"), "unknown positions 'alibi'; choose one of: learned, rotary"),
        (dict(attention="flash"), "unknown attention 'flash'"),
        (dict(n_embd=12, n_head=4, positions="rotary"), "must be even"),
        (dict(n_layer=0), "n_layer must be > 0"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_configs_are_rejected(fields, message):
    with pytest.raises(MiniLLMError, match=message):
        GPTConfig(**fields)


def test_gpt_rejects_a_dict_config():
    with pytest.raises(InputTypeError, match="GPTConfig.from_dict"):
        GPT({"n_layer": 2})


# --- encoder-only and encoder-decoder ------------------------------------------------------


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


def test_cpu_gelu_equals_torch_tanh_gelu_in_value_and_gradient():
    from minillm.model import gelu_tanh

    x = torch.linspace(-12, 12, 2001, dtype=torch.float64).requires_grad_()
    reference = torch.nn.functional.gelu(x, approximate="tanh")
    (grad_reference,) = torch.autograd.grad(reference.sum(), x)
    ours = gelu_tanh(x)
    (grad_ours,) = torch.autograd.grad(ours.sum(), x)
    torch.testing.assert_close(ours, reference, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad_ours, grad_reference, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(
        gelu_tanh, (torch.randn(20, dtype=torch.float64, requires_grad=True),)
    )


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_activation_checkpointing_recomputes_blocks_with_the_same_gradients(positions):
    from minillm.memory import saved_activation_bytes

    model = small_gpt(positions=positions).train()
    idx = torch.randint(0, SMALL["vocab_size"], (3, SMALL["block_size"]))
    kept, loss = saved_activation_bytes(model, lambda: model(idx, idx)[1])
    loss.backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    calls = []

    def counting_checkpoint(block, x, **kwargs):
        calls.append(block)
        return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, **kwargs)

    model.set_activation_checkpointing(True, counting_checkpoint)
    kept_checkpointed, loss = saved_activation_bytes(model, lambda: model(idx, idx)[1])
    loss.backward()
    assert calls == list(model.blocks)  # every block went through the given function
    assert kept_checkpointed < kept / 2  # each block keeps its input only
    for a, p in zip(plain, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a, rtol=0, atol=1e-6)
    with torch.no_grad():
        model(idx)  # no graph, nothing to recompute: the blocks run directly
    assert len(calls) == SMALL["n_layer"]
    model.set_activation_checkpointing(False)
    assert model.activation_checkpoint is None
