"""Gene selection: top-k most variable genes (HEST-Benchmark convention) across slides."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import _constants as K

if TYPE_CHECKING:
    from anndata import AnnData


def layer_matrix(adata: AnnData, layer: str | None):
    """``adata.layers[layer]`` (``X`` for ``None``) with a clear error when missing."""
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise KeyError(f"Layer {layer!r} not found; available layers: {list(adata.layers.keys()) or 'none'}.")
    return adata.layers[layer]


def _col_sums(x, *, square: bool = False) -> np.ndarray:
    if sp.issparse(x):
        x = x.multiply(x) if square else x
        return np.asarray(x.sum(axis=0)).ravel()
    x = np.asarray(x, dtype=np.float64)
    return ((x * x) if square else x).sum(axis=0)


def select_top_genes(
    tables: Sequence[AnnData],
    n_top: int,
    *,
    layer: str | None = K.COUNTS_LAYER,
    exclude_prefixes: Sequence[str] = (),
) -> list[str]:
    """Top ``n_top`` most variable genes across ``tables`` (HEST-Benchmark convention).

    Following the HEST-Benchmark protocol (Jaume et al. 2024), genes are ranked by the variance of their
    ``log1p`` counts over all spots of the given slides, among the genes measured in every slide. Pass
    only the training slides: choosing genes on held-out slides leaks information.

    Parameters
    ----------
    tables
        One :class:`~anndata.AnnData` per slide.
    n_top
        Number of genes to return.
    layer
        Layer with raw counts (``None`` for ``X``).
    exclude_prefixes
        Gene-name prefixes to skip (e.g. ``("MT-", "RPL", "RPS")``).

    Returns
    -------
    Gene names, most variable first.
    """
    from .._validate import check_counts, check_table

    if n_top < 1:
        raise ValueError(f"n_top must be >= 1, got {n_top}.")
    for i, t in enumerate(tables):
        check_table(t, element=f"slide {i}")
    common = pd.Index(tables[0].var_names)
    for t in tables[1:]:
        common = common.intersection(t.var_names, sort=False)
    if exclude_prefixes:
        common = common[~common.str.startswith(tuple(exclude_prefixes))]
    if len(common) == 0:
        raise ValueError("The slides share no gene names.")
    n, s1, s2 = 0, np.zeros(len(common)), np.zeros(len(common))
    for i, t in enumerate(tables):
        x = layer_matrix(t, layer)
        idx = t.var_names.get_indexer(common)
        x = x[:, idx]
        check_counts(x, element=f"slide {i} layer {layer!r}" if layer else f"slide {i} X",
                     hint="Pass layer= with the raw counts (e.g. layer='counts').")
        x = x.log1p() if sp.issparse(x) else np.log1p(np.asarray(x, dtype=np.float64))
        n += x.shape[0]
        s1 += _col_sums(x)
        s2 += _col_sums(x, square=True)
    var = s2 / n - (s1 / n) ** 2
    if n_top > len(common):
        raise ValueError(f"Asked for {n_top} genes but the slides share only {len(common)}.")
    order = np.argsort(-var, kind="stable")[:n_top]
    return common[order].tolist()
