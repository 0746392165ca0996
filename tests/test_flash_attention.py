"""Tests of minillm.flash_attention: the tiled forward and the hand-written backward equal exact
attention (torch's F.scaled_dot_product_attention) in float64, outputs and every gradient, causal
and not, with tiles that do not divide the sequence; bad input is refused; the memory counter
counts what is allocated."""

import math

import pytest
import torch
import torch.nn.functional as F

from minillm.attention import scaled_dot_product_attention
from minillm.errors import InputError, InputTypeError
from minillm.flash_attention import (
    flash_attention,
    flash_attention_forward,
    online_softmax_update,
    peak_tensor_bytes,
)

# float64: the tiled sums differ from the exact ones by rounding only (measured: about 1e-15).
ATOL = 1e-12

# (seq_q, seq_k, block_q, block_k): equal and unequal lengths, tiles that divide nothing,
# tiles of one position and tiles larger than the sequence.
CASES = [(7, 7, 3, 2), (5, 9, 2, 4), (9, 4, 4, 3), (6, 6, 1, 1), (5, 5, 64, 64)]


def qkv(seq_q, seq_k, d_k=4, d_v=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, seq_q, d_k, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, seq_k, d_k, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, seq_k, d_v, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("seq_q", "seq_k", "block_q", "block_k"), CASES)
def test_output_and_gradients_equal_exact_attention(causal, seq_q, seq_k, block_q, block_k):
    q, k, v = qkv(seq_q, seq_k)
    ours = flash_attention(q, k, v, causal=causal, block_q=block_q, block_k=block_k)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
    grad = torch.randn_like(ours)
    our_grads = torch.autograd.grad(ours, (q, k, v), grad)
    their_grads = torch.autograd.grad(theirs, (q, k, v), grad)
    for name, a, b in zip("qkv", our_grads, their_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL, msg=f"d{name}")


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_against_finite_differences(causal):
    q, k, v = qkv(5, 6, d_k=3, d_v=2)

    def attend(q, k, v):
        return flash_attention(q, k, v, causal=causal, block_q=2, block_k=4)

    assert torch.autograd.gradcheck(attend, (q, k, v))


def test_forward_keeps_each_rows_log_sum_exp():
    q, k, v = qkv(7, 7)
    out, lse = flash_attention_forward(q, k, v, causal=True, block_q=3, block_k=2)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(lse, scores.logsumexp(-1), rtol=0, atol=ATOL)
    torch.testing.assert_close(out, scores.softmax(-1) @ v, rtol=0, atol=ATOL)
    assert not out.requires_grad  # the forward alone records no graph


def test_scale_multiplies_the_scores():
    q, k, v = qkv(6, 6)
    ours = flash_attention(q, k, v, scale=0.3, block_q=4, block_k=4)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, scale=0.3))


def test_online_softmax_update_over_tiles_equals_the_softmax():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(3, 10, generator=g, dtype=torch.float64) * 5
    scores[0, :4] = float("-inf")  # row 0's first tile is wholly masked
    v = torch.randn(10, 2, generator=g, dtype=torch.float64)
    m = torch.full((3,), float("-inf"), dtype=torch.float64)
    denom, acc = torch.zeros(3, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64)
    for start in (0, 4, 7):  # tiles of 4, 3 and 3 keys
        end = start + (4 if start == 0 else 3)
        m, denom, acc = online_softmax_update(m, denom, acc, scores[:, start:end], v[start:end])
    torch.testing.assert_close(m, scores.amax(-1))
    torch.testing.assert_close(acc / denom[:, None], scores.softmax(-1) @ v, rtol=0, atol=ATOL)


def test_a_tiny_hand_case():
    """One query, two keys with scores 0 and log 3: weights 1/4 and 3/4."""
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    k = torch.tensor([[0.0, 0.0], [math.log(3) * math.sqrt(2), 0.0]], dtype=torch.float64)
    v = torch.tensor([[4.0], [8.0]], dtype=torch.float64)
    out = flash_attention(q, k, v, block_k=1)
    torch.testing.assert_close(out, torch.tensor([[7.0]], dtype=torch.float64))


def good(**changes):
    args = dict(zip("qkv", qkv(4, 4), strict=True))
    return args | changes


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"q": [[1.0]]}, InputTypeError, "q must be a torch.Tensor, got list"),
        ({"k": torch.ones(2, 3, 4, 4, dtype=torch.long)}, InputTypeError, "floating-point"),
        ({"v": torch.ones(2, 3, 4, 5)}, InputTypeError, "share one dtype"),
        ({"q": torch.ones(4, dtype=torch.float64)}, InputError, r"\(\.\.\., seq, features\)"),
        ({"k": torch.ones(2, 3, 4, 3, dtype=torch.float64)}, InputError, "same last dimension"),
        ({"v": torch.ones(2, 3, 5, 5, dtype=torch.float64)}, InputError, "seq_k"),
        ({"k": torch.ones(2, 1, 4, 4, dtype=torch.float64)}, InputError, "share_kv_heads"),
        ({"q": torch.ones(2, 3, 0, 4, dtype=torch.float64)}, InputError, "seq_q=0"),
        ({"block_q": 0}, InputError, "block_q"),
        ({"block_k": 2.5}, InputTypeError, "block_k must be an integer"),
        ({"scale": float("nan")}, InputError, "scale must be a finite number"),
    ],
)
def test_bad_inputs_are_refused_with_what_to_fix(changes, error, match):
    with pytest.raises(error, match=match):
        flash_attention(**good(**changes))


def test_peak_tensor_bytes_counts_what_is_alive_at_once():
    x = torch.ones(1000)  # allocated before: not counted

    def two_buffers():
        a = torch.empty(1000)  # 4000 bytes
        b = torch.empty(500)  # 2000 more while a lives
        del a
        c = torch.empty(250)  # a's 4000 are free again: the peak stays 6000
        return b, c, x[:10], x.mul_(1)  # a view and an in-place result allocate nothing

    assert peak_tensor_bytes(two_buffers) == 6000
    with pytest.raises(InputTypeError, match="function of no arguments"):
        peak_tensor_bytes(42)


def test_tiled_attention_holds_no_score_matrix():
    """Forward and backward at seq 256 with 16 x 16 tiles: the written-out attention of
    minillm.attention holds the (heads, seq, seq) scores; the tiled one less than half of them.
    (torch's own CPU kernel is tiled too, so it is not the quadratic reference here.)"""
    shape, score_bytes = (1, 2, 256, 8), 2 * 256 * 256 * 4
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape)

    def pass_of(attention):
        return lambda: torch.autograd.grad(attention(q, k, v), (q, k, v), grad)

    exact = peak_tensor_bytes(
        pass_of(lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True))
    )
    tiled = peak_tensor_bytes(
        pass_of(lambda q, k, v: flash_attention(q, k, v, causal=True, block_q=16, block_k=16))
    )
    assert tiled < score_bytes / 2 < exact
