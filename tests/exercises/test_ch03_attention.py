"""Graded tests for chapter 03 (attention): `minillm grade ch03`.

References are torch's own `F.scaled_dot_product_attention`, `nn.MultiheadAttention` and hand
values. Comparisons with torch run in float64 with atol 1e-12 (only rounding differs); hand values
use atol 1e-6.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

# What each exercise must not call: the library function it asks you to write (a call fails
# the test). A guard against the obvious shortcut; the stubs' docstrings name the same.
SOFTMAX = (
    "torch.softmax",
    "torch.nn.functional.softmax",
    "torch.Tensor.softmax",
    "torch.special.softmax",
    "torch.log_softmax",
    "torch.nn.functional.log_softmax",
    "torch.Tensor.log_softmax",
    "torch.special.log_softmax",
)
OFF_LIMITS = {
    "stable_softmax": SOFTMAX,
    "causal_mask": ("minillm.attention.causal_mask",),
    "padding_mask": ("minillm.attention.padding_mask",),
    "scaled_dot_product_attention": (
        "torch.nn.functional.scaled_dot_product_attention",
        "minillm.attention.scaled_dot_product_attention",
        *SOFTMAX,
    ),
    "split_heads": ("minillm.attention.split_heads",),
    "merge_heads": ("minillm.attention.merge_heads",),
    "multi_head_attention": (
        "torch.nn.functional.multi_head_attention_forward",
        "torch.nn.MultiheadAttention.forward",
        "torch.nn.functional.scaled_dot_product_attention",
        "minillm.attention.scaled_dot_product_attention",
        "minillm.attention.MultiHeadAttention.forward",
        *SOFTMAX,
    ),
    "online_softmax_update": (
        "minillm.flash_attention.online_softmax_update",
        "minillm.flash_attention.flash_attention_forward",
    ),
    "tiled_attention": (
        "torch.nn.functional.scaled_dot_product_attention",
        "minillm.attention.scaled_dot_product_attention",
        "minillm.flash_attention.flash_attention",
        "minillm.flash_attention.flash_attention_forward",
        "minillm.flash_attention.online_softmax_update",
        *SOFTMAX,
    ),
}

F64 = {"atol": 1e-12, "rtol": 0.0}


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.points(1)
def test_stable_softmax_survives_large_inputs(impl):
    """Catches computing exp(x) directly: exp(1000) overflows to inf and inf / inf is NaN."""
    ex = impl("ch03_attention")
    x = torch.tensor([[1000.0, 1000.0 + math.log(3.0)], [-5.0, 2.0]], dtype=torch.float64)
    out = ex.stable_softmax(x)
    assert torch.isfinite(out).all(), "softmax of large inputs gave inf or NaN"
    torch.testing.assert_close(out[0], torch.tensor([0.25, 0.75], dtype=torch.float64), **F64)
    torch.testing.assert_close(out, torch.softmax(x, dim=-1), **F64)


@pytest.mark.points(1)
def test_stable_softmax_normalises_the_given_axis(impl):
    """Catches ignoring `dim`, or subtracting the maximum of the whole tensor instead of each
    slice's (a slice far below the global maximum then underflows to 0 / 0)."""
    ex = impl("ch03_attention")
    x = randn(3, 4) * 3
    for dim in (0, 1, -1):
        torch.testing.assert_close(ex.stable_softmax(x, dim=dim), torch.softmax(x, dim=dim), **F64)
    far_apart = torch.tensor([[0.0, 1.0], [2000.0, 2001.0]], dtype=torch.float64)
    torch.testing.assert_close(ex.stable_softmax(far_apart), torch.softmax(far_apart, -1), **F64)


@pytest.mark.points(1)
def test_attention_scores_are_scaled_by_sqrt_d_k(impl):
    """Catches a missing 1/sqrt(d_k), dividing by d_k itself, or by the square root of the
    sequence length instead of the key width."""
    ex = impl("ch03_attention")
    # By hand: each dot product of all-ones vectors of width 4 is 4; 4 / sqrt(4) = 2.
    torch.testing.assert_close(
        ex.attention_scores(torch.ones(1, 4), torch.ones(2, 4)), torch.tensor([[2.0, 2.0]])
    )
    q, k = randn(2, 3, 5, 16), randn(2, 3, 7, 16, seed=1)
    torch.testing.assert_close(ex.attention_scores(q, k), q @ k.transpose(-2, -1) / 4.0, **F64)


@pytest.mark.points(1)
def test_causal_mask_includes_the_diagonal(impl):
    """Catches the off-by-one that hides a token from itself (diagonal excluded) and the inverted
    convention (True where attention is blocked)."""
    ex = impl("ch03_attention")
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    mask = ex.causal_mask(4)
    assert mask.dtype == torch.bool, f"the mask must be boolean, got {mask.dtype}"
    assert torch.equal(mask, expected)


@pytest.mark.points(1)
def test_padding_mask_from_lengths(impl):
    """Catches an off-by-one (`<=` instead of `<`), the inverted convention, and masking queries
    instead of keys (wrong shape: the mask must be (batch, 1, 1, seq_len))."""
    ex = impl("ch03_attention")
    mask = ex.padding_mask(torch.tensor([3, 1, 4]), 4)
    assert mask.shape == (3, 1, 1, 4), f"expected (batch, 1, 1, seq_len), got {tuple(mask.shape)}"
    expected = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]).bool()
    assert torch.equal(mask[:, 0, 0], expected)


@pytest.mark.points(2)
def test_scaled_dot_product_attention_matches_torch(impl):
    """Catches a softmax over the queries (dim=-2) instead of the keys, and a missing
    1/sqrt(d_k); seq_q, seq_k, d_k and d_v all differ, so a transposed shape cannot hide."""
    ex = impl("ch03_attention")
    q, k, v = randn(2, 3, 4, 8), randn(2, 3, 6, 8, seed=1), randn(2, 3, 6, 5, seed=2)
    out = ex.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), **F64)


@pytest.mark.points(2)
def test_scaled_dot_product_attention_mask_convention(impl):
    """Catches the inverted mask convention (blocking where the mask is True) and setting blocked
    scores to 0 instead of -inf, which still gives them weight. True means "may attend"."""
    ex = impl("ch03_attention")
    q, k, v = randn(2, 2, 5, 4), randn(2, 2, 5, 4, seed=1), randn(2, 2, 5, 3, seed=2)
    mask = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(3)) > 0.5
    mask[..., 2] = True  # every query may attend somewhere
    out = ex.scaled_dot_product_attention(q, k, v, mask=mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), **F64)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    out = ex.scaled_dot_product_attention(q, k, v, mask=causal)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), **F64)


@pytest.mark.points(1)
def test_split_heads_layout(impl):
    """Catches reshaping (batch, seq, d_model) straight to (batch, heads, seq, d_head) without the
    transpose, which scatters one token's features over several positions."""
    ex = impl("ch03_attention")
    x = torch.arange(2 * 3 * 8.0).reshape(2, 3, 8)
    heads = ex.split_heads(x, 4)
    assert heads.shape == (2, 4, 3, 2)
    for h in range(4):
        assert torch.equal(heads[:, h], x[:, :, 2 * h : 2 * h + 2]), f"head {h} has wrong features"


@pytest.mark.points(1)
def test_merge_heads_undoes_split(impl):
    """Catches merging with a reshape before the transpose (the mirror of the split mistake)."""
    ex = impl("ch03_attention")
    heads = torch.arange(2 * 4 * 3 * 2.0).reshape(2, 4, 3, 2)  # (batch, heads, seq, d_head)
    merged = ex.merge_heads(heads)
    assert merged.shape == (2, 3, 8)
    for h in range(4):
        assert torch.equal(merged[:, :, 2 * h : 2 * h + 2], heads[:, h])
    x = randn(2, 5, 12)
    assert torch.equal(ex.merge_heads(ex.split_heads(x, 3)), x)


def torch_mha(d_model, n_heads, seed=0):
    """An `nn.MultiheadAttention` without biases and its four weights in (out, in) layout."""
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(d_model, n_heads, bias=False, batch_first=True)
    mha = mha.double().eval()
    w_q, w_k, w_v = mha.in_proj_weight.detach().chunk(3)
    return mha, (w_q, w_k, w_v, mha.out_proj.weight.detach())


@pytest.mark.points(3)
def test_multi_head_attention_matches_torch(impl):
    """Catches forgetting the output projection, splitting heads in the wrong order, and scaling
    by the full d_model instead of each head's d_head."""
    ex = impl("ch03_attention")
    mha, weights = torch_mha(12, 3)
    x = randn(2, 5, 12)
    expected, _ = mha(x, x, x, need_weights=False)
    out = ex.multi_head_attention(x, x, *weights, n_heads=3)
    torch.testing.assert_close(out, expected, **F64)


@pytest.mark.points(2)
def test_multi_head_attention_cross_and_causal(impl):
    """Catches taking keys and values from the queries' input in cross-attention, and passing
    torch's inverted `nn.MultiheadAttention` mask (True = blocked) instead of True = may attend."""
    ex = impl("ch03_attention")
    mha, weights = torch_mha(8, 2, seed=1)
    x_q, x_kv = randn(2, 4, 8), randn(2, 6, 8, seed=1)
    expected, _ = mha(x_q, x_kv, x_kv, need_weights=False)
    torch.testing.assert_close(
        ex.multi_head_attention(x_q, x_kv, *weights, n_heads=2), expected, **F64
    )
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    expected, _ = mha(x_kv, x_kv, x_kv, attn_mask=~causal, need_weights=False)
    out = ex.multi_head_attention(x_kv, x_kv, *weights, n_heads=2, mask=causal)
    torch.testing.assert_close(out, expected, **F64)


@pytest.mark.points(3)
def test_online_softmax_over_tiles_equals_the_softmax(impl):
    """Catches forgetting to rescale the running denominator or accumulator by exp(m - m_new)
    when a tile raises a row's maximum (row 1's largest score is in the last tile), and NaN for
    a row whose first tile is wholly masked (-inf). Walks 10 keys in tiles of 4, 3 and 3;
    reference: torch's softmax over all scores at once, and the running maximum."""
    ex = impl("ch03_attention")
    scores = randn(3, 10) * 3
    scores[0, :4] = float("-inf")
    scores[1, 9] = 40.0
    v = randn(10, 2, seed=1)
    m = torch.full((3,), float("-inf"), dtype=torch.float64)
    denom, acc = torch.zeros(3, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64)
    for start, end in ((0, 4), (4, 7), (7, 10)):
        m, denom, acc = ex.online_softmax_update(m, denom, acc, scores[:, start:end], v[start:end])
        assert torch.isfinite(denom).all() and torch.isfinite(acc).all(), (
            f"NaN or inf after the tile of keys {start}..{end - 1}: a row whose scores so far "
            "are all -inf must keep denom = 0 and acc = 0"
        )
        torch.testing.assert_close(m, scores[:, :end].amax(-1), **F64)
    torch.testing.assert_close(acc / denom[:, None], torch.softmax(scores, -1) @ v, **F64)


@pytest.mark.points(3)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tiled_attention_equals_exact_attention(impl, causal):
    """Tiled attention (FlashAttention's forward) must equal exact attention in float64 for tiles
    that do not divide the keys (10 keys in tiles of 4: 4, 4, 2), one key per tile, and one tile
    wider than the sequence. Catches averaging each tile's own softmax instead of rescaling the
    running sums, a missing 1/sqrt(d_k), and a causal mask built from the tile's own column
    index instead of the key's place in the sequence (correct for the first tile only).
    Reference: torch's F.scaled_dot_product_attention."""
    ex = impl("ch03_attention")
    seq_q = 10 if causal else 7  # torch's is_causal aligns query i with key i
    q, k, v = randn(2, 3, seq_q, 8), randn(2, 3, 10, 8, seed=1), randn(2, 3, 10, 5, seed=2)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    for block_k in (4, 1, 16):
        out = ex.tiled_attention(q, k, v, block_k, causal=causal)
        assert out.shape == want.shape, (
            f"expected (batch, heads, seq_q, d_v) = {tuple(want.shape)}, got {tuple(out.shape)}"
        )
        error = (out - want).abs().max().item()
        assert error < 1e-12, (
            f"block_k={block_k}{', causal' if causal else ''}: max |tiled - exact| = {error:.2e}, "
            "expected rounding only (< 1e-12)"
        )
