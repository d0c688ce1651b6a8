"""Output head shared by the baselines: features -> expression (and distribution parameters)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._losses import get_loss

LEVELS = ("spot", "slide")

doc_dims = """\
input_dim
    Embedding width F.
num_genes
    Number of genes G."""
"""Docstring text of the two leading arguments of every baseline (substituted with ``doc_params``)."""

doc_slide_head = """\
loss
    Loss name; decides the output parameters.
level
    Must be ``"slide"`` (the model has no per-spot output).
gene_means
    Optional (G,) target means to initialise the read-out bias."""
"""Docstring text of ``loss``, ``level`` and ``gene_means`` for the slide-level-only baselines."""


def check_loss_level(name: str, loss: str, level: str, levels: tuple[str, ...]) -> None:
    """Raise a clear ``ValueError`` for an unknown loss or an unsupported level of model ``name``."""
    try:
        get_loss(loss)
    except ValueError as err:
        raise ValueError(f"Model {name!r}: {err}") from None
    if level not in LEVELS:
        raise ValueError(f"Unknown level {level!r} for model {name!r}; choose 'spot' or 'slide'.")
    if level not in levels:
        only = " and ".join(repr(lv) for lv in levels)
        raise ValueError(
            f"Model {name!r} predicts at level {only} only: it cannot give per-spot ({level!r}) predictions. "
            f"Use level={levels[0]!r}, or a dense model (e.g. 'stf', 'he2rna', 'ridge') for per-spot output."
        )


def _inv_softplus(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp_min(1e-4)
    return x + torch.log(-torch.expm1(-x))


class OutputHead(nn.Module):
    """Linear read-out to genes in target space, with the parameters the loss needs.

    The loss's head (:mod:`~spatialtranscriptformer.module._losses`) decides the outputs: ``"expr"``
    (``mse``/``pcc``/``mse_pcc``): ``expr`` is linear; ``"rate"`` (``poisson``): ``rate = softplus(.)`` and
    ``expr = rate``; ``"zinb"``: ``mu = softplus(.)``, ``theta = softplus(.) + 1e-4``,
    ``pi = sigmoid(.)`` and ``expr = (1 - pi) * mu``.

    Parameters
    ----------
    in_dim
        Feature width.
    num_genes
        Number of genes.
    loss
        Loss name (decides the outputs).
    gene_means
        Optional (G,) mean of the targets; initialises the bias so training starts at the mean
        (HE2RNA's ``bias_init``).
    """

    def __init__(
        self, in_dim: int, num_genes: int, *, loss: str, gene_means: np.ndarray | None = None
    ) -> None:
        super().__init__()
        self.loss, self.head = loss, get_loss(loss).head
        self.expr = nn.Linear(in_dim, num_genes)
        if self.head == "zinb":
            self.theta = nn.Linear(in_dim, num_genes)
            self.pi = nn.Linear(in_dim, num_genes)
        if gene_means is not None:
            m = torch.as_tensor(np.asarray(gene_means, dtype=np.float32))
            if m.shape != (num_genes,):
                raise ValueError(f"gene_means must have shape ({num_genes},), got {tuple(m.shape)}.")
            if not torch.isfinite(m).all():
                raise ValueError("gene_means has NaN/inf values.")
            with torch.no_grad():
                self.expr.bias.copy_(m if self.head == "expr" else _inv_softplus(m))

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """Map features (..., D) to a dict of (..., G) tensors."""
        z = self.expr(h)
        if self.head == "rate":
            rate = F.softplus(z)
            return {"expr": rate, "rate": rate}
        if self.head == "zinb":
            mu = F.softplus(z)
            theta = F.softplus(self.theta(h)) + 1e-4
            pi = torch.sigmoid(self.pi(h))
            return {"expr": (1 - pi) * mu, "mu": mu, "theta": theta, "pi": pi}
        return {"expr": z}


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim`` where ``mask`` False gets exactly zero weight (rows with no True -> 0)."""
    scores = scores.masked_fill(~mask, float("-inf"))
    w = torch.softmax(scores, dim=dim)
    return torch.nan_to_num(w, nan=0.0)
