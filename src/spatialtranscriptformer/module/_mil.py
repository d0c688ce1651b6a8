"""Gated attention-based multiple-instance learning (slide-level).

Reference
---------
Ilse M., Tomczak J. M., Welling M., "Attention-based Deep Multiple Instance Learning",
*ICML* (2018), gated attention (eq. 9).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .._docs import doc_params
from ._baseline_head import OutputHead, check_loss_level, doc_dims, doc_slide_head, masked_softmax


@doc_params(dims=doc_dims, slide_head=doc_slide_head)
class AttentionMIL(nn.Module):
    """Gated attention MIL: one expression vector per slide.

    Spot embeddings are projected (``h_k = ReLU(W x_k)``), scored with the gated attention of
    Ilse et al. (2018), ``a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k)))``, and pooled as
    ``z = sum_k a_k h_k``; a linear head maps ``z`` to the genes. Padded spots get ``-inf``
    scores (zero weight), so padding never changes a slide's prediction.

    Parameters
    ----------
    {dims}
    hidden
        Width L of the instance projection (paper: 500).
    attention_dim
        Width D of the attention network (paper: 128).
    dropout
        Dropout on the projected instances.
    {slide_head}
    """

    def __init__(
        self,
        input_dim: int,
        num_genes: int,
        *,
        hidden: int = 512,
        attention_dim: int = 128,
        dropout: float = 0.1,
        loss: str = "mse",
        level: str = "slide",
        gene_means: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        check_loss_level("attention_mil", loss, level, ("slide",))
        self.level = level
        self.loss = loss
        self.project = nn.Sequential(nn.Linear(input_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.att_v = nn.Linear(hidden, attention_dim)
        self.att_u = nn.Linear(hidden, attention_dim)
        self.att_w = nn.Linear(attention_dim, 1)
        self.head = OutputHead(hidden, num_genes, loss=loss, gene_means=gene_means)

    def forward(
        self, x: torch.Tensor, coords: torch.Tensor, mask: torch.Tensor, *, return_attention: bool = False
    ) -> dict[str, torch.Tensor]:
        """Pool the real spots of each slide and predict (B, G); ``coords`` is unused."""
        mask = mask.bool()
        if not mask.any(dim=1).all():
            raise ValueError("Every slide in the batch needs at least one real spot (mask all False).")
        h = self.project(x)  # (B, S, L)
        scores = self.att_w(torch.tanh(self.att_v(h)) * torch.sigmoid(self.att_u(h))).squeeze(-1)  # (B, S)
        a = masked_softmax(scores, mask, dim=1)
        z = torch.einsum("bs,bsl->bl", a, h)
        out = self.head(z)
        if return_attention:
            out["attention"] = [a]
        return out
