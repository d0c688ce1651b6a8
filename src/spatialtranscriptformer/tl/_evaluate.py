"""``stf.tl.evaluate``: per-gene (and per-pathway) agreement of predictions with measured expression."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.stats import rankdata

from .. import _constants as K
from .._data import as_slide_list, get_table
from .._docs import doc_params, doc_slides, doc_table_key

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from ._superres import SuperResModel

COLUMNS = ["feature_type", "gene", "slide", "level", "pearson", "spearman", "mse", "n_spots"]


def column_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r between matching columns of ``a`` and ``b`` (NaN where either is constant)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ac, bc = a - a.mean(0), b - b.mean(0)
    den = np.sqrt((ac**2).sum(0) * (bc**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (ac * bc).sum(0) / den
    return np.where(den > 1e-12 * max(1.0, float(np.abs(den).max(initial=0))), r, np.nan)


def column_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rho between matching columns (Pearson r of average ranks)."""
    return column_pearson(rankdata(a, axis=0), rankdata(b, axis=0))


def _to_space(x: np.ndarray, space: str, log_transform: bool) -> np.ndarray:
    if space == "counts" and log_transform:
        return np.log1p(np.clip(x, 0, None))
    if space == "log1p" and not log_transform:
        return np.expm1(x)
    return x


def _rows(ftype, names, slide, level, pred, true, n, *, mse=True) -> list[dict]:
    pr, sr = column_pearson(pred, true), column_spearman(pred, true)
    err = ((pred - true) ** 2).mean(0) if mse else np.full(len(names), np.nan)
    return [
        {"feature_type": ftype, "gene": g, "slide": slide, "level": level, "pearson": pr[j], "spearman": sr[j],
         "mse": float(err[j]), "n_spots": n}
        for j, g in enumerate(names)
    ]


@doc_params(data=doc_slides, table_key=doc_table_key)
def evaluate(
    data: AnnData | SpatialData | Sequence[AnnData | SpatialData],
    *,
    model: SuperResModel | None = None,
    pred_key: str = K.PRED_KEY,
    true_layer: str | None = K.COUNTS_LAYER,
    log_transform: bool = True,
    pathway_key: str = K.PRED_PATHWAY_KEY,
    true_pathway_key: str = K.PATHWAY_KEY,
    slide_key: str = K.SLIDE_KEY,
    min_counts: float = 1,
    table_key: str | None = None,
) -> pd.DataFrame:
    """Compare predictions written by :func:`~spatialtranscriptformer.tl.predict` with measured expression.

    Metrics follow HEST-Benchmark (Jaume et al. 2024): Pearson r per gene across the spots of each slide
    (on log1p counts), plus Spearman rho and the mean squared error. Spots failing QC (total counts in
    ``true_layer`` < ``min_counts``) are left out. A correlation is NaN where the truth or the prediction
    is constant (undefined).

    Parameters
    ----------
    {data}
    model
        Only for a :class:`~spatialtranscriptformer.tl.SuperResModel`: evaluate it on the slides' 2 µm
        bins per gene and scale (masked PCC and SSIM, non-zero fraction; see
        :func:`~spatialtranscriptformer.tl.evaluate_superres`). Spot models are evaluated from the
        predictions already written by :func:`~spatialtranscriptformer.tl.predict`.
    pred_key
        Key given to :func:`~spatialtranscriptformer.tl.predict` as ``key_added``.
    true_layer
        Layer with the measured raw counts (``None``: ``X``).
    log_transform
        Compare on ``log1p`` counts (predictions in count space are ``log1p``-transformed too).
    pathway_key, true_pathway_key
        ``obsm`` keys of predicted pathway scores and of pathway targets
        (:func:`~spatialtranscriptformer.pp.pathway_activity`); where both exist, rows with
        ``feature_type="pathway"`` compare them (the pathway name is in ``gene``; ``mse`` is NaN as the
        two are on different scales).
    slide_key
        ``obs`` column splitting a table into slides.
    min_counts
        QC threshold on the total counts of a spot.
    {table_key}

    Returns
    -------
    A tidy :class:`~pandas.DataFrame` with columns ``feature_type`` (``"gene"`` / ``"pathway"``), ``gene``,
    ``slide``, ``level``, ``pearson``, ``spearman``, ``mse`` and ``n_spots``. ``level="spot"`` rows are
    per gene and slide (across spots). With at least three slides, ``level="slide"`` rows (``slide="all"``)
    correlate the per-slide mean expression (pseudo-bulk) across slides; slide-level models only have those.
    """
    from ..train._data import collect_slides, counts_block, layer_of

    if model is not None:  # 2 µm super-resolution: per gene and scale, masked PCC / SSIM
        from ._superres import SuperResModel
        from ._superres_evaluate import evaluate_superres

        if not isinstance(model, SuperResModel):
            raise TypeError("`model=` is only used for super-resolution models; spot models are evaluated "
                            "from the predictions written by `stf.tl.predict` (`pred_key`).")
        return evaluate_superres(data, model, table_key=table_key)

    rows: list[dict] = []
    bulk_pred, bulk_true, bulk_n, bulk_genes = [], [], [], None
    for i, d in enumerate(as_slide_list(data)):
        t = get_table(d, table_key)
        if pred_key not in t.uns:
            raise KeyError(f"Slide {i}: no predictions `uns[{pred_key!r}]`; run `stf.tl.predict` first.")
        info = t.uns[pred_key]
        space = info.get("target_space", "log1p")
        level = info.get("level", "spot")
        if level == "spot":
            in_layer = [g for g in info.get("genes", [])]
            in_obsm = [g for g in info.get("obsm_genes", []) if g in t.var_names]
            genes = in_layer + in_obsm
            parts = []
            if in_layer:
                lay = t.layers[pred_key]
                blk = lay[:, t.var_names.get_indexer(in_layer)]
                parts.append(blk.toarray() if sp.issparse(blk) else np.asarray(blk))
            if in_obsm:
                parts.append(np.asarray(t.obsm[pred_key][in_obsm], dtype=np.float64))
            pred_all = np.concatenate(parts, axis=1) if parts else np.zeros((t.n_obs, 0))
        else:
            slide_expr = info["slide_expr"]
            genes = [g for g in slide_expr.columns if g in t.var_names]
        if genes:
            layer_of(t, true_layer, f"table {i}")
        for r in collect_slides(t, slide_key=slide_key):
            if not genes:
                continue
            y, tot = counts_block(r, genes, true_layer)
            keep = tot >= min_counts
            true = np.log1p(y[keep]) if log_transform else y[keep]
            n = int(keep.sum())
            if level == "spot":
                pred = _to_space(pred_all[r.rows[keep]].astype(np.float64), space, log_transform)
                rows += _rows("gene", genes, r.slide_id, "spot", pred, true, n)
                pb = pred.mean(0)
            else:
                pb = _to_space(np.asarray(slide_expr.loc[r.slide_id, genes], dtype=np.float64), space, log_transform)
            if bulk_genes is None or bulk_genes == genes:
                bulk_genes = genes
                bulk_pred.append(pb)
                bulk_true.append(true.mean(0))
                bulk_n.append(n)
        if pathway_key in t.obsm and true_pathway_key in t.obsm:
            pp_, tp = t.obsm[pathway_key], t.obsm[true_pathway_key]
            shared = [c for c in pp_.columns if c in set(tp.columns)]
            for r in collect_slides(t, slide_key=slide_key):
                if shared:
                    a = np.asarray(pp_[shared], dtype=np.float64)[r.rows]
                    b = np.asarray(tp[shared], dtype=np.float64)[r.rows]
                    rows += _rows("pathway", shared, r.slide_id, "spot", a, b, len(r.rows), mse=False)
    if len(bulk_pred) >= 3:
        rows += _rows("gene", bulk_genes, "all", "slide", np.stack(bulk_pred), np.stack(bulk_true), int(sum(bulk_n)))
    return pd.DataFrame(rows, columns=COLUMNS)
