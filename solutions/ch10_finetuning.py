"""Chapter 10 solutions: the arithmetic inside fine-tuning, LoRA, reward models and DPO.

The reference answers to exercises/ch10_finetuning.py, written from torch alone
(`minillm grade ch10 --impl solutions` scores full marks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from minillm.model import GPTConfig

IGNORE = -100


def sft_inputs_and_targets(
    prompt_ids: Sequence[int], response_ids: Sequence[int]
) -> tuple[list[int], list[int]]:
    ids = [*prompt_ids, *response_ids]
    targets = ids[1:]
    for i in range(len(prompt_ids) - 1):
        targets[i] = IGNORE
    return ids[:-1], targets


def pool_last_tokens(hidden: Tensor, lengths: Tensor) -> Tensor:
    return hidden[torch.arange(hidden.shape[0]), lengths - 1]


def lora_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, alpha: float
) -> Tensor:
    r = A.shape[0]
    y = x @ weight.T + (alpha / r) * (x @ A.T @ B.T)
    return y if bias is None else y + bias


def merge_lora_weight(weight: Tensor, A: Tensor, B: Tensor, alpha: float) -> Tensor:
    return weight + (alpha / A.shape[0]) * B @ A


def lora_parameter_count(config: GPTConfig, r: int, targets: Sequence[str]) -> int:
    c = config.n_embd
    shapes = {"q_proj": (c, c), "k_proj": (c, c), "v_proj": (c, c), "o_proj": (c, c)}
    shapes |= {"up_proj": (c, 4 * c), "down_proj": (4 * c, c)}
    per_block = sum(r * (fan_in + fan_out) for fan_in, fan_out in (shapes[t] for t in targets))
    return config.n_layer * per_block


def response_logprobs(
    logits: Tensor, ids: Tensor, prompt_lengths: Tensor, lengths: Tensor
) -> Tensor:
    logp = F.log_softmax(logits[:, :-1].double(), dim=-1)
    nxt = ids[:, 1:]  # the token that position t predicts
    picked = logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
    position = torch.arange(1, ids.shape[1])  # of the predicted token
    kept = (position >= prompt_lengths[:, None]) & (position < lengths[:, None])
    return (picked * kept).sum(-1).to(logits.dtype)


def reward_model_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    return -F.logsigmoid(chosen - rejected).mean()


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor,
    reference_rejected: Tensor,
    beta: float,
) -> Tensor:
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return -F.logsigmoid(beta * margin).mean()
