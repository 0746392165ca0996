"""Muon: the momentum of each hidden weight matrix, orthogonalised by a Newton-Schulz iteration,
is the step; AdamW moves everything else (embeddings, norms, biases, an untied output layer).
Both live in one optimizer, so one schedule, one clipping and one checkpoint cover them
(chapter 05).

AdamW scales each coordinate of the gradient by its own history. Muon replaces a matrix's
update by the nearest semi-orthogonal matrix (all singular values about 1): every direction the
gradient spans moves by the same amount, including the many weak ones that a small batch's
gradient hardly pushes. The iteration costs a few matmuls per matrix and step, which is real
time for a small model on a small batch (`benchmarks/peers.py` prints it)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from minillm.errors import InputError

# A quintic x -> a x + b x^3 + c x^5 on the singular values, whose coefficients trade exactness
# (values land in about [0.7, 1.2], not on 1) for reaching that band in 5 steps from near 0.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def orthogonalize(matrix: Tensor, steps: int = NS_STEPS) -> Tensor:
    """About U Vᵀ for `matrix` = U S Vᵀ: the same singular vectors, every singular value pushed
    into about [0.7, 1.2]. Computed in float32 (the CPU has no fast bfloat16 matmul)."""
    if matrix.dim() != 2:
        raise InputError(
            f"orthogonalize takes a matrix, got a tensor of shape {tuple(matrix.shape)}"
        )
    x = matrix.float()
    x = x / (x.norm() + 1e-7)  # the Frobenius norm bounds the largest singular value: all <= 1
    wide = x.shape[0] <= x.shape[1]
    if not wide:  # x xᵀ on the short side: the smaller Gram matrix
        x = x.T
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).to(matrix.dtype)


class Muon(torch.optim.Optimizer):
    """Groups with `"muon": True` (2-D weights only) take Muon's step: Nesterov momentum,
    orthogonalised, times sqrt(max(1, rows / cols)), after decoupled weight decay. The other
    groups take AdamW's step, as `torch.optim.AdamW` computes it."""

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float,
        *,
        momentum: float = 0.95,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        defaults = dict(
            lr=lr, momentum=momentum, betas=betas, eps=eps, weight_decay=weight_decay, muon=False
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            flat = [tuple(p.shape) for p in group["params"] if p.dim() != 2]
            if group["muon"] and flat:
                raise InputError(f"Muon orthogonalises matrices; this group holds shapes {flat}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            lr, decay = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.mul_(1 - lr * decay)
                if group["muon"]:
                    self._muon_update(p, lr, group["momentum"])
                else:
                    self._adamw_update(p, lr, *group["betas"], group["eps"])
        return loss

    def _muon_update(self, p: Tensor, lr: float, momentum: float) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buffer = state["momentum_buffer"]
        buffer.lerp_(p.grad, 1 - momentum)
        nesterov = p.grad.lerp(buffer, momentum)  # look one momentum step ahead
        rows, cols = p.shape
        p.add_(orthogonalize(nesterov), alpha=-lr * math.sqrt(max(1.0, rows / cols)))

    def _adamw_update(self, p: Tensor, lr: float, beta1: float, beta2: float, eps: float) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = state["step"].item()
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**t)).add_(eps)
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**t))
