"""Baseline models registered for :func:`spatialtranscriptformer.tl.fit`.

- ``"he2rna"``: per-tile MLP with top-k aggregation (Schmauch et al. 2020), levels spot and slide;
- ``"attention_mil"``: gated attention MIL (Ilse et al. 2018), slide level only;
- ``"transmil"``: TransMIL with Nyström attention and PPEG (Shao et al. 2021), slide level only.

The HEST ridge probe (``"ridge"``, :class:`~spatialtranscriptformer.module._ridge.RidgeProbe`) is
scikit-learn based and dispatched by :func:`~spatialtranscriptformer.tl.fit` directly.
"""

from __future__ import annotations

from typing import Any

from ._he2rna import HE2RNA
from ._mil import AttentionMIL
from ._registry import register_model
from ._transmil import TransMIL

__all__ = ["HE2RNA", "AttentionMIL", "TransMIL"]


@register_model(
    "he2rna",
    levels=("spot", "slide"),
    description="HE2RNA (Schmauch et al. 2020): per-tile MLP with top-k slide aggregation",
)
def build_he2rna(input_dim: int, num_genes: int, *, level: str, loss: str, **hparams: Any) -> HE2RNA:
    """Build :class:`HE2RNA` (hparams: ``hidden``, ``ks``, ``dropout``, ``gene_means``)."""
    return HE2RNA(input_dim, num_genes, level=level, loss=loss, **hparams)


@register_model(
    "attention_mil",
    levels=("slide",),
    description="Gated attention MIL (Ilse et al. 2018): one expression vector per slide",
)
def build_attention_mil(
    input_dim: int, num_genes: int, *, level: str, loss: str, **hparams: Any
) -> AttentionMIL:
    """Build :class:`AttentionMIL` (hparams: ``hidden``, ``attention_dim``, ``dropout``, ``gene_means``)."""
    return AttentionMIL(input_dim, num_genes, level=level, loss=loss, **hparams)


@register_model(
    "transmil",
    levels=("slide",),
    description="TransMIL (Shao et al. 2021): Nystrom attention + PPEG, one expression vector per slide",
)
def build_transmil(input_dim: int, num_genes: int, *, level: str, loss: str, **hparams: Any) -> TransMIL:
    """Build :class:`TransMIL` (hparams: ``dim``, ``heads``, ``num_landmarks``, ``dropout``, ``grid_order``, ``gene_means``)."""
    return TransMIL(input_dim, num_genes, level=level, loss=loss, **hparams)
