"""Chapter 10 exercises: the arithmetic inside fine-tuning, LoRA, reward models and DPO.

Replace each `raise NotImplementedError` with your code; `minillm grade ch10` grades them (the
tests are in tests/exercises/test_ch10_finetuning.py). Use plain Python and torch operations, not
`minillm.finetune` or `peft`: writing these yourself is the point.

Conventions as in the chapter: a GPT reads ids[:-1] and is trained to predict ids[1:]; a target
of -100 is left out of the loss; sequences are right-padded; LoRA's update of a weight W
(out x in) is (alpha / r) * B @ A with A of shape (r, in) and B of shape (out, r).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch  # noqa: F401  (you will want it)
import torch.nn.functional as F  # noqa: F401  (you will want it)
from torch import Tensor

from minillm.model import GPTConfig

IGNORE = -100


def sft_inputs_and_targets(
    prompt_ids: Sequence[int], response_ids: Sequence[int]
) -> tuple[list[int], list[int]]:
    """Inputs and targets of one supervised fine-tuning example, as two lists of equal length.

    The model reads the whole example (prompt then response) but its last token, and at each
    position predicts the next token. Only the response is learned: every position whose next
    token is still part of the prompt gets the target -100. The position of the prompt's last
    token predicts the first response token, so it is learned.

    Example: sft_inputs_and_targets([1, 2, 3], [4, 5]) == ([1, 2, 3, 4], [-100, -100, 4, 5]).

    Off limits: `minillm.finetune.sft_tokens` (this exercise asks you to write it; a call fails the
    test).
    """
    raise NotImplementedError


def pool_last_tokens(hidden: Tensor, lengths: Tensor) -> Tensor:
    """Each sequence's hidden state at its last real token: `hidden` `(B, T, C)` holds B
    right-padded sequences, `lengths` `(B,)` how many real tokens each has. Returns `(B, C)`.

    Under causal attention the last real token is the only position that has read the whole
    sequence, which is why a classifier on a GPT reads it.

    Example: for lengths [2, 4], row 0 gives hidden[0, 1] and row 1 gives hidden[1, 3].

    Off limits: `minillm.finetune.last_token_states` (this exercise asks you to write it; a call
    fails the test).
    """
    raise NotImplementedError


def lora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, alpha: float
) -> Tensor:
    """A linear layer with a LoRA update: x W^T + b + (alpha / r) x A^T B^T.

    `x` `(..., in)`; `weight` `(out, in)` and `bias` `(out,)` or None are the frozen layer (as in
    `nn.Linear`); `A` `(r, in)` and `B` `(out, r)` are LoRA's matrices, r read from A's shape.
    Compute the update from A and B without forming the (out, in) matrix B @ A.

    Example: with B all zeros the result is exactly `torch.nn.functional.linear(x, weight, bias)`.

    Off limits: `minillm.finetune.LoRALinear` (this exercise asks you to write it; a call
    fails the test).
    """
    raise NotImplementedError


def merge_lora_weight(weight: Tensor, A: Tensor, B: Tensor, alpha: float) -> Tensor:
    """The single weight `(out, in)` that computes the same as `lora_linear` (its bias unchanged):
    the frozen weight plus the scaled update (alpha / r) B A. Do not change `weight` in place.

    Off limits: `minillm.finetune.merge_lora` (this exercise asks you to write it; a call fails the
    test).
    """
    raise NotImplementedError


def lora_parameter_count(config: GPTConfig, r: int, targets: Sequence[str]) -> int:
    """Trainable parameters when LoRA of rank `r` adapts, in every block of `GPT(config)`, the
    linear layers named in `targets`: any of "q_proj", "k_proj", "v_proj", "o_proj" (each
    C -> C, C = config.n_embd), "up_proj" (C -> 4C) and "down_proj" (4C -> C). LoRA adds no bias.

    Example: GPTConfig(n_layer=2, n_embd=8, n_head=2), r=2, targets ("q_proj", "v_proj") gives
    2 blocks x 2 layers x 2 x (8 + 8) = 128.

    Off limits: `minillm.finetune.parameter_counts`, `minillm.finetune.add_lora` (this exercise asks
    you to write it; a call fails the test).
    """
    raise NotImplementedError


def response_logprobs(
    logits: Tensor, ids: Tensor, prompt_lengths: Tensor, lengths: Tensor
) -> Tensor:
    """Each sequence's log-probability of its response: the sum over the response's tokens of
    log p(token | everything before it). `ids` `(B, T)` holds B right-padded sequences, prompt
    then response; `logits` `(B, T, V)` is what the GPT computed reading `ids`, so position t's
    logits predict token t + 1. Row b's response is `ids[b, prompt_lengths[b]:lengths[b]]`; the
    prompt and the padding count nothing. Returns `(B,)`, differentiable with respect to
    `logits` (DPO trains through it).

    Example: a row with prompt_length 2 and length 4 sums log_softmax(logits[b, 1])[ids[b, 2]]
    and log_softmax(logits[b, 2])[ids[b, 3]].

    Off limits: `minillm.finetune.sequence_logprobs` (this exercise asks you to write it; a call
    fails the test).
    """
    raise NotImplementedError


def reward_model_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """The Bradley-Terry loss of a reward model on a batch of preference pairs, averaged over
    the batch (a 0-d tensor): -log sigmoid(r_chosen - r_rejected) for each pair, `chosen` and
    `rejected` `(B,)` the rewards the model gave the pair's two answers. Each pair is compared
    with itself only, not with the other pairs of the batch. It must stay finite and exact for
    margins of hundreds.

    Example: equal rewards give log 2 = 0.6931 for every pair.

    Off limits: `minillm.finetune.reward_model_loss` (this exercise asks you to write it; a call
    fails the test).
    """
    raise NotImplementedError


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor,
    reference_rejected: Tensor,
    beta: float,
) -> Tensor:
    """DPO's loss for a batch of preference pairs, averaged over the batch (a 0-d tensor).

    Each argument `(B,)` is the summed log-probability of an answer's tokens under the model
    being trained (policy) or the frozen starting model (reference). An answer's implicit reward
    is beta * (log pi(answer) - log pi_ref(answer)); the loss of a pair is
    -log sigmoid(reward of the chosen answer - reward of the rejected one). It must stay finite
    and exact for margins of hundreds of nats.

    Example: when the policy equals the reference every pair's loss is log 2 = 0.6931.

    Off limits: `minillm.finetune.dpo_loss` (this exercise asks you to write it; a call fails the
    test).
    """
    raise NotImplementedError
