"""Tests of minillm.model: the course GPT, its positions and options, and the parts of its
forward pass that pipeline stages run (the encoder families are tests/test_encoders.py,
generation tests/test_generate.py)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minillm.errors import InputError, InputTypeError, MiniLLMError
from minillm.model import GPT, GPTConfig, apply_rotary, rotary_cos_sin

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


def test_state_dict_keys_are_the_checkpoint_format():
    """Checkpoints and minillm.hf read these names: they must not change."""
    block = [
        "ln_1.weight",
        "ln_1.bias",
        *[f"self_attn.{x}_proj.{w}" for x in "qkvo" for w in ("weight", "bias")],
        "ln_2.weight",
        "ln_2.bias",
        *[f"mlp.{x}_proj.{w}" for x in ("up", "down") for w in ("weight", "bias")],
    ]
    expected = [
        "tok_emb.weight",
        "pos_emb.weight",
        *[f"blocks.{i}.{name}" for i in range(2) for name in block],
        "ln_f.weight",
        "ln_f.bias",
        "lm_head.weight",
    ]
    assert list(small_gpt().state_dict()) == expected
    rotary = small_gpt(positions="rotary", bias=False).state_dict()
    assert list(rotary) == [k for k in expected if "bias" not in k and k != "pos_emb.weight"]


@pytest.mark.parametrize("positions", ["learned", "rotary"])
@pytest.mark.parametrize("tie_weights", [True, False])
def test_parts_compose_to_the_forward_pass(positions, tie_weights):
    """Two parts, as two pipeline stages hold them, compute the model's logits bit for bit."""
    model = small_gpt(positions=positions, tie_weights=tie_weights, n_layer=3)
    idx = torch.randint(0, 17, (2, 12))
    first = model.part([0], tokens=True, positions=True)
    last = model.part([1, 2], head=True)
    logits = last.head(last.run_blocks(first.run_blocks(first.embed(idx))))
    torch.testing.assert_close(logits, model(idx)[0], rtol=0, atol=0)
    hidden = model.run_blocks(model.embed(idx))
    torch.testing.assert_close(model.ln_f(hidden), model.hidden_states(idx), rtol=0, atol=0)


def test_a_part_holds_only_its_modules_under_the_models_names():
    model = small_gpt(n_layer=3)
    first = model.part([0], tokens=True, positions=True)
    middle = model.part([1])
    last = model.part([2], head=True)
    full = dict(model.named_parameters(remove_duplicate=False))
    held = {}
    for part in (first, middle, last):
        for name, p in part.named_parameters(remove_duplicate=False):
            assert full[name] is p  # the model's own tensor, not a copy
            held[name] = p
    assert set(held) == set(full)  # together they hold every parameter, once each
    assert set(dict(middle.named_parameters())) == {n for n in full if n.startswith("blocks.1.")}
    assert set(dict(first.named_parameters())) == {
        "tok_emb.weight",
        "pos_emb.weight",
        *[n for n in full if n.startswith("blocks.0.")],
    }
    assert not hasattr(middle, "tok_emb") and not hasattr(middle, "lm_head")
    rotary = small_gpt(positions="rotary")
    assert list(rotary.part(positions=True).parameters()) == []  # rotary adds no vectors
    for bad in ([3], [0, 0], [-1], ["1"]):
        with pytest.raises(InputError, match=r"distinct block indices in \[0, 3\)"):
            model.part(bad)


def test_learned_positions_start_where_asked():
    """A part that starts at position s adds rows s, s+1, ... of the table (what a KV cache
    needs for the tokens after the cached ones)."""
    model = small_gpt()
    x = torch.randn(2, 4, 16)
    torch.testing.assert_close(model.add_positions(x, start=5), x + model.pos_emb.weight[5:9])
    assert torch.equal(small_gpt(positions="rotary").add_positions(x, start=5), x)


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


def test_bad_targets_get_one_clear_sentence():
    model = small_gpt()
    idx = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(InputError, match=r"targets must be a tensor of shape \(2, 5\)"):
        model(idx, idx[:, :4])


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
