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

DEFAULT_MODELS = ("stf", "ridge", "he2rna", "attention_mil", "transmil")
METRIC_COLUMNS = [
    "model",
    "level",
    "evaluated_on",
    "fold",
    "slide",
    "gene",
    "pearson",
    "spearman",
    "mse",
    "n",
]
SUMMARY_COLUMNS = [
    "model", "level", "evaluated_on", "pcc_mean", "pcc_sd", "n_folds", "slide_mean_pcc", "slide_mean_pcc_sd",
    "n_genes", "wall_time_s",
]  # fmt: skip


def _model_level(name: str) -> str:
    if name == "ridge":
        return "spot"
    from ..module._registry import get_model_entry

    return get_model_entry(name).levels[0]


@doc_params(data=doc_slides, table_key=doc_table_key, progress=doc_progress)
def benchmark(
    data: AnnData | SpatialData | Sequence[AnnData | SpatialData],
    *,
    models: Sequence[str] = DEFAULT_MODELS,
    embedding_key: str | None = None,
    genes: int | Sequence[str] = 50,
    groups: Literal["patient", "slide"] = "patient",
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
    folds of :func:`~spatialtranscriptformer.tl.cross_validate`), with its validation slides drawn from
    the training groups only; genes chosen by number are re-selected on each fold's training slides
    (HEST-Benchmark, Jaume et al. 2024). Each held-out slide is predicted on a copy and scored:

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
    held-out slides. Wall time per model covers fitting, prediction and scoring of all folds.

    Parameters
    ----------
    {data}
    models
        Model names: ``"ridge"`` or names registered for :func:`~spatialtranscriptformer.tl.fit`.
    embedding_key
        ``obsm`` key of the embeddings (the same for every slide); ``None``: the only shared ``X_*`` key.
    genes
        Number of most variable genes (chosen per fold on the training slides) or a list of genes.
    groups
        ``"patient"`` (leave one patient out) or ``"slide"``. Fewer than two groups is a ``ValueError``.
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
    One row per model with columns ``model``, ``level``, ``evaluated_on`` (``"spot"`` or
    ``"slide mean"``), ``pcc_mean``, ``pcc_sd``, ``n_folds``, ``slide_mean_pcc``, ``slide_mean_pcc_sd``,
    ``n_genes`` and ``wall_time_s`` (parameters in ``result.attrs["params"]``). With ``return_metrics=True``,
    ``(summary, metrics)`` where ``metrics`` is the per-gene / per-fold table written to ``metrics.csv``
    (what :func:`~spatialtranscriptformer.pl.metrics` plots).
    """
    from ..train._data import check_embeddings, collect_slides
    from ..train._splits import leave_one_group_out
    from ._fit import default_embedding_key

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
    refs = collect_slides(data, slide_key=slide_key, patient_key=patient_key, table_key=table_key)
    folds = leave_one_group_out([r.slide_id for r in refs], [r.patient_id for r in refs], groups=groups)
    embedding_key = embedding_key or default_embedding_key(refs)
    check_embeddings(refs, embedding_key)  # missing / mismatched embeddings -> KeyError / ValueError
    out_dir = None if out is None else Path(out)
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"`out` {str(out_dir)!r} exists and is not a folder.")

    by_id = {r.slide_id: r for r in refs}
    metric_rows: list[pd.DataFrame] = []
    summary = []
    for name in models:
        t0 = time.perf_counter()
        rows, bulk = _run_model(
            name, folds, by_id, levels[name], embedding_key=embedding_key, genes=genes, layer=layer,
            log_transform=log_transform, min_counts=min_counts, slide_key=slide_key, patient_key=patient_key,
            progress=progress, model_kwargs=model_kwargs.get(name), fit_kwargs=fit_kwargs,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        bulk_rows = _slide_mean_rows(bulk)
        metrics = pd.concat([d for d in (rows, bulk_rows) if len(d)] or [rows], ignore_index=True)
        metrics.insert(0, "model", name)
        metrics.insert(1, "level", levels[name])
        metric_rows.append(metrics)
        summary.append(_summarise(name, levels[name], rows, bulk_rows, wall))
        logger.info("Benchmark %s: %s (%.1f s).", name, _fmt(summary[-1]), wall)
    table = pd.DataFrame(summary, columns=SUMMARY_COLUMNS)
    long = pd.concat(metric_rows, ignore_index=True)[METRIC_COLUMNS]
    table.attrs["params"] = {
        "models": models, "embedding_key": embedding_key, "genes": genes if isinstance(genes, int) else list(genes),
        "groups": groups, "folds": [f[0] for f in folds], "log_transform": log_transform,
    }  # fmt: skip
    if out_dir is not None:
        from ._benchmark_report import write_report

        write_report(table, long, out_dir)
    return (table, long) if return_metrics else table


def _run_model(name, folds, by_id, level, *, embedding_key, genes, layer, log_transform, min_counts, slide_key,
               patient_key, progress, model_kwargs, fit_kwargs) -> tuple[pd.DataFrame, list[dict]]:  # fmt: skip
    """Fit / predict / score one model over all folds: spot-level rows and slide-mean records."""
    from ..train._data import collect_slides, counts_block, slide_features
    from ._evaluate import _to_space, evaluate
    from ._fit import fit
    from ._predict import predict

    rows, bulk = [], []
    for k, (group, train_ids, test_ids) in enumerate(folds):
        logger.info("%s fold %d/%d: held out %r.", name, k + 1, len(folds), group)
        train = [by_id[s].table[by_id[s].rows] for s in train_ids]
        test = [by_id[s].table[by_id[s].rows].copy() for s in test_ids]
        kw = dict(fit_kwargs)
        if model_kwargs:
            kw["model_kwargs"] = dict(model_kwargs)
        m = fit(
            train, model=name, embedding_key=embedding_key, genes=genes, layer=layer, log_transform=log_transform,
            min_counts=min_counts, slide_key=slide_key, patient_key=patient_key, progress=progress, **kw,
        )  # fmt: skip
        if level == "spot":
            predict(test, m, slide_key=slide_key, progress=progress)
            ev = evaluate(
                test,
                true_layer=layer,
                log_transform=log_transform,
                slide_key=slide_key,
                min_counts=min_counts,
            )
            ev = ev[(ev["feature_type"] == "gene") & (ev["level"] == "spot")]
            rows.append(
                pd.DataFrame({
                    "evaluated_on": "spot", "fold": str(group), "slide": ev["slide"].astype(str), "gene": ev["gene"],
                    "pearson": ev["pearson"], "spearman": ev["spearman"], "mse": ev["mse"], "n": ev["n_spots"],
                })
            )  # fmt: skip
        for t in test:
            for r in collect_slides(t, slide_key=slide_key, patient_key=patient_key):
                y, tot = counts_block(r, m.genes, layer)
                keep = tot >= min_counts
                if not keep.any():
                    continue
                x, coords = slide_features(r, embedding_key)
                pred = np.asarray(m.predict_arrays(x, coords)["expr"], dtype=np.float64)
                if pred.ndim == 2:  # dense model: mean of its (log1p-space) spot predictions over QC spots
                    pred = _to_space(pred[keep], m.target_space, log_transform).mean(0)
                else:
                    pred = _to_space(pred, m.target_space, log_transform)
                true = (np.log1p(y[keep]) if log_transform else y[keep]).mean(0)
                bulk.append(
                    {
                        "fold": str(group),
                        "slide": r.slide_id,
                        "genes": list(m.genes),
                        "pred": pred,
                        "true": true,
                    }
                )
    cols = ["evaluated_on", "fold", "slide", "gene", "pearson", "spearman", "mse", "n"]
    return (pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=cols)), bulk


def _slide_mean_rows(bulk: list[dict]) -> pd.DataFrame:
    """Per gene: Pearson / Spearman r across the held-out slides (pooled over folds) of slide means."""
    from ._evaluate import column_pearson, column_spearman

    per_gene: dict[str, list[tuple[float, float]]] = {}
    for b in bulk:
        for g, p, t in zip(b["genes"], b["pred"], b["true"], strict=True):
            per_gene.setdefault(g, []).append((p, t))
    out = []
    for g, pairs in per_gene.items():
        if len(pairs) < 3:
            continue
        a = np.asarray(pairs, dtype=np.float64)
        out.append({
            "evaluated_on": "slide mean", "fold": "pooled", "slide": "all", "gene": g,
            "pearson": float(column_pearson(a[:, :1], a[:, 1:])[0]),
            "spearman": float(column_spearman(a[:, :1], a[:, 1:])[0]),
            "mse": float(((a[:, 0] - a[:, 1]) ** 2).mean()), "n": len(pairs),
        })  # fmt: skip
    return pd.DataFrame(
        out, columns=["evaluated_on", "fold", "slide", "gene", "pearson", "spearman", "mse", "n"]
    )


def _summarise(name: str, level: str, rows: pd.DataFrame, bulk_rows: pd.DataFrame, wall: float) -> dict:
    bulk_r = bulk_rows["pearson"].astype(float)
    sm, ssd = (
        (float(np.nanmean(bulk_r)), float(np.nanstd(bulk_r))) if bulk_r.notna().any() else (np.nan, np.nan)
    )
    if level == "spot":
        per_fold = rows.groupby("fold", sort=False)["pearson"].apply(lambda s: np.nanmean(s.astype(float)))
        pcc, sd, n_folds = float(per_fold.mean()), float(np.std(per_fold.to_numpy())), int(len(per_fold))
        n_genes = int(rows["gene"].nunique())
        evaluated_on = "spot"
    else:
        pcc, sd, n_folds = sm, ssd, int(len(set(bulk_rows["fold"]))) if len(bulk_rows) else 0
        n_genes = int(bulk_rows["gene"].nunique())
        evaluated_on = "slide mean"
    return {
        "model": name, "level": level, "evaluated_on": evaluated_on, "pcc_mean": pcc, "pcc_sd": sd,
        "n_folds": n_folds, "slide_mean_pcc": sm, "slide_mean_pcc_sd": ssd, "n_genes": n_genes,
        "wall_time_s": float(wall),
    }  # fmt: skip


def _fmt(row: dict) -> str:
    return f"PCC {row['pcc_mean']:.3f} ± {row['pcc_sd']:.3f} ({row['evaluated_on']})"
