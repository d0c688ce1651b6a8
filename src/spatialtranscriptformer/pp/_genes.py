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
    flavor: str = "variance",
) -> list[str]:
    """Top ``n_top`` most variable genes across ``tables``, among the genes measured in every slide.

    Two conventions:

    - ``"variance"`` (default): genes ranked by the variance of their ``log1p`` raw counts over all spots
      of the given slides (the targets of the HEST-Benchmark probe are log1p raw counts; Jaume et al.
      2024). Simple, deterministic and favours genes whose measured maps vary most.
    - ``"seurat"``: scanpy's dispersion-based selection (:func:`scanpy.pp.highly_variable_genes` with
      ``flavor="seurat"``: normalised dispersion within bins of mean expression) on log1p-CP10k
      expression of all spots of the given slides pooled. HEST-Benchmark's released gene panels were
      chosen with scanpy's dispersion-based highly-variable-gene selection over all samples; the two
      conventions share few of their top-50 genes on her2st.

    Pass only training slides: choosing genes on held-out slides leaks information.

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
    flavor
        ``"variance"`` or ``"seurat"``.

    Returns
    -------
    Gene names, most variable first.
    """
    from .._validate import check_counts, check_table

    if flavor not in ("variance", "seurat"):
        raise ValueError(f"flavor must be 'variance' or 'seurat', got {flavor!r}.")
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
    if n_top > len(common):
        raise ValueError(f"Asked for {n_top} genes but the slides share only {len(common)}.")
    if flavor == "seurat":
        return _seurat_hvg(tables, common, n_top, layer=layer)
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
    order = np.argsort(-var, kind="stable")[:n_top]
    return common[order].tolist()


def _seurat_hvg(tables, common: pd.Index, n_top: int, *, layer: str | None) -> list[str]:
    """Scanpy's ``flavor="seurat"`` selection on pooled log1p-CP10k expression of ``common`` genes."""
    import warnings

    import anndata as ad
    import scanpy as sc

    from .._validate import check_counts

    blocks = []
    for i, t in enumerate(tables):
        x = layer_matrix(t, layer)
        check_counts(x, element=f"slide {i} layer {layer!r}" if layer else f"slide {i} X",
                     hint="Pass layer= with the raw counts (e.g. layer='counts').")
        x = sp.csr_matrix(x, dtype=np.float64)
        tot = np.asarray(x.sum(axis=1)).ravel()
        x = sp.diags(1e4 / np.maximum(tot, 1e-12)) @ x[:, t.var_names.get_indexer(common)]
        blocks.append(x.log1p())
    pooled = ad.AnnData(sp.vstack(blocks).tocsr(), var=pd.DataFrame(index=common))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hv = sc.pp.highly_variable_genes(pooled, n_top_genes=n_top, flavor="seurat", inplace=False)
    disp = hv["dispersions_norm"].to_numpy(dtype=np.float64)
    disp = np.where(np.isfinite(disp), disp, -np.inf)
    order = np.argsort(-disp, kind="stable")[:n_top]
    return common[order].tolist()
