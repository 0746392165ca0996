"""The compute budget (chapter 05) and scaling laws (chapter 06): FLOPs per token from the
architecture, a count of the real FLOPs of a training step, this machine's matmul peak, model
FLOP utilisation (MFU), time-to-train estimates, and the fit of scaling laws L(N, D).

Read it top to bottom:

1. `matmul_weights` and `flops_per_token`: the FLOPs of one training token, derived from the
   config of a `GPT` or a `Llama`; `counted_flops` counts them on a real step with
   `torch.utils.flop_counter.FlopCounterMode` (tests/test_compute.py checks that the two agree);
2. `matmul_peak`, `mfu`: the achieved FLOP/s of a training run against this machine's measured
   matmul peak;
3. `time_to_train` and `TIME_TO_TRAIN`: named models on named hardware, assumptions stated;
4. `ScalingLaw` (Hoffmann et al.'s additive form), `CoupledScalingLaw` (Kaplan et al.'s),
   `CHINCHILLA`, `fit_scaling_law`: the loss as a function of parameters N and training tokens
   D, fitted as Hoffmann et al. (2022) fit theirs, and the compute-optimal N for a budget
   C = 6 N D; `bootstrap_scaling_law`: how tightly the runs pin each fitted number down
   (refits on runs drawn with replacement), and which numbers they do not identify.

A FLOP here is one floating-point multiply or add: a multiply-add counts 2, so `(m, k) @ (k, n)`
costs 2 m k n, torch's convention too.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from minillm.errors import InputError, InputTypeError, require_positive
from minillm.llama import LlamaConfig
from minillm.model import GPTConfig

# ---------------------------------------------------------------------------------------------
# 1. FLOPs per token
# ---------------------------------------------------------------------------------------------


def _check_config(config) -> None:
    if not isinstance(config, (GPTConfig, LlamaConfig)):
        raise InputTypeError(
            f"the FLOP count takes a GPTConfig or a LlamaConfig, got {type(config).__name__}"
        )


def matmul_weights(config: GPTConfig | LlamaConfig) -> int:
    """The weights of every matrix multiply one token passes through, lm_head included.

    Per block: q_proj and o_proj (C x C), k_proj and v_proj (C x G*D: C x C in the GPT, fewer
    with grouped-query attention), and the MLP (two C x 4C in the GPT, three C x I in a Llama's
    SwiGLU); then lm_head (C x V), which multiplies every token's hidden state even when it shares
    its matrix with the token table. Embedding lookups, biases, norms, activations and the softmax
    are not matrix multiplies and are left out (together < 1% of the FLOPs here).
    """
    _check_config(config)
    c = config
    kv_width = c.n_kv_head * c.head_dim if isinstance(c, LlamaConfig) else c.n_embd
    attention = 2 * c.n_embd * c.n_embd + 2 * c.n_embd * kv_width
    mlp = 3 * c.n_embd * c.intermediate_size if isinstance(c, LlamaConfig) else 8 * c.n_embd**2
    return c.n_layer * (attention + mlp) + c.n_embd * c.vocab_size


def flops_per_token(
    config: GPTConfig | LlamaConfig, seq_len: int | None = None, *, backward: bool = True
) -> int:
    """FLOPs to train on one token of a sequence of `seq_len` (the config's block_size by default):

        forward            2 W + 4 n_layer T d
        forward + backward 6 W + 12 n_layer T d     (backward=True)

    W = `matmul_weights(config)` (each weight is one multiply-add per token: 2 FLOPs), T the
    sequence length and d = n_head x head_dim = n_embd the width of the queries. Attention adds two
    matmuls per layer that have no weights: q k^T (T x d by d x T) and the probabilities times v
    (T x T by T x d), 2 T d FLOPs per token each. The backward pass costs twice the forward: each
    matmul's input gradient and its weight gradient are one matmul each.

    This is the count of a kernel that computes the full T x T scores, as torch's
    `FlopCounterMode` counts them. The causal mask makes half of them unneeded, and a kernel that
    skips masked tiles does 6 n_layer T d attention FLOPs: that is Kaplan et al.'s (2020)
    C = 6N + 6 n_layer T d, with N the non-embedding parameters. The common shorthand 6N drops the
    attention term and lm_head (and counts biases and norm gains as if they were matmuls).
    """
    _check_config(config)
    t = (
        config.block_size
        if seq_len is None
        else int(require_positive(seq_len, "seq_len", integer=True))
    )
    forward = 2 * matmul_weights(config) + 4 * config.n_layer * t * config.n_embd
    return 3 * forward if backward else forward


def _sdpa_cpu_flops(query, key, value, *args, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward_flops(grad_out, query, key, value, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's FlopCounterMode has formulas for the CUDA attention kernels but none for the CPU flash
# kernel that F.scaled_dot_product_attention runs here; without these two it would count 0.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
}


def counted_flops(model: nn.Module, idx: Tensor, targets: Tensor) -> dict[str, int]:
    """The FLOPs of one real training step's forward and backward, counted operator by operator by
    `torch.utils.flop_counter.FlopCounterMode` (with `CPU_ATTENTION_FLOPS`): a dict of aten
    operator name -> FLOPs, and "total". The parameters' gradients are cleared afterwards."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        _, loss = model(idx, targets)
        loss.backward()
    model.zero_grad(set_to_none=True)
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return {**counts, "total": counter.get_total_flops()}


# ---------------------------------------------------------------------------------------------
# 2. This machine's peak and the model FLOP utilisation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peak:
    """A measured matmul throughput: the median and the range over the repeats, in FLOP/s."""

    median: float
    low: float
    high: float
    size: int
    dtype: str
    device: str
    threads: int
    repeats: int

    def __str__(self) -> str:
        return (
            f"{self.median / 1e9:.1f} GFLOP/s (median of {self.repeats}, range "
            f"{self.low / 1e9:.1f}-{self.high / 1e9:.1f}; {self.size}x{self.size} {self.dtype} "
            f"matmul on {self.device}, {self.threads} threads)"
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(
    size: int = 2048,
    repeats: int = 7,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Peak:
    """This machine's matmul throughput: `size` x `size` by `size` x `size` (2 size^3 FLOPs),
    timed `repeats` times after one warm-up, with torch's current number of threads. The median
    is the figure to divide by (one slow repeat on a shared machine does not move it); it is what
    the machine reaches on the best-shaped work a model does, so MFU below 1 is expected."""
    size = int(require_positive(size, "size", integer=True))
    repeats = int(require_positive(repeats, "repeats", integer=True))
    device = torch.device(device)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    out = torch.empty(size, size, dtype=dtype, device=device)
    torch.mm(a, b, out=out)  # warm-up: threads, caches, kernel selection
    rates = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(device)
        rates.append(2 * size**3 / (time.perf_counter() - start))
    return Peak(
        statistics.median(rates),
        min(rates),
        max(rates),
        size,
        str(dtype).removeprefix("torch."),
        str(device),
        torch.get_num_threads(),
        repeats,
    )


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops_per_s: float) -> float:
    """Model FLOP utilisation: the FLOP/s the model's own arithmetic accounts for
    (`flops_per_token` x tokens per second) as a fraction of the peak. Work the model does not need
    (activation recomputation, padding) does not count, so engines are compared on equal terms."""
    for name, value in (
        ("flops_per_token", flops_per_token),
        ("tokens_per_s", tokens_per_s),
        ("peak_flops_per_s", peak_flops_per_s),
    ):
        require_positive(value, name)
    return flops_per_token * tokens_per_s / peak_flops_per_s


# ---------------------------------------------------------------------------------------------
# 3. Time to train
# ---------------------------------------------------------------------------------------------

# Dense bf16 tensor-core peaks (without 2:4 sparsity) from NVIDIA's data sheets, in FLOP/s.
ACCELERATORS = {
    "A100 SXM (bf16 dense 312 TFLOP/s)": 312e12,
    "H100 SXM (bf16 dense 989 TFLOP/s)": 989e12,
}

# Named models as configs (no weights are built) and the tokens they were trained on.
NAMED_MODELS = {
    "GPT-2 124M on 10B tokens": (
        GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
        10e9,
    ),
    "Llama-2 7B on 2T tokens": (
        LlamaConfig(
            vocab_size=32000,
            block_size=4096,
            n_layer=32,
            n_head=32,
            n_kv_head=32,
            n_embd=4096,
            intermediate_size=11008,
        ),
        2e12,
    ),
}


def time_to_train(
    flops_per_token: float, tokens: float, peak_flops_per_s: float, mfu: float, devices: int = 1
) -> float:
    """Seconds to train on `tokens` tokens: flops_per_token x tokens / (devices x peak x mfu).
    Assumes perfect scaling over `devices` (communication hidden or counted in the MFU)."""
    require_positive(flops_per_token, "flops_per_token")
    require_positive(tokens, "tokens")
    require_positive(peak_flops_per_s, "peak_flops_per_s")
    require_positive(devices, "devices", integer=True)
    if not 0 < mfu <= 1:
        raise InputError(f"mfu must be in (0, 1], got {mfu!r}")
    return flops_per_token * tokens / (devices * peak_flops_per_s * mfu)


def time_to_train_table(mfu: float = 0.4, devices: int = 1) -> list[dict[str, float | str]]:
    """One row per named model and accelerator: the model's FLOPs per token (`flops_per_token`
    at its training context), the total FLOPs, and the days on `devices` accelerators at the
    stated bf16 peak and `mfu`."""
    rows = []
    for (model, (config, tokens)), (chip, peak) in itertools.product(
        NAMED_MODELS.items(), ACCELERATORS.items()
    ):
        per_token = flops_per_token(config)
        seconds = time_to_train(per_token, tokens, peak, mfu, devices)
        rows.append(
            {
                "model": model,
                "accelerator": chip,
                "flops_per_token": per_token,
                "total_flops": per_token * tokens,
                "days": seconds / 86400,
                "gpu_hours": seconds * devices / 3600,
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# 4. Scaling laws
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScalingLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta: the loss of a model of N parameters trained on D
    tokens, Hoffmann et al.'s (2022) additive form. E is the loss no model reaches (the text's own
    entropy); the two terms are what a finite model and a finite run add to it. Every size gains
    the same B/D^beta from more tokens: the form cannot follow a small model that saturates while
    a large one keeps learning (`CoupledScalingLaw` can)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    # The numbers a fit reports (`ScalingSpread`): the law's own and the compute-optimal exponent.
    QUANTITIES = ("E", "A", "B", "alpha", "beta", "n_exponent")

    def loss(self, n_params, tokens):
        """L at `n_params` and `tokens` (numbers or numpy arrays of one shape)."""
        n, d = np.asarray(n_params, dtype=float), np.asarray(tokens, dtype=float)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    @property
    def n_exponent(self) -> float:
        """a in N_opt ~ C^a: beta / (alpha + beta) (`compute_optimal`); D_opt grows as C^(1 - a)."""
        return self.beta / (self.alpha + self.beta)

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        """(N, D) that minimise L on the budget C = 6 N D = `flops`.

        With D = C / (6N), dL/dN = 0 gives alpha A / N^alpha = beta B / D^beta, so
        N_opt = G (C/6)^(beta / (alpha + beta)) with G = (alpha A / (beta B))^(1 / (alpha + beta)),
        and D_opt = C / (6 N_opt).
        """
        require_positive(flops, "flops")
        if not min(self.A, self.B, self.alpha, self.beta) > 0:
            raise InputError(
                "a law whose loss does not fall with both N and D (A, B, alpha and beta all > 0) "
                f"has no compute-optimal split: {self}"
            )
        s = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / s)
        n = g * (flops / 6) ** (self.beta / s)
        return n, flops / (6 * n)

    # The fit's view (`fit_scaling_law`): theta = (log A, log B, log E, alpha, beta), and
    # log L = logsumexp(log A - alpha log N, log B - beta log D, log E).

    @staticmethod
    def _log_loss(theta, log_n, log_d):
        """log L at theta and its Jacobian (one row per entry of theta)."""
        a, b, e, alpha, beta = theta
        terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
        pred = _logsumexp(terms)
        weights = np.exp(terms - pred)  # d pred / d (each term): the softmax of the terms
        jac = np.stack(
            [weights[0], weights[1], weights[2], -weights[0] * log_n, -weights[1] * log_d]
        )
        return pred, jac

    @staticmethod
    def _starts(n, d, loss):
        """(misfit, theta) per pair of a grid of exponents: for fixed exponents the law is linear
        in (E, A, B), so non-negative least squares on relative errors (about log space) gives
        each pair's best start cheaply."""
        from scipy.optimize import nnls

        for alpha, beta in itertools.product(_EXPONENT_GRID, _EXPONENT_GRID):
            design = np.stack([np.ones_like(n), n**-alpha, d**-beta], axis=1) / loss[:, None]
            coef, misfit = nnls(design, np.ones_like(loss))
            e, a, b = np.log(np.maximum(coef, 1e-8))
            yield misfit, (a, b, e, alpha, beta)

    @classmethod
    def _from_theta(cls, theta) -> ScalingLaw:
        a, b, e, alpha, beta = theta
        return cls(math.exp(e), math.exp(a), math.exp(b), float(alpha), float(beta))

    def _seen(self, n, d, loss, unseen) -> dict[str, bool]:
        """Which quantities the runs see: a term that changes the loss over the runs by less than
        `unseen` (relative) is not measured by them; an E below it is the floor gone to 0."""
        seen_n = np.ptp(self.A / n**self.alpha / loss) > unseen
        seen_d = np.ptp(self.B / d**self.beta / loss) > unseen
        return {
            "E": self.E >= _UNSEEN * loss.min(),
            "A": seen_n,
            "alpha": seen_n,
            "B": seen_d,
            "beta": seen_d,
            "n_exponent": seen_n and seen_d,
        }


@dataclass(frozen=True)
class CoupledScalingLaw:
    """L(N, D) = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D, Kaplan et al.'s (2020) eq. 1.5.

    The two limits are power laws, L = (N_c/N)^alpha_N for D -> infinity and (D_c/D)^alpha_D for
    N -> infinity, but they add inside the bracket: how much a model gains from more tokens
    depends on its size. A small model's bracket is dominated by its N-term, so more data barely
    moves it (it saturates); a large model's by the D-term, so it keeps learning. There is no
    floor: L -> 0 as N, D -> infinity. Fitted with a floor E added (a fifth parameter), the 10
    runs of benchmarks/scaling.py past their first descent put E at 3e-14 with the same
    residuals (1.3% rms): they support none, so the law has none.
    """

    N_c: float
    D_c: float
    alpha_N: float
    alpha_D: float

    QUANTITIES = ("N_c", "D_c", "alpha_N", "alpha_D", "n_exponent")

    def loss(self, n_params, tokens):
        """L at `n_params` and `tokens` (numbers or numpy arrays of one shape)."""
        n, d = np.asarray(n_params, dtype=float), np.asarray(tokens, dtype=float)
        return ((self.N_c / n) ** (self.alpha_N / self.alpha_D) + self.D_c / d) ** self.alpha_D

    @property
    def n_exponent(self) -> float:
        """a in N_opt ~ C^a: alpha_D / (alpha_N + alpha_D). On the budget the bracket is
        (N_c/N)^r + 6 D_c N / C with r = alpha_N / alpha_D; its derivative in N vanishes at
        N^(r+1) = r N_c^r C / (6 D_c), so N_opt ~ C^(1 / (r + 1))."""
        return self.alpha_D / (self.alpha_N + self.alpha_D)

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        """(N, D) that minimise L on the budget C = 6 N D = `flops`, found numerically: L(N, C/6N)
        has one minimum in log N (the bracket is a sum of a falling and a rising power of N),
        bracketed here around the closed-form estimate of `n_exponent`'s note and refined by
        Brent's method to 1e-10 in log N."""
        from scipy.optimize import minimize_scalar

        require_positive(flops, "flops")
        if not min(self.N_c, self.D_c, self.alpha_N, self.alpha_D) > 0:
            raise InputError(
                "a law whose loss does not fall with both N and D (N_c, D_c, alpha_N and alpha_D "
                f"all > 0) has no compute-optimal split: {self}"
            )
        r = self.alpha_N / self.alpha_D
        guess = (math.log(r) + r * math.log(self.N_c) + math.log(flops / (6 * self.D_c))) / (r + 1)

        def log_loss(log_n):
            return float(np.log(self.loss(math.exp(log_n), flops / (6 * math.exp(log_n)))))

        found = minimize_scalar(
            log_loss, bounds=(guess - 10, guess + 10), method="bounded", options={"xatol": 1e-10}
        )
        n = math.exp(found.x)
        return n, flops / (6 * n)

    # The fit's view: theta = (r log N_c, log D_c, alpha_D, r) with r = alpha_N / alpha_D, and
    # log L = alpha_D logsumexp(r log N_c - r log N, log D_c - log D).

    @staticmethod
    def _log_loss(theta, log_n, log_d):
        p, c, alpha_d, r = theta
        terms = np.stack([p - r * log_n, c - log_d])
        inner = _logsumexp(terms)
        weights = np.exp(terms - inner)
        jac = np.stack(
            [alpha_d * weights[0], alpha_d * weights[1], inner, -alpha_d * weights[0] * log_n]
        )
        return alpha_d * inner, jac

    @staticmethod
    def _starts(n, d, loss):
        """(misfit, theta) per pair of a grid of (alpha_D, r): L^(1/alpha_D) = N_c^r N^-r + D_c/D
        is linear in (N_c^r, D_c), solved by non-negative least squares on relative errors."""
        from scipy.optimize import nnls

        for alpha_d, r in itertools.product(_EXPONENT_GRID, _RATIO_GRID):
            target = loss ** (1 / alpha_d)
            design = np.stack([n**-r, 1 / d], axis=1) / target[:, None]
            coef, misfit = nnls(design, np.ones_like(loss))
            p, c = np.log(np.maximum(coef, 1e-300))
            yield misfit, (p, c, alpha_d, r)

    @classmethod
    def _from_theta(cls, theta) -> CoupledScalingLaw:
        p, c, alpha_d, r = theta
        return cls(math.exp(p / r), math.exp(c), float(r * alpha_d), float(alpha_d))

    def _seen(self, n, d, loss, unseen) -> dict[str, bool]:
        """Which quantities the runs see: the N-part is seen when L differs from its N -> infinity
        limit (D_c/D)^alpha_D by more than `unseen` more at some runs than at others (in log),
        the D-part likewise against (N_c/N)^alpha_N."""
        log_l = np.log(self.loss(n, d))
        seen_n = np.ptp(log_l - self.alpha_D * np.log(self.D_c / d)) > unseen
        seen_d = np.ptp(log_l - self.alpha_N * np.log(self.N_c / n)) > unseen
        return {
            "N_c": seen_n,
            "alpha_N": seen_n,
            "D_c": seen_d,
            "alpha_D": seen_d,
            "n_exponent": seen_n and seen_d,
        }


# Hoffmann et al. (2022), "Training compute-optimal large language models", approach 3 (their
# eq. 10): fitted to over 400 runs of 70M to 16B parameters on MassiveText, loss in nats per
# (SentencePiece) token. Its compute-optimal models train on about 20 tokens per parameter.
CHINCHILLA = ScalingLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)

LAWS = (ScalingLaw, CoupledScalingLaw)


@dataclass(frozen=True)
class ScalingFit:
    """A fitted law (a `ScalingLaw` or a `CoupledScalingLaw`) with how well it fits: the
    residuals log L_fit - log L of each run (about the relative error), their root mean square and
    largest magnitude."""

    law: ScalingLaw | CoupledScalingLaw
    residuals: np.ndarray
    rms: float
    max_abs: float


_EXPONENT_GRID = np.linspace(0.05, 1.5, 30)
_RATIO_GRID = np.geomspace(0.1, 10, 30)  # alpha_N / alpha_D of the coupled law
# Huber's loss with delta 1e-3 has gradients of 1e-3 and less: scipy's default tolerance would
# stop far from the minimum. A well-posed fit converges in about 50 iterations; the cap stops
# the slow drift along a flat valley of an unidentified fit (say E -> 0 while beta -> 0 turns
# B/D^beta into the floor), where every point fits equally well. BFGS rather than Hoffmann et
# al.'s L-BFGS: five unknowns need no limited memory, and scipy's L-BFGS-B calls threaded BLAS
# on 5-vectors, 30x slower on a busy CPU.
_BFGS_OPTIONS = {"maxiter": 1000, "gtol": 1e-13}


def _logsumexp(terms: np.ndarray) -> np.ndarray:
    """log sum exp over the first axis, by hand: scipy's takes 15x as long on 3 x 15."""
    top = terms.max(axis=0)
    return top + np.log(np.exp(terms - top).sum(axis=0))


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber's loss of residuals `r` and its derivative."""
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))
    return value, np.where(small, r, delta * np.sign(r))


def _check_law(law) -> None:
    if law not in LAWS:
        raise InputTypeError(
            f"law must be one of {', '.join(f.__name__ for f in LAWS)}, got {law!r}"
        )


def fit_scaling_law(
    n_params: Sequence[float],
    tokens: Sequence[float],
    losses: Sequence[float],
    *,
    law: type = ScalingLaw,
    huber_delta: float = 1e-3,
) -> ScalingFit:
    """Fit a law L(N, D) (`ScalingLaw`, the default, or `CoupledScalingLaw`) to runs as Hoffmann
    et al. (2022) fit theirs: in log space, by minimising the Huber loss (delta 1e-3: least
    squares on small residuals, robust to outliers) of log L_fit - log L with BFGS from the best
    three starting points of a grid, keeping the best.

    Fitting logarithms weighs every run by its relative error; each law is written as a
    log-sum-exp of its terms in logarithmic parameters, which keeps its constants positive without
    constraints. The additive law's five parameters need runs that vary N and D independently:
    at least 6, in practice a grid of several sizes by several token budgets.
    """
    from scipy.optimize import minimize

    _check_law(law)
    n, d, loss = (np.asarray(v, dtype=float) for v in (n_params, tokens, losses))
    if not (n.ndim == d.ndim == loss.ndim == 1 and len(n) == len(d) == len(loss)):
        raise InputError("n_params, tokens and losses must be three 1-D sequences of one length")
    if len(n) < 6:
        raise InputError(f"a scaling law needs at least 6 runs, got {len(n)}")
    if not (np.isfinite(np.stack([n, d, loss])).all() and (n > 0).all() and (d > 0).all()):
        raise InputError("n_params and tokens must be finite and > 0, losses finite")
    if (loss <= 0).any():
        raise InputError("losses must be > 0 (a cross-entropy in nats)")
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)

    def objective(theta):
        pred, jac = law._log_loss(theta, log_n, log_d)
        value, slope = _huber(pred - log_l, huber_delta)
        return value.sum(), jac @ slope

    starts = sorted(law._starts(n, d, loss), key=lambda s: s[0])
    best = None
    for _, start in starts[:3]:
        result = minimize(
            objective, np.array(start), jac=True, method="BFGS", options=_BFGS_OPTIONS
        )
        if best is None or result.fun < best.fun:
            best = result
    fitted = law._from_theta(best.x)
    residuals = np.log(fitted.loss(n, d)) - log_l
    return ScalingFit(
        fitted, residuals, float(np.sqrt(np.mean(residuals**2))), float(np.abs(residuals).max())
    )


# Below this fraction of the loss a part of the law is not measured by the runs: an E that small
# is the fit's floor gone to 0 (log E running off to -inf); a term that changes the loss by less
# over the runs (or by less than the fit's rms residual) is not seen by them.
_UNSEEN = 1e-3


@dataclass(frozen=True)
class ScalingSpread:
    """How tightly a set of runs pins down each number of a fitted law.

    `fit` is the fit to all runs; `samples[q]` the quantity q (one of the law's `QUANTITIES`) of
    each refit on a bootstrap resample of the runs; `intervals[q]` their 16th and 84th percentiles
    (a 68% interval: +-1 sigma were the spread normal); `relative_spread[q]` how far the interval
    reaches from the full fit's value, over |value|. q is `identified` when that is at most
    `rel_tol`, when (for E) the fit has not put the floor at 0, and when the part of the law it
    belongs to (the N-part or the D-part) changes the loss over the runs by more than 0.1% and
    more than the rms residual: a term the runs do not see has no spread, since its refits never
    move it, yet says nothing. The compute-optimal exponent n_exponent needs both parts seen.
    """

    fit: ScalingFit
    samples: dict[str, np.ndarray]
    intervals: dict[str, tuple[float, float]]
    relative_spread: dict[str, float]
    identified: dict[str, bool]
    rel_tol: float

    def value(self, name: str) -> float:
        """Quantity `name` of the fit to all runs."""
        return float(getattr(self.fit.law, name))

    def refits(self) -> list[ScalingLaw | CoupledScalingLaw]:
        """The law of every bootstrap refit."""
        kind = type(self.fit.law)
        names = [f.name for f in dataclasses.fields(kind)]
        return [kind(*row) for row in zip(*(self.samples[q] for q in names), strict=True)]


def bootstrap_scaling_law(
    n_params: Sequence[float],
    tokens: Sequence[float],
    losses: Sequence[float],
    *,
    law: type = ScalingLaw,
    resamples: int = 200,
    seed: int = 0,
    rel_tol: float = 0.25,
    huber_delta: float = 1e-3,
) -> ScalingSpread:
    """`fit_scaling_law` of `law` on all runs, then on `resamples` resamples of the runs drawn with
    replacement (a bootstrap over runs, seeded by `seed`): the spread of the refits says which
    numbers the runs identify (`ScalingSpread`).

    A law can reproduce every run closely and still leave a parameter free: when E + A/N^alpha
    barely bends over the sizes, E and A trade off against each other; when the loss does not
    depend on D, B is 0 and beta anything. Dropping and repeating runs moves such a parameter a
    long way, a well-determined one little. The refits use the same grid of starts as the fit, so
    a resample that admits two fits may land on either: that is part of the spread.
    """
    fit = fit_scaling_law(n_params, tokens, losses, law=law, huber_delta=huber_delta)
    resamples = int(require_positive(resamples, "resamples", integer=True))
    if resamples < 20:
        raise InputError(f"percentiles of {resamples} refits mean little; use at least 20")
    if not (isinstance(rel_tol, (int, float)) and 0 < rel_tol < 1):
        raise InputError(f"rel_tol must be a fraction in (0, 1), got {rel_tol!r}")
    n, d, loss = (np.asarray(v, dtype=float) for v in (n_params, tokens, losses))
    rng = np.random.default_rng(seed)
    quantities = law.QUANTITIES
    rows = []
    for _ in range(resamples):
        pick = rng.integers(0, len(n), len(n))
        refit = fit_scaling_law(n[pick], d[pick], loss[pick], law=law, huber_delta=huber_delta)
        rows.append([getattr(refit.law, q) for q in quantities])
    table = np.array(rows)
    seen = fit.law._seen(n, d, loss, max(_UNSEEN, fit.rms))
    samples, intervals, relative = {}, {}, {}
    for column, q in zip(table.T, quantities, strict=True):
        low, high = np.percentile(column, [16, 84])
        value = float(getattr(fit.law, q))
        samples[q] = column
        intervals[q] = (float(low), float(high))
        reach = max(high - value, value - low)
        relative[q] = float(reach / abs(value)) if value != 0 else math.inf
    identified = {q: relative[q] <= rel_tol and bool(seen[q]) for q in quantities}
    return ScalingSpread(fit, samples, intervals, relative, identified, rel_tol)
