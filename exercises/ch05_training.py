"""Chapter 05 exercises: the loss and the pieces of a training step, from torch primitives.

Replace each `raise NotImplementedError` with your code; `minillm grade ch05` grades them (the
tests are in tests/exercises/test_ch05_training.py). Use torch operations, not `minillm.train` or
`torch.nn.functional`'s losses: building these yourself is the point.

Conventions as in the chapter: logits are `(..., V)` scores over a vocabulary of V tokens and
targets `(...)` the ids of the true next tokens; a target equal to `ignore_index` (-100, torch's
value) is left out of the loss. Losses are in nats (natural logarithm), averaged over the targets
that count.
"""

from __future__ import annotations

import math  # noqa: F401  (you will want it)
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

IGNORE_INDEX = -100


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean cross-entropy -log softmax(logits)[target] over the targets that count.

    log softmax(z)_y = z_y - log sum_j exp(z_j), and log sum_j exp(z_j) = m + log sum_j exp(z_j - m)
    for m = max_j z_j: after subtracting the maximum the largest exponent is exp(0) = 1, so nothing
    overflows however large the logits are.

    Args:
        logits: `(..., V)`, e.g. `(batch, seq, vocab)`, floating point.
        targets: `(...)` integer ids in [0, V), or `ignore_index` where nothing is to be learned
            (at least one target counts).
        ignore_index: targets with this value add nothing to the sum and are not counted in the
            mean.

    Returns:
        A 0-d tensor: the sum of -log p(target) over the counted positions, divided by how many
        positions count.

    Example:
        >>> logits = torch.tensor([[[0.0, 0.0, math.log(2.0)], [9.0, 0.0, 0.0]]])  # (1, 2, 3)
        >>> cross_entropy(logits, torch.tensor([[2, -100]]))  # p(2) = 2 / (1 + 1 + 2) = 0.5
        tensor(0.6931)

    Off limits: `torch.nn.functional.cross_entropy`, `torch.nn.functional.nll_loss`,
    `torch.nn.functional.log_softmax`, `torch.log_softmax`, `torch.Tensor.log_softmax` (this
    exercise asks you to write it; a call fails the test).
    """
    raise NotImplementedError


def perplexity(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> float:
    """exp(mean cross-entropy): the number of tokens the model is, on average, choosing among.

    It is the geometric mean of 1/p(target) over the counted positions (not the arithmetic mean),
    and it is e to the loss in nats, not 2 to it. A model that gives every one of V tokens the
    same probability has perplexity exactly V.

    Args:
        logits: `(..., V)`.
        targets: `(...)`, with `ignore_index` where nothing counts.

    Returns:
        A float >= 1.

    Example (all logits equal: uniform over 65 tokens):
        >>> round(perplexity(torch.zeros(2, 3, 65), torch.zeros(2, 3, dtype=torch.long)), 3)
        65.0

    Off limits: `torch.nn.functional.cross_entropy`, `torch.nn.functional.nll_loss` (this exercise
    asks you to write it; a call fails the test).
    """
    raise NotImplementedError


def label_smoothed_cross_entropy(
    logits: Tensor, targets: Tensor, smoothing: float, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Cross-entropy against a smoothed target distribution, as `F.cross_entropy(...,
    label_smoothing=smoothing)` computes it.

    The target is no longer one-hot: every one of the V tokens (the true one included) gets
    smoothing / V, and the true token gets 1 - smoothing on top. The loss is the cross-entropy
    -sum_j q_j log p_j against that q, which equals

        (1 - smoothing) * (-log p_target) + smoothing * mean_j(-log p_j).

    Args:
        logits: `(..., V)`.
        targets: `(...)`, with `ignore_index` where nothing counts.
        smoothing: in [0, 1); 0 gives the plain cross-entropy.

    Returns:
        A 0-d tensor, the mean over the counted positions.

    Example:
        >>> logits = torch.tensor([[0.0, 0.0, math.log(2.0)]])  # p = [0.25, 0.25, 0.5]
        >>> label_smoothed_cross_entropy(logits, torch.tensor([2]), 0.3)  # 0.7*0.693 + 0.3*1.155
        tensor(0.8318)

    Off limits: `torch.nn.functional.cross_entropy`, `torch.nn.functional.nll_loss` (this exercise
    asks you to write it; a call fails the test).
    """
    raise NotImplementedError


def warmup_cosine_lr(
    step: int, *, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int
) -> float:
    """The learning rate for optimizer step `step` (0 for the first update): linear warm-up, then
    a half cosine down to `min_lr`.

    - Warm-up, step < warmup_steps: max_lr * (step + 1) / warmup_steps, so the first update
      already moves (never lr 0) and step warmup_steps - 1 uses max_lr.
    - Decay, warmup_steps <= step <= max_steps: with progress = (step - warmup_steps) /
      (max_steps - warmup_steps) going from 0 to 1, min_lr + (max_lr - min_lr) * (1 +
      cos(pi * progress)) / 2, which is max_lr at the start and exactly min_lr at max_steps.
    - After max_steps: min_lr (the cosine must not climb back up).

    Example:
        >>> [round(warmup_cosine_lr(s, max_lr=1.0, min_lr=0.1, warmup_steps=2, max_steps=4), 3)
        ...  for s in range(6)]
        [0.5, 1.0, 1.0, 0.55, 0.1, 0.1]

    Off limits: `torch.optim.lr_scheduler.LRScheduler`, `minillm.engines.common.lr_at`,
    `minillm.engines.common.lr_schedule` (this exercise asks you to write it; a call fails the
    test).
    """
    raise NotImplementedError


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> float:
    """Scale all gradients together, in place, so that their global L2 norm is at most max_norm.

    The global norm is one number for the whole model: the square root of the sum of the squares
    of every entry of every gradient. When it exceeds `max_norm`, every gradient is multiplied by
    the same factor max_norm / (norm + 1e-6) (the 1e-6 as in torch), which keeps the update's
    direction and shortens it; otherwise nothing changes. Parameters whose `.grad` is None are
    skipped.

    Returns:
        The global norm before clipping, as a float (what training logs show as grad_norm).

    Example:
        >>> a, b = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
        >>> a.grad, b.grad = torch.tensor([3.0]), torch.tensor([4.0])
        >>> clip_grad_norm([a, b], max_norm=1.0), a.grad, b.grad  # norm 5: both scaled by 1/5
        (5.0, tensor([0.6000]), tensor([0.8000]))

    Off limits: `torch.nn.utils.clip_grad_norm_`, `torch.nn.utils.get_total_norm`,
    `torch.nn.utils.clip_grads_with_norm_` (this exercise asks you to write it; a call fails the
    test).
    """
    raise NotImplementedError


def accumulate_gradients(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    micro_batches: Sequence[tuple[Tensor, Tensor]],
) -> float:
    """Fill every parameter's `.grad` with the gradient of the whole batch, one micro-batch at a
    time, and return the whole batch's loss.

    Each micro-batch `(x, y)` gives `loss_fn(model(x), y)`, a mean over its own examples. With n
    micro-batches of equal size the big batch's mean loss is the average of the n losses, so each
    backward pass gets its loss divided by n; `.grad` adds up across backward passes. Gradients
    left in the model from before are discarded first.

    Args:
        model: any module.
        loss_fn: `(model output, y) -> 0-d mean loss`.
        micro_batches: n pairs `(x, y)`, all with the same number of examples.

    Returns:
        The mean loss of the whole batch (the average of the micro-batch losses), as a float.

    Example:
        >>> model = nn.Linear(3, 1)
        >>> batches = [(torch.randn(4, 3), torch.randn(4, 1)) for _ in range(2)]
        >>> loss = accumulate_gradients(model, nn.functional.mse_loss, batches)
        >>> # model.weight.grad now equals the gradient of mse_loss on all 8 examples at once
    """
    raise NotImplementedError


@torch.no_grad()
def adamw_step(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    *,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> None:
    """One AdamW update of one parameter tensor, in place, as `torch.optim.AdamW` makes it.

        param      <- param * (1 - lr * weight_decay)   decoupled: the decay never enters m or v
        exp_avg    <- beta1 * exp_avg + (1 - beta1) * grad          m, running mean of grad
        exp_avg_sq <- beta2 * exp_avg_sq + (1 - beta2) * grad**2    v, running mean of grad**2
        m_hat = exp_avg / (1 - beta1**step),  v_hat = exp_avg_sq / (1 - beta2**step)
        param      <- param - lr * m_hat / (sqrt(v_hat) + eps)

    The moments start at zero, so early on they are biased towards zero; dividing by
    1 - beta**step removes that bias (at step 1, m_hat is exactly grad).

    Args:
        param, grad, exp_avg, exp_avg_sq: tensors of one shape; param, exp_avg and exp_avg_sq
            are updated in place.
        step: the number of this update, 1 for the first.
        lr, beta1, beta2, eps, weight_decay: torch's names and defaults.

    Example:
        >>> p, m, v = torch.tensor([1.0, -1.0]), torch.zeros(2), torch.zeros(2)
        >>> adamw_step(p, torch.tensor([0.5, 0.5]), m, v, 1, lr=0.1, weight_decay=0.0)
        >>> p  # the first step moves each weight by lr against the sign of its gradient
        tensor([ 0.9000, -1.1000])

    Off limits: `torch.optim.AdamW.step`, `torch.optim.Adam.step`, `torch.optim.adamw.adamw` (this
    exercise asks you to write it; a call fails the test).
    """
    raise NotImplementedError


def decay_param_names(model: nn.Module) -> tuple[set[str], set[str]]:
    """Split the parameter names of `model` into those that get weight decay and those that do not.

    Decay shrinks weights towards zero; it is meant for the weight matrices of `nn.Linear` layers.
    Biases, LayerNorm weights and biases and embedding tables get none: shrinking a LayerNorm
    gain or a rare token's embedding towards zero only hurts. A Linear weight that is also an
    embedding table (a tied output layer, like GPT's lm_head sharing tok_emb's matrix) counts as an
    embedding. Names are those of `model.named_parameters()`, which lists a shared tensor once,
    under its first name.

    Returns:
        `(decay, no_decay)`: two disjoint sets that together hold every name.

    Example:
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 2))
        >>> decay, no_decay = decay_param_names(model)
        >>> sorted(decay), sorted(no_decay)
        (['2.weight'], ['0.weight', '1.bias', '1.weight', '2.bias'])

    Off limits: `minillm.model.GPT.param_groups` (this exercise asks you to write it; a call fails
    the test).
    """
    raise NotImplementedError


def top_k_probs(logits: Tensor, k: int | None = None, temperature: float = 1.0) -> Tensor:
    """The distribution the next token is sampled from: softmax(logits / temperature), kept on
    each row's k largest logits and renormalised there.

    A temperature below 1 sharpens the distribution, above 1 flattens it. Tokens outside the top k
    get probability exactly 0 (their logits become -inf before the softmax); logits tied with the
    k-th largest are kept.

    Args:
        logits: `(..., V)`.
        k: in [1, V], or None to keep every token.
        temperature: > 0.

    Returns:
        `(..., V)` probabilities; each row sums to 1.

    Example:
        >>> top_k_probs(torch.tensor([2.0, 1.0, 0.0, -1.0]), k=2)  # e/(e+1), 1/(e+1)
        tensor([0.7311, 0.2689, 0.0000, 0.0000])
    """
    raise NotImplementedError


def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> float:
    """The mean loss of `model` over `batches`, measured as an evaluation must be.

    - In evaluation mode (`model.eval()`): dropout off, so the same batches give the same number
      every time.
    - Without building a graph (`torch.no_grad()`): nothing is backpropagated, so keeping every
      activation for a backward pass would only waste memory.
    - Afterwards the model is back in the mode it was in before the call: a training loop that
      evaluates every few hundred steps must go on training with dropout on (and a model that was
      in eval mode stays there).

    Args:
        model: called as `model(x, y)`, returning `(logits, loss)` as the course GPT does, with
            `loss` a 0-d mean over the batch.
        batches: pairs `(x, y)` of one size.

    Returns:
        The mean of the batches' losses, as a float.

    Off limits: `minillm.train.Trainer.evaluate` (this exercise asks you to write it; a call fails
    the test).
    """
    raise NotImplementedError


def save_checkpoint(
    path: str, model: nn.Module, optimizer: torch.optim.Optimizer, step: int
) -> None:
    """Write to the file `path` everything a run needs to continue exactly where it is: the
    model's weights, the optimizer's state (AdamW's m and v and its step counts; the learning rate
    of every group) and the number of optimizer steps taken.

    Resuming from the weights alone is not resuming: AdamW's moments start again at zero and its
    bias correction at step 1, and the next updates differ.

    Off limits: `minillm.checkpoint.save`, `minillm.train.Trainer.save_checkpoint` (this exercise
    asks you to write it; a call fails the test).
    """
    raise NotImplementedError


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Restore what `save_checkpoint` wrote into `model` and `optimizer` (built afresh, as a new
    process builds them) and return the step to continue from.

    After `load_checkpoint`, training on the same batches gives the same weights, bit for bit on
    a CPU, as a run that was never interrupted.

    Off limits: `minillm.checkpoint.load_weights`, `minillm.checkpoint.load_state` (this exercise
    asks you to write it; a call fails the test).
    """
    raise NotImplementedError


def gpt_flops_per_token(config) -> int:
    """FLOPs of one training token (forward and backward) of `GPT(config)`, counting matrix
    multiplies only, 2 FLOPs per multiply-add.

    - Forward: every weight of a matrix multiply is one multiply-add per token: q_proj, k_proj,
      v_proj, o_proj (C x C each), up_proj and down_proj (C x 4C each) in every block, and lm_head
      (C x V; it multiplies every position even when it shares the token table's matrix). Then
      attention's two matmuls without weights: q k^T and probabilities @ v, each 2 T C FLOPs per
      token per layer for a context of T = config.block_size (the full T x T scores are computed).
    - Backward: twice the forward (the input's and the weight's gradient are one matmul each).

    Embedding lookups, biases, LayerNorms, GELU and softmax are not counted.

    Example: GPTConfig() (C = 128, 4 layers, V = 65, T = 64) gives 5,161,728.

    Off limits: `minillm.compute.flops_per_token`, `minillm.compute.matmul_weights` (this exercise
    asks you to write it; a call fails the test).
    """
    raise NotImplementedError
