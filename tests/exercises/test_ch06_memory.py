"""Graded tests for chapter 06 (memory and mixed precision): `minillm grade ch06`.

References: the course GPT built for real (`num_parameters`, tensor sizes after an AdamW step,
the tensors autograd saves as measured with `saved_tensors_hooks`, the plain forward's gradients),
`torch.amp.GradScaler`, fp16's rounding threshold (values of at most 2^-25 round to 0), a
brute-force search of the scaling law, and hand values. Byte counts must be
exact; gigabytes match to 1e-9 relative.
"""

import math

import pytest
import torch

from minillm.model import GPT, Block, GPTConfig
from tests.exercises import in_worker

# What each exercise must not call: the library function it asks you to write (a call fails
# the test). A guard against the obvious shortcut; the stubs' docstrings name the same.
OFF_LIMITS = {
    "gpt_parameter_count": (
        "minillm.model.GPT.__init__",
        "minillm.memory.parameter_count",
    ),
    "training_memory_bytes": ("minillm.memory.model_state_bytes",),
    "gpt3_memory_report": ("minillm.memory.gpt3_report",),
    "bytes_to_human": ("minillm.memory.bytes_to_human",),
    "activation_bytes_per_layer": (
        "minillm.memory.activation_bytes_per_layer",
        "minillm.memory.activation_bytes",
        "minillm.memory.saved_activation_bytes",
        "minillm.model.Block.__init__",
    ),
    "fp16_underflow_fraction": ("minillm.memory.fp16_cast_report",),
    "checkpointed_forward": (
        "minillm.model.GPT.set_activation_checkpointing",
        "minillm.memory.forward_with_checkpointing",
    ),
    "compute_optimal_params": ("minillm.compute.ScalingLaw.compute_optimal",),
    "DynamicLossScaler": (
        "minillm.memory.DynamicLossScaler.__init__",
        "torch.amp.GradScaler.__init__",
    ),
}


def grads_of_a_real_gpt(config, seed=0):
    torch.manual_seed(seed)
    model = GPT(config)
    idx = torch.randint(0, config.vocab_size, (4, 32))
    model(idx, idx)[1].backward()
    return model, [p.grad for p in model.parameters()]


# -- parameters and model state --------------------------------------------------------------


@pytest.mark.points(3)
def test_parameter_count_with_tied_and_untied_heads(impl):
    """Catches counting a tied lm_head twice (GPT-2 shares it with the token table) and forgetting
    the untied head's matrix."""
    ex = impl("ch06_memory")
    for tie in (True, False):
        config = GPTConfig(vocab_size=50, n_layer=3, n_embd=48, n_head=4, tie_weights=tie)
        assert ex.gpt_parameter_count(config) == GPT(config).num_parameters(), f"tie={tie}"


@pytest.mark.points(2)
def test_parameter_count_biases_layernorms_and_positions(impl):
    """Catches forgetting biases, LayerNorm weights (two per block and ln_f) or the learned
    position table, and counting a position table that rotary models do not have."""
    ex = impl("ch06_memory")
    configs = [
        GPTConfig(bias=True),
        GPTConfig(bias=False),
        GPTConfig(positions="rotary", n_layer=2),
        GPTConfig(n_embd=8, n_head=2, n_layer=1, vocab_size=10, block_size=4),
    ]
    for config in configs:
        assert ex.gpt_parameter_count(config) == GPT(config).num_parameters(), config


@pytest.mark.points(3)
def test_fp32_training_memory_matches_real_tensors(impl):
    """Catches Adam with one moment (12 bytes per parameter instead of 16) and forgetting the
    gradients: the reference is the bytes of the weights, gradients and AdamW's exp_avg and
    exp_avg_sq after one real step."""
    ex = impl("ch06_memory")
    model, _ = grads_of_a_real_gpt(GPTConfig(n_layer=2))
    optimizer = torch.optim.AdamW(model.parameters())
    optimizer.step()
    tensors = [*model.parameters(), *(p.grad for p in model.parameters())]
    tensors += [s[k] for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    measured = sum(t.numel() * t.element_size() for t in tensors)
    assert ex.training_memory_bytes(model.num_parameters(), "fp32") == measured


@pytest.mark.points(2)
def test_mixed_precision_keeps_a_master_copy(impl):
    """Catches 12 bytes per parameter for mixed precision (2 + 2 + 4 + 4, no fp32 master
    weights): 2-byte weights and gradients, fp32 master weights, m and v make 16. An unknown
    precision raises ValueError."""
    ex = impl("ch06_memory")
    for precision in ("bf16", "fp16"):
        assert ex.training_memory_bytes(1000, precision) == 16_000, precision
    with pytest.raises(ValueError):
        ex.training_memory_bytes(1000, "fp8")


@pytest.mark.points(2)
def test_gpt3_memory_report(impl):
    """Catches Adam with one moment (adam 700 GB instead of 1400) and binary gigabytes (651.9
    GiB is the same 700e9 bytes): the seed's 700 GB and 2.8 TB are decimal."""
    ex = impl("ch06_memory")
    report = ex.gpt3_memory_report(175e9)
    expected = {"weights": 700.0, "gradients": 700.0, "adam": 1400.0, "total": 2800.0}
    assert set(report) == set(expected)
    for key, value in expected.items():
        assert math.isclose(report[key], value, rel_tol=1e-9), key
    assert math.isclose(ex.gpt3_memory_report(1e9)["total"], 16.0, rel_tol=1e-9)


@pytest.mark.points(2)
def test_bytes_to_human_decimal_and_binary(impl):
    """Catches mixing GB and GiB (dividing by 1024 for "GB" or by 1000 for "GiB") and a unit
    chosen one step too large or too small."""
    ex = impl("ch06_memory")
    cases = [
        ((700e9,), "700.0 GB"),
        ((700e9, True), "651.9 GiB"),
        ((2.8e12,), "2.8 TB"),
        ((2**30, True), "1.0 GiB"),
        ((1e9, True), "953.7 MiB"),
        ((1536, True), "1.5 KiB"),
        ((1500,), "1.5 kB"),
        ((512,), "512 B"),
    ]
    for args, expected in cases:
        assert ex.bytes_to_human(*args) == expected, args


# -- activations -----------------------------------------------------------------------------


def saved_bytes_of_one_block(batch_size, seq_len, n_embd, n_head):
    """What a real course Block saves for backward: distinct storages, parameters left out."""
    torch.manual_seed(0)
    block = Block(n_embd, n_head)
    x = torch.randn(batch_size, seq_len, n_embd, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, is_causal=True)
    return sum(storages.values())


@pytest.mark.points(3)
def test_activation_bytes_per_layer_matches_saved_tensors(impl):
    """Catches leaving out the LayerNorm statistics, the attention's log-sum-exp or the GELU's
    saved tensors, and counting the attention output twice (o_proj reads the same storage). The
    reference is what autograd really saves for one block on a CPU."""
    ex = impl("ch06_memory")
    for sizes in [(2, 16, 32, 4), (3, 10, 48, 2), (1, 1, 8, 1)]:
        assert ex.activation_bytes_per_layer(*sizes) == saved_bytes_of_one_block(*sizes), sizes


# -- mixed precision -------------------------------------------------------------------------


def underflow_reference(grads, scale):
    """fp16 rounds |x| <= 2^-25 (half its smallest subnormal, ties to even) to 0."""
    flat = torch.cat([g.flatten().double() for g in grads])
    flat = flat[flat != 0] * scale
    return (flat.abs() <= 2.0**-25).double().mean().item()


@pytest.mark.points(2)
def test_fp16_underflow_fraction_on_real_gradients(impl):
    """Catches counting entries that were zero before the cast, ignoring the loss scale, and
    casting to bfloat16 (whose range holds these gradients) instead of float16."""
    ex = impl("ch06_memory")
    _, grads = grads_of_a_real_gpt(GPTConfig(n_layer=2))
    for scale in (1.0, 2.0**8, 2.0**16):
        got = ex.fp16_underflow_fraction(grads, scale)
        assert math.isclose(got, underflow_reference(grads, scale), abs_tol=1e-12), scale
    assert ex.fp16_underflow_fraction([torch.tensor([1e-9, 1e-3, 0.0])]) == 0.5
    assert ex.fp16_underflow_fraction([torch.tensor([1e-9, 1e-3, 0.0])], 2.0**16) == 0.0


@pytest.mark.points(3)
def test_loss_scaler_matches_torch_gradscaler(impl):
    """Catches a scaler that does not skip the step on inf (update must return False), one that
    does not halve the scale, and one that keeps counting good steps across an overflow. The
    reference is torch.amp.GradScaler driven with the same overflows."""
    ex = impl("ch06_memory")
    ours = ex.DynamicLossScaler(init_scale=8.0, growth_interval=3)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    theirs = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=3)
    pattern = [False, False, True, False, False, False, False, True, True, False, False, False]
    for i, overflow in enumerate(pattern):
        theirs.scale(torch.ones(()))
        before = param.detach().clone()
        param.grad = torch.tensor([math.inf if overflow else 1.0])
        theirs.step(optimizer)
        theirs.update()
        stepped = not torch.equal(before, param.detach())
        assert ours.update(overflow) == stepped, f"step {i}: overflow={overflow}"
        assert ours.scale == theirs.get_scale(), f"step {i}"


@pytest.mark.points(2)
def test_loss_scaler_grows_after_good_steps(impl):
    """Catches growing the scale on every good step, or one step early or late (by hand:
    growth_interval=2 doubles after every second good step in a row)."""
    ex = impl("ch06_memory")
    scaler = ex.DynamicLossScaler(init_scale=1.0, growth_factor=4.0, growth_interval=2)
    scales = []
    for _ in range(5):
        assert scaler.update(False) is True
        scales.append(scaler.scale)
    assert scales == [1.0, 4.0, 4.0, 16.0, 16.0]


# -- activation checkpointing ----------------------------------------------------------------


@pytest.mark.points(3)
@pytest.mark.timeout(120)  # three blocks forward and backward twice; generous on a busy machine
def test_checkpointed_forward_equals_plain_and_saves_less(impl):
    """Catches a forward that is not checkpointed (it saves every activation of every block), one
    run under torch.no_grad() (no gradients reach the weights), and a hand-made recomputation
    that draws new dropout masks (the gradients differ from the plain forward's). The reference
    is the plain forward of the same blocks, with the same random state, computed here."""
    ex = impl("ch06_memory")
    out, x_grad, grads, saved = ex.run_helper(in_worker.checkpointed_in_worker)
    blocks, x = in_worker.checkpoint_blocks()
    params = {p.untyped_storage().data_ptr() for p in blocks.parameters()}

    def plain():
        h = x
        for block in blocks:
            h = block(h)
        return h

    torch.manual_seed(1)
    storages, expected = in_worker.saved_bytes(plain)
    expected.pow(2).sum().backward()
    plain_saved = sum(n for ptr, n in storages.items() if ptr not in params)
    torch.testing.assert_close(out, expected.detach(), rtol=0, atol=1e-12)
    assert x_grad is not None and all(g is not None for g in grads), (
        "no gradient reached the input or a weight: the forward must run with gradients enabled"
    )
    torch.testing.assert_close(x_grad, x.grad, rtol=0, atol=1e-10, msg="input gradient differs")
    for (name, p), g in zip(blocks.named_parameters(), grads, strict=True):
        torch.testing.assert_close(
            g,
            p.grad,
            rtol=0,
            atol=1e-10,
            msg=f"gradient of {name} differs from the plain forward's: were the dropout masks "
            "recomputed with the same random state?",
        )
    limit = len(blocks) * x.untyped_storage().nbytes()
    assert saved <= limit, (
        f"{saved:,} bytes saved for backward (the plain forward saves {plain_saved:,}); a "
        f"checkpointed forward keeps at most one block input per block, {limit:,} bytes"
    )


# -- the compute-optimal model size ----------------------------------------------------------


@pytest.mark.points(2)
def test_compute_optimal_params_minimise_the_loss_on_the_budget(impl):
    """Catches the exponents swapped (N growing as C^(alpha/(alpha+beta)) instead of
    C^(beta/(alpha+beta))), a budget of N D instead of 6 N D, and a D that does not spend the
    budget. The reference is a brute-force search over N of L(N, C / 6N)."""
    ex = impl("ch06_memory")
    laws = [(1.69, 406.4, 410.7, 0.34, 0.28), (1.2, 30.0, 900.0, 0.5, 0.25)]
    for law in laws:
        E, A, B, alpha, beta = law
        for flops in (1e15, 5.76e23):
            n, d = ex.compute_optimal_params(flops, *law)
            assert 6 * n * d == pytest.approx(flops, rel=1e-9), f"6 N D = {6 * n * d:.4g}"
            grid = torch.logspace(math.log10(n) - 2, math.log10(n) + 2, 40001, dtype=torch.float64)
            loss = E + A / grid**alpha + B / (flops / (6 * grid)) ** beta
            best = grid[loss.argmin()].item()
            assert n == pytest.approx(best, rel=2e-3), (
                f"law {law}, budget {flops:.3g}: expected N near {best:.4g}, got {n:.4g}"
            )
