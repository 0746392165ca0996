"""Chapter 11 exercises: the arithmetic inside decoding, quantisation, pruning, distillation, low
rank and speculative decoding.

Replace each `raise NotImplementedError` with your code; `minillm grade ch11` grades them (the
tests are in tests/exercises/test_ch11_compression.py). Use plain torch operations, not
`minillm.generate`, `minillm.infer`, `torch.quantize_per_*` or `torch.nn.utils.prune`: writing
these yourself is the point.

Conventions as in the chapter: logits are `(N, V)`, one row per position; a weight matrix is
`(out, in)` as in `nn.Linear`, and "per channel" means one scale per output row.
"""

from __future__ import annotations

import torch  # noqa: F401  (you will want it)
import torch.nn.functional as F  # noqa: F401  (you will want it)
from torch import Tensor


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus filtering: `logits` `(N, V)` with every token outside the nucleus set to -inf.

    The nucleus of a row is the smallest set of most likely tokens whose probabilities (softmax
    of the row) add up to at least `top_p`; the most likely token is always in it. Keep the
    other logits unchanged. `top_p` is in (0, 1].

    Example: logits whose softmax is [0.5, 0.3, 0.2] with top_p 0.7 keep the first two tokens
    (0.5 alone is not enough, 0.5 + 0.3 reaches 0.7) and set the third to -inf.

    Off limits: `minillm.generate.filter_logits` (this exercise asks you to write it; a call fails
    the test).
    """
    raise NotImplementedError


def absmax_quantize(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 quantisation of the whole tensor `w` with one scale.

    scale = max|w| / 127; q = round(w / scale), an int8 tensor of w's shape in [-127, 127].
    Returns `(q, scale)` with `scale` a 0-d float32 tensor. An all-zero `w` must not divide by
    zero (any positive scale will do there).

    Example: w = [0.5, -1.0, 0.25] gives scale 1/127 and q = [64, -127, 32] (63.5 rounds to the
    even 64, as torch.round does).

    Off limits: `minillm.infer.quantize`, `torch.quantize_per_tensor` (this exercise asks you to
    write it; a call fails the test).
    """
    raise NotImplementedError


def absmax_dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """The float32 tensor that int8 `q` with `scale` stands for: q * scale."""
    raise NotImplementedError


def zeropoint_quantize_per_channel(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric 8-bit quantisation of the 2-D `w` `(out, in)`, one scale and zero point per
    output row (row i uses its own min and max).

    For each row: lo = min(row min, 0) and hi = max(row max, 0) (the range always holds 0, so
    that 0 is exact); scale = (hi - lo) / 255; zero = round(-lo / scale), an integer in 0..255;
    q = clamp(round(w / scale) + zero, 0, 255) as uint8. Returns `(q, scale, zero)` with q
    `(out, in)` uint8, scale `(out,)` float32 and zero `(out,)` int64. A row of zeros must not
    divide by zero.

    The value that q stands for is (q - zero) * scale.

    Off limits: `minillm.infer.quantize`, `torch.quantize_per_channel` (this exercise asks you to
    write it; a call fails the test).
    """
    raise NotImplementedError


def magnitude_mask(w: Tensor, sparsity: float) -> Tensor:
    """Unstructured magnitude pruning of one tensor: a bool mask of `w`'s shape that is False at
    the `round(sparsity * w.numel())` entries of smallest |w| and True elsewhere. `sparsity` is
    in [0, 1]. (Ties at the threshold are not tested.)

    Example: magnitude_mask(tensor([0.3, -0.1, 0.2, -0.4]), 0.5) == tensor([True, False, False,
    True]).

    Off limits: `minillm.infer.magnitude_prune`, `torch.nn.utils.prune.l1_unstructured` (this
    exercise asks you to write it; a call fails the test).
    """
    raise NotImplementedError


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    temperature: float,
    alpha: float,
) -> Tensor:
    """Hinton et al.'s distillation loss, a scalar:

        alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE

    `student_logits` and `teacher_logits` are `(N, V)`, `targets` `(N,)` the data's token ids;
    KL and the cross-entropy CE(student_logits, targets) (at temperature 1) are both averaged
    over the N positions. T^2 keeps the soft term's gradient on the scale of the hard term's.

    Off limits: `minillm.infer.distillation_loss` (this exercise asks you to write it; a call fails
    the test).
    """
    raise NotImplementedError


def low_rank_factors(w: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The best rank-`rank` approximation of `w` `(out, in)` as two factors: `A` `(rank, in)` and
    `B` `(out, rank)` with B @ A as close to `w` as any rank-`rank` matrix (Frobenius norm).

    Use the singular value decomposition w = U diag(S) V^T (torch.linalg.svd); the split of S
    between A and B is your choice. `rank` is at most min(out, in).

    Off limits: `minillm.infer.low_rank` (this exercise asks you to write it; a call fails the
    test).
    """
    raise NotImplementedError


def speculative_accept(p: Tensor, q: Tensor, drafted: Tensor, u: Tensor, r: Tensor) -> Tensor:
    """The token speculative sampling keeps at N independent positions, `(N,)` int64.

    `p` and `q` `(N, V)` are the target's and the draft's probabilities; `drafted` `(N,)` tokens
    the draft drew from q. `u` and `r` `(N,)` are uniform random numbers in [0, 1) to use (so
    that the result is repeatable): keep drafted token x when u < p(x) / q(x); otherwise return
    the token that inverse-CDF sampling with `r` picks from the residual distribution
    max(0, p - q) / sum(max(0, p - q)): the first token whose cumulative residual probability
    exceeds r.

    Whatever q is, the tokens returned are distributed as p.

    Off limits: `minillm.infer.speculative_accept` (this exercise asks you to write it; a call fails
    the test).
    """
    raise NotImplementedError
