"""Optimisers over stacked networks: K networks' parameters as the rows of one tensor ``[K, P]``, each
row with its own learning rate.

Per row the arithmetic is exactly that of ``torch.optim.SGD`` (momentum, dampening 0, weight decay,
Nesterov) and ``torch.optim.Adam``; ``tests/test_sweep.py`` checks both against them. They exist because
one update of the whole stack is a handful of element-wise kernels, and because a process that builds no
``torch.optim`` optimiser never imports ``torch._dynamo`` (about 3 s of an evaluation process's start-up on 2 cores).
"""

from __future__ import annotations

import math

import torch


class BatchedSGD:
    """SGD with momentum for K networks, learning rates ``lrs`` (one per network)."""

    def __init__(self, lrs: list[float], n_params: int, momentum: float, weight_decay: float, nesterov: bool):
        self.lr = torch.tensor(lrs).unsqueeze(1)  # [K, 1]
        self.momentum, self.weight_decay, self.nesterov = momentum, weight_decay, nesterov
        self.momentum_buf = torch.zeros(len(lrs), n_params)
        self.steps = 0

    @torch.no_grad()
    def step(self, theta: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor | float = 1.0) -> None:
        """One update of ``theta [K, P]`` with the learning rates times ``scale`` (a schedule, or a mask of
        the networks still training). ``grad`` is used as scratch space."""
        d_p = grad.add_(theta, alpha=self.weight_decay)
        if self.steps == 0:
            self.momentum_buf.copy_(d_p)
        else:
            self.momentum_buf.mul_(self.momentum).add_(d_p)
        if self.nesterov:
            d_p.add_(self.momentum_buf, alpha=self.momentum)
        else:
            d_p = self.momentum_buf
        theta.addcmul_(d_p, self.lr * scale, value=-1.0)
        self.steps += 1


class BatchedAdam:
    """Adam for K networks shaped like ``params [K, P]``, learning rates ``lrs`` (one per network)."""

    def __init__(self, params: torch.Tensor, lrs: list[float], beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        self.lr = torch.tensor(lrs).unsqueeze(1)  # [K, 1]
        self.exp_avg, self.exp_avg_sq = torch.zeros_like(params), torch.zeros_like(params)
        self.b1, self.b2, self.eps = beta1, beta2, eps
        self.steps = 0

    @torch.no_grad()
    def step(self, params: torch.Tensor, grad: torch.Tensor, scale: torch.Tensor | float = 1.0) -> None:
        """One update of ``params`` in place with the learning rates times ``scale``, as ``BatchedSGD``."""
        self.steps += 1
        b1, b2 = self.b1, self.b2
        self.exp_avg.mul_(b1).add_(grad, alpha=1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.exp_avg_sq.sqrt() / math.sqrt(1 - b2 ** self.steps)).add_(self.eps)
        params.sub_(self.lr * scale / (1 - b1 ** self.steps) * self.exp_avg / denom)

    def zero(self, mask: torch.Tensor) -> None:
        """Forget the moments of the networks in ``mask`` (diverged ones, frozen at zero)."""
        self.exp_avg[mask] = 0.0
        self.exp_avg_sq[mask] = 0.0
