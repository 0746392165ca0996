"""minillm.memory: formulas against measured tensors (exact), the seed's GPT-3 figures, fp16's
limits, the loss scaler against torch.amp.GradScaler, and bad input."""

import math

import pytest
import torch

from minillm import memory
from minillm.errors import InputError, InputTypeError
from minillm.model import GPT, GPTConfig

CONFIGS = [
    GPTConfig(),
    GPTConfig(n_layer=2, n_head=2, n_embd=64, bias=False, tie_weights=False),
]
B, T = 3, 40


def batch(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (B, T), generator=g)


@pytest.mark.parametrize("config", CONFIGS)
def test_parameter_count_matches_the_built_model(config):
    assert memory.parameter_count(config) == GPT(config).num_parameters()


@pytest.mark.parametrize("config", CONFIGS)
def test_state_formula_matches_tensors_after_one_adamw_step(config):
    torch.manual_seed(0)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = batch(config)
    model(idx, idx)[1].backward()
    optimizer.step()
    measured = memory.measured_state_bytes(model, optimizer)
    predicted = memory.model_state_bytes(memory.parameter_count(config), "fp32")
    assert {part: measured[part] for part in memory.STATE_PARTS} == predicted.as_dict()
    assert predicted.optimizer_states == 2 * predicted.parameters  # m and v, 4 bytes each
    assert measured["other"] == 4 * len(list(model.parameters()))  # one fp32 step per tensor


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_formula_matches_saved_tensors(config, precision, checkpointing):
    """The formula counts every tensor autograd saves on a CPU: expected error 0, tolerance 1%."""
    torch.manual_seed(0)
    model, idx = GPT(config), batch(config)
    if checkpointing:
        run = lambda: memory.forward_with_checkpointing(model, idx, idx)  # noqa: E731
    else:
        run = lambda: model(idx, idx)[1]  # noqa: E731
    autocast = torch.autocast("cpu", dtype=memory.DTYPES[precision], enabled=precision != "fp32")
    with autocast:
        measured, loss = memory.saved_activation_bytes(model, run)
    predicted = memory.activation_bytes(config, B, T, precision, checkpointing)
    assert abs(predicted - measured) <= 0.01 * measured
    loss.backward()  # the measured graph is a real one


def test_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    config = CONFIGS[0]
    model, idx = GPT(config), batch(config)
    model(idx, idx)[1].backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    memory.forward_with_checkpointing(model, idx, idx).backward()
    for a, b in zip(plain, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(a, b)


def test_gpt3_figures_of_the_seed():
    report = memory.gpt3_report()
    assert report["parameters_fp32"] == 700e9  # 175e9 x 4 bytes
    assert report["parameters_and_optimizer_states_fp32"] == 2.1e12  # weights, m, v
    assert report["training_fp32"] == 2.8e12  # weights, gradients, m, v: 4 x 700 GB
    assert report["training_mixed"] == 2.8e12
    assert memory.bytes_to_human(report["parameters_fp32"]) == "700.0 GB"
    assert memory.bytes_to_human(report["parameters_fp32"], binary=True) == "651.9 GiB"


def test_sixteen_bytes_per_parameter():
    for precision in memory.PRECISIONS:
        assert memory.model_state_bytes(1000, precision).total == 16_000
    mixed = memory.model_state_bytes(1000, "fp16")
    assert mixed.as_dict() == {
        "parameters": 2000,
        "gradients": 2000,
        "master_weights": 4000,
        "optimizer_states": 8000,
    }
    assert tuple(mixed.as_dict()) == memory.STATE_PARTS


def test_bytes_to_human_units():
    assert memory.bytes_to_human(0) == "0 B"
    assert memory.bytes_to_human(999) == "999 B"
    assert memory.bytes_to_human(1500) == "1.5 kB"
    assert memory.bytes_to_human(2**30, binary=True) == "1.0 GiB"
    assert memory.bytes_to_human(2.8e12) == "2.8 TB"


def test_format_table_bits():
    rows = {r["format"]: r for r in memory.format_table()}
    assert (rows["fp16"]["exponent_bits"], rows["fp16"]["mantissa_bits"]) == (5, 10)
    assert (rows["bf16"]["exponent_bits"], rows["bf16"]["mantissa_bits"]) == (8, 7)
    assert (rows["fp32"]["exponent_bits"], rows["fp32"]["mantissa_bits"]) == (8, 23)


def test_fp16_overflow_and_underflow_facts():
    assert torch.tensor(65504.0).half().item() == 65504.0
    assert torch.tensor(70000.0).half().isinf()
    assert torch.tensor(1e38).bfloat16().isfinite()  # bf16 has fp32's exponent range
    assert torch.tensor(2.0**-24).half().item() == 2.0**-24  # smallest subnormal survives
    assert torch.tensor(2.0**-26).half().item() == 0.0
    # bf16's 8 significant bits: relative rounding error at most 2^-8.
    x = torch.rand(10_000, dtype=torch.float64) + 0.5
    rel = ((x.bfloat16().double() - x) / x).abs().max().item()
    assert 2.0**-10 < rel <= 2.0**-8
    values = torch.tensor([1e-9, 1e-3, 1e5, 0.0])
    assert memory.fp16_cast_report(values) == {"underflow": 1 / 3, "overflow": 1 / 3}
    assert memory.fp16_cast_report(values, scale=2.0**10) == {"underflow": 0.0, "overflow": 1 / 3}


def test_loss_scaling_rescues_real_gpt_gradients():
    torch.manual_seed(0)
    config = CONFIGS[0]
    model, idx = GPT(config), batch(config)
    model(idx, idx)[1].backward()
    grads = [p.grad for p in model.parameters()]
    plain = memory.fp16_cast_report(grads)
    scaled = memory.fp16_cast_report(grads, scale=2.0**16)
    assert scaled["underflow"] < plain["underflow"]
    assert scaled["overflow"] == 0.0


def test_loss_scaler_matches_torch_gradscaler():
    """Drive both scalers with the same overflow pattern: the same scale after every update and
    the same steps skipped."""
    pattern = [False, False, False, True, False, False, False, False, True, True, False]
    ours = memory.DynamicLossScaler(init_scale=8.0, growth_interval=3)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    theirs = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=3)
    for overflow in pattern:
        theirs.scale(torch.ones(()))  # initialises GradScaler's state on this device
        before = param.detach().clone()
        param.grad = torch.tensor([math.inf if overflow else 8.0])
        theirs.step(optimizer)
        theirs.update()
        their_stepped = not torch.equal(before, param.detach())
        ours_grad = torch.nn.Parameter(torch.zeros(1))
        ours_grad.grad = torch.tensor([math.inf if overflow else 8.0])
        stepped = ours.update(ours.unscale_([ours_grad]))
        assert stepped == their_stepped == (not overflow)
        assert ours.scale == theirs.get_scale()


def test_loss_scaler_hand_sequence():
    scaler = memory.DynamicLossScaler(init_scale=1024.0, growth_interval=2)
    scales = []
    for overflow in [False, False, True, False, False, False]:
        scaler.update(overflow)
        scales.append(scaler.scale)
    assert scales == [1024.0, 2048.0, 1024.0, 1024.0, 2048.0, 2048.0]


def test_loss_scaler_step_skips_on_inf():
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scaler = memory.DynamicLossScaler(init_scale=4.0)
    param.grad = torch.tensor([4.0, math.inf])
    assert not scaler.step(optimizer, [param])
    torch.testing.assert_close(param.detach(), torch.ones(2))
    assert scaler.scale == 2.0
    param.grad = torch.tensor([2.0, 2.0])  # unscaled: 1.0 each
    assert scaler.step(optimizer, [param])
    torch.testing.assert_close(param.detach(), torch.full((2,), 0.9))


def test_bad_input_is_rejected():
    with pytest.raises(InputError, match="unknown precision 'fp8'"):
        memory.model_state_bytes(10, "fp8")
    with pytest.raises(InputError, match="n_params must be > 0"):
        memory.model_state_bytes(0)
    with pytest.raises(InputError, match="batch_size must be > 0"):
        memory.activation_bytes(GPTConfig(), 0, 8)
    with pytest.raises(InputError, match="longer than the context"):
        memory.activation_bytes(GPTConfig(), 1, 65)
    with pytest.raises(InputError, match="default layout"):
        memory.activation_bytes(GPTConfig(positions="rotary"), 1, 8)
    with pytest.raises(InputTypeError, match="GPTConfig"):
        memory.parameter_count({"n_layer": 2})
    with pytest.raises(InputError, match=">= 0"):
        memory.bytes_to_human(-1)
    with pytest.raises(InputError, match="scale must be > 0"):
        memory.fp16_cast_report(torch.ones(3), scale=0)
    with pytest.raises(InputError, match="no nonzero"):
        memory.fp16_cast_report(torch.zeros(3))
