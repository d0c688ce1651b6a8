"""Agreement statistics shared by evaluation, benchmarks and model selection.

A correlation must not hide failure: a prediction that is constant over a slide (a collapsed model)
scores r = 0, never NaN, so averaging over genes cannot drop it. Only a gene whose *measured* values are
constant on a slide has an undefined r (NaN): that is a property of the data, not of the model, and it
is reported separately.
"""

from __future__ import annotations

import numpy as np


def _constant(centred_norm: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Columns whose spread is at round-off level relative to their magnitude."""
    scale = np.maximum(1.0, np.abs(values).max(axis=0, initial=0.0)) * np.sqrt(max(len(values), 1))
    return centred_norm <= 1e-10 * scale


def constant_columns(a: np.ndarray) -> np.ndarray:
    """Boolean per column: the column is constant (up to round-off)."""
    a = np.asarray(a, dtype=np.float64)
    if len(a) == 0:
        return np.ones(a.shape[1], dtype=bool)
    return _constant(np.sqrt(((a - a.mean(0)) ** 2).sum(0)), a)


def column_pearson(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson r between matching columns: 0 where the prediction is constant, NaN where the truth is."""
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    pc, tc = pred - pred.mean(0), true - true.mean(0)
    sp, st = np.sqrt((pc**2).sum(0)), np.sqrt((tc**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (pc * tc).sum(0) / (sp * st)
    r = np.where(_constant(sp, pred), 0.0, np.clip(r, -1.0, 1.0))
    return np.where(_constant(st, true), np.nan, r)


def column_spearman(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Spearman rho between matching columns (Pearson r of average ranks; same constant rules)."""
    from scipy.stats import rankdata

    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    rp, rt = rankdata(pred, axis=0), rankdata(true, axis=0)
    r = column_pearson(rp, rt)
    return np.where(constant_columns(pred) & ~constant_columns(true), 0.0, r)


def mean_r(r: np.ndarray) -> float:
    """Mean of correlations over the defined ones (NaN only where the truth is constant); 0 if none."""
    r = np.asarray(r, dtype=np.float64)
    return float(np.nanmean(r)) if np.isfinite(r).any() else 0.0


def collapse_index(maps: np.ndarray) -> float:
    """Median over pairs of columns of |Pearson r| between them (1: all maps are one map).

    Used for predicted pathway maps: a model whose named pathway maps are one map under many names
    scores near 1; expression-derived Hallmark activities on her2st score about 0.6-0.7. Constant
    columns count as uncorrelated with everything (absolute r = 0).
    """
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim != 2 or maps.shape[1] < 2 or maps.shape[0] < 3:
        return float("nan")
    c = maps - maps.mean(0)
    n = np.sqrt((c**2).sum(0))
    ok = ~_constant(n, maps)
    c = np.where(ok, c / np.where(ok, n, 1.0), 0.0)
    r = np.abs(c.T @ c)
    iu = np.triu_indices(maps.shape[1], 1)
    return float(np.median(r[iu]))


def knn_weights(coords: np.ndarray, n_neighs: int = 6):
    """Row-standardised k-nearest-neighbour weights (CSR; self excluded).

    The graph of ``squidpy.gr.spatial_neighbors(coord_type="generic", n_neighs=k)``.
    """
    import scipy.sparse as sp
    from scipy.spatial import cKDTree

    coords = np.asarray(coords, dtype=np.float64)
    n = len(coords)
    k = min(int(n_neighs), n - 1)
    _, nn = cKDTree(coords).query(coords, k=k + 1)
    rows = np.repeat(np.arange(n), k)
    cols = nn[:, 1:].ravel()
    return sp.csr_matrix((np.full(n * k, 1.0 / k), (rows, cols)), shape=(n, n))


def morans_i(values: np.ndarray, coords: np.ndarray, *, n_neighs: int = 6) -> np.ndarray:
    """Moran's I of each column over the spots' k-nearest-neighbour graph.

    The estimator of ``squidpy.gr.spatial_autocorr(mode="moran")`` (row-standardised weights) on the
    graph of ``squidpy.gr.spatial_neighbors(coord_type="generic", n_neighs=k)`` (Palla et al., *Nature
    Methods* 2022), computed here directly (the test suite checks it against squidpy) so that evaluation
    needs neither squidpy's import time nor its console output. A constant column has I = 0.
    """
    values = np.asarray(values, dtype=np.float64)
    n, g = values.shape
    out = np.zeros(g)
    const = constant_columns(values)
    if n < 3 or const.all():
        return out
    w = knn_weights(coords, n_neighs)
    z = values[:, ~const] - values[:, ~const].mean(0)
    out[~const] = (n / w.sum()) * (z * (w @ z)).sum(0) / (z**2).sum(0)
    return out


def rank_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation between two vectors over their finite entries (0 when undefined)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    r = column_spearman(a[ok, None], b[ok, None])[0]
    return 0.0 if not np.isfinite(r) else float(r)
