"""``stf.tl.benchmark``: several models over the same leave-one-group-out folds, one table."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .. import _constants as K
from .._docs import doc_params, doc_progress, doc_slides, doc_table_key
from .._logging import logger

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

DEFAULT_MODELS = ("stf", "ridge", "ridge_cv", "he2rna", "attention_mil", "transmil")
METRIC_COLUMNS = [
    "model",
    "level",
    "evaluated_on",
    "control",
    "fold",
    "slide",
    "gene",
    "pearson",
    "spearman",
    "mse",
    "n",
    "collapsed",
    "moran_true",
    "moran_pred",
]
SUMMARY_COLUMNS = [
    "model", "level", "evaluated_on", "control", "pcc_mean", "pcc_sd", "n_folds", "n_collapsed",
    "moran_rank_agreement", "slide_mean_pcc", "slide_mean_pcc_sd", "pathway_pcc", "pathway_collapse_index",
    "n_genes", "wall_time_s",
]  # fmt: skip


def _model_level(name: str) -> str:
    from ..module._registry import get_model_entry

    entry = get_model_entry(name)
    if entry.family == "superres":
        raise ValueError(f"benchmark compares spot models on spot embeddings; score {name!r} with "
                         "`stf.tl.cross_validate(data, model='superres')`.")
    return entry.levels[0]


@doc_params(data=doc_slides, table_key=doc_table_key, progress=doc_progress)
def benchmark(
    data: AnnData | SpatialData | Sequence[AnnData | SpatialData],
    *,
    models: Sequence[str] = DEFAULT_MODELS,
    embedding_key: str | None = None,
    genes: int | Sequence[str] = 50,
    gene_selection: Literal["variance", "seurat"] = "variance",
    groups: Literal["patient", "slide"] = "patient",
    controls: Sequence[str] = (),
    out: str | os.PathLike | None = None,
    model_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    layer: str | None = K.COUNTS_LAYER,
    log_transform: bool = True,
    min_counts: float = 1,
    slide_key: str = K.SLIDE_KEY,
    patient_key: str = K.PATIENT_KEY,
    table_key: str | None = None,
    progress: bool | None = None,
    return_metrics: bool = False,
    **fit_kwargs: Any,
) -> pd.DataFrame:
    """Cross-validate several models on identical features and identical held-out groups.

    Every model is fitted with :func:`~spatialtranscriptformer.tl.fit` on the same
    leave-one-patient-out (or leave-one-slide-out) folds (``train._splits.leave_one_group_out``, the
    folds of :func:`~spatialtranscriptformer.tl.cross_validate`), with any validation slides drawn from
    the training groups only. Genes chosen by number are selected once per fold on that fold's training
    slides (HEST-Benchmark, Jaume et al. 2024), and every model of the fold gets that same list. Each
    held-out slide is predicted on a copy and scored:

    - dense models (level ``"spot"``: ``stf``, ``ridge``, ``he2rna``) with
      :func:`~spatialtranscriptformer.tl.evaluate`: Pearson r per gene across the spots of each held-out
      slide on log1p counts; the headline PCC is the mean over genes per fold, then mean ± sd over folds
      (the HEST protocol);
    - global models (level ``"slide"``: ``attention_mil``, ``transmil``) predict one profile per slide,
      so they are scored on slide-mean expression: per gene, the Pearson r across all held-out slides
      (pooled over folds) between predicted and measured mean log1p expression; the headline PCC is
      the mean ± sd over genes.

    The slide-mean score (``slide_mean_pcc``) is computed for every model (dense models through the
    mean of their spot predictions), so all models can be compared on it; it needs at least three
    held-out slides. A collapsed (constant) prediction scores r = 0; ``n_collapsed`` counts such
    gene-slide pairs. ``moran_rank_agreement`` is the Spearman correlation over genes between measured
    and predicted Moran's I (mean over held-out slides). For models with named pathway tokens,
    ``pathway_pcc`` is the mean r of the predicted pathway maps against pathway activity computed from
    all measured genes and ``pathway_collapse_index`` the median pairwise absolute r between predicted maps.
    Wall time per model covers fitting, prediction and scoring of all folds.

    Parameters
    ----------
    {data}
    models
        Names of registered spot models (:func:`~spatialtranscriptformer.module.available_models`), e.g.
        ``"stf"``, ``"ridge"`` (HEST probe), ``"ridge_cv"``, ``"he2rna"``.
    embedding_key
        ``obsm`` key of the embeddings (the same for every slide); ``None``: the only shared ``X_*`` key.
    genes
        Number of most variable genes (chosen per fold on the training slides) or a list of genes.
    gene_selection
        ``"variance"`` or ``"seurat"`` (see :func:`~spatialtranscriptformer.pp.highly_variable_genes`).
    groups
        ``"patient"`` (leave one patient out) or ``"slide"``. Fewer than two groups is a ``ValueError``.
    controls
        Also score dense models on held-out slides with mirrored (``"mirror"``) / rotated (``"rot90"``)
        coordinates (see :func:`~spatialtranscriptformer.tl.cross_validate`); summary rows per control.
    out
        Folder for ``metrics.csv`` (per gene, fold and slide), ``summary.md`` (mean ± sd PCC per model,
        level, wall time) and ``pcc_per_gene.png`` (per-gene PCC distributions per model). ``None``: write
        nothing.
    model_kwargs
        Hyperparameters per model, e.g. ``{{"transmil": {{"dim": 128}}}}`` (``fit(model_kwargs=...)``).
    layer
        Raw-count layer (targets and scoring).
    log_transform
        Train and score on ``log1p`` counts.
    min_counts
        Spots with fewer total counts are left out of training and scoring.
    slide_key, patient_key
        ``obs`` columns with slide and patient ids.
    {table_key}
    {progress}
    return_metrics
        Also return the per-gene / per-fold metrics table.
    **fit_kwargs
        Further arguments of :func:`~spatialtranscriptformer.tl.fit` for every model (e.g. ``max_epochs``,
        ``loss``; the ridge probe always uses its least-squares fit).

    Returns
    -------
    One row per model (and control) with columns ``model``, ``level``, ``evaluated_on`` (``"spot"`` or
    ``"slide mean"``), ``control``, ``pcc_mean``, ``pcc_sd``, ``n_folds``, ``n_collapsed``,
    ``moran_rank_agreement``, ``slide_mean_pcc``, ``slide_mean_pcc_sd``, ``pathway_pcc``,
    ``pathway_collapse_index``, ``n_genes`` and ``wall_time_s`` (parameters in ``result.attrs["params"]``). With ``return_metrics=True``,
    ``(summary, metrics)`` where ``metrics`` is the per-gene / per-fold table written to ``metrics.csv``
    (what :func:`~spatialtranscriptformer.pl.metrics` plots).
    """
    from ..pp._genes import select_top_genes
    from ..train._data import check_embeddings, collect_slides
    from ..train._splits import leave_one_group_out
    from ._fit import default_embedding_key
    from ._folds import check_controls

    # --- validate everything before any training or writing ------------------------------------------
    models = [models] if isinstance(models, str) else list(models)
    if not models:
        raise ValueError("`models` is empty; give at least one model name.")
    dup = sorted({m for m in models if models.count(m) > 1})
    if dup:
        raise ValueError(f"Models listed more than once: {dup}.")
    levels = {m: _model_level(m) for m in models}  # unknown names -> ValueError listing the registered ones
    model_kwargs = dict(model_kwargs or {})
    unknown = sorted(set(model_kwargs) - set(models))
    if unknown:
        raise KeyError(
            f"model_kwargs given for models that are not benchmarked: {unknown}; models: {models}."
        )
    for key in ("model", "data", "embedding_key", "genes", "model_kwargs", "level"):
        if key in fit_kwargs:
            raise ValueError(f"`{key}` is set by benchmark; it cannot be passed as a fit argument.")
    if "validation" in fit_kwargs and not isinstance(fit_kwargs["validation"], str | type(None)):
        raise ValueError(
            "benchmark chooses validation slides inside each fold; pass 'patient', 'slide' or None."
        )
    controls = check_controls(controls)
    refs = collect_slides(data, slide_key=slide_key, patient_key=patient_key, table_key=table_key)
    folds = leave_one_group_out([r.slide_id for r in refs], [r.patient_id for r in refs], groups=groups)
    embedding_key = embedding_key or default_embedding_key(refs)
    check_embeddings(refs, embedding_key)  # missing / mismatched embeddings -> KeyError / ValueError
    out_dir = None if out is None else Path(out)
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"`out` {str(out_dir)!r} exists and is not a folder.")

    by_id = {r.slide_id: r for r in refs}
    rows: dict[str, list[pd.DataFrame]] = {m: [] for m in models}
    pws: dict[str, list[pd.DataFrame]] = {m: [] for m in models}
    bulk: dict[str, list[dict]] = {m: [] for m in models}
    wall = dict.fromkeys(models, 0.0)
    fold_genes = {}
    for k, (group, train_ids, test_ids) in enumerate(folds):
        train = [by_id[s].table[by_id[s].rows] for s in train_ids]
        test = [by_id[s].table[by_id[s].rows] for s in test_ids]
        g = (select_top_genes(train, int(genes), layer=layer, flavor=gene_selection)
             if isinstance(genes, int | np.integer) else [str(x) for x in genes])
        fold_genes[str(group)] = g
        for name in models:
            logger.info("%s fold %d/%d: held out %r.", name, k + 1, len(folds), group)
            t0 = time.perf_counter()
            rows_, pw_, bulk_ = _run_model_fold(
                name, train, test, group, genes=g, embedding_key=embedding_key, layer=layer,
                log_transform=log_transform, min_counts=min_counts, slide_key=slide_key, patient_key=patient_key,
                progress=progress, model_kwargs=model_kwargs.get(name), fit_kwargs=fit_kwargs,
                controls=controls if levels[name] == "spot" else ["none"],
            )  # fmt: skip
            wall[name] += time.perf_counter() - t0
            rows[name].append(rows_)
            if pw_ is not None:
                pws[name].append(pw_)
            bulk[name] += bulk_
    metric_rows: list[pd.DataFrame] = []
    summary = []
    for name in models:
        spot = pd.concat(rows[name], ignore_index=True) if rows[name] else pd.DataFrame(columns=METRIC_COLUMNS)
        bulk_rows = _slide_mean_rows(bulk[name])
        pw = pd.concat(pws[name], ignore_index=True) if pws[name] else None
        metrics = pd.concat([d for d in (spot, bulk_rows) if len(d)] or [spot], ignore_index=True)
        metrics.insert(0, "model", name)
        metrics.insert(1, "level", levels[name])
        metric_rows.append(metrics)
        for control in (controls if levels[name] == "spot" else ["none"]):
            sel = spot[spot["control"] == control] if len(spot) else spot
            summary.append(_summarise(name, levels[name], control, sel, bulk_rows, pw, wall[name]))
            logger.info("Benchmark %s (%s): %s (%.1f s).", name, control, _fmt(summary[-1]), wall[name])
    table = pd.DataFrame(summary, columns=SUMMARY_COLUMNS)
    long = pd.concat(metric_rows, ignore_index=True).reindex(columns=METRIC_COLUMNS)
    table.attrs["params"] = {
        "models": models, "embedding_key": embedding_key, "genes": genes if isinstance(genes, int) else list(genes),
        "gene_selection": gene_selection, "groups": groups, "folds": [f[0] for f in folds],
        "log_transform": log_transform, "controls": controls, "fold_genes": fold_genes,
    }  # fmt: skip
    if out_dir is not None:
        from ._benchmark_report import write_report

        write_report(table, long, out_dir)
    return (table, long) if return_metrics else table


def _run_model_fold(name, train, test, group, *, genes, embedding_key, layer, log_transform, min_counts, slide_key,
                    patient_key, progress, model_kwargs, fit_kwargs, controls):  # fmt: skip
    """Fit / predict / score one model on one fold: spot-level rows, pathway rows and slide-mean records."""
    from ..module._registry import get_model_entry
    from ._folds import run_fold

    kw = dict(fit_kwargs)
    kw["embedding_key"] = embedding_key
    if get_model_entry(name).family == "probe":  # a least-squares fit: the loss is not an option
        kw.pop("loss", None)
    if model_kwargs:
        kw["model_kwargs"] = dict(model_kwargs)
    res = run_fold(train, test, model=name, genes=genes, fit_kwargs=kw, controls=controls, layer=layer,
                   log_transform=log_transform, min_counts=min_counts, slide_key=slide_key,
                   patient_key=patient_key, progress=progress)
    ev = res.genes
    rows = pd.DataFrame(columns=[c for c in METRIC_COLUMNS if c not in ("model", "level")])
    if len(ev):
        rows = pd.DataFrame({
            "evaluated_on": "spot", "control": ev["control"], "fold": str(group), "slide": ev["slide"].astype(str),
            "gene": ev["gene"], "pearson": ev["pearson"], "spearman": ev["spearman"], "mse": ev["mse"],
            "n": ev["n_spots"], "collapsed": ev["collapsed"], "moran_true": ev["moran_true"],
            "moran_pred": ev["moran_pred"],
        })  # fmt: skip
    pw = None
    if res.pathways is not None:
        summ = res.pathways.attrs.get("summary", {})
        pw = res.pathways.copy()
        pw.insert(0, "fold", str(group))
        pw["collapse_index"] = pw["slide"].map(lambda s: summ.get(str(s), {}).get("collapse_index", np.nan))
    bulk = [dict(b, fold=str(group)) for b in res.slide_means]
    return rows, pw, bulk


def _slide_mean_rows(bulk: list[dict]) -> pd.DataFrame:
    """Per gene: Pearson / Spearman r across the held-out slides (pooled over folds) of slide means."""
    from ._folds import slide_mean_rows

    d = slide_mean_rows(bulk)
    return pd.DataFrame({
        "evaluated_on": "slide mean", "control": "none", "fold": "pooled", "slide": "all", "gene": d["gene"],
        "pearson": d["pearson"], "spearman": d["spearman"], "mse": d["mse"], "n": d["n"], "collapsed": d["collapsed"],
    })  # fmt: skip


def _summarise(name: str, level: str, control: str, rows: pd.DataFrame, bulk_rows: pd.DataFrame,
               pw: pd.DataFrame | None, wall: float) -> dict:  # fmt: skip
    from .._stats import mean_r, rank_agreement

    bulk_r = bulk_rows["pearson"].astype(float)
    sm, ssd = (
        (float(np.nanmean(bulk_r)), float(np.nanstd(bulk_r))) if bulk_r.notna().any() else (np.nan, np.nan)
    )
    n_coll, moran = 0, np.nan
    if level == "spot" and len(rows):
        per_fold = rows.groupby("fold", sort=False)["pearson"].apply(lambda s: mean_r(s.to_numpy(dtype=float)))
        pcc, sd, n_folds = float(per_fold.mean()), float(np.std(per_fold.to_numpy())), int(len(per_fold))
        n_genes = int(rows.groupby("fold")["gene"].nunique().max())
        n_coll = int(rows["collapsed"].astype(bool).sum())
        agree = [rank_agreement(d["moran_true"].to_numpy(float), d["moran_pred"].to_numpy(float))
                 for _, d in rows.groupby(["fold", "slide"], sort=False)]
        moran = float(np.nanmean(agree)) if np.isfinite(agree).any() else np.nan
        evaluated_on = "spot"
    else:
        pcc, sd, n_folds = sm, ssd, int(len(set(bulk_rows["fold"]))) if len(bulk_rows) else 0
        n_genes = int(bulk_rows["gene"].nunique())
        n_coll = int(bulk_rows["collapsed"].astype(bool).sum()) if len(bulk_rows) else 0
        evaluated_on = "slide mean"
    pw_r = pw_ci = np.nan
    if pw is not None and len(pw) and control == "none":
        pw_r = mean_r(pw["pearson"].to_numpy(dtype=float))
        ci = pw.groupby(["fold", "slide"])["collapse_index"].first().to_numpy(dtype=float)
        pw_ci = float(np.nanmean(ci)) if np.isfinite(ci).any() else np.nan
    return {
        "model": name, "level": level, "evaluated_on": evaluated_on, "control": control, "pcc_mean": pcc,
        "pcc_sd": sd, "n_folds": n_folds, "n_collapsed": n_coll, "moran_rank_agreement": moran,
        "slide_mean_pcc": sm, "slide_mean_pcc_sd": ssd, "pathway_pcc": pw_r, "pathway_collapse_index": pw_ci,
        "n_genes": n_genes, "wall_time_s": float(wall),
    }  # fmt: skip


def _fmt(row: dict) -> str:
    return f"PCC {row['pcc_mean']:.3f} ± {row['pcc_sd']:.3f} ({row['evaluated_on']})"
