"""Graded tests for chapter 04 (transformer architectures): `minillm grade ch04`.

References are independent of the exercises: torch's `F.layer_norm`, `F.rms_norm`,
`nn.MultiheadAttention` and `F.scaled_dot_product_attention`, Llama's rotary embedding, MLP and
`repeat_kv` and GPT-2's block from `transformers`, parameter counts of `GPT2LMHeadModel`, and hand
formulas. Comparisons run in float64 with atol 1e-10 unless a test says otherwise.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig
from transformers.models.gpt2.modeling_gpt2 import GPT2Block
from transformers.models.llama.modeling_llama import LlamaMLP, apply_rotary_pos_emb, repeat_kv

from minillm.model import GPT, GPTConfig

# What each exercise must not call: the library function it asks you to write (a call fails
# the test). A guard against the obvious shortcut; the stubs' docstrings name the same.
LAYER_NORM = ("torch.nn.functional.layer_norm", "torch.layer_norm", "torch.nn.LayerNorm.forward")
ROTARY = (
    "minillm.model.apply_rotary",
    "minillm.model.rotary_cos_sin",
    "minillm.llama.apply_rotary_interleaved",
    "minillm.llama.rotary_cos_sin_interleaved",
)
OFF_LIMITS = {
    "layer_norm": LAYER_NORM,
    "sinusoidal_positions": ("minillm.encoders.sinusoidal_positions",),
    "apply_rotary": ROTARY,
    "rotary_attention": ROTARY,
    "interleaved_to_half": (
        "minillm.llama.interleaved_to_half",
        "minillm.llama.half_to_interleaved",
    ),
    "gpt_block": ("minillm.model.Block.forward", *LAYER_NORM),
    "gpt_forward": (
        "minillm.model.GPT.forward",
        "minillm.model.GPT.hidden_states",
        "minillm.model.Block.forward",
        *LAYER_NORM,
    ),
    "gpt_parameter_count": (
        "minillm.model.GPT.__init__",
        "minillm.memory.parameter_count",
    ),
    "mask_tokens": ("minillm.encoders.mask_tokens",),
    "cross_attention": (
        "torch.nn.functional.multi_head_attention_forward",
        "torch.nn.MultiheadAttention.forward",
    ),
    "rms_norm": (
        "torch.nn.functional.rms_norm",
        "torch.rms_norm",
        "minillm.llama.RMSNorm.forward",
    ),
    "swiglu": ("minillm.llama.SwiGLU.forward",),
    "grouped_query_attention": (
        "torch.nn.functional.scaled_dot_product_attention",
        "minillm.llama.share_kv_heads",
    ),
}

F64 = {"atol": 1e-10, "rtol": 0.0}


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def llama_cos_sin(positions: torch.Tensor, dim: int, base: float = 10000.0):
    """cos and sin `(T, dim)` exactly as transformers' LlamaRotaryEmbedding builds them."""
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    freqs = positions.double()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def meta_rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0):
    """The interleaved pairing as Meta's reference Llama code computes it: each feature pair
    (2i, 2i+1) is a complex number, multiplied by exp(i p theta_i)."""
    dim = x.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = positions.double()[:, None] * inv_freq  # (T, dim/2)
    freqs_cis = torch.polar(torch.ones_like(angles), angles)
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], dim // 2, 2).contiguous())
    return torch.view_as_real(pairs * freqs_cis).flatten(-2).to(x.dtype)


def half_rotary(x: torch.Tensor, positions: torch.Tensor):
    """The rotate-half pairing as transformers' Llama computes it."""
    cos, sin = llama_cos_sin(positions, x.shape[-1])
    return apply_rotary_pos_emb(x, x, cos, sin, unsqueeze_dim=0)[0]  # (T, D) broadcast over x


@pytest.mark.points(2)
def test_layer_norm_matches_torch(impl):
    """Catches the unbiased variance (dividing by C - 1, as torch.var does by default): with C = 4
    that is off by a factor sqrt(4/3); also eps outside the square root, or a missing gain/bias."""
    ex = impl("ch04_transformer")
    x, weight, bias = randn(3, 5, 4) * 3 + 1, randn(4, seed=1), randn(4, seed=2)
    want = F.layer_norm(x, (4,), weight, bias, eps=1e-5)
    torch.testing.assert_close(ex.layer_norm(x, weight, bias), want, **F64)
    tiny = randn(2, 8, seed=3) * 1e-3  # variance comparable to eps: eps must sit inside the root
    ones, zeros = torch.ones(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    torch.testing.assert_close(
        ex.layer_norm(tiny, ones, zeros, eps=1e-5), F.layer_norm(tiny, (8,), eps=1e-5), **F64
    )


@pytest.mark.points(2)
def test_sinusoidal_positions_interleave_sin_and_cos(impl):
    """Catches sines and cosines in two halves instead of alternating columns, an exponent of
    i/dim instead of 2i/dim, and sin/cos swapped. Hand formula, atol 1e-6 (float32 result)."""
    ex = impl("ch04_transformer")
    table = ex.sinusoidal_positions(30, 8)
    assert table.shape == (30, 8), (
        f"expected (n_positions, dim) = (30, 8), got {tuple(table.shape)}"
    )
    want = torch.empty(30, 8, dtype=torch.float64)
    for pos in range(30):
        for i in range(4):
            angle = pos / 10000 ** (2 * i / 8)
            want[pos, 2 * i], want[pos, 2 * i + 1] = math.sin(angle), math.cos(angle)
    torch.testing.assert_close(table.double(), want, atol=1e-6, rtol=0)


@pytest.mark.points(2)
def test_apply_rotary_half_pairing_matches_transformers(impl):
    """pairing="half" (the default) must rotate features (i, i + D/2) as transformers' Llama does.
    Catches pairing neighbours (2i, 2i+1) here, the rotation's sign flipped, ignoring the given
    positions (they start at 3 and skip), and theta_i = base^(-i/D) instead of base^(-2i/D)."""
    ex = impl("ch04_transformer")
    x = randn(2, 3, 5, 8)
    positions = torch.tensor([3, 4, 7, 8, 20])
    want = half_rotary(x, positions)
    torch.testing.assert_close(ex.apply_rotary(x, positions), want, **F64)
    torch.testing.assert_close(ex.apply_rotary(x, positions, pairing="half"), want, **F64)


@pytest.mark.points(2)
def test_apply_rotary_interleaved_pairing_matches_meta(impl):
    """pairing="interleaved" must rotate neighbours (2i, 2i + 1), as the RoFormer paper and
    Meta's reference code (complex multiplication by exp(i p theta_i)) do. Catches ignoring the
    pairing argument (rotate-half returned for both), cos/sin tables laid out for rotate-half
    (angles repeated in two halves instead of twice per pair), and the sign flipped."""
    ex = impl("ch04_transformer")
    x = randn(2, 3, 5, 8, seed=4)
    positions = torch.tensor([3, 4, 7, 8, 20])
    out = ex.apply_rotary(x, positions, pairing="interleaved")
    want = meta_rotary(x, positions)
    error = (out - want).abs().max().item()
    assert error < 1e-10, (
        f"interleaved pairing: max |yours - Meta's| = {error:.2e}; "
        f"your output is {(out - half_rotary(x, positions)).abs().max().item():.1e} from "
        "the rotate-half result (0 means the pairing argument was ignored)"
    )


@pytest.mark.points(1)
@pytest.mark.parametrize("pairing", ["half", "interleaved"])
def test_apply_rotary_scores_depend_on_relative_position(impl, pairing):
    """Catches any rotation that is not one: q at m and k at n must score as at m+s and n+s,
    in both pairings."""
    ex = impl("ch04_transformer")
    q, k = randn(6, 16), randn(6, 16, seed=1)
    positions = torch.tensor([0, 1, 2, 5, 9, 13])

    def scores(shift):
        p = positions + shift
        return ex.apply_rotary(q, p, pairing=pairing) @ ex.apply_rotary(k, p, pairing=pairing).T

    torch.testing.assert_close(scores(0), scores(11), atol=1e-9, rtol=0)
    assert not torch.allclose(scores(0), q @ k.T), "apply_rotary left the scores unchanged"


@pytest.mark.points(2)
def test_rotary_attention_rotates_queries_and_keys_only(impl):
    """Catches rotating the values too, forgetting the causal mask, a missing 1/sqrt(D), and
    rotating q and k with different pairings. Either pairing is accepted (the exercise does not
    fix one). Reference: Llama's (rotate-half) or Meta's (interleaved) rotary embedding, then
    torch's causal SDPA."""
    ex = impl("ch04_transformer")
    q, k, v = randn(2, 2, 6, 8), randn(2, 2, 6, 8, seed=1), randn(2, 2, 6, 8, seed=2)
    positions = torch.arange(6)
    out = ex.rotary_attention(q, k, v)
    errors = {}
    for name, rotate in (("rotate-half", half_rotary), ("interleaved", meta_rotary)):
        want = F.scaled_dot_product_attention(
            rotate(q, positions), rotate(k, positions), v, is_causal=True
        )
        errors[name] = (out - want).abs().max().item()
    assert min(errors.values()) < 1e-10, (
        "rotary_attention matches neither pairing: max difference "
        + ", ".join(f"{e:.2e} from {name}" for name, e in errors.items())
    )


@pytest.mark.points(2)
def test_interleaved_to_half_permutes_within_each_head(impl):
    """Catches permuting the rows of the whole matrix instead of within each head, and the
    inverse permutation (half -> interleaved). Checked on the row order itself (3 heads of 4
    features: rows 0, 2, 1, 3 | 4, 6, 5, 7 | ...) and by what the permutation is for: queries and
    keys from the permuted weights, rotated with rotate-half, give the same scores as the
    original weights with the interleaved pairing (Meta's reference rotation)."""
    ex = impl("ch04_transformer")
    rows = torch.arange(12.0, dtype=torch.float64)[:, None].expand(12, 2)
    got = ex.interleaved_to_half(rows, n_heads=3)[:, 0].long().tolist()
    want = [0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11]
    assert got == want, f"row order after the permutation: expected {want}, got {got}"

    n_heads, d_head, C, T = 2, 8, 12, 5
    w_q, w_k = randn(n_heads * d_head, C, seed=1), randn(n_heads * d_head, C, seed=2)
    x, positions = randn(T, C, seed=3), torch.arange(T)

    def scores(wq, wk, rotate):
        q = (x @ wq.T).view(T, n_heads, d_head).transpose(0, 1)  # (H, T, D)
        k = (x @ wk.T).view(T, n_heads, d_head).transpose(0, 1)
        return rotate(q, positions) @ rotate(k, positions).transpose(-2, -1)

    permuted = [ex.interleaved_to_half(w, n_heads=n_heads) for w in (w_q, w_k)]
    torch.testing.assert_close(
        scores(*permuted, half_rotary),
        scores(w_q, w_k, meta_rotary),
        **F64,
        msg="rotate-half on the permuted weights must give the interleaved model's scores",
    )


def gpt2_block_and_weights(n_embd=16, n_head=4, seed=0):
    """A transformers GPT2Block with random weights, and the same weights under minillm's names
    in nn.Linear layout (GPT-2's Conv1D stores them transposed, q k v fused in c_attn)."""
    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=n_embd,
        n_head=n_head,
        n_positions=32,
        resid_pdrop=0.0,
        attn_pdrop=0.0,
        embd_pdrop=0.0,
    )
    block = GPT2Block(config, layer_idx=0).double().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    return block, block_weights_from_gpt2(block.state_dict())


def block_weights_from_gpt2(s: dict) -> dict:
    """A GPT2Block's state dict under gpt_block's names, in nn.Linear layout."""
    q_w, k_w, v_w = s["attn.c_attn.weight"].T.chunk(3)
    q_b, k_b, v_b = s["attn.c_attn.bias"].chunk(3)
    return {
        "ln_1.weight": s["ln_1.weight"],
        "ln_1.bias": s["ln_1.bias"],
        "self_attn.q_proj.weight": q_w,
        "self_attn.q_proj.bias": q_b,
        "self_attn.k_proj.weight": k_w,
        "self_attn.k_proj.bias": k_b,
        "self_attn.v_proj.weight": v_w,
        "self_attn.v_proj.bias": v_b,
        "self_attn.o_proj.weight": s["attn.c_proj.weight"].T,
        "self_attn.o_proj.bias": s["attn.c_proj.bias"],
        "ln_2.weight": s["ln_2.weight"],
        "ln_2.bias": s["ln_2.bias"],
        "mlp.up_proj.weight": s["mlp.c_fc.weight"].T,
        "mlp.up_proj.bias": s["mlp.c_fc.bias"],
        "mlp.down_proj.weight": s["mlp.c_proj.weight"].T,
        "mlp.down_proj.bias": s["mlp.c_proj.bias"],
    }


@pytest.mark.points(3)
def test_gpt_block_matches_gpt2(impl):
    """Catches post-norm (LayerNorm after the residual add instead of before the sublayer), a
    missing residual connection, no causal mask, heads split the wrong way, and the exact (erf)
    GELU instead of GPT-2's tanh approximation. Reference: transformers' GPT2Block."""
    ex = impl("ch04_transformer")
    block, weights = gpt2_block_and_weights()
    x = randn(2, 7, 16)
    # A standalone GPT2Block is causal only through the mask its GPT2Model would build: pass it.
    causal = torch.full((7, 7), float("-inf"), dtype=torch.float64).triu(1)[None, None]
    with torch.no_grad():
        want = block(x, attention_mask=causal)
    torch.testing.assert_close(ex.gpt_block(x, weights, n_head=4), want, **F64)


@pytest.mark.points(1)
def test_gpt_block_is_causal(impl):
    """Catches a block whose early outputs change when a later token does (no causal mask)."""
    ex = impl("ch04_transformer")
    _, weights = gpt2_block_and_weights(seed=1)
    x = randn(1, 6, 16)
    changed = x.clone()
    changed[0, 4] = randn(16, seed=2)  # not a constant shift, which LayerNorm would erase
    before, after = ex.gpt_block(x, weights, 4), ex.gpt_block(changed, weights, 4)
    torch.testing.assert_close(before[:, :4], after[:, :4], **F64)
    assert not torch.allclose(before[:, 4:], after[:, 4:])


def gpt2_model_and_weights(tie: bool, n_layer=2, n_embd=16, n_head=4, vocab=30, seed=0):
    """A transformers GPT2LMHeadModel with random weights, and the same weights under the names
    gpt_forward takes (the blocks' as in gpt2_block_and_weights)."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=16,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        tie_word_embeddings=tie,
        resid_pdrop=0.0,
        attn_pdrop=0.0,
        embd_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    s = model.state_dict()
    weights = {
        "tok_emb.weight": s["transformer.wte.weight"],
        "pos_emb.weight": s["transformer.wpe.weight"],
        "ln_f.weight": s["transformer.ln_f.weight"],
        "ln_f.bias": s["transformer.ln_f.bias"],
        "lm_head.weight": s["lm_head.weight"],
    }
    for i, block in enumerate(model.transformer.h):
        block_weights = block_weights_from_gpt2(block.state_dict())
        weights.update({f"blocks.{i}.{name}": w for name, w in block_weights.items()})
    return model, weights


@pytest.mark.points(3)
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_gpt_forward_matches_gpt2(impl, tie):
    """The whole forward pass, embeddings to logits, against transformers' GPT2LMHeadModel with
    the same weights (2 blocks). Catches a missing position embedding (or positions added in
    every block), the final ln_f left out, a bias or a transpose missing in the output head,
    the token matrix used as the head when the weights are not tied, and blocks applied in the
    wrong order or the same block twice."""
    ex = impl("ch04_transformer")
    model, weights = gpt2_model_and_weights(tie)
    idx = torch.randint(0, 30, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(idx).logits
    out = ex.gpt_forward(idx, weights, n_layer=2, n_head=4)
    assert out.shape == (2, 9, 30), f"expected (B, T, V) = (2, 9, 30), got {tuple(out.shape)}"
    error = (out - want).abs().max().item()
    assert error < 1e-9, (
        f"max |your logits - GPT2LMHeadModel's| = {error:.2e} with "
        f"{'tied' if tie else 'untied'} weights, expected rounding only (< 1e-9)"
    )


@pytest.mark.points(2)
@pytest.mark.parametrize("tie", [True, False])
def test_gpt_parameter_count_matches_gpt2(impl, tie):
    """Catches counting a tied lm_head twice (or an untied one not at all), forgetting biases or
    LayerNorm parameters, and giving lm_head a bias. Reference: GPT2LMHeadModel's own count."""
    ex = impl("ch04_transformer")
    config = GPTConfig(
        vocab_size=50, block_size=20, n_layer=3, n_head=2, n_embd=24, tie_weights=tie
    )
    hf = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=50, n_positions=20, n_layer=3, n_head=2, n_embd=24, tie_word_embeddings=tie
        )
    )
    assert ex.gpt_parameter_count(config) == hf.num_parameters()


@pytest.mark.points(1)
def test_gpt_parameter_count_of_gpt2_small_and_variants(impl):
    """Catches a formula that ignores `bias` or `positions`. References: GPT-2 small's known
    124,439,808 parameters, and the course GPT counted on the meta device (no memory used)."""
    ex = impl("ch04_transformer")
    gpt2_small = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    assert ex.gpt_parameter_count(gpt2_small) == 124_439_808
    for variant in (
        dict(bias=False),
        dict(positions="rotary"),
        dict(bias=False, tie_weights=False),
    ):
        config = GPTConfig(vocab_size=50, block_size=20, n_layer=3, n_head=2, n_embd=24, **variant)
        with torch.device("meta"):
            expected = GPT(config).num_parameters()
        assert ex.gpt_parameter_count(config) == expected, f"wrong count for {variant}"


@pytest.mark.points(2)
def test_mask_tokens_follows_the_80_10_10_rule(impl):
    """Catches applying 80/10/10 to every token instead of to the chosen 15%, labels at unchosen
    positions (they must be -100), and choosing padding. Statistics of 170,000 tokens; each
    fraction within 0.01 (about 6 standard deviations)."""
    ex = impl("ch04_transformer")
    vocab, mask_id, pad = 1000, 999, 0
    idx = torch.randint(1, 999, (200, 1000), generator=torch.Generator().manual_seed(1))
    idx[:, 850:] = pad
    inputs, labels = ex.mask_tokens(
        idx,
        mask_id,
        vocab,
        mask_prob=0.15,
        special_ids=(pad,),
        generator=torch.Generator().manual_seed(0),
    )
    assert inputs.shape == labels.shape == idx.shape
    chosen = labels != -100
    assert not chosen[:, 850:].any(), "a special (padding) token was chosen"
    assert torch.equal(inputs[:, 850:], idx[:, 850:])
    assert abs(chosen.float().mean().item() - 0.15 * 0.85) < 0.01, "choose 15% of real tokens"
    assert torch.equal(labels[chosen], idx[chosen]), "labels must hold the original ids"
    assert torch.equal(inputs[~chosen], idx[~chosen]), "unchosen tokens must stay unchanged"
    masked = (inputs[chosen] == mask_id).double().mean().item()
    kept = (inputs[chosen] == idx[chosen]).double().mean().item()
    assert abs(masked - 0.8) < 0.01, f"{masked:.3f} of chosen tokens became mask_id, want 0.8"
    assert abs(kept - 0.1) < 0.01, f"{kept:.3f} of chosen tokens stayed unchanged, want 0.1"
    assert abs(1 - masked - kept - 0.1) < 0.01, "10% of chosen tokens get a random id"


def mha_weights(mha: nn.MultiheadAttention) -> dict:
    """nn.MultiheadAttention's packed projections under the exercise's names."""
    q_w, k_w, v_w = mha.in_proj_weight.detach().chunk(3)
    q_b, k_b, v_b = mha.in_proj_bias.detach().chunk(3)
    return {
        "q_proj.weight": q_w,
        "q_proj.bias": q_b,
        "k_proj.weight": k_w,
        "k_proj.bias": k_b,
        "v_proj.weight": v_w,
        "v_proj.bias": v_b,
        "o_proj.weight": mha.out_proj.weight.detach(),
        "o_proj.bias": mha.out_proj.bias.detach(),
    }


@pytest.mark.points(2)
def test_cross_attention_matches_torch_multihead_attention(impl):
    """Catches queries taken from the memory (or keys from the decoder), a causal mask in
    cross-attention, and the padding mask inverted (True = real token here; torch's
    key_padding_mask uses True = padding). Decoder length 5, memory length 7, so a transpose
    shows. Reference: nn.MultiheadAttention."""
    ex = impl("ch04_transformer")
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True, dtype=torch.float64).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    x, memory = randn(2, 5, 16), randn(2, 7, 16, seed=1)
    real = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    with torch.no_grad():
        want_full, _ = mha(x, memory, memory)
        want_padded, _ = mha(x, memory, memory, key_padding_mask=~real)
    out = ex.cross_attention(x, memory, mha_weights(mha), n_head=4)
    assert out.shape == (2, 5, 16), f"expected (B, T, C) = (2, 5, 16), got {tuple(out.shape)}"
    torch.testing.assert_close(out, want_full, **F64)
    padded = ex.cross_attention(x, memory, mha_weights(mha), 4, memory_padding_mask=real)
    torch.testing.assert_close(padded, want_padded, **F64)


# -- The Llama family ------------------------------------------------------------------------


@pytest.mark.points(2)
def test_rms_norm_matches_torch(impl):
    """Catches subtracting the mean first (that is LayerNorm), dividing by the standard deviation
    instead of the root mean square, and eps outside the square root. Reference:
    F.rms_norm; inputs with a mean far from 0, so a subtracted mean shows."""
    ex = impl("ch04_transformer")
    x, weight = randn(3, 5, 8) * 2 + 3, randn(8, seed=1)
    torch.testing.assert_close(ex.rms_norm(x, weight), F.rms_norm(x, (8,), weight, 1e-5), **F64)
    tiny, ones = randn(2, 8, seed=2) * 1e-3, torch.ones(8, dtype=torch.float64)
    torch.testing.assert_close(
        ex.rms_norm(tiny, ones, eps=1e-5), F.rms_norm(tiny, (8,), ones, 1e-5), **F64
    )


@pytest.mark.points(2)
def test_swiglu_matches_transformers_llama_mlp(impl):
    """Catches SiLU applied to the up projection instead of the gate, GELU or a bare sigmoid in
    place of SiLU, and weights used untransposed. Reference: transformers' LlamaMLP."""
    ex = impl("ch04_transformer")
    config = LlamaConfig(
        hidden_size=6, intermediate_size=10, num_attention_heads=2, hidden_act="silu"
    )
    mlp = LlamaMLP(config).double()
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(randn(*p.shape, seed=p.numel()))
        x = randn(2, 3, 6, seed=5)
        want = mlp(x)
    weights = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    out = ex.swiglu(x, *(w.detach() for w in weights))
    assert out.shape == (2, 3, 6), f"expected (B, T, C) = (2, 3, 6), got {tuple(out.shape)}"
    torch.testing.assert_close(out, want, **F64)


@pytest.mark.points(3)
def test_grouped_query_attention_shares_each_kv_head_with_neighbouring_query_heads(impl):
    """Catches query head h reading key/value head h % G (tiling the heads with repeat instead of
    repeat_interleave): with 6 query and 2 key/value heads, heads 0, 1, 2 share kv head 0. Also a
    missing causal mask or 1/sqrt(D) scale. Reference: transformers' repeat_kv, then
    F.scaled_dot_product_attention; G = 2 (grouped), 1 (multi-query), 6 (multi-head)."""
    ex = impl("ch04_transformer")
    q = randn(2, 6, 5, 4)
    for n_kv_head in (2, 1, 6):
        k, v = randn(2, n_kv_head, 5, 4, seed=1), randn(2, n_kv_head, 5, 4, seed=2)
        rep = 6 // n_kv_head
        want = F.scaled_dot_product_attention(
            q, repeat_kv(k, rep), repeat_kv(v, rep), is_causal=True
        )
        out = ex.grouped_query_attention(q, k, v)
        assert out.shape == (2, 6, 5, 4), (
            f"expected (B, H, T, D) = (2, 6, 5, 4) with {n_kv_head} kv heads, got "
            f"{tuple(out.shape)}"
        )
        torch.testing.assert_close(out, want, **F64, msg=f"with {n_kv_head} key/value heads")
