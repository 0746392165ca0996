"""Chapter 06 exercises: counting a training step's memory, and fp16 loss scaling.

Replace each `raise NotImplementedError` with your code; `minillm grade ch06` grades them (the
tests are in tests/exercises/test_ch06_memory.py). Use plain Python and torch operations, not
`minillm.memory`: working the numbers out yourself is the point.

Units: sizes are in bytes. Decimal units are powers of 1000 (1 GB = 1e9 bytes), binary units
powers of 1024 (1 GiB = 2**30 bytes). Precisions are named "fp32", "bf16" and "fp16".
"""

from __future__ import annotations

import math  # noqa: F401  (you will want it)
from collections.abc import Iterable

import torch
import torch.utils.checkpoint
from torch import Tensor

from minillm.model import GPTConfig


def gpt_parameter_count(config: GPTConfig) -> int:
    """Parameters of `GPT(config)`, from the sizes alone, each counted once.

    Per block: `ln_1` and `ln_2` (a weight of C and, with `config.bias`, a bias of C each);
    `q_proj`, `k_proj`, `v_proj`, `o_proj` (C x C weights, C biases); the MLP's `up_proj`
    (C -> 4C) and `down_proj` (4C -> C), with biases of 4C and C. Around the blocks: the token
    table (V x C), the position table (block_size x C) when `config.positions == "learned"`
    (rotary positions have none), the final LayerNorm `ln_f`, and `lm_head` (V x C, no bias),
    which is the token table itself when `config.tie_weights`.

    Example: GPTConfig(vocab_size=10, block_size=4, n_layer=1, n_head=1, n_embd=2) has
    20 + 8 + 1 * 78 + 4 = 110 parameters (a block of C = 2 has 8 + 24 + 46 = 78).
    """
    c = config
    C, b = c.n_embd, 1 if c.bias else 0
    layer_norms = 2 * (C + b * C)
    attention = 4 * (C * C + b * C)
    mlp = (C * 4 * C + b * 4 * C) + (4 * C * C + b * C)
    total = c.vocab_size * C + c.n_layer * (layer_norms + attention + mlp) + (C + b * C)
    if c.positions == "learned":
        total += c.block_size * C
    if not c.tie_weights:
        total += c.vocab_size * C  # an untied lm_head has a matrix of its own
    return total


def training_memory_bytes(n_params: int, precision: str) -> int:
    """Bytes of weights, gradients and AdamW state for `n_params` parameters (no activations).

    "fp32": fp32 weights, fp32 gradients and Adam's two fp32 moments (m and v).
    "bf16" / "fp16" (mixed precision, as Megatron and DeepSpeed keep it): 2-byte weights and
    2-byte gradients for forward and backward, plus the fp32 master weights the optimizer
    updates, plus m and v in fp32.
    Any other name raises ValueError.

    Example: training_memory_bytes(1000, "fp16") == 16000.
    """
    if precision == "fp32":
        return n_params * (4 + 4 + 4 + 4)
    if precision in ("bf16", "fp16"):
        return n_params * (2 + 2 + 4 + 4 + 4)
    raise ValueError(f"unknown precision {precision!r}; choose fp32, bf16 or fp16")


def gpt3_memory_report(n_params: float = 175e9) -> dict[str, float]:
    """fp32 training memory of a model of `n_params` parameters, in decimal gigabytes (1e9 bytes).

    Keys: "weights", "gradients", "adam" (both moments together) and "total" (their sum).

    Example: gpt3_memory_report(1e9) == {"weights": 4.0, "gradients": 4.0, "adam": 8.0,
    "total": 16.0}; for GPT-3's 175e9 parameters the weights alone are 700 GB.
    """
    weights = n_params * 4 / 1e9
    return {"weights": weights, "gradients": weights, "adam": 2 * weights, "total": 4 * weights}


def bytes_to_human(n_bytes: float, binary: bool = False) -> str:
    """`n_bytes` as a number with one decimal and a unit.

    Decimal (default): "B", "kB", "MB", "GB", "TB", steps of 1000. `binary`: "B", "KiB", "MiB",
    "GiB", "TiB", steps of 1024. Pick the largest unit that keeps the number >= 1 (at most TB
    or TiB); bytes below one kB/KiB print as an integer: "512 B".

    Example: bytes_to_human(700e9) == "700.0 GB"; bytes_to_human(700e9, binary=True) ==
    "651.9 GiB"; bytes_to_human(1536, binary=True) == "1.5 KiB".
    """
    base = 1024 if binary else 1000
    units = ["KiB", "MiB", "GiB", "TiB"] if binary else ["kB", "MB", "GB", "TB"]
    if n_bytes < base:
        return f"{int(n_bytes)} B"
    value, unit = n_bytes / base, units[0]
    for next_unit in units[1:]:
        if value < base:
            break
        value, unit = value / base, next_unit
    return f"{value:.1f} {unit}"


def activation_bytes_per_layer(batch_size: int, seq_len: int, n_embd: int, n_head: int) -> int:
    """Bytes one block of the course GPT saves for backward in an fp32 training forward on a CPU.

    With N = batch_size * seq_len tokens and C = n_embd, autograd keeps, per block:
    - for each of the two LayerNorms: its input (N x C) and its mean and 1/std (N each);
    - each LayerNorm's output (N x C), the input of the linear layers after it (one tensor, even
      when three layers read it);
    - q, k and v (N x C each), the attention output (N x C; o_proj reads the same storage), and
      the attention's log-sum-exp, one float per head and token (N x n_head);
    - the MLP's up_proj output (N x 4C, the GELU's input), the GELU's sigmoid (N x 4C) and the
      GELU's output (N x 4C, down_proj's input).
    Everything is fp32 (4 bytes). The test measures a real block with
    `torch.autograd.graph.saved_tensors_hooks`.

    Example: activation_bytes_per_layer(1, 1, 2, 1) == 4 * (20 * 2 + 4 + 1) == 180.
    """
    n, C = batch_size * seq_len, n_embd
    layer_norms = 2 * (C + 2 + C)  # input, mean, 1/std, output
    attention = 3 * C + C + n_head  # q, k, v, output, log-sum-exp
    mlp = 3 * 4 * C  # up_proj output, sigmoid, GELU output
    return 4 * n * (layer_norms + attention + mlp)


def fp16_underflow_fraction(grads: Iterable[Tensor], scale: float = 1.0) -> float:
    """Fraction of the nonzero gradient entries that become exactly 0 when multiplied by `scale`
    and cast to fp16 (torch.float16). Entries that are 0 already are not counted at all.

    Args:
        grads: tensors of any shapes (e.g. every parameter's `.grad`), float32 or float64.
        scale: the loss scale; scaling the loss scales every gradient by the same factor.

    Example: fp16_underflow_fraction([torch.tensor([1e-9, 1e-3, 0.0])]) == 0.5, and with
    scale=2.0**16 it is 0.0.
    """
    flat = torch.cat([g.detach().flatten().double() for g in grads])
    nonzero = flat[flat != 0]
    return ((nonzero * scale).to(torch.float16) == 0).double().mean().item()


class DynamicLossScaler:
    """fp16 loss scaling with a scale that adapts, as torch.amp.GradScaler does it.

    The loss is multiplied by `scale` before backward; the optimizer step then sees gradients
    divided by it again. `update(found_inf)` is called once per step with whether any gradient
    was inf or NaN.
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ):
        self.scale = init_scale
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.good_steps = 0  # finite steps in a row since the scale last changed

    def update(self, found_inf: bool) -> bool:
        """Adjust the scale after one step and say whether that step's update may be applied.

        On inf/NaN: multiply the scale by `backoff_factor`, reset the count of good steps, and
        return False (the step is skipped). Otherwise count the good step; after
        `growth_interval` good steps in a row multiply the scale by `growth_factor` and start
        counting again; return True.

        Example (init_scale=8, growth_interval=2): found_inf False, False, True, False gives
        scales 8, 16, 8, 8 and returns True, True, False, True.
        """
        if found_inf:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            return False
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0
        return True


def checkpointed_forward(blocks: Iterable[torch.nn.Module], x: Tensor) -> Tensor:
    """Run `x` `(B, T, C)` through `blocks` in order (`x = block(x)`), with activation
    checkpointing: while gradients are enabled, keep only each block's input and recompute the
    block's activations in the backward pass (`torch.utils.checkpoint.checkpoint`, non-reentrant);
    with gradients disabled, run the blocks as they are.

    The gradients must equal those of the plain forward, dropout included: the recomputation must
    draw the same dropout masks as the forward (torch's checkpoint keeps the random state for
    that). The saved activations shrink to at most one block input per block.
    """
    for block in blocks:
        if torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x


def compute_optimal_params(
    flops: float, E: float, A: float, B: float, alpha: float, beta: float
) -> tuple[float, float]:
    """The model size N and token count D that minimise L(N, D) = E + A/N^alpha + B/D^beta on a
    compute budget of `flops` = 6 N D FLOPs.

    Substitute D = flops / (6N) and set dL/dN = 0: the closed form follows. Returns `(N, D)` as
    floats, with 6 N D = flops.

    Example: with Hoffmann et al.'s fit (E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28) and
    flops=5.76e23 (Chinchilla's budget), N is about 3.2e10 and D/N about 93.
    """
    # dL/dN = -alpha A N^-(alpha+1) + beta B (6/flops)^-beta N^(beta-1) = 0
    # <=> alpha A N^-alpha = beta B D^-beta with D = flops / (6N)
    n = (alpha * A / (beta * B)) ** (1 / (alpha + beta)) * (flops / 6) ** (beta / (alpha + beta))
    return n, flops / (6 * n)
