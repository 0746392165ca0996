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
OFF_LIMITS = {
    "layer_norm": ("torch.nn.functional.layer_norm", "torch.layer_norm"),
    "sinusoidal_positions": ("minillm.encoders.sinusoidal_positions",),
    "apply_rotary": ("minillm.model.apply_rotary", "minillm.model.rotary_cos_sin"),
    "rotary_attention": ("minillm.model.apply_rotary", "minillm.model.rotary_cos_sin"),
    "gpt_block": ("minillm.model.Block.forward",),
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
def test_apply_rotary_matches_llama(impl):
    """Catches pairing neighbours (2i, 2i+1) instead of (i, i + D/2), the rotation's sign flipped,
    ignoring the given positions (they start at 3 and skip here), and theta_i = base^(-i/D)."""
    ex = impl("ch04_transformer")
    x = randn(2, 3, 5, 8)
    positions = torch.tensor([3, 4, 7, 8, 20])
    cos, sin = llama_cos_sin(positions, 8)
    want, _ = apply_rotary_pos_emb(x, x, cos[None], sin[None])
    torch.testing.assert_close(ex.apply_rotary(x, positions), want, **F64)


@pytest.mark.points(1)
def test_apply_rotary_scores_depend_on_relative_position(impl):
    """Catches any rotation that is not one: q at m and k at n must score as at m+s and n+s."""
    ex = impl("ch04_transformer")
    q, k = randn(6, 16), randn(6, 16, seed=1)
    positions = torch.tensor([0, 1, 2, 5, 9, 13])

    def scores(shift):
        p = positions + shift
        return ex.apply_rotary(q, p) @ ex.apply_rotary(k, p).T

    torch.testing.assert_close(scores(0), scores(11), atol=1e-9, rtol=0)
    assert not torch.allclose(scores(0), q @ k.T), "apply_rotary left the scores unchanged"


@pytest.mark.points(2)
def test_rotary_attention_rotates_queries_and_keys_only(impl):
    """Catches rotating the values too, forgetting the causal mask, and a missing 1/sqrt(D).
    Reference: Llama's rotary embedding and torch's causal SDPA."""
    ex = impl("ch04_transformer")
    q, k, v = randn(2, 2, 6, 8), randn(2, 2, 6, 8, seed=1), randn(2, 2, 6, 8, seed=2)
    cos, sin = llama_cos_sin(torch.arange(6), 8)
    q_rot, k_rot = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    want = F.scaled_dot_product_attention(q_rot, k_rot, v, is_causal=True)
    torch.testing.assert_close(ex.rotary_attention(q, k, v), want, **F64)


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
    s = block.state_dict()
    q_w, k_w, v_w = s["attn.c_attn.weight"].T.chunk(3)
    q_b, k_b, v_b = s["attn.c_attn.bias"].chunk(3)
    weights = {
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
    return block, weights


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
