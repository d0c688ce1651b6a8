"""Pathway activity targets: per-slide z-scored genes averaged over gene-set members."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import _constants as K
from .._data import copy_data, get_table, slide_ids
from .._docs import doc_copy, doc_data, doc_params, doc_table_key
from .._logging import logger
from ._gene_sets import load_gene_sets, membership_matrix
from ._genes import layer_matrix

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def zscore_by_group(expr: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Z-score each column over the rows of each group (constant columns -> 0)."""
    expr = np.asarray(expr, dtype=np.float64)
    out = np.zeros_like(expr)
    groups = np.zeros(len(expr)) if groups is None else np.asarray(groups)
    for g in pd.unique(groups):
        rows = groups == g
        x = expr[rows]
        sd = x.std(axis=0)
        out[rows] = np.divide(x - x.mean(axis=0), sd, out=np.zeros_like(x), where=sd > 0)
    return out


def pathway_scores_from_expression(
    expr: np.ndarray, membership: np.ndarray, *, groups: np.ndarray | None = None
) -> np.ndarray:
    """Pathway activity of each spot from expression (the design's auxiliary-loss targets).

    Every gene is z-scored over the spots of its slide (``groups``), then each pathway's score is the
    mean of its member genes' z-scores (not a raw sum), so lowly expressed genes get an equal vote.

    Parameters
    ----------
    expr
        Spots x genes expression (e.g. log1p-normalised).
    membership
        Genes x pathways 0/1 matrix.
    groups
        Slide label of each spot; ``None`` treats all spots as one slide.

    Returns
    -------
    Spots x pathways float32 array. Pathways without member genes are an error.
    """
    m = np.asarray(membership, dtype=np.float64)
    if m.shape[0] != np.shape(expr)[1]:
        raise ValueError(f"Membership has {m.shape[0]} genes, expression has {np.shape(expr)[1]}.")
    n = m.sum(axis=0)
    if (n == 0).any():
        raise ValueError(f"{int((n == 0).sum())} pathways have no member gene among the given genes.")
    return (zscore_by_group(expr, groups) @ m / n).astype(np.float32)


def slide_pathway_activity(
    counts,
    membership: np.ndarray,
    *,
    keep: np.ndarray | None = None,
    target_sum: float | None = 1e4,
    zscore: bool = True,
) -> np.ndarray:
    """Pathway activity of the spots of *one slide* from raw counts of all its genes (sparse-friendly).

    Counts are scaled to ``target_sum`` per spot (CP10k) and ``log1p``-transformed; every member gene is
    z-scored over the slide's QC-passed spots (``keep``); a pathway's activity is the mean z-score of its
    member genes. Spots failing QC get NaN. Equivalent to :func:`pathway_scores_from_expression` on the
    dense log1p-CP10k matrix, without densifying all genes: only the member genes' columns are touched.

    Parameters
    ----------
    counts
        ``(S, genes)`` raw counts (dense or sparse).
    membership
        ``(genes, P)`` 0/1 matrix over the same genes; every pathway needs at least one member.
    keep
        ``(S,)`` boolean QC mask (``None``: spots with any counts).
    target_sum
        Per-spot total before ``log1p`` (``None``: no scaling).
    zscore
        Z-score the genes over the slide's spots (the design); ``False``: member means of log1p-CP10k, whose
        slide means are comparable between slides (the targets of slide-level models).

    Returns
    -------
    ``(S, P)`` float32.
    """
    m = np.asarray(membership, dtype=np.float64)
    if m.shape[0] != counts.shape[1]:
        raise ValueError(f"Membership has {m.shape[0]} genes, the counts have {counts.shape[1]}.")
    n = m.sum(axis=0)
    if (n == 0).any():
        raise ValueError(f"{int((n == 0).sum())} pathways have no member gene among the given genes.")
    tot = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    keep = tot > 0 if keep is None else np.asarray(keep, dtype=bool)
    cols = np.flatnonzero(m.sum(axis=1) > 0)
    x = counts[:, cols]
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    x = np.asarray(x[keep], dtype=np.float64)
    if target_sum is not None:
        x = x * (target_sum / np.maximum(tot[keep], 1e-12))[:, None]
    x = np.log1p(x)
    out = np.full((len(tot), m.shape[1]), np.nan, dtype=np.float32)
    if keep.sum() >= 1:
        if zscore:
            sd = x.std(axis=0)
            x = np.divide(x - x.mean(axis=0), sd, out=np.zeros_like(x), where=sd > 0)
        out[keep] = (x @ m[cols] / n).astype(np.float32)
    return out


def pathway_membership(
    gene_sets: str | os.PathLike | Mapping[str, Sequence[str]],
    genes: Sequence[str],
    *,
    min_genes: int = 5,
) -> pd.DataFrame:
    """Genes x pathways 0/1 membership restricted to the gene sets with ``>= min_genes`` members among ``genes``.

    A clear ``ValueError`` says how many genes matched when no gene set qualifies.
    """
    sets = load_gene_sets(gene_sets)
    genes = pd.Index([str(g) for g in genes])
    all_members = {g for v in sets.values() for g in v}
    matched = genes.isin(list(all_members))
    if not matched.any():
        raise ValueError(
            f"None of the {len(all_members)} genes of the gene sets are in the data ({len(genes)} genes, "
            f"e.g. {genes[:3].tolist()}); are var_names gene symbols?"
        )
    m = membership_matrix(sets, genes, min_genes=0)
    n = m.sum(axis=0)
    keep = n >= min_genes
    if not keep.any():
        raise ValueError(
            f"No gene set has >= {min_genes} genes in the data ({int(matched.sum())} of {len(all_members)} "
            "gene-set genes matched); lower `min_genes` or use other gene sets."
        )
    if (~keep).any():
        logger.info("Dropped %d gene sets with < %d member genes in the data: %s", int((~keep).sum()), min_genes,
                    m.columns[~keep].tolist()[:10])
    return m.loc[:, keep]


def normalized_log1p(x, *, target_sum: float | None = 1e4) -> np.ndarray:
    """``log1p`` of counts, scaled to ``target_sum`` per spot first (CP10k) unless ``None``."""
    x = x.toarray() if sp.issparse(x) else np.asarray(x, dtype=np.float64)
    x = x.astype(np.float64)
    if target_sum is not None:
        tot = x.sum(axis=1, keepdims=True)
        x = np.divide(x * target_sum, tot, out=np.zeros_like(x), where=tot > 0)
    return np.log1p(x)


@doc_params(data=doc_data, table_key=doc_table_key, copy=doc_copy)
def pathway_activity(
    data: AnnData | SpatialData,
    *,
    gene_sets: str | os.PathLike | Mapping[str, Sequence[str]] = "hallmark",
    layer: str | None = K.COUNTS_LAYER,
    target_sum: float | None = 1e4,
    min_genes: int = 5,
    min_counts: float = 1,
    table_key: str | None = None,
    key_added: str = K.PATHWAY_KEY,
    inplace: bool = True,
    copy: bool = False,
) -> AnnData | SpatialData | pd.DataFrame | None:
    """Per-spot pathway activity targets.

    As in the SpatialTranscriptFormer design: counts of *all* measured genes are CP10k-normalised and
    ``log1p``-transformed, every gene is z-scored over the QC-passed spots of its slide, and each
    pathway's activity is the mean z-score of its member genes present in the data (a mean, not a sum,
    so lowly expressed genes get an equal vote). These are the targets of the SpatialTranscriptFormer's
    auxiliary pathway loss and what :func:`~spatialtranscriptformer.tl.evaluate` compares predicted
    pathway maps with. Default gene sets: MSigDB Hallmarks 2024.1 (Liberzon et
    al. 2015, CC BY 4.0), read with gseapy.

    Parameters
    ----------
    {data}
    gene_sets
        ``"hallmark"``, a GMT path, or a dict of set name to genes.
    layer
        Layer with raw counts (``None`` for ``X``).
    target_sum
        Per-spot total before ``log1p`` (``None``: no scaling).
    min_genes
        Gene sets with fewer member genes in the data are dropped (logged); if none remain, an error
        says how many genes matched.
    min_counts
        Spots with fewer total counts fail QC: they are left out of the z-scores and get NaN.
    {table_key}
    key_added
        ``obsm`` key of the result (default ``"pathway_activity"``).
    inplace
        Write into ``data``; ``False`` returns the DataFrame and writes nothing.
    {copy}

    Returns
    -------
    ``None`` (or a copy with ``copy=True``), writing:

    - ``table.obsm[key_added]``: spots x pathways :class:`~pandas.DataFrame`;
    - ``table.uns[key_added]``: ``{{"pathways": [...], "n_genes": {{pathway: n}}, "params": {{...}}}}``.

    With ``inplace=False`` the DataFrame is returned instead.
    """
    from .._validate import check_counts, check_number, check_table

    check_number("target_sum", target_sum, minimum=0, exclusive=True, none_ok=True)
    check_number("min_counts", min_counts, minimum=0)
    if copy:
        data = copy_data(data)
    adata = get_table(data, table_key)
    check_table(adata, element="pathway_activity")
    m = pathway_membership(gene_sets, adata.var_names.astype(str), min_genes=min_genes)
    x = layer_matrix(adata, layer)
    check_counts(x, element=f"pathway_activity: layer {layer!r}" if layer else "pathway_activity: X",
                 hint="Pass layer= with the raw counts (e.g. layer='counts').")
    tot = np.asarray(x.sum(axis=1), dtype=np.float64).ravel()
    if not np.isfinite(tot).all():
        raise ValueError("Expression contains NaN/inf values.")
    scores = np.full((adata.n_obs, m.shape[1]), np.nan, dtype=np.float32)
    groups = slide_ids(adata)
    for g in pd.unique(groups):
        rows = np.flatnonzero(groups == g)
        scores[rows] = slide_pathway_activity(x[rows], m.to_numpy(), keep=tot[rows] >= min_counts,
                                              target_sum=target_sum)
    df = pd.DataFrame(scores, index=adata.obs_names, columns=m.columns)
    if not inplace:
        return df
    adata.obsm[key_added] = df
    adata.uns[key_added] = {
        "pathways": list(m.columns),
        "n_genes": {k: int(v) for k, v in m.sum(axis=0).items()},
        "params": {"gene_sets": gene_sets if isinstance(gene_sets, str) else "custom", "layer": layer,
                   "target_sum": target_sum, "min_genes": min_genes, "min_counts": min_counts},
    }
    return data if copy else None
