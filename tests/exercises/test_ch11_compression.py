"""Graded tests for chapter 11 (inference and compression): `minillm grade ch11`.

References: transformers' `TopPLogitsWarper`, torch's `quantize_per_tensor` and
`quantize_per_channel`, `torch.nn.utils.prune.l1_unstructured`, numpy's SVD in float64, the
distillation loss written out in float64, and the exact target distribution for the
speculative rule (its output frequencies over many draws). Floats match to 1e-5 (float32) or
1e-9 (float64) unless stated.
"""

import numpy as np
import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn
from transformers.generation.logits_process import TopPLogitsWarper

# What each exercise must not call: the library function it asks you to write.
OFF_LIMITS = {
    "top_p_filter": ("minillm.generate.filter_logits",),
    "absmax_quantize": ("minillm.infer.quantize", "torch.quantize_per_tensor"),
    "zeropoint_quantize_per_channel": ("minillm.infer.quantize", "torch.quantize_per_channel"),
    "magnitude_mask": ("minillm.infer.magnitude_prune", "torch.nn.utils.prune.l1_unstructured"),
    "distillation_loss": ("minillm.infer.distillation_loss",),
    "low_rank_factors": ("minillm.infer.low_rank",),
    "speculative_accept": ("minillm.infer.speculative_accept",),
}


def logits_of(probs):
    return torch.tensor(probs, dtype=torch.float32).log()[None]


# -- decoding -------------------------------------------------------------------------------


@pytest.mark.points(3)
def test_top_p_filter_equals_transformers(impl):
    """Catches keeping one token too few (dropping the token whose probability crosses top_p,
    `cumsum > p` instead of the mass *before* the token), sorting ascending, filtering in sorted
    order without scattering back, and changing the logits that stay."""
    ex = impl("ch11_compression")
    out = ex.top_p_filter(logits_of([0.5, 0.3, 0.2]), 0.7)
    assert torch.isinf(out).tolist() == [[False, False, True]]
    out = ex.top_p_filter(logits_of([0.2, 0.5, 0.3]), 0.45)  # the nucleus is the top token only
    assert torch.isinf(out).tolist() == [[True, False, True]]
    torch.manual_seed(0)
    logits = torch.randn(8, 40) * 3
    for top_p in (0.05, 0.3, 0.6, 0.9, 0.99, 1.0):
        expected = TopPLogitsWarper(top_p)(None, logits.clone())
        got = ex.top_p_filter(logits.clone(), top_p)
        assert torch.equal(got.isinf(), expected.isinf()), top_p
        kept = ~expected.isinf()
        torch.testing.assert_close(got[kept], logits[kept])


# -- quantisation ---------------------------------------------------------------------------


@pytest.mark.points(3)
def test_absmax_int8_round_trip_equals_torch(impl):
    """Catches a scale of max/128 or max/255 (the symmetric range is -127..127), truncating
    instead of rounding, returning floats instead of int8, a per-row scale, and dividing by
    zero on an all-zero tensor."""
    ex = impl("ch11_compression")
    q, scale = ex.absmax_quantize(torch.tensor([0.5, -1.0, 0.25]))
    assert q.dtype == torch.int8 and q.tolist() == [64, -127, 32]
    assert abs(float(scale) - 1 / 127) < 1e-9
    torch.manual_seed(0)
    w = torch.randn(16, 24) * torch.linspace(0.1, 3, 16)[:, None]
    expected_scale = w.abs().max().item() / 127
    expected = torch.quantize_per_tensor(w, expected_scale, 0, torch.qint8)
    q, scale = ex.absmax_quantize(w)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert abs(float(scale) - expected_scale) < 1e-7
    assert torch.equal(q, expected.int_repr())
    back = ex.absmax_dequantize(q, scale)
    torch.testing.assert_close(back, expected.dequantize())
    assert (back - w).abs().max() <= expected_scale / 2 + 1e-6
    q, scale = ex.absmax_quantize(torch.zeros(3, 4))
    assert torch.equal(q, torch.zeros(3, 4, dtype=torch.int8)) and float(scale) > 0
    assert torch.equal(ex.absmax_dequantize(q, scale), torch.zeros(3, 4))


@pytest.mark.points(3)
def test_zeropoint_per_channel_equals_torch(impl):
    """Catches quantising with the wrong axis (a scale per column instead of per output row),
    a range that does not hold 0, a scale of range/256, and an unrounded zero point."""
    ex = impl("ch11_compression")
    torch.manual_seed(0)
    w = torch.randn(6, 10) * torch.tensor([0.1, 1, 3, 0.5, 2, 0.01])[:, None] + 0.3
    w[1] = w[1].abs() + 0.5  # a row that is all positive: its range must widen to hold 0
    q, scale, zero = ex.zeropoint_quantize_per_channel(w)
    lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
    expected_scale = ((hi - lo) / 255).double()
    expected_zero = torch.round(-lo / (hi - lo) * 255).long()
    assert scale.shape == (6,) and zero.shape == (6,) and q.shape == w.shape
    torch.testing.assert_close(scale.double(), expected_scale, rtol=1e-6, atol=0)
    assert torch.equal(zero.long(), expected_zero)
    expected = torch.quantize_per_channel(w, expected_scale, expected_zero, 0, torch.quint8)
    # a weight exactly halfway between two levels may round either way in float32
    assert (q.long() - expected.int_repr().long()).abs().max() <= 1
    assert (q.long() != expected.int_repr().long()).float().mean() < 0.02
    back = (q.double() - zero.double()[:, None]) * scale.double()[:, None]
    assert ((back - w.double()).abs() <= expected_scale[:, None] * 0.5 + 1e-6).all()
    q, scale, zero = ex.zeropoint_quantize_per_channel(torch.zeros(2, 3))
    assert torch.isfinite(scale.float()).all() and torch.equal(
        q, torch.zeros(2, 3, dtype=torch.uint8)
    )


# -- pruning --------------------------------------------------------------------------------


@pytest.mark.points(2)
def test_magnitude_mask_equals_torch_prune(impl):
    """Catches ranking by signed value instead of magnitude, keeping the smallest weights,
    pruning one weight too many or too few, and ranking within rows instead of the tensor."""
    ex = impl("ch11_compression")
    assert ex.magnitude_mask(torch.tensor([0.3, -0.1, 0.2, -0.4]), 0.5).tolist() == [
        True,
        False,
        False,
        True,
    ]
    torch.manual_seed(0)
    for sparsity in (0.0, 0.1, 0.37, 0.5, 0.9):
        layer = nn.Linear(12, 9)
        torch_prune.l1_unstructured(layer, "weight", amount=sparsity)
        got = ex.magnitude_mask(layer.weight_orig.detach().clone(), sparsity)
        assert got.dtype == torch.bool and got.shape == (9, 12)
        assert torch.equal(got, layer.weight_mask.bool()), sparsity


# -- distillation ---------------------------------------------------------------------------


def reference_distillation(student, teacher, targets, t, alpha):
    s, te = student.double(), teacher.double()
    log_s = (s / t) - (s / t).logsumexp(-1, keepdim=True)
    log_t = (te / t) - (te / t).logsumexp(-1, keepdim=True)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    log_p = s - s.logsumexp(-1, keepdim=True)
    ce = -log_p[torch.arange(len(targets)), targets].mean()
    return (alpha * t * t * kl + (1 - alpha) * ce).item()


@pytest.mark.points(3)
def test_distillation_loss_with_the_t_squared_factor(impl):
    """Catches forgetting the T^2 factor, KL in the wrong direction (student || teacher), the
    cross-entropy at temperature T instead of 1, summing instead of averaging over positions,
    and swapping alpha and 1 - alpha."""
    ex = impl("ch11_compression")
    torch.manual_seed(0)
    student, teacher = torch.randn(7, 11) * 2, torch.randn(7, 11) * 2
    targets = torch.randint(0, 11, (7,))
    for t, alpha in [(1.0, 0.5), (2.0, 0.5), (4.0, 0.9), (3.0, 0.0), (2.0, 1.0)]:
        got = ex.distillation_loss(
            student.double(), teacher.double(), targets, temperature=t, alpha=alpha
        )
        expected = reference_distillation(student, teacher, targets, t, alpha)
        assert abs(float(got) - expected) < 1e-9 * max(1, abs(expected)), (t, alpha)


# -- low rank -------------------------------------------------------------------------------


@pytest.mark.points(2)
def test_low_rank_factors_are_the_truncated_svd(impl):
    """Catches dropping the singular values, keeping the smallest instead of the largest,
    transposed factors, and using U's rows or V's columns."""
    ex = impl("ch11_compression")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((9, 14))
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    for rank in (1, 3, 9):
        A, B = ex.low_rank_factors(torch.from_numpy(w), rank)
        assert tuple(A.shape) == (rank, 14) and tuple(B.shape) == (9, rank)
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        np.testing.assert_allclose((B @ A).numpy(), best, atol=1e-9)
    # the error of the best rank-r matrix is the norm of the singular values left out
    A, B = ex.low_rank_factors(torch.from_numpy(w), 4)
    err = np.linalg.norm(w - (B @ A).numpy())
    assert abs(err - np.sqrt((s[4:] ** 2).sum())) < 1e-9


# -- speculative decoding -------------------------------------------------------------------


@pytest.mark.points(3)
def test_speculative_accept_keeps_the_target_distribution(impl):
    """Catches accepting with probability q/p instead of p/q, resampling from p instead of the
    residual max(0, p - q) (which over-weights what the draft already proposes), and forgetting
    to renormalise the residual. Checked on 200,000 draws: frequencies within 0.005 of p
    (about 4 standard errors), and acceptance within 0.005 of 1 - TV(p, q)."""
    ex = impl("ch11_compression")
    p = torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.3, 0.3, 0.05, 0.05, 0.3], dtype=torch.float64)
    n = 200_000
    g = torch.Generator().manual_seed(0)
    drafted = torch.multinomial(q.expand(n, -1), 1, replacement=True, generator=g).squeeze(1)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    r = torch.rand(n, generator=g, dtype=torch.float64)
    tokens = ex.speculative_accept(p.expand(n, -1), q.expand(n, -1), drafted, u, r)
    assert tokens.shape == (n,)
    freq = torch.bincount(tokens.long(), minlength=5).double() / n
    assert (freq - p).abs().max() < 0.005, freq
    accepted = (tokens.long() == drafted) & (u < p[drafted] / q[drafted])
    assert abs(accepted.double().mean().item() - (1 - 0.5 * (p - q).abs().sum().item())) < 0.005
    # a rejected draft becomes the residual's inverse-CDF pick of r, by hand:
    one = ex.speculative_accept(
        p[None],
        q[None],
        torch.tensor([0]),
        torch.tensor([0.99]),
        torch.tensor([0.5], dtype=torch.float64),
    )
    residual = (p - q).clamp(min=0)
    cdf = (residual / residual.sum()).cumsum(0)
    assert one.tolist() == [int((cdf <= 0.5).sum())]
    # when draft and target agree, every draft is kept
    same = ex.speculative_accept(p.expand(50, -1), p.expand(50, -1), drafted[:50], u[:50], r[:50])
    assert torch.equal(same.long(), drafted[:50])
