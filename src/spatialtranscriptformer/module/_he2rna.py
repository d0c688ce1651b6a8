"""HE2RNA: a per-tile MLP with top-k tile aggregation.

Reference
---------
Schmauch B. et al., "A deep learning model to predict RNA-Seq expression of tumours from whole
slide images", *Nature Communications* 11, 3877 (2020); public code ``owkin/HE2RNA_code``
(``model.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .._docs import doc_params
from ._baseline_head import OutputHead, check_loss_level, doc_dims
from ._losses import get_loss

HE2RNA_KS = (1, 2, 5, 10, 20, 50, 100)
"""Top-k values of the paper's configuration (``configs/config_all_genes.ini``)."""


@doc_params(dims=doc_dims)
class HE2RNA(nn.Module):
    """Per-tile multilayer perceptron with HE2RNA's top-k aggregation.

    Every spot embedding goes through the same MLP (the paper's stack of 1x1 convolutions:
    linear -> ReLU -> dropout per hidden layer, then a linear read-out), giving one prediction per
    tile (spot) and gene. The slide-level prediction of a gene is the mean of its ``k`` highest tile
    predictions over the slide's real spots. As in the original code, ``k`` is drawn at random from
    ``ks`` at every training forward pass and predictions are averaged over all ``ks`` in evaluation
    mode; ``k`` is capped at the slide's number of real spots.

    With ``level="spot"`` (default) the model is dense: ``"expr"`` is (B, S, G) per tile and
    ``"expr_slide"`` (B, G) the top-k aggregate. With ``level="slide"`` (the original bulk RNA-seq
    set-up) ``"expr"`` is the (B, G) top-k aggregate and ``"expr_spot"`` the per-tile values.

    Parameters
    ----------
    {dims}
    hidden
        Hidden widths of the per-tile MLP (the paper used ``(1024, 1024)`` on 2048-d ResNet-50
        features; the default is smaller for the small spatial data sets).
    ks
        Candidate ``k`` for the top-k aggregation.
    dropout
        Dropout after each hidden layer (paper: 0.25).
    loss
        Loss name; decides the output parameters (``"zinb"`` is not available at level "slide":
        a top-k mean of ZINB parameters is not a ZINB distribution).
    level
        ``"spot"`` or ``"slide"``.
    gene_means
        Optional (G,) target means to initialise the read-out bias (``bias_init`` in the paper).
    """

    def __init__(
        self,
        input_dim: int,
        num_genes: int,
        *,
        hidden: Sequence[int] = (256, 256),
        ks: Sequence[int] = HE2RNA_KS,
        dropout: float = 0.25,
        loss: str = "mse",
        level: str = "spot",
        gene_means: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        check_loss_level("he2rna", loss, level, ("spot", "slide"))
        if level == "slide" and get_loss(loss).head == "zinb":
            raise ValueError(
                f"Model 'he2rna' at level 'slide' does not support loss {loss!r} (a zinb head); use level 'spot'."
            )
        ks = tuple(int(k) for k in ks)
        if not ks or min(ks) < 1:
            raise ValueError(f"ks must be a non-empty list of integers >= 1, got {ks}.")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        self.level = level
        self.loss = loss
        self.ks = ks
        layers: list[nn.Module] = []
        width = input_dim
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU(), nn.Dropout(dropout)]
            width = int(h)
        self.mlp = nn.Sequential(*layers)
        self.head = OutputHead(width, num_genes, loss=loss, gene_means=gene_means)

    @staticmethod
    def topk_mean(values: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
        """Mean of the ``k`` largest values per gene over real spots: (B, S, G) -> (B, G)."""
        n_real = mask.sum(dim=1)  # (B,)
        k = min(k, values.shape[1])
        v = values.masked_fill(~mask[..., None], float("-inf"))
        top = torch.topk(v, k, dim=1, largest=True, sorted=True).values  # (B, k, G)
        keep = torch.arange(k, device=values.device)[None, :] < n_real[:, None]  # (B, k)
        top = torch.where(keep[..., None], top, torch.zeros((), dtype=top.dtype, device=top.device))
        denom = keep.sum(dim=1).clamp_min(1)[:, None].to(top.dtype)
        return top.sum(dim=1) / denom

    def aggregate(self, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Top-k aggregate: random ``k`` from ``ks`` in training, mean over ``ks`` in evaluation."""
        if self.training:
            k = self.ks[int(torch.randint(len(self.ks), (1,)).item())]
            return self.topk_mean(values, mask, k)
        return torch.stack([self.topk_mean(values, mask, k) for k in self.ks]).mean(dim=0)

    def forward(
        self, x: torch.Tensor, coords: torch.Tensor, mask: torch.Tensor, *, return_attention: bool = False
    ) -> dict[str, torch.Tensor]:
        """Predict per-tile and top-k slide-level expression (``coords`` is unused)."""
        mask = mask.bool()
        # padded rows get finite values of their own (never zeros, which would make a rate or theta
        # degenerate in the likelihood); losses and the top-k aggregate use the mask
        tiles = self.head(self.mlp(x))  # dict of (B, S, G)
        slide = self.aggregate(tiles["expr"], mask)
        if self.level == "spot":
            out = dict(tiles)
            out["expr_slide"] = slide
        else:
            out = {"expr": slide, "expr_spot": tiles["expr"]}
            if self.loss == "poisson":
                out["rate"] = slide
        if return_attention:
            out["attention"] = []
        return out
