"""GradNorm loss balancing.

Chen, Badrinarayanan, Lee and Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss Balancing
in Deep Multitask Networks", ICML 2018 (Algorithm 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class GradNorm(nn.Module):
    """Learnable task weights balanced by gradient norms (Chen et al. 2018).

    With task losses ``L_i``, the weight ``W`` of the last layer shared by all tasks and task weights
    ``w_i`` (initially 1):

    - ``G_i = ||grad_W (w_i L_i)|| = w_i ||grad_W L_i||`` and ``G_avg = mean_i G_i``;
    - the inverse training rate ``L~_i = L_i / L_i(0)`` (``L_i(0)``: the loss at the first step) and the
      relative inverse training rate ``r_i = L~_i / mean_j L~_j``; a task that trains faster than the
      others (its loss fell further) has ``r_i < 1``;
    - the GradNorm loss ``L_grad = sum_i |G_i - G_avg r_i^alpha|`` with the targets ``G_avg r_i^alpha``
      held constant. Its gradient is taken with respect to the weights ``w_i`` only (never the network),
      one step of their own Adam optimiser (learning rate ``lr``) is made, and the weights are
      renormalised to sum to the number of tasks (and kept at least ``1e-3``, so that they stay positive).

    So a task whose loss falls faster than the others' gets a smaller gradient-norm target, and its weight
    goes down relative to theirs; ``alpha`` sets how strongly training rates are equalised (``alpha = 0``
    only equalises the gradient norms).

    The method needs positive losses (ratios of losses to their initial values): a loss that is negative or
    not finite, or an initial loss that is not positive, is a ``ValueError`` naming the task (for the Poisson
    likelihood use the exact negative log-likelihood, with ``log k!``).

    Parameters
    ----------
    n_tasks
        Number of losses.
    alpha
        Asymmetry (1.5 as in the 2 µm super-resolution design).
    lr
        Learning rate of the weights' own optimiser (0.025).
    names
        Task names used in error messages (default: the task indices).
    """

    def __init__(
        self, n_tasks: int, *, alpha: float = 1.5, lr: float = 0.025, names: Sequence[str] | None = None
    ) -> None:
        super().__init__()
        if n_tasks < 1:
            raise ValueError(f"n_tasks must be >= 1, got {n_tasks}.")
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}.")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}.")
        if names is not None and len(names) != n_tasks:
            raise ValueError(f"{len(names)} names for {n_tasks} tasks.")
        self.n_tasks, self.alpha, self.lr = int(n_tasks), float(alpha), float(lr)
        self.names = [str(n) for n in names] if names is not None else [str(i) for i in range(n_tasks)]
        self.weights = nn.Parameter(torch.ones(n_tasks))
        self.register_buffer("initial", torch.full((n_tasks,), float("nan")))
        self.register_buffer("last_ratio", torch.ones(n_tasks))
        self._opt: torch.optim.Optimizer | None = None

    def optimizer(self) -> torch.optim.Optimizer:
        """The weights' own optimiser (created on first use)."""
        if self._opt is None:
            self._opt = torch.optim.Adam([self.weights], lr=self.lr)
        return self._opt

    def weighted(self, losses: Sequence[torch.Tensor]) -> torch.Tensor:
        """``sum_i w_i L_i`` with the current weights (a constant copy): the loss the network minimises.

        Call it before :meth:`step`, as in Algorithm 1 of Chen et al. (the network's step at time ``t``
        uses ``w_i(t)``; GradNorm then updates the weights to ``w_i(t+1)``).
        """
        w = self.weights.detach().clone()
        return sum(w[i] * losses[i] for i in range(self.n_tasks))

    def _check(self, cur: torch.Tensor) -> None:
        bad = [i for i in range(self.n_tasks) if not torch.isfinite(cur[i]) or cur[i] < 0]
        if bad:
            vals = ", ".join(f"{self.names[i]}: {float(cur[i]):.4g}" for i in bad)
            raise ValueError(
                f"GradNorm needs finite, non-negative losses; got {vals}. (A Poisson negative log-likelihood "
                "without the log k! term is negative at coarse scales: use the exact likelihood.)"
            )

    def step(self, losses: Sequence[torch.Tensor], shared: torch.Tensor) -> torch.Tensor:
        """One GradNorm update of the weights from the current ``losses``; returns the GradNorm loss.

        Needs the losses' graph (it differentiates them with respect to ``shared`` and keeps the graph for
        the network's own backward pass). The first call records the initial losses ``L_i(0)``.
        """
        if len(losses) != self.n_tasks:
            raise ValueError(f"Expected {self.n_tasks} losses, got {len(losses)}.")
        cur = torch.stack([loss.detach().float() for loss in losses])
        self._check(cur)
        if torch.isnan(self.initial).any():
            zero = [self.names[i] for i in range(self.n_tasks) if cur[i] <= 0]
            if zero:
                raise ValueError(
                    f"GradNorm: the initial loss of task(s) {zero} is 0; training rates L_i / L_i(0) are "
                    "undefined."
                )
            self.initial.copy_(cur)
        norms = []
        for loss in losses:
            (g,) = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
            norms.append(torch.zeros((), device=cur.device) if g is None else g.detach().float().norm())
        norms = torch.stack(norms)
        gnorm = self.weights * norms  # G_i; d G_i / d w_i = ||grad_W L_i||
        ratio = cur / self.initial  # inverse training rates, >= 0
        mean = ratio.mean()
        r = ratio / mean if mean > 0 else torch.ones_like(ratio)  # every loss at 0: no preference
        self.last_ratio.copy_(r)
        target = (gnorm.mean() * r.pow(self.alpha)).detach()
        gn_loss = (gnorm - target).abs().sum()
        opt = self.optimizer()
        opt.zero_grad(set_to_none=True)
        (gw,) = torch.autograd.grad(gn_loss, self.weights)  # the weights only, never the network
        self.weights.grad = gw
        opt.step()
        with torch.no_grad():
            self.weights.clamp_(min=1e-3)
            self.weights.mul_(self.n_tasks / self.weights.sum())
        return gn_loss.detach()
