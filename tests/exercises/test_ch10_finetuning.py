"""Graded tests for chapter 10 (fine-tuning): `minillm grade ch10`.

References: hand-worked cases, PEFT's LoRA layers (the library's own forward pass and its count
of trainable parameters on the course GPT), `torch.nn.functional.linear`, and DPO's loss written
in float64 with math.log1p. Tensors match to 1e-5 (float32) or 1e-9 (float64).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from minillm.model import GPT, GPTConfig
from tests.exercises import in_worker

# What each exercise must not call: the library function it asks you to write (a call fails
# the test). A guard against the obvious shortcut; the stubs' docstrings name the same.
OFF_LIMITS = {
    "sft_inputs_and_targets": ("minillm.finetune.sft_tokens",),
    "pool_last_tokens": ("minillm.finetune.last_token_states",),
    "lora_linear": ("minillm.finetune.LoRALinear.__init__",),
    "merge_lora_weight": ("minillm.finetune.merge_lora",),
    "lora_parameter_count": ("minillm.finetune.parameter_counts", "minillm.finetune.add_lora"),
    "dpo_loss": ("minillm.finetune.dpo_loss",),
    "response_logprobs": ("minillm.finetune.sequence_logprobs",),
    "reward_model_loss": ("minillm.finetune.reward_model_loss",),
}


class _OneLayer(nn.Module):
    def __init__(self, fan_in, fan_out, bias):
        super().__init__()
        self.proj = nn.Linear(fan_in, fan_out, bias=bias)


def peft_layer(fan_in=6, fan_out=5, r=2, alpha=6.0, bias=True, seed=0):
    """PEFT's LoRA layer with a random frozen layer and random (non-zero) A and B."""
    torch.manual_seed(seed)
    model = inject_adapter_in_model(
        LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"]), _OneLayer(fan_in, fan_out, bias)
    )
    layer = model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    base = layer.base_layer
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    return layer, base.weight.detach(), None if base.bias is None else base.bias.detach(), A, B


# -- supervised fine-tuning -------------------------------------------------------------------


@pytest.mark.points(3)
def test_sft_inputs_and_targets(impl):
    """Catches masking one prompt position too many (the first answer token is then never
    learned), forgetting the shift by one, and masking the response instead of the prompt."""
    ex = impl("ch10_finetuning")
    assert ex.sft_inputs_and_targets([1, 2, 3], [4, 5]) == ([1, 2, 3, 4], [-100, -100, 4, 5])
    assert ex.sft_inputs_and_targets([7], [8, 9]) == ([7, 8], [8, 9])  # nothing to mask
    inputs, targets = ex.sft_inputs_and_targets([10, 11, 12, 13], [14])
    assert inputs == [10, 11, 12, 13] and targets == [-100, -100, -100, 14]


@pytest.mark.points(2)
def test_pool_last_tokens(impl):
    """Catches reading position `length` (one past the last real token, padding or out of
    range), the last column (padding for short rows) and position 0."""
    ex = impl("ch10_finetuning")
    torch.manual_seed(0)
    hidden = torch.randn(4, 6, 3)
    lengths = torch.tensor([1, 6, 3, 5])
    expected = torch.stack([hidden[i, n - 1] for i, n in enumerate(lengths.tolist())])
    torch.testing.assert_close(ex.pool_last_tokens(hidden, lengths), expected)


# -- LoRA ------------------------------------------------------------------------------------


@pytest.mark.points(3)
def test_lora_linear_equals_peft(impl):
    """Catches scaling by alpha instead of alpha / r, transposed A or B, a forgotten bias, and
    inputs with more than one leading dimension."""
    ex = impl("ch10_finetuning")
    for bias in (True, False):
        layer, weight, b, A, B = peft_layer(r=2, alpha=6.0, bias=bias)
        x = torch.randn(3, 4, 6)
        with torch.no_grad():
            expected = layer(x)
        torch.testing.assert_close(ex.lora_linear(x, weight, b, A, B, 6.0), expected)
    zero_B = torch.zeros_like(B)
    torch.testing.assert_close(ex.lora_linear(x, weight, b, A, zero_B, 6.0), F.linear(x, weight, b))


@pytest.mark.points(2)
def test_merged_weight_computes_the_same_layer(impl):
    """Catches A @ B in place of B @ A, a missing scale, and merging into the frozen weight in
    place (the base model would be changed for good)."""
    ex = impl("ch10_finetuning")
    layer, weight, b, A, B = peft_layer(fan_in=7, fan_out=4, r=3, alpha=2.0)
    untouched = weight.clone()
    merged = ex.merge_lora_weight(weight, A, B, 2.0)
    assert merged.shape == (4, 7)
    x = torch.randn(5, 7)
    with torch.no_grad():
        torch.testing.assert_close(F.linear(x, merged, b), layer(x))
    torch.testing.assert_close(weight, untouched, rtol=0, atol=0)


@pytest.mark.points(2)
def test_lora_parameter_count_equals_peft_on_the_course_gpt(impl):
    """Catches r * in * out (a full matrix), counting only A or only B, forgetting that every
    block is adapted, and giving up_proj and down_proj the attention layers' C x C shape."""
    ex = impl("ch10_finetuning")
    config = GPTConfig(vocab_size=20, block_size=8, n_layer=3, n_head=2, n_embd=12)
    cases = [
        (4, ("q_proj", "v_proj")),
        (2, ("q_proj", "k_proj", "v_proj", "o_proj")),
        (3, ("up_proj", "down_proj")),
    ]
    for r, targets in cases:
        model = inject_adapter_in_model(
            LoraConfig(r=r, lora_alpha=r, target_modules=list(targets)), GPT(config)
        )
        expected = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        assert ex.lora_parameter_count(config, r, targets) == expected, (r, targets)


# -- a reward model and DPO --------------------------------------------------------------------


@pytest.mark.points(3)
def test_reward_model_loss(impl):
    """Bradley-Terry by hand in float64 (math.log1p), then margins of hundreds in float32.
    Catches the swapped sign (rejected - chosen), a softmax over the batch's rewards (each pair
    must be compared with itself only), a sum instead of the mean, and -log(sigmoid(z)), which
    is infinite at a margin of -200 in float32."""
    ex = impl("ch10_finetuning")
    chosen, rejected = [2.0, -1.0, 0.5, 3.0], [1.0, 1.0, 0.5, -4.0]
    pairs = list(zip(chosen, rejected, strict=True))
    expected = sum(math.log1p(math.exp(r - c)) for c, r in pairs) / 4
    swapped = sum(math.log1p(math.exp(c - r)) for c, r in pairs) / 4
    loss = ex.reward_model_loss(
        torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64)
    )
    assert loss.dim() == 0, f"a 0-d loss expected, got shape {tuple(loss.shape)}"
    assert loss.item() == pytest.approx(expected, abs=1e-9), (
        f"loss {loss.item():.6f} instead of mean(-log sigmoid(chosen - rejected)) = {expected:.6f}"
        f" (the swapped sign gives {swapped:.6f})"
    )
    loss, (grad,) = ex.run_helper(
        in_worker.call_and_backward,
        "reward_model_loss",
        torch.tensor([0.0, 5.0], requires_grad=True),
        torch.tensor([200.0, 5.0]),
    )
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(
        (200 + math.log(2)) / 2, rel=1e-6
    ), f"loss {loss.item()} for margins -200 and 0 instead of (200 + log 2) / 2"
    assert grad is not None, "no gradient reached the chosen rewards"
    torch.testing.assert_close(grad, torch.tensor([-0.5, -0.25]), rtol=1e-6, atol=1e-9)


def logprob_problem():
    """Random logits over 5 tokens for 3 right-padded rows: (logits, ids, prompt_lengths,
    lengths), and the padding's ids and logits set to values that would show if counted."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 5, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 5, (3, 6), generator=g)
    prompt_lengths, lengths = torch.tensor([2, 1, 3]), torch.tensor([5, 6, 4])
    for b, n in enumerate(lengths.tolist()):
        ids[b, n:] = 4
        logits[b, n - 1 :, 4] = 30.0  # padding predicted with certainty, if read
    return logits, ids, prompt_lengths, lengths


@pytest.mark.points(3)
def test_response_logprobs(impl):
    """Three right-padded rows with different prompt and response lengths, against a loop over
    each response token in float64 (the logits of position t - 1 predict token t). Catches the
    missing shift (position t's logits scoring token t), a mean over the response instead of
    the sum, counting the prompt's tokens, and counting the padding."""
    ex = impl("ch10_finetuning")
    logits, ids, prompt_lengths, lengths = logprob_problem()
    expected = []
    for b in range(3):
        total = 0.0
        for t in range(prompt_lengths[b].item(), lengths[b].item()):
            row = logits[b, t - 1]
            total += (row[ids[b, t]] - torch.logsumexp(row, 0)).item()
        expected.append(total)
    got = ex.response_logprobs(logits, ids, prompt_lengths, lengths)
    assert isinstance(got, torch.Tensor) and got.shape == (3,), (
        f"one log-probability per row expected, shape (3,); got {getattr(got, 'shape', got)}"
    )
    for b in range(3):
        assert got[b].item() == pytest.approx(expected[b], abs=1e-9), (
            f"row {b} (prompt {prompt_lengths[b].item()} tokens, length {lengths[b].item()}): "
            f"{got[b].item():.6f} instead of the sum of its response tokens' log-probabilities, "
            f"{expected[b]:.6f}"
        )
    # A one-token prompt: its response starts at position 1, predicted by position 0.
    one = ex.response_logprobs(logits[:1], ids[:1], torch.tensor([1]), torch.tensor([2]))
    by_hand = (logits[0, 0, ids[0, 1]] - torch.logsumexp(logits[0, 0], 0)).item()
    assert one.item() == pytest.approx(by_hand, abs=1e-9), (
        f"{one.item():.6f} for a 1-token prompt and 1-token response instead of {by_hand:.6f}"
    )


@pytest.mark.points(1)
def test_response_logprobs_gradient(impl):
    """The gradient reaches the logits of the positions that predict the response only (DPO
    trains through this sum): catches a result detached from the logits (`.item()`, numpy) and
    gradient leaking to the prompt's or the padding's positions."""
    ex = impl("ch10_finetuning")
    logits, ids, prompt_lengths, lengths = logprob_problem()
    logits.requires_grad_(True)

    _, (grad,) = ex.run_helper(
        in_worker.sum_and_backward, "response_logprobs", logits, ids, prompt_lengths, lengths
    )
    assert grad is not None, "no gradient reached the logits"
    reference = logits.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(reference, -1)
    total = sum(
        logp[b, t - 1, ids[b, t]]
        for b in range(3)
        for t in range(prompt_lengths[b].item(), lengths[b].item())
    )
    total.backward()
    gap = (grad - reference.grad).abs().max().item()
    assert gap < 1e-9, (
        f"the gradient with respect to the logits differs from that of the response tokens' "
        f"summed log-probabilities by {gap:.3g}; positions that received gradient but should "
        f"not: {(grad.abs().sum(-1) > 0) & (reference.grad.abs().sum(-1) == 0)}"
    )


# -- DPO -------------------------------------------------------------------------------------


@pytest.mark.points(3)
def test_dpo_loss_by_hand(impl):
    """Catches leaving out the reference model, the sign of the margin, beta outside the
    sigmoid, and a sum over the batch instead of the mean."""
    ex = impl("ch10_finetuning")
    pc, pr = [-3.0, -5.0, -1.0], [-4.0, -2.0, -1.5]
    rc, rr = [-3.5, -4.0, -2.0], [-3.0, -2.5, -0.5]
    beta = 0.5
    margins = [beta * ((a - c) - (b - d)) for a, b, c, d in zip(pc, pr, rc, rr, strict=True)]
    expected = sum(math.log1p(math.exp(-m)) for m in margins) / 3
    as_tensors = [torch.tensor(v, dtype=torch.float64) for v in (pc, pr, rc, rr)]
    loss = ex.dpo_loss(*as_tensors, beta)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, abs=1e-9)
    same = ex.dpo_loss(as_tensors[0], as_tensors[1], as_tensors[0], as_tensors[1], beta)
    assert same.item() == pytest.approx(math.log(2), abs=1e-9)


@pytest.mark.points(2)
def test_dpo_loss_is_finite_for_large_margins(impl):
    """Catches -log(sigmoid(z)): in float32 sigmoid(-150) rounds to 0 and the loss to infinity
    (log-sigmoid computed directly stays exact), and its gradient vanishing at large margins."""
    ex = impl("ch10_finetuning")
    policy_chosen = torch.tensor([-400.0], requires_grad=True)
    # The backward pass runs where the student's graph lives: in the worker.
    loss, (grad,) = ex.run_helper(
        in_worker.call_and_backward,
        "dpo_loss",
        policy_chosen,
        torch.tensor([-100.0]),
        torch.tensor([0.0]),
        torch.tensor([0.0]),
        0.5,
    )
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(150.0, rel=1e-6)
    assert grad is not None, "no gradient reached policy_chosen_logps"
    assert grad.item() == pytest.approx(-0.5, rel=1e-6)  # -beta: the sigmoid is 1
    small = ex.dpo_loss(
        torch.tensor([0.0]), torch.tensor([-200.0]), torch.tensor([0.0]), torch.tensor([0.0]), 1.0
    )
    assert small.item() == pytest.approx(0.0, abs=1e-30)  # log1p(e^-200) ~ 1.4e-87
