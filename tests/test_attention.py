"""minillm.attention against torch's own attention, a hand-computed case, and bad input.

Comparisons with torch run in float64, where both sides agree to rounding: atol 1e-12, rtol 0.
"""

import math

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minillm.attention import (
    MultiHeadAttention,
    attention_cost,
    causal_mask,
    combine_masks,
    merge_heads,
    padding_mask,
    plot_attention,
    scaled_dot_product_attention,
    split_heads,
)
from minillm.errors import InputError, InputTypeError

matplotlib.use("Agg")

F64 = {"atol": 1e-12, "rtol": 0.0}  # float64 on both sides: only rounding differs
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def qkv(batch=2, heads=3, seq_q=5, seq_k=5, d_k=8, d_v=6, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, heads)
    q = torch.randn(*shape, seq_q, d_k, generator=g, dtype=torch.float64)
    k = torch.randn(*shape, seq_k, d_k, generator=g, dtype=torch.float64)
    v = torch.randn(*shape, seq_k, d_v, generator=g, dtype=torch.float64)
    return q.to(device), k.to(device), v.to(device)


# --- scaled dot-product attention -------------------------------------------------------------


def test_hand_computed_two_tokens():
    # On paper: q = k = I (2 tokens, d_k = 2), so q k^T / sqrt(2) = [[a, 0], [0, a]], a = 1/sqrt(2).
    # softmax([a, 0]) = [s, 1 - s] with s = 1 / (1 + e^-a) = 0.669762; out = weights @ v.
    q = k = torch.eye(2, dtype=torch.float64)
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    out, w = scaled_dot_product_attention(q, k, v, return_weights=True)
    s = 1 / (1 + math.exp(-1 / math.sqrt(2)))
    assert s == pytest.approx(0.669762, abs=1e-6)
    torch.testing.assert_close(w, torch.tensor([[s, 1 - s], [1 - s, s]], dtype=torch.float64))
    # Row 0: s*[1, 2] + (1-s)*[3, 4] = [3 - 2s, 4 - 2s] = [1.660477, 2.660477].
    expected = torch.tensor([[1.660477, 2.660477], [2.339523, 3.339523]], dtype=torch.float64)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # Causal: token 0 sees only itself, so its output is v[0]; token 1 is unchanged.
    causal = scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(causal, torch.stack([v[0], expected[1]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["plain", "causal", "bool_mask", "causal_rectangular"])
def test_matches_torch_sdpa(case, device):
    seq_k = 7 if case == "causal_rectangular" else 5
    q, k, v = qkv(seq_k=seq_k, device=device)
    kwargs = {}
    if case.startswith("causal"):
        kwargs["is_causal"] = True
    if case == "bool_mask":
        g = torch.Generator().manual_seed(1)
        mask = torch.rand(2, 1, 5, 5, generator=g) > 0.4
        mask[..., 0] = True  # keep a key in every row so torch's output is defined
        kwargs["mask"] = mask.to(device)
    ours = scaled_dot_product_attention(q, k, v, **kwargs)
    if "mask" in kwargs:
        kwargs["attn_mask"] = kwargs.pop("mask")
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, **kwargs), **F64)


def test_weights_are_distributions_and_multiply_v():
    q, k, v = qkv()
    out, w = scaled_dot_product_attention(q, k, v, return_weights=True)
    assert w.shape == (2, 3, 5, 5)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 5, dtype=torch.float64), **F64)
    torch.testing.assert_close(out, w @ v, **F64)


def test_softmax_over_keys_not_queries():
    # Changing one query must change only that query's output row.
    q, k, v = qkv()
    q2 = q.clone()
    q2[..., 3, :] += 1.0
    changed = (scaled_dot_product_attention(q2, k, v) != scaled_dot_product_attention(q, k, v)).any(
        -1
    )
    assert changed[..., 3].all() and not changed[..., [0, 1, 2, 4]].any()


def test_dot_product_variance_is_d_k_and_scaling_restores_one():
    # For q, k with independent unit-variance entries, q.k is a sum of d_k unit-variance terms.
    g = torch.Generator().manual_seed(0)
    for d_k in (4, 64, 256):
        q = torch.randn(20_000, d_k, generator=g, dtype=torch.float64)
        k = torch.randn(20_000, d_k, generator=g, dtype=torch.float64)
        dots = (q * k).sum(-1)
        assert dots.var().item() == pytest.approx(d_k, rel=0.05)
        assert (dots / math.sqrt(d_k)).var().item() == pytest.approx(1.0, rel=0.05)


def test_unscaled_scores_saturate_softmax():
    # Without 1/sqrt(d_k) the largest weight approaches 1 as d_k grows: one key takes all.
    g = torch.Generator().manual_seed(0)
    d_k = 512
    q = torch.randn(1000, 1, d_k, generator=g)
    k = torch.randn(1000, 16, d_k, generator=g)
    raw = (q @ k.transpose(-2, -1)).softmax(-1).amax(-1).mean()
    scaled = scaled_dot_product_attention(q, k, k, return_weights=True)[1].amax(-1).mean()
    assert raw > 0.9 > 0.5 > scaled


# --- masks ------------------------------------------------------------------------------------


def test_causal_mask_values():
    expected = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(3), expected)
    assert causal_mask(4, device="cpu").dtype == torch.bool


def test_causal_mask_blocks_future_positions():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64, requires_grad=True)
    for t in range(6):
        (grad,) = torch.autograd.grad(mha(x, is_causal=True)[:, t].sum(), x)
        assert (grad[:, t + 1 :] == 0).all(), f"position {t} sees the future"
        assert (grad[:, : t + 1].abs().sum(-1) > 0).all(), f"position {t} ignores its past"
    # The same through an explicit mask.
    (grad,) = torch.autograd.grad(mha(x, mask=causal_mask(6))[:, 2].sum(), x)
    assert (grad[:, 3:] == 0).all()


def test_padding_mask_from_lengths_and_from_attention_mask_agree():
    by_lengths = padding_mask(torch.tensor([3, 1]), seq_len=4)
    by_mask = padding_mask(torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]))
    assert by_lengths.shape == (2, 1, 1, 4)
    assert torch.equal(by_lengths, by_mask)
    assert torch.equal(padding_mask([2, 3]).squeeze(), torch.tensor([[1, 1, 0], [1, 1, 1]]).bool())


def test_padding_gives_same_output_as_the_unpadded_sequence():
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2).double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    lengths = torch.tensor([5, 3])
    out, w = mha(x, mask=padding_mask(lengths), return_weights=True)
    assert (w[1, :, :, 3:] == 0).all()  # nobody attends to padding
    alone = mha(x[1:, :3])
    torch.testing.assert_close(out[1, :3], alone[0], **F64)


def test_combine_masks():
    combined = combine_masks(causal_mask(4), None, padding_mask([2, 4]))
    assert combined.shape == (2, 1, 4, 4)
    assert torch.equal(combined[1, 0], causal_mask(4))
    assert torch.equal(combined[0, 0, :, 2:], torch.zeros(4, 2, dtype=torch.bool))
    assert combine_masks(None, None) is None


def test_fully_masked_rows_give_zeros_and_finite_gradients():
    # Left padding under a causal mask: the first query rows may attend to nothing but padding.
    q, k, v = (t.requires_grad_() for t in qkv(batch=1, heads=2, seq_q=4, seq_k=4))
    pad = padding_mask(torch.tensor([[0, 0, 1, 1]]))
    out, w = scaled_dot_product_attention(q, k, v, mask=pad, is_causal=True, return_weights=True)
    assert torch.isfinite(out).all() and torch.isfinite(w).all()
    assert (out[..., :2, :] == 0).all() and (w[..., :2, :] == 0).all()
    torch.testing.assert_close(w[..., 2:, :].sum(-1), torch.ones(1, 2, 2, dtype=torch.float64))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    # torch's SDPA defines these rows the same way.
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=pad & causal_mask(4))
    torch.testing.assert_close(out, expected, **F64)


# --- multi-head attention ---------------------------------------------------------------------


def test_split_and_merge_heads():
    x = torch.arange(2 * 3 * 8).reshape(2, 3, 8)
    heads = split_heads(x, 4)
    assert heads.shape == (2, 4, 3, 2)
    # Head 1 of token 2 holds features 2:4 of token 2.
    assert torch.equal(heads[0, 1, 2], x[0, 2, 2:4])
    assert torch.equal(merge_heads(heads), x)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", ["self", "cross", "causal", "padding"])
def test_matches_nn_multiheadattention(case, bias):
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(12, 3, bias=bias, batch_first=True, dtype=torch.float64).eval()
    ours = MultiHeadAttention.from_torch(theirs)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    x_kv = torch.randn(2, 7, 12, dtype=torch.float64) if case == "cross" else x
    torch_kwargs, our_mask = {}, None
    if case == "causal":
        our_mask = causal_mask(5)
        torch_kwargs["attn_mask"] = ~our_mask  # torch's MHA: True = blocked
    if case == "padding":
        our_mask = padding_mask([5, 2])
        torch_kwargs["key_padding_mask"] = ~our_mask[:, 0, 0, :]
    expected, expected_w = theirs(
        x, x_kv, x_kv, need_weights=True, average_attn_weights=False, **torch_kwargs
    )
    out, w = ours(x, None if case != "cross" else x_kv, mask=our_mask, return_weights=True)
    torch.testing.assert_close(out, expected, **F64)
    torch.testing.assert_close(w, expected_w, **F64)


def test_to_torch_round_trip():
    torch.manual_seed(0)
    ours = MultiHeadAttention(8, 2).double().eval()
    theirs = ours.to_torch()
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    mask = causal_mask(4)
    expected, _ = theirs(x, x, x, attn_mask=~mask)
    torch.testing.assert_close(ours(x, mask=mask), expected, **F64)
    back = MultiHeadAttention.from_torch(theirs)
    for a, b in zip(ours.state_dict().values(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2, dropout=0.5)
    x = torch.randn(1, 6, 8)
    mha.eval()
    assert torch.equal(mha(x), mha(x))
    mha.train()
    assert not torch.equal(mha(x), mha(x))


def test_parameter_count():
    assert sum(p.numel() for p in MultiHeadAttention(16, 4).parameters()) == 4 * 16 * 16 + 4 * 16
    assert sum(p.numel() for p in MultiHeadAttention(16, 4, bias=False).parameters()) == 4 * 256


# --- bad input --------------------------------------------------------------------------------


def test_bad_input_gives_clear_errors():
    q, k, v = qkv()
    with pytest.raises(InputError, match="must divide d_model"):
        MultiHeadAttention(10, 3)
    with pytest.raises(InputError, match="same last dimension d_k"):
        scaled_dot_product_attention(q, k[..., :4], v)
    with pytest.raises(InputError, match="seq_k"):
        scaled_dot_product_attention(q, k, v[..., :3, :])
    with pytest.raises(InputError, match="leading"):
        scaled_dot_product_attention(q, k[:1, :2], v[:1, :2])
    with pytest.raises(InputTypeError, match="floating-point"):
        scaled_dot_product_attention(q.long(), k.long(), v.long())
    with pytest.raises(InputTypeError, match="share one dtype"):
        scaled_dot_product_attention(q.float(), k, v)
    with pytest.raises(InputError, match="does not broadcast"):
        scaled_dot_product_attention(q, k, v, mask=causal_mask(4))
    with pytest.raises(InputTypeError, match="boolean"):
        scaled_dot_product_attention(q, k, v, mask=causal_mask(5).long())
    with pytest.raises(InputError, match="dropout_p"):
        scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    with pytest.raises(InputError, match="d_model=8"):
        MultiHeadAttention(8, 2)(torch.randn(2, 3, 6))
    with pytest.raises(InputTypeError, match="floating-point"):
        MultiHeadAttention(8, 2)(torch.ones(2, 3, 8, dtype=torch.long))
    with pytest.raises(InputError, match="lengths must lie"):
        padding_mask([3, 5], seq_len=4)
    with pytest.raises(InputError, match="only 0"):
        padding_mask(torch.tensor([[1, 2]]))
    with pytest.raises(InputTypeError, match="integers"):
        padding_mask(torch.tensor([1.5]))
    with pytest.raises(InputError, match=r"\(seq_q, seq_k\)"):
        plot_attention(torch.rand(1, 2, 3, 3))


# --- plotting and cost ------------------------------------------------------------------------


def test_plot_attention_labels_tokens():
    w = torch.softmax(torch.randn(3, 3), -1)
    ax = plot_attention(w, tokens=["a", "b", "c"], title="head 0")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    assert ax.get_title() == "head 0"
    with pytest.raises(InputError, match="labels"):
        plot_attention(w, tokens=["a", "b"])


def test_attention_cost_reports_score_size():
    costs = attention_cost(
        [16, 32], batch=1, n_heads=2, d_head=8, device="cpu", repeats=1, min_total_s=0.0
    )
    assert [c.seq_len for c in costs] == [16, 32]
    assert [c.score_bytes for c in costs] == [2 * 16 * 16 * 4, 2 * 32 * 32 * 4]
    assert all(c.seconds > 0 and c.torch_seconds > 0 and c.peak_bytes is None for c in costs)
