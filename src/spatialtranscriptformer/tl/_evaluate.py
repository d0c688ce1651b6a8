"""``stf.tl.evaluate``: per-gene (and per-pathway) agreement of predictions with measured expression."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .. import _constants as K
from .._data import as_slide_list, get_table
from .._docs import doc_params, doc_slides, doc_table_key

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from ._base import BaseModel

GENE_COLUMNS = ["gene", "slide", "level", "pearson", "spearman", "mse", "n_spots", "collapsed", "moran_true",
                "moran_pred"]
PATHWAY_COLUMNS = ["pathway", "slide", "pearson", "spearman", "n_spots", "collapsed"]


def column_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r between matching columns of prediction ``a`` and truth ``b`` (see :mod:`.._stats`)."""
    from .._stats import column_pearson as cp

    return cp(a, b)


def column_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rho between matching columns of prediction ``a`` and truth ``b``."""
    from .._stats import column_spearman as cs

    return cs(a, b)


def _to_space(x: np.ndarray, space: str, log_transform: bool) -> np.ndarray:
    if space == "counts" and log_transform:
        return np.log1p(np.clip(x, 0, None))
    if space == "log1p" and not log_transform:
        return np.expm1(x)
    return x


def spot_predictions(data, t: AnnData, pred_key: str, i: int, *, table_key: str | None = None
                     ) -> tuple[list[str], np.ndarray, dict]:
    """Genes, ``(n_obs, G)`` predictions aligned to ``t`` and the record written by :func:`~spatialtranscriptformer.tl.predict`.

    ``data`` is the slide as the user passed it (a SpatialData holds the predictions as its table
    ``pred_key``; an AnnData as ``obsm[pred_key]``). Slide-level models give no genes and a ``(n_obs, 0)``
    array; their record holds ``slide_expr``.
    """
    from ._prediction_table import read_predictions

    genes, values, info = read_predictions(data, t, pred_key, kind="expression", i=i, table_key=table_key)
    if values is None:
        return [], np.zeros((t.n_obs, 0)), {**info, "level": "slide"}
    return genes, values, info


def _spot_mask(t: AnnData, spots: str | None, i: int) -> np.ndarray | None:
    """The boolean ``obs[spots]`` column of table ``i`` (a clear error otherwise); ``None`` without ``spots``."""
    if spots is None:
        return None
    if spots not in t.obs:
        raise KeyError(f"Slide {i}: `spots`: no obs column {spots!r}; available: {list(t.obs.columns)[:10]}.")
    col = t.obs[spots]
    if col.dtype != bool or col.isna().any():
        raise ValueError(f"Slide {i}: `spots`: obs[{spots!r}] must be a boolean column (True = a spot to score).")
    mask = col.to_numpy(dtype=bool)
    if not mask.any():
        raise ValueError(f"Slide {i}: `spots`: obs[{spots!r}] marks no spot.")
    return mask


def _gene_rows(genes, slide, pred, true, coords, *, spatial: bool) -> list[dict]:
    from .._stats import constant_columns, morans_i

    pr, sr = column_pearson(pred, true), column_spearman(pred, true)
    err = ((pred - true) ** 2).mean(0)
    collapsed = constant_columns(pred)
    if spatial and coords is not None and len(true) >= 3:
        mt, mp = morans_i(true, coords), morans_i(pred, coords)
    else:
        mt = mp = np.full(len(genes), np.nan)
    return [
        {"gene": g, "slide": slide, "level": "spot", "pearson": pr[j], "spearman": sr[j], "mse": float(err[j]),
         "n_spots": len(true), "collapsed": bool(collapsed[j]), "moran_true": mt[j], "moran_pred": mp[j]}
        for j, g in enumerate(genes)
    ]


def summarize_genes(res: pd.DataFrame) -> dict:
    """Per-slide summary of a gene table from :func:`evaluate`.

    Mean r (collapsed genes count as 0), the numbers of collapsed and undefined genes, and the rank
    agreement (Spearman) between observed and predicted Moran's I over genes.
    """
    from .._stats import mean_r, rank_agreement

    out = {}
    for slide, d in res[res["level"] == "spot"].groupby("slide", sort=False):
        out[str(slide)] = {
            "mean_pearson": mean_r(d["pearson"].to_numpy(dtype=float)),
            "n_genes": len(d), "n_collapsed": int(d["collapsed"].sum()),
            "n_undefined": int(d["pearson"].isna().sum()),
            "moran_rank_agreement": rank_agreement(d["moran_true"].to_numpy(float), d["moran_pred"].to_numpy(float)),
        }
    return out


@doc_params(data=doc_slides, table_key=doc_table_key)
def evaluate(
    data: AnnData | SpatialData | Sequence[AnnData | SpatialData],
    *,
    model: BaseModel | str | os.PathLike | None = None,
    features: Literal["genes", "pathways"] = "genes",
    pred_key: str = K.PRED_KEY,
    true_layer: str | None = K.COUNTS_LAYER,
    log_transform: bool = True,
    pathway_key: str = K.PRED_PATHWAY_KEY,
    true_pathway_key: str = K.PATHWAY_KEY,
    spatial: bool = True,
    slide_key: str = K.SLIDE_KEY,
    min_counts: float = 1,
    spots: str | None = None,
    table_key: str | None = None,
) -> pd.DataFrame:
    """Compare predictions written by :func:`~spatialtranscriptformer.tl.predict` with measured expression.

    Metrics follow HEST-Benchmark (Jaume et al. 2024): Pearson r per gene across the spots of each slide
    (on log1p counts), plus Spearman rho, the mean squared error and, with ``spatial``, Moran's I of the
    measured and of the predicted map of every gene (squidpy's estimator on a 6-nearest-neighbour graph;
    a model that reproduces spatial structure ranks genes by Moran's I as the data do). Spots failing QC
    (total counts in ``true_layer`` < ``min_counts``) are left out everywhere.

    Failure is never hidden: a prediction that is constant over a slide (a collapsed model) scores r = 0
    and is flagged in ``collapsed``; r is NaN only where the *measured* values are constant. Genes and
    pathways are evaluated by separate calls (``features``) so that their scores are never averaged
    together.

    Parameters
    ----------
    {data}
    model
        A trained model (or the folder it was saved to) to predict the slides with first, on copies (the
        slides are not modified; ``pred_key`` / ``pathway_key`` are then the defaults). A
        :class:`~spatialtranscriptformer.tl.SuperResModel` is scored on the slides' 2 µm bins per gene and
        scale (masked PCC and SSIM, non-zero fraction; see :func:`~spatialtranscriptformer.tl.evaluate_superres`).
        ``None``: score the predictions already written by :func:`~spatialtranscriptformer.tl.predict`.
    features
        ``"genes"``: predicted expression vs measured counts; ``"pathways"``: predicted pathway scores
        (``pathway_key``) vs pathway activity computed from *all* measured genes
        (``obsm[true_pathway_key]`` from :func:`~spatialtranscriptformer.pp.pathway_activity`, computed
        on the fly with the Hallmark sets when absent).
    pred_key
        Key given to :func:`~spatialtranscriptformer.tl.predict` as ``key_added``: the prediction table
        ``tables[pred_key]`` of a SpatialData, ``obsm[pred_key]`` of an AnnData.
    true_layer
        Layer with the measured raw counts (``None``: ``X``).
    log_transform
        Compare on ``log1p`` counts (predictions in count space are ``log1p``-transformed too).
    pathway_key, true_pathway_key
        Key of the predicted pathway scores (``pathway_key_added`` of :func:`~spatialtranscriptformer.tl.predict`)
        and ``obsm`` key of the pathway activity targets.
    spatial
        Compute Moran's I of measured and predicted maps (genes only).
    slide_key
        ``obs`` column splitting a table into slides.
    min_counts
        QC threshold on the total counts of a spot.
    spots
        A boolean ``obs`` column of the expression table: score only the spots where it is ``True`` (e.g.
        a held-out region of a slide predicted as a whole); the others are left out like QC-failed spots.
    {table_key}

    Returns
    -------
    For ``features="genes"``, a tidy :class:`~pandas.DataFrame` with columns ``gene``, ``slide``, ``level``,
    ``pearson``, ``spearman``, ``mse``, ``n_spots``, ``collapsed``, ``moran_true`` and ``moran_pred``.
    ``level="spot"`` rows are per gene and slide (across spots). With at least three slides,
    ``level="slide"`` rows (``slide="all"``) correlate the per-slide mean expression (pseudo-bulk) across
    slides; slide-level models only have those. ``result.attrs["summary"]`` maps each slide to its mean
    r (collapsed genes as 0), numbers of collapsed and undefined genes and the Moran's I rank agreement.

    For ``features="pathways"``: columns ``pathway``, ``slide``, ``pearson``, ``spearman``, ``n_spots`` and
    ``collapsed``; ``result.attrs["summary"]`` maps each slide to its mean r, the collapse index of the
    predicted maps (median pairwise absolute r between pathway maps; 1 = one map under many names) and that
    of the measured activities.
    """
    from ..train._data import collect_slides, counts_block, layer_of

    if features not in ("genes", "pathways"):
        raise ValueError(f"features must be 'genes' or 'pathways', got {features!r}.")
    if model is not None:  # the model predicts copies of the slides and scores them (its evaluate hook)
        from ._base import as_model

        model = as_model(model)
        if model.kind == "superres":  # 2 µm super-resolution: per gene and scale, masked PCC / SSIM
            return model.evaluate(data, table_key=table_key)
        return model.evaluate(data, features=features, true_layer=true_layer, log_transform=log_transform,
                              spatial=spatial, slide_key=slide_key, min_counts=min_counts, spots=spots,
                              table_key=table_key)
    slides = as_slide_list(data)
    tables = [get_table(d, table_key) for d in slides]
    masks = [_spot_mask(t, spots, i) for i, t in enumerate(tables)]
    if features == "pathways":
        return _evaluate_pathways(slides, tables, masks, pathway_key=pathway_key, true_pathway_key=true_pathway_key,
                                  true_layer=true_layer, slide_key=slide_key, min_counts=min_counts,
                                  table_key=table_key)

    preds = [spot_predictions(d, t, pred_key, i, table_key=table_key)  # validate all first
             for i, (d, t) in enumerate(zip(slides, tables, strict=True))]
    for i, (t, (genes, _, info)) in enumerate(zip(tables, preds, strict=True)):
        if genes or info.get("level", "spot") == "slide":
            layer_of(t, true_layer, f"table {i}")
    rows: list[dict] = []
    bulk_pred, bulk_true, bulk_n, bulk_genes = [], [], [], None
    for t, mask, (genes, pred_all, info) in zip(tables, masks, preds, strict=True):
        space = info.get("target_space", "log1p")
        level = info.get("level", "spot")
        if level == "slide":
            slide_expr = info["slide_expr"]
            genes = [g for g in slide_expr.columns if g in t.var_names]
        else:
            keep_cols = [j for j, g in enumerate(genes) if g in t.var_names]
            genes, pred_all = [genes[j] for j in keep_cols], pred_all[:, keep_cols]
        if not genes:
            continue
        for r in collect_slides(t, slide_key=slide_key):
            y, tot = counts_block(r, genes, true_layer)
            keep = tot >= min_counts
            if mask is not None:
                keep &= mask[r.rows]
                if not keep.any():
                    continue
            true = np.log1p(y[keep]) if log_transform else y[keep]
            n = int(keep.sum())
            if level == "spot":
                pred = _to_space(pred_all[r.rows[keep]], space, log_transform)
                coords = np.asarray(t.obsm[K.SPATIAL_KEY], dtype=np.float64)[r.rows[keep]] if spatial else None
                rows += _gene_rows(genes, r.slide_id, pred, true, coords, spatial=spatial)
                pb = pred.mean(0)
            else:
                pb = _to_space(np.asarray(slide_expr.loc[r.slide_id, genes], dtype=np.float64), space, log_transform)
            if bulk_genes is None or bulk_genes == genes:
                bulk_genes = genes
                bulk_pred.append(pb)
                bulk_true.append(true.mean(0))
                bulk_n.append(n)
    if len(bulk_pred) >= 3:
        from .._stats import constant_columns

        bp, bt = np.stack(bulk_pred), np.stack(bulk_true)
        pr, sr, coll = column_pearson(bp, bt), column_spearman(bp, bt), constant_columns(bp)
        rows += [{"gene": g, "slide": "all", "level": "slide", "pearson": pr[j], "spearman": sr[j],
                  "mse": float(((bp[:, j] - bt[:, j]) ** 2).mean()), "n_spots": int(sum(bulk_n)),
                  "collapsed": bool(coll[j]), "moran_true": np.nan, "moran_pred": np.nan}
                 for j, g in enumerate(bulk_genes)]
    res = pd.DataFrame(rows, columns=GENE_COLUMNS)
    res.attrs["summary"] = summarize_genes(res)
    return res


def _evaluate_pathways(slides, tables, masks, *, pathway_key, true_pathway_key, true_layer, slide_key, min_counts,
                       table_key) -> pd.DataFrame:
    """Predicted pathway scores vs expression-derived activity, per pathway and slide (QC-masked)."""
    from .._stats import collapse_index, constant_columns, mean_r
    from ..train._data import collect_slides, layer_of
    from ._prediction_table import read_predictions

    work = []
    for i, (d, t) in enumerate(zip(slides, tables, strict=True)):
        names, values, _ = read_predictions(d, t, pathway_key, kind="pathways", i=i, table_key=table_key)
        if values is None:
            raise ValueError(f"Slide {i}: `{pathway_key}` holds slide-level pathway scores (one per slide); "
                             "pathways are evaluated per spot.")
        pred = pd.DataFrame(values, index=t.obs_names, columns=names)
        if true_pathway_key in t.obsm:
            truth = t.obsm[true_pathway_key]
        else:
            from ..pp._pathways import pathway_activity

            truth = pathway_activity(t, layer=true_layer, min_counts=min_counts, inplace=False)
        shared = [c for c in pred.columns if c in set(truth.columns)]
        if not shared:
            raise ValueError(
                f"Slide {i}: the predicted pathway scores ({list(pred.columns)[:3]}...) share no name with the "
                f"pathway activity `obsm[{true_pathway_key!r}]` ({list(truth.columns)[:3]}...). Unnamed tokens "
                "come from a model trained without the auxiliary pathway loss (`pathway_loss_weight=0`)."
            )
        tot = np.asarray(layer_of(t, true_layer, f"table {i}").sum(axis=1), dtype=np.float64).ravel()
        qc = tot >= min_counts
        if masks[i] is not None:
            qc &= masks[i]
        work.append((t, pred, truth, shared, qc))
    rows, summary = [], {}
    for t, pred, truth, shared, qc in work:
        for r in collect_slides(t, slide_key=slide_key):
            rows_ = r.rows[qc[r.rows]]
            if not len(rows_):
                continue
            a = np.asarray(pred[shared], dtype=np.float64)[rows_]
            b = np.asarray(truth[shared], dtype=np.float64)[rows_]
            pr, sr, coll = column_pearson(a, b), column_spearman(a, b), constant_columns(a)
            rows += [{"pathway": p, "slide": r.slide_id, "pearson": pr[j], "spearman": sr[j], "n_spots": len(rows_),
                      "collapsed": bool(coll[j])} for j, p in enumerate(shared)]
            summary[r.slide_id] = {"mean_pearson": mean_r(pr), "n_pathways": len(shared),
                                   "n_collapsed": int(coll.sum()), "collapse_index": collapse_index(a),
                                   "target_collapse_index": collapse_index(b)}
    res = pd.DataFrame(rows, columns=PATHWAY_COLUMNS)
    res.attrs["summary"] = summary
    return res
