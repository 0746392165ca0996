"""Where a training step's memory goes, predicted from the config and measured on real tensors.

Read it top to bottom:

1. the number formats: bytes per value, fp16's and bf16's limits, bytes printed as GB or GiB;
2. model state: parameters counted from a `GPTConfig` (a tied lm_head counted once), and the bytes
   of its four parts (`STATE_PARTS`, the names every memory figure of the package uses:
   `parameters`, `gradients`, `master_weights`, `optimizer_states`), fp32 or mixed precision;
3. activations: the tensors autograd saves for backward in one forward of the course GPT, per block,
   with and without activation checkpointing, and how to measure them;
4. mixed precision: fp16 underflow/overflow of real gradients and a dynamic loss scaler.

Shapes: B batch, T sequence length, C = n_embd, H heads, V vocabulary, L = n_layer, N = B * T
tokens. Sizes are in bytes; 1 GB = 1e9 bytes, 1 GiB = 2**30 bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from minillm.errors import InputError, InputTypeError, require_positive, unknown_name
from minillm.model import GPT, GPTConfig

# ---------------------------------------------------------------------------------------------
# 1. Number formats
# ---------------------------------------------------------------------------------------------

PRECISIONS = ("fp32", "bf16", "fp16")  # the names TrainConfig's `precision` option takes
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FP16_MAX = torch.finfo(torch.float16).max  # 65504: anything larger becomes inf
FP16_TINY = 2.0**-24  # the smallest fp16 subnormal; below half of it a value rounds to 0


def _precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise unknown_name("precision", precision, PRECISIONS)
    return precision


def bytes_per_value(precision: str) -> int:
    """4 for fp32, 2 for bf16 and fp16."""
    return DTYPES[_precision(precision)].itemsize


def format_table() -> list[dict[str, float | int | str]]:
    """fp32, bf16 and fp16 side by side, read from `torch.finfo`: bits, exponent and mantissa
    bits, largest value, smallest normal value, and `eps` (the gap after 1.0; a value is rounded
    to within eps / 2 of itself, relatively)."""
    rows = []
    for name, dtype in DTYPES.items():
        info = torch.finfo(dtype)
        mantissa = round(-math.log2(info.eps))  # stored fraction bits
        rows.append(
            {
                "format": name,
                "bits": info.bits,
                "exponent_bits": info.bits - 1 - mantissa,
                "mantissa_bits": mantissa,
                "max": info.max,
                "smallest_normal": info.smallest_normal,
                "eps": info.eps,
            }
        )
    return rows


def bytes_to_human(n_bytes: float, binary: bool = False) -> str:
    """`n_bytes` with a unit: decimal (kB, MB, GB, TB: powers of 1000, as disks and the seed's
    "700 GB" count) or `binary` (KiB, MiB, GiB, TiB: powers of 1024, as GPU memory is reported).

    >>> bytes_to_human(700e9), bytes_to_human(700e9, binary=True)
    ('700.0 GB', '651.9 GiB')
    """
    if isinstance(n_bytes, bool) or not isinstance(n_bytes, (int, float)):
        raise InputTypeError(f"n_bytes must be a number, got {n_bytes!r}")
    if not math.isfinite(n_bytes) or n_bytes < 0:
        raise InputError(f"n_bytes must be a finite number >= 0, got {n_bytes!r}")
    base = 1024 if binary else 1000
    if binary:
        units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    else:
        units = ("B", "kB", "MB", "GB", "TB", "PB")
    power = 0
    while n_bytes >= base ** (power + 1) and power < len(units) - 1:
        power += 1
    if power == 0:
        return f"{int(n_bytes)} B"
    return f"{n_bytes / base**power:.1f} {units[power]}"


# ---------------------------------------------------------------------------------------------
# 2. Model state: parameters, gradients, optimizer
# ---------------------------------------------------------------------------------------------


def _config(config: GPTConfig) -> GPTConfig:
    if not isinstance(config, GPTConfig):
        raise InputTypeError(f"config must be a GPTConfig, got {type(config).__name__}")
    return config


def parameter_count(config: GPTConfig) -> int:
    """`GPT(config).num_parameters()` from the sizes alone, without building the model.

    Per block: two LayerNorms (C weights, C biases each), q/k/v/o projections (4 C^2 + 4 C) and
    the MLP (C x 4C up, 4C x C down: 8 C^2 + 5 C); biases only when `config.bias`. Around the
    blocks: the token table V C, the learned position table block_size C, the final LayerNorm,
    and lm_head's V C only when it is not tied to the token table.
    """
    c = _config(config)
    C, b = c.n_embd, int(c.bias)
    block = 2 * (C + b * C) + (4 * C * C + b * 4 * C) + (8 * C * C + b * 5 * C)
    total = c.vocab_size * C + c.n_layer * block + (C + b * C)
    if c.positions == "learned":
        total += c.block_size * C
    if not c.tie_weights:
        total += c.vocab_size * C
    return total


# The parts of model state, in this order, in every memory figure of minillm (this module, the
# ZeRO census and prediction, DeepSpeed's census, fine-tuning costs).
STATE_PARTS = ("parameters", "gradients", "master_weights", "optimizer_states")


@dataclass(frozen=True)
class ModelStateBytes:
    """Bytes a training step keeps for the whole run, whatever the batch."""

    parameters: int  # the weights the forward pass reads (fp32, or the fp16/bf16 copy)
    gradients: int  # one gradient per weight, in the weights' format
    master_weights: int  # the fp32 copy the optimizer updates, where it is not the parameters
    optimizer_states: int  # Adam's two moments m and v (running means of g and g^2), fp32

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.master_weights + self.optimizer_states

    def as_dict(self) -> dict[str, int]:
        return {part: getattr(self, part) for part in STATE_PARTS}


def model_state_bytes(n_params: int, precision: str = "fp32") -> ModelStateBytes:
    """Parameters, gradients, master weights and Adam's two moments (optimizer states) for
    `n_params` parameters.

    fp32: 4 + 4 + 0 + (4 + 4) = 16 bytes per parameter. Mixed precision (bf16 or fp16, the layout
    of Megatron, DeepSpeed and the ZeRO paper): 2-byte weights and gradients for the forward and
    backward passes, plus an fp32 master copy and fp32 moments, 2 + 2 + 4 + (4 + 4) = 16 bytes
    too. The master copy is not optional: an update lr * step is often smaller than the gap
    between neighbouring fp16/bf16 values, and added to a 2-byte weight it would be lost.

    >>> model_state_bytes(10, "bf16").total
    160
    """
    require_positive(n_params, "n_params", integer=True)
    n = int(n_params)
    half = bytes_per_value(precision) == 2
    low = 2 * n if half else 4 * n
    return ModelStateBytes(low, low, 4 * n if half else 0, 8 * n)


GPT3_PARAMETERS = 175e9


def gpt3_report() -> dict[str, float]:
    """The seed's GPT-3 figures, recomputed for 175e9 parameters, in bytes: fp32 parameters
    alone (700 GB), with Adam's two moments (2.1 TB), with gradients too (2.8 TB), and
    mixed-precision Adam's 16 bytes per parameter (2.8 TB as well). Activations come on top."""
    fp32 = model_state_bytes(int(GPT3_PARAMETERS), "fp32")
    return {
        "parameters_fp32": fp32.parameters,
        "parameters_and_optimizer_states_fp32": fp32.parameters + fp32.optimizer_states,
        "training_fp32": fp32.total,
        "training_mixed": model_state_bytes(int(GPT3_PARAMETERS), "bf16").total,
    }


def tensor_bytes(tensors: Iterable[Tensor | None]) -> int:
    """Sum of `numel * element_size` over `tensors`; None (a missing gradient) counts 0."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def measured_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """What the tensors of `model` and an Adam-type `optimizer` stepping the model's own
    parameters really hold, by `STATE_PARTS`: `parameters`, `gradients` (after a backward), no
    `master_weights` (the optimizer updates the parameters themselves) and the
    `optimizer_states` `exp_avg` and `exp_avg_sq` (after a first step). torch also keeps a
    `step` counter per parameter tensor, 4 bytes each: `other`."""
    state = optimizer.state.values()
    moments = {"exp_avg", "exp_avg_sq"}
    return {
        "parameters": tensor_bytes(model.parameters()),
        "gradients": tensor_bytes(p.grad for p in model.parameters()),
        "master_weights": 0,
        "optimizer_states": tensor_bytes(s.get(k) for s in state for k in moments),
        "other": tensor_bytes(
            v for s in state for k, v in s.items() if k not in moments and isinstance(v, Tensor)
        ),
    }


# ---------------------------------------------------------------------------------------------
# 3. Activations
# ---------------------------------------------------------------------------------------------


def _check_activation_inputs(config: GPTConfig, batch_size: int, seq_len: int) -> None:
    c = _config(config)
    require_positive(batch_size, "batch_size", integer=True)
    require_positive(seq_len, "seq_len", integer=True)
    if seq_len > c.block_size:
        raise InputError(f"seq_len {seq_len} is longer than the context block_size={c.block_size}")
    if c.dropout or c.positions != "learned" or c.attention != "sdpa":
        raise InputError(
            "the activation formula counts the course GPT's default layout: dropout=0.0, "
            "positions='learned', attention='sdpa' (dropout adds masks, rotary its tables, the "
            "manual attention the T x T weights)"
        )


def activation_bytes_per_layer(
    config: GPTConfig,
    batch_size: int,
    seq_len: int,
    precision: str = "fp32",
    device: str = "cpu",
) -> int:
    """Bytes one block saves for backward in a training forward pass, N = B T tokens.

    fp32, per token (each entry C floats unless noted):
        ln_1 input; its mean and 1/std (1 float each); ln_1 output (q/k/v_proj's input);
        q, k, v; the attention output (o_proj's input: the same storage); ln_2 input, mean and
        1/std; ln_2 output; up_proj output (4C) = GELU input; on a CPU GELU's sigmoid (4C, see
        `minillm.model.gelu_tanh`); GELU output (4C) = down_proj's input.
        That is (80 C + 16) bytes per token on a CPU, (64 C + 16) on CUDA, plus scaled dot-product
        attention's log-sum-exp, H floats per token.
    bf16/fp16 (`torch.autocast`): LayerNorm still runs in fp32 (its input and statistics stay
    4 bytes); every linear layer casts its input to 2 bytes separately (ln_1's output is saved
    three times, once each for q, k and v), and every weight matrix is cast too, 12 C^2 values
    saved per block whatever the batch.

    Exact against `saved_activation_bytes` on a CPU; on CUDA attention kernels may add a few
    small tensors (random-number state, padded statistics).
    """
    _check_activation_inputs(config, batch_size, seq_len)
    if device not in ("cpu", "cuda"):
        raise unknown_name("device", device, ("cpu", "cuda"))
    c, n = config, batch_size * seq_len
    C = c.n_embd
    gelu_saved = 3 if device == "cpu" else 2  # (4C)-sized tensors around the GELU
    lse = batch_size * c.n_head * seq_len * 4
    if bytes_per_value(precision) == 4:
        return n * (4 * (C + 2 + C + 3 * C + C + C + 2 + C + gelu_saved * 4 * C)) + lse
    fp32_part = 4 * (C + 2 + C + 2)  # the two LayerNorm inputs and their statistics
    half_part = 2 * (3 * C + 3 * C + C + C + gelu_saved * 4 * C)
    return n * (fp32_part + half_part) + lse + 2 * 12 * C * C


def activation_bytes(
    config: GPTConfig,
    batch_size: int,
    seq_len: int,
    precision: str = "fp32",
    checkpointing: bool = False,
    device: str = "cpu",
) -> int:
    """Bytes the whole GPT saves for backward in one training forward with targets.

    Without checkpointing: L times `activation_bytes_per_layer`. With activation checkpointing
    of every block, a block keeps only its input (N C values; fp32, the residual stream) and
    recomputes the rest during backward, so the peak adds back one block's worth while it is
    recomputed. Around the blocks: the token ids and positions (int64, for the embeddings'
    backward), ln_f's input, statistics and output, lm_head's weight (cast, under autocast), and the
    cross-entropy's log-softmax (N V floats, fp32 even under autocast) and one scalar.
    """
    per_layer = activation_bytes_per_layer(config, batch_size, seq_len, precision, device)
    c, n = config, batch_size * seq_len
    C, V = c.n_embd, c.vocab_size
    half = bytes_per_value(precision) == 2
    blocks = c.n_layer * (n * C * 4 if checkpointing else per_layer)
    embeddings = 8 * (n + seq_len)
    head = n * (4 * C + 8) + (n * C * 2 + V * C * 2 if half else n * C * 4) + n * V * 4 + 4
    return blocks + embeddings + head


def forward_with_checkpointing(model: GPT, idx: Tensor, targets: Tensor) -> Tensor:
    """`model(idx, targets)`'s loss, with every block wrapped in `torch.utils.checkpoint`
    (`GPT.set_activation_checkpointing`): its inner activations are dropped after the forward
    pass and recomputed during backward. The model's setting is restored afterwards."""
    previous = model.activation_checkpoint
    model.set_activation_checkpointing(True)
    try:
        return model(idx, targets)[1]
    finally:
        model.activation_checkpoint = previous


def saved_activation_bytes(model: nn.Module, forward: Callable[[], Tensor]) -> tuple[int, Tensor]:
    """Run `forward()` (which returns a loss) and measure what autograd saves for backward:
    the bytes of every distinct storage packed by `torch.autograd.graph.saved_tensors_hooks`,
    leaving out `model`'s own parameters (they are counted as weights). Views of one tensor share
    a storage and count once. Returns `(bytes, loss)`; call `loss.backward()` as usual."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    return sum(seen.values()), loss


def memory_breakdown(
    config: GPTConfig,
    batch_size: int,
    seq_len: int,
    precision: str = "fp32",
    checkpointing: bool = False,
) -> dict[str, int]:
    """Predicted bytes of one training step by component, for a bar chart: the `STATE_PARTS`
    and the activations."""
    state = model_state_bytes(parameter_count(config), precision)
    return {
        **state.as_dict(),
        "activations": activation_bytes(config, batch_size, seq_len, precision, checkpointing),
    }


# ---------------------------------------------------------------------------------------------
# 4. Mixed precision: what fp16 loses, and loss scaling
# ---------------------------------------------------------------------------------------------


def fp16_cast_report(values: Tensor | Iterable[Tensor], scale: float = 1.0) -> dict[str, float]:
    """Fractions of the nonzero entries of `values` (a tensor or, e.g., every parameter's
    gradient) that fp16 cannot hold after multiplying by `scale`: `underflow` (rounded to 0:
    |x| <= 2^-25) and `overflow` (became inf: |x| > 65504 after rounding)."""
    require_positive(scale, "scale")
    tensors = [values] if isinstance(values, Tensor) else [t for t in values if t is not None]
    if not tensors or not all(isinstance(t, Tensor) and t.is_floating_point() for t in tensors):
        raise InputTypeError("values must be a floating-point tensor or a list of them")
    flat = torch.cat([t.detach().flatten().double() for t in tensors])
    nonzero = flat[flat != 0]
    if nonzero.numel() == 0:
        raise InputError("values has no nonzero entry to test")
    cast = (nonzero * scale).to(torch.float16)
    return {
        "underflow": (cast == 0).double().mean().item(),
        "overflow": cast.isinf().double().mean().item(),
    }


class DynamicLossScaler:
    """Loss scaling for fp16, as `torch.amp.GradScaler` does it.

    Multiply the loss by `scale` before backward so that small gradients stay above fp16's
    smallest value; divide the gradients by `scale` before the optimizer step. When any gradient
    is inf or NaN the scale was too large: skip that step (its update would be garbage) and halve
    the scale. After `growth_interval` good steps in a row, double it, to probe for a larger
    scale that rescues more small gradients.
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ):
        require_positive(init_scale, "init_scale")
        require_positive(growth_interval, "growth_interval", integer=True)
        if not growth_factor > 1.0 or not 0.0 < backoff_factor < 1.0:
            raise InputError("growth_factor must be > 1 and backoff_factor in (0, 1)")
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval = int(growth_interval)
        self.good_steps = 0

    def scale_loss(self, loss: Tensor) -> Tensor:
        return loss * self.scale

    def unscale_(self, params: Iterable[Tensor]) -> bool:
        """Divide every gradient by the scale, in place; True when any is inf or NaN."""
        found_inf = False
        for p in params:
            if p.grad is not None:
                p.grad.div_(self.scale)
                found_inf |= not bool(torch.isfinite(p.grad).all())
        return found_inf

    def update(self, found_inf: bool) -> bool:
        """Move the scale after a step; returns whether the optimizer step should be taken."""
        if found_inf:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            return False
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0
        return True

    def step(self, optimizer: torch.optim.Optimizer, params: Iterable[Tensor]) -> bool:
        """Unscale, step the optimizer unless a gradient overflowed, update; True if it stepped."""
        stepped = self.update(self.unscale_(params))
        if stepped:
            optimizer.step()
        return stepped
