"""GradNorm loss balancing.

Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask
Networks", ICML 2018.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class GradNorm(nn.Module):
    """Learnable task weights balanced by gradient norms.

    For task losses ``L_i`` and the weight ``W`` of the last shared layer, ``G_i = w_i ||dL_i/dW||``;
    with the relative inverse training rate ``r_i = (L_i / L_i(0)) / mean_j(L_j / L_j(0))`` the weights
    minimise ``sum_i |G_i - mean(G) r_i^alpha|`` (target held constant) with their own Adam optimiser
    (learning rate ``lr``), then are renormalised to sum to the number of tasks.

    Parameters
    ----------
    n_tasks
        Number of losses.
    alpha
        Asymmetry (1.5 as in the 2 µm super-resolution design).
    lr
        Learning rate of the weights' own optimiser (0.025).
    """

    def __init__(self, n_tasks: int, *, alpha: float = 1.5, lr: float = 0.025) -> None:
        super().__init__()
        if n_tasks < 1:
            raise ValueError(f"n_tasks must be >= 1, got {n_tasks}.")
        self.n_tasks, self.alpha, self.lr = int(n_tasks), float(alpha), float(lr)
        self.weights = nn.Parameter(torch.ones(n_tasks))
        self.register_buffer("initial", torch.full((n_tasks,), float("nan")))
        self._opt: torch.optim.Optimizer | None = None

    def optimizer(self) -> torch.optim.Optimizer:
        """The weights' own optimiser (created on first use)."""
        if self._opt is None:
            self._opt = torch.optim.Adam([self.weights], lr=self.lr)
        return self._opt

    def weighted(self, losses: Sequence[torch.Tensor]) -> torch.Tensor:
        """``sum_i w_i L_i`` with the current (detached) weights: the loss the model minimises."""
        w = self.weights.detach()
        return sum(w[i] * losses[i] for i in range(self.n_tasks))

    def step(self, losses: Sequence[torch.Tensor], shared: torch.Tensor) -> torch.Tensor:
        """One GradNorm update of the weights from the current ``losses``; returns the GradNorm loss.

        Needs the losses' graph (call before ``backward`` and keep it with ``retain_graph``).
        """
        if len(losses) != self.n_tasks:
            raise ValueError(f"Expected {self.n_tasks} losses, got {len(losses)}.")
        cur = torch.stack([loss.detach().float() for loss in losses])
        if torch.isnan(self.initial).any():
            self.initial.copy_(cur.clamp_min(1e-12))
        norms = []
        for loss in losses:
            (g,) = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
            norms.append(torch.zeros((), device=cur.device) if g is None else g.detach().float().norm())
        gnorm = self.weights * torch.stack(norms)
        ratio = cur / self.initial
        r = ratio / ratio.mean().clamp_min(1e-12)
        target = (gnorm.mean() * r.pow(self.alpha)).detach()
        gn_loss = (gnorm - target).abs().sum()
        opt = self.optimizer()
        opt.zero_grad(set_to_none=True)
        (gw,) = torch.autograd.grad(gn_loss, self.weights)
        self.weights.grad = gw
        opt.step()
        with torch.no_grad():
            self.weights.clamp_(min=1e-3)
            self.weights.mul_(self.n_tasks / self.weights.sum())
        return gn_loss.detach()
