"""minillm.compute: the FLOP formula against torch's FlopCounterMode on real training steps, the
matmul peak and MFU, time-to-train by hand, and the scaling-law fit on data from known laws."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from minillm import compute
from minillm.errors import InputError, InputTypeError
from minillm.llama import Llama, LlamaConfig
from minillm.model import GPT, GPTConfig


def step_flops(model, batch=2):
    torch.manual_seed(0)
    c = model.config
    idx = torch.randint(0, c.vocab_size, (batch, c.block_size))
    return compute.counted_flops(model, idx, idx), batch * c.block_size


@pytest.mark.parametrize(
    "model",
    [
        GPT(GPTConfig(attention="manual")),
        GPT(GPTConfig(attention="manual", tie_weights=False, n_layer=2, n_embd=96, n_head=3)),
        Llama(LlamaConfig(attention="manual")),  # grouped-query: 2 key/value heads for 4
        Llama(LlamaConfig(attention="manual", n_kv_head=1, intermediate_size=200)),  # one kv head
    ],
    ids=["gpt", "gpt-untied", "llama-gqa", "llama-mqa"],
)
def test_formula_equals_flop_counter_exactly_with_written_out_attention(model):
    """Every FLOP FlopCounterMode counts in a real forward + backward (mm, addmm for the linear
    layers, bmm for q k^T and p v) is in 6 W + 12 n_layer T d, and nothing else: exact equality."""
    counts, tokens = step_flops(model)
    assert counts["total"] == tokens * compute.flops_per_token(model.config), counts
    attention = counts["aten.bmm"]
    c = model.config
    assert attention == tokens * 12 * c.n_layer * c.block_size * c.n_embd


@pytest.mark.parametrize("model", [GPT(GPTConfig()), Llama(LlamaConfig())], ids=["gpt", "llama"])
def test_fused_attention_count_adds_the_backward_recomputation(model):
    """With torch's fused CPU attention (the default), the counter sees the flash kernel's backward
    recompute q k^T: 2.5 times the forward's attention instead of 2, so the count exceeds the
    model FLOPs by exactly 2 n_layer T d per token; the matmul part is unchanged."""
    counts, tokens = step_flops(model)
    c = model.config
    extra = tokens * 2 * c.n_layer * c.block_size * c.n_embd
    assert counts["total"] == tokens * compute.flops_per_token(c) + extra, counts
    forward = counts["aten._scaled_dot_product_flash_attention_for_cpu"]
    assert forward == tokens * 4 * c.n_layer * c.block_size * c.n_embd


def test_flops_per_token_by_hand_and_against_6n():
    """The course GPT by hand (C = 128, 4 layers, V = 65, T = 64): W = 4 * 12 C^2 + C V =
    794,752; 6 W + 12 * 4 * 64 * 128 = 5,161,728. The 6N shorthand with N the non-embedding
    parameters is 8% lower (it drops lm_head and attention, adds biases and gains)."""
    config = GPTConfig()
    assert compute.matmul_weights(config) == 794_752
    assert compute.flops_per_token(config) == 5_161_728
    assert compute.flops_per_token(config, backward=False) == 5_161_728 // 3
    assert compute.flops_per_token(config, seq_len=32) == 6 * 794_752 + 12 * 4 * 32 * 128
    n = GPT(config).num_parameters(non_embedding=True)
    assert 0.07 < 1 - 6 * n / compute.flops_per_token(config) < 0.09
    # Llama-2 7B: 6.74e9 parameters, of which 6.61e9 are matmul weights (the 32000 x 4096
    # embedding table is not).
    llama7b, _ = compute.NAMED_MODELS["Llama-2 7B on 2T tokens"]
    assert compute.matmul_weights(llama7b) == 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 4096 * 32000


def test_flops_refuses_other_configs():
    with pytest.raises(InputTypeError, match="GPTConfig or a LlamaConfig"):
        compute.flops_per_token({"n_layer": 4})
    with pytest.raises(InputError):
        compute.flops_per_token(GPTConfig(), seq_len=0)


def test_matmul_peak_is_a_median_within_its_range():
    """A real measurement: positive, median between the extremes, the settings recorded. (No speed
    is asserted: the machine may be busy.)"""
    peak = compute.matmul_peak(size=256, repeats=5)
    assert 0 < peak.low <= peak.median <= peak.high
    assert (peak.size, peak.repeats, peak.dtype, peak.device) == (256, 5, "float32", "cpu")
    assert "GFLOP/s" in str(peak)
    with pytest.raises(InputError):
        compute.matmul_peak(size=0)


def test_mfu_and_time_to_train_by_hand():
    """MFU = 6e6 FLOPs/token x 1e3 tokens/s / 1e10 FLOP/s = 0.6. GPT-2 124M: 854,438,400 FLOPs per
    token x 10e9 tokens at 40% of 312e12 on one A100 = 6.846e7 s = 0.792 days."""
    assert compute.mfu(6e6, 1e3, 1e10) == pytest.approx(0.6, rel=1e-12)
    gpt2, tokens = compute.NAMED_MODELS["GPT-2 124M on 10B tokens"]
    assert compute.flops_per_token(gpt2) == 854_438_400
    seconds = compute.time_to_train(854_438_400, tokens, 312e12, 0.4)
    assert seconds == pytest.approx(854_438_400 * 1e10 / (0.4 * 312e12), rel=1e-12)
    assert compute.time_to_train(1e9, 1e12, 1e15, 0.5, devices=8) == pytest.approx(250_000.0)
    rows = compute.time_to_train_table(mfu=0.4)
    assert len(rows) == len(compute.NAMED_MODELS) * len(compute.ACCELERATORS)
    row = rows[0]
    assert row["days"] == pytest.approx(seconds / 86400, rel=1e-12)
    for bad in (0.0, 1.5):
        with pytest.raises(InputError, match="mfu"):
            compute.time_to_train(1e9, 1e9, 1e12, bad)
    with pytest.raises(InputError):
        compute.mfu(1e6, -1.0, 1e9)


GRID_N = np.repeat([1e3, 3e3, 1e4, 3e4, 1e5], 3)
GRID_D = np.tile([1e5, 1e6, 1e7], 5)


def test_fit_recovers_known_parameters_from_noise_free_runs():
    """Runs generated from a known law (5 sizes x 3 budgets): the fit returns its five parameters
    to 1e-6 relative and residuals below 1e-9."""
    truth = compute.ScalingLaw(E=1.5, A=50.0, B=300.0, alpha=0.4, beta=0.3)
    fit = compute.fit_scaling_law(GRID_N, GRID_D, truth.loss(GRID_N, GRID_D))
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(fit.law, name) == pytest.approx(getattr(truth, name), rel=1e-6), name
    assert fit.rms < 1e-9 and fit.max_abs < 1e-9


def test_fit_recovers_chinchilla_at_its_own_scale():
    """Hoffmann et al.'s law sampled at 10M-1B parameters and 1B-100B tokens is fitted back."""
    n, d = GRID_N * 1e4, GRID_D * 1e4
    fit = compute.fit_scaling_law(n, d, compute.CHINCHILLA.loss(n, d))
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(fit.law, name) == pytest.approx(getattr(compute.CHINCHILLA, name), rel=1e-4)


def optimum_and_brute_force(law, budget, *, decades):
    """`law.compute_optimal(budget)`'s N (checked to spend the whole budget) and the N of least
    L(N, C / 6N) on a fine grid `decades` either side of it."""
    n_opt, d_opt = law.compute_optimal(budget)
    assert 6 * n_opt * d_opt == pytest.approx(budget, rel=1e-12)
    center = math.log10(n_opt)
    grid = np.logspace(center - decades, center + decades, 20000 * decades + 1)
    return n_opt, grid[np.argmin(law.loss(grid, budget / (6 * grid)))]


def test_compute_optimal_minimises_the_loss_on_the_budget():
    """N_opt from the closed form against a brute-force search of L(N, C / 6N) over N; and
    Chinchilla's law gives about 20 tokens per parameter at Chinchilla's own budget (5.76e23)."""
    law = compute.CHINCHILLA
    for budget in (1e18, 5.76e23):
        n_opt, best = optimum_and_brute_force(law, budget, decades=1)
        assert best == pytest.approx(n_opt, rel=1e-3)
    n_opt, d_opt = law.compute_optimal(5.76e23)
    assert 15 < d_opt / n_opt < 100  # tokens per parameter: tens, not Kaplan's ~1
    with pytest.raises(InputError):
        law.compute_optimal(0.0)
    for no_optimum in (dict(alpha=-0.1), dict(beta=0.0)):  # a loss that does not fall with N or D
        with pytest.raises(InputError, match="no compute-optimal split"):
            dataclasses.replace(law, **no_optimum).compute_optimal(1e18)


def test_fit_refuses_bad_input():
    with pytest.raises(InputError, match="at least 6"):
        compute.fit_scaling_law([1, 2, 3], [1, 2, 3], [3, 2, 1])
    with pytest.raises(InputError, match="one length"):
        compute.fit_scaling_law(GRID_N, GRID_D[:-1], GRID_N)
    bad = np.ones(15)
    bad[3] = np.nan
    with pytest.raises(InputError, match="finite"):
        compute.fit_scaling_law(GRID_N, GRID_D, bad)
    with pytest.raises(InputError, match="> 0"):
        compute.fit_scaling_law(GRID_N, GRID_D, -np.ones(15))


def test_n_exponent_by_hand():
    """Chinchilla's N_opt ~ C^a: a = 0.28 / (0.34 + 0.28) = 0.4516..."""
    assert compute.CHINCHILLA.n_exponent == pytest.approx(0.28 / 0.62, rel=1e-15)


KNOWN = compute.ScalingLaw(E=1.5, A=50.0, B=300.0, alpha=0.4, beta=0.3)


def noisy(losses, sigma=0.002, seed=0):
    """Losses times exp(normal(0, sigma)): measured runs' relative noise."""
    return losses * np.exp(np.random.default_rng(seed).normal(0.0, sigma, len(losses)))


def test_bootstrap_of_noise_free_runs_has_no_spread():
    """Runs exactly on a law: every resample's refit is the law (the 68% intervals sit on it)."""
    spread = compute.bootstrap_scaling_law(GRID_N, GRID_D, KNOWN.loss(GRID_N, GRID_D), resamples=40)
    for q in compute.ScalingLaw.QUANTITIES:
        low, high = spread.intervals[q]
        assert low == pytest.approx(getattr(KNOWN, q), rel=1e-5), q
        assert high == pytest.approx(getattr(KNOWN, q), rel=1e-5), q
        assert spread.identified[q], q
    assert len(spread.samples["beta"]) == 40


def test_bootstrap_of_noisy_runs_brackets_the_true_law():
    """0.2% noise on runs from a known law: every number is identified to within 10%, and the
    true value lies within the interval widened by its own width on each side."""
    losses = noisy(KNOWN.loss(GRID_N, GRID_D))
    spread = compute.bootstrap_scaling_law(GRID_N, GRID_D, losses, resamples=40, seed=1)
    for q in compute.ScalingLaw.QUANTITIES:
        low, high = spread.intervals[q]
        assert low <= spread.value(q) <= high, q
        assert spread.relative_spread[q] < 0.1, q
        assert spread.identified[q], q
        assert low - (high - low) <= getattr(KNOWN, q) <= high + (high - low), q
    again = compute.bootstrap_scaling_law(GRID_N, GRID_D, losses, resamples=40, seed=1)
    np.testing.assert_array_equal(again.samples["alpha"], spread.samples["alpha"])


@pytest.mark.parametrize("sigma", [0.0, 0.002])
def test_bootstrap_without_d_dependence_does_not_identify_beta(sigma):
    """Losses that depend on N only: B and beta (and the compute-optimal exponent, which needs
    beta) are reported unidentified, with or without noise, while E, A and alpha are."""
    losses = KNOWN.E + KNOWN.A / GRID_N**KNOWN.alpha
    if sigma:
        losses = noisy(losses, sigma)
    spread = compute.bootstrap_scaling_law(GRID_N, GRID_D, losses, resamples=40)
    for q in ("B", "beta", "n_exponent"):
        assert not spread.identified[q], q
    for q in ("E", "A", "alpha"):
        assert spread.identified[q], q
        assert spread.value(q) == pytest.approx(getattr(KNOWN, q), rel=0.1), q


def test_bootstrap_reports_a_floor_at_zero_as_unidentified():
    """Runs from a law with no floor (E = 0): the fit's E goes to 0, which is not a measurement of
    the text's entropy, so E is reported unidentified; the rest is recovered."""
    law = compute.ScalingLaw(E=0.0, A=50.0, B=300.0, alpha=0.4, beta=0.3)
    spread = compute.bootstrap_scaling_law(GRID_N, GRID_D, law.loss(GRID_N, GRID_D), resamples=40)
    assert spread.value("E") < 1e-3
    assert not spread.identified["E"]
    for q in ("alpha", "beta", "n_exponent"):
        assert spread.identified[q], q
        assert spread.value(q) == pytest.approx(getattr(law, q), rel=1e-3), q


def test_bootstrap_refuses_bad_input():
    losses = KNOWN.loss(GRID_N, GRID_D)
    with pytest.raises(InputError, match="at least 20"):
        compute.bootstrap_scaling_law(GRID_N, GRID_D, losses, resamples=5)
    with pytest.raises(InputError, match="resamples"):
        compute.bootstrap_scaling_law(GRID_N, GRID_D, losses, resamples=0)
    for bad in (0.0, 1.0, -0.1, "0.2"):
        with pytest.raises(InputError, match="rel_tol"):
            compute.bootstrap_scaling_law(GRID_N, GRID_D, losses, rel_tol=bad)
    with pytest.raises(InputError, match="one length"):
        compute.bootstrap_scaling_law(GRID_N, GRID_D[:-1], losses)


COUPLED = compute.CoupledScalingLaw(N_c=1e6, D_c=1e7, alpha_N=0.2, alpha_D=0.3)


def test_coupled_law_by_hand():
    """Kaplan's form at one point, and its two limits: (N_c/N)^alpha_N without the D-term and
    (D_c/D)^alpha_D without the N-term."""
    r = 0.2 / 0.3
    assert COUPLED.loss(1e4, 1e6) == pytest.approx((100**r + 10) ** 0.3, rel=1e-14)
    assert COUPLED.loss(1e4, 1e300) == pytest.approx(100**0.2, rel=1e-12)
    assert COUPLED.loss(1e300, 1e6) == pytest.approx(10**0.3, rel=1e-12)
    assert COUPLED.n_exponent == pytest.approx(0.3 / 0.5, rel=1e-15)


def test_fit_recovers_a_coupled_law_from_noise_free_runs():
    """Runs generated from a known coupled law: the fit returns its four numbers to 1e-6, and the
    additive law, whose D-term is the same for every size, cannot follow them."""
    losses = COUPLED.loss(GRID_N, GRID_D)
    fit = compute.fit_scaling_law(GRID_N, GRID_D, losses, law=compute.CoupledScalingLaw)
    assert isinstance(fit.law, compute.CoupledScalingLaw)
    for name in ("N_c", "D_c", "alpha_N", "alpha_D"):
        assert getattr(fit.law, name) == pytest.approx(getattr(COUPLED, name), rel=1e-6), name
    assert fit.rms < 1e-9
    assert compute.fit_scaling_law(GRID_N, GRID_D, losses).rms > 1e-3


def test_bootstrap_of_a_noisy_coupled_law_brackets_the_truth():
    """0.2% noise on runs from a known coupled law: the exponents and the compute-optimal exponent
    are identified, and each true value lies within its 68% interval widened by its own width."""
    losses = noisy(COUPLED.loss(GRID_N, GRID_D))
    spread = compute.bootstrap_scaling_law(
        GRID_N, GRID_D, losses, law=compute.CoupledScalingLaw, resamples=20, seed=1
    )
    assert set(spread.intervals) == set(compute.CoupledScalingLaw.QUANTITIES)
    for q in compute.CoupledScalingLaw.QUANTITIES:
        low, high = spread.intervals[q]
        assert low <= spread.value(q) <= high, q
        assert low - (high - low) <= getattr(COUPLED, q) <= high + (high - low), q
    for q in ("alpha_N", "alpha_D", "n_exponent"):
        assert spread.identified[q], q
    assert all(isinstance(w, compute.CoupledScalingLaw) for w in spread.refits())


def test_coupled_compute_optimal_against_a_grid_and_the_closed_form():
    """N_opt found numerically against a brute-force grid of L(N, C/6N) and the closed form
    N^(r+1) = r N_c^r C / (6 D_c); its growth with C is C^n_exponent."""
    r = COUPLED.alpha_N / COUPLED.alpha_D
    for budget in (1e12, 1e18):
        n_opt, best = optimum_and_brute_force(COUPLED, budget, decades=2)
        assert best == pytest.approx(n_opt, rel=1e-3)
        closed = (r * COUPLED.N_c**r * budget / (6 * COUPLED.D_c)) ** (1 / (r + 1))
        assert n_opt == pytest.approx(closed, rel=1e-6)
    slope = math.log(COUPLED.compute_optimal(1e18)[0] / COUPLED.compute_optimal(1e12)[0]) / 6
    assert slope / math.log(10) == pytest.approx(COUPLED.n_exponent, rel=1e-6)


def test_coupled_law_refuses_bad_input():
    with pytest.raises(InputError, match="flops"):
        COUPLED.compute_optimal(-1.0)
    with pytest.raises(InputError, match="no compute-optimal split"):
        dataclasses.replace(COUPLED, alpha_N=0.0).compute_optimal(1e18)
    with pytest.raises(InputTypeError, match="law must be one of"):
        compute.fit_scaling_law(GRID_N, GRID_D, COUPLED.loss(GRID_N, GRID_D), law=dict)
    with pytest.raises(InputError, match="at least 6"):
        compute.fit_scaling_law([1, 2, 3], [1, 2, 3], [3, 2, 1], law=compute.CoupledScalingLaw)
    with pytest.raises(InputError, match="> 0"):
        compute.bootstrap_scaling_law(
            GRID_N, GRID_D, -np.ones(15), law=compute.CoupledScalingLaw, resamples=20
        )
