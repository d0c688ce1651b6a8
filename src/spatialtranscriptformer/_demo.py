"""The ``stf demo`` pipeline: bundled her2st section -> tiles -> embeddings -> targets -> fit -> maps."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import _constants as K
from ._atomic import atomic_output, atomic_write_text, write_spatialdata
from ._logging import logger


def spatial_holdout(coords: np.ndarray, *, fraction: float = 0.3) -> np.ndarray:
    """Boolean mask of a held-out region: the spots right of the ``1 - fraction`` x-quantile."""
    return coords[:, 0] > np.quantile(coords[:, 0], 1 - fraction)


SPLIT_KEY = "stf_split"
"""``obs`` column of the demo's split: ``"train"`` or ``"held_out"``."""
HELD_OUT_KEY = "stf_held_out"
"""Boolean ``obs`` column: the demo's held-out spots."""
BASELINES = ("ridge", "ridge_cv")


def run_demo(
    out: str | os.PathLike,
    *,
    backbone: str = "handcrafted",
    weights: str | None = None,
    model: str = "stf",
    n_genes: int = 50,
    max_epochs: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Run the demo and write its outputs to ``out``.

    On the bundled her2st section (Andersson et al. 2021, CC BY 4.0): embed spot tiles with ``backbone``,
    compute Hallmark pathway activity, hold out the right-most 30 % of the section, choose the
    ``n_genes`` most variable genes on the training spots, fit ``model`` with the library's defaults and
    the two linear probes (HEST's ridge and the cross-validated ridge) on the rest, predict the whole
    section and score per-gene Pearson r on the held-out spots only. The summary says plainly which
    model wins there.

    One section is a small, optimistic test (the held-out region borders the training spots); the
    leave-one-section-out study in ``benchmarks/bench_her2st_accuracy.py`` is the honest one.

    Parameters
    ----------
    out
        Output folder: ``her2st_C2.zarr`` (SpatialData with embeddings, targets and the split in
        ``obs['stf_split']``; the predictions of each model are its tables ``"<model>_pred"`` /
        ``"<model>_pathways"``, ``"stf_pred"`` / ``"stf_pathways"`` for ``model``), ``demo_maps.png`` (observed vs predicted maps, held-out spots outlined,
        r on them), ``metrics.csv`` and ``summary.json``. Each is written to a temporary sibling and
        moved into place when complete (an earlier run's output is replaced only then).
    backbone
        Backbone name (``handcrafted`` needs no weights).
    weights
        Backbone weights (path), when the backbone needs them.
    model
        Model to fit (``"stf"`` or a baseline).
    n_genes
        Number of most variable genes.
    max_epochs
        Training epochs (``None``: the library's default).
    seed
        Random seed.
    progress
        Show progress bars.

    Returns
    -------
    Per-gene metrics on the held-out region for ``model`` and the probes (``result.attrs["summary"]``:
    mean r per model, pathway metrics and the verdict).
    """
    import matplotlib

    matplotlib.use("Agg")
    from . import datasets, pl, pp, tl
    from ._stats import mean_r
    from .pp._genes import select_top_genes

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sdata = datasets.her2st()
    table = sdata.tables[K.TABLE_KEY]
    key = f"{K.EMBEDDING_PREFIX}{backbone}"
    pp.embed(sdata, backbone=backbone, weights=weights, key_added=key, progress=progress)
    pp.pathway_activity(sdata)
    test = spatial_holdout(table.obsm[K.SPATIAL_KEY])
    table.obs[HELD_OUT_KEY] = test
    table.obs[SPLIT_KEY] = pd.Categorical(np.where(test, "held_out", "train"), categories=["train", "held_out"])
    train = table[~test].copy()
    genes = select_top_genes([train], n_genes)
    logger.info("demo: %d training spots, %d held-out spots", int((~test).sum()), int(test.sum()))
    extra = {} if max_epochs is None else {"max_epochs": max_epochs}
    results, summary = [], {}
    for name in dict.fromkeys([model, *BASELINES]):
        fitted = tl.fit(train, model=name, embedding_key=key, genes=genes, seed=seed, progress=progress,
                        **(extra if name not in BASELINES else {}))
        pred_key = K.PRED_KEY if name == model else f"{name}_pred"
        pw_key = K.PRED_PATHWAY_KEY if name == model else f"{name}_pathways"
        tl.predict(sdata, fitted, key_added=pred_key, pathway_key_added=pw_key)  # tables[pred_key], [pw_key]
        res = tl.evaluate(sdata, pred_key=pred_key, spots=HELD_OUT_KEY)
        res.insert(0, "model", name)
        results.append(res)
        summary[name] = {"mean_pearson_held_out": mean_r(res["pearson"].to_numpy(float)),
                         "n_collapsed": int(res["collapsed"].sum())}
        named = fitted.pathways is not None and not str(fitted.pathways[0]).startswith("token_")
        if named:
            pw = tl.evaluate(sdata, features="pathways", pathway_key=pw_key, spots=HELD_OUT_KEY).attrs["summary"]
            s = next(iter(pw.values()))
            summary[name].update(pathway_pearson_held_out=s["mean_pearson"], n_pathways=s["n_pathways"],
                                 pathway_collapse_index=s["collapse_index"],
                                 measured_pathway_collapse_index=s["target_collapse_index"])
    metrics = pd.concat(results, ignore_index=True)
    with atomic_output(out / "metrics.csv") as tmp:
        metrics.to_csv(tmp, index=False)
    verdict = demo_verdict(model, {k: v["mean_pearson_held_out"] for k, v in summary.items()})
    logger.info("demo: %s", verdict)
    shown = genes[:3]  # the most variable genes: shown whatever their score
    pl.spatial(sdata, genes=shown, layers=(K.COUNTS_LAYER, K.PRED_KEY, "ridge_cv_pred"), highlight=HELD_OUT_KEY,
               save=out / "demo_maps.png", show=False)
    sdata.tables[K.TABLE_KEY].uns["stf_demo"] = {
        "params": {"backbone": backbone, "model": model, "n_genes": n_genes, "seed": seed, "held_out_fraction": 0.3,
                   "split_key": SPLIT_KEY},
        "verdict": verdict,
    }
    write_spatialdata(sdata, out / "her2st_C2.zarr", overwrite=True)
    info = {"backbone": backbone, "model": model, "n_genes": n_genes, "held_out_spots": int(test.sum()),
            "training_spots": int((~test).sum()),
            "mean_pearson_held_out": {k: round(v["mean_pearson_held_out"], 4) for k, v in summary.items()},
            "models": summary, "verdict": verdict, "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_text(out / "summary.json", json.dumps(info, indent=2, default=float))
    metrics.attrs["summary"] = info
    return metrics


def demo_verdict(model: str, scores: dict[str, float]) -> str:
    """One plain sentence: whether ``model`` beats the linear probes on the held-out spots."""
    others = {k: v for k, v in scores.items() if k != model}
    best_other = max(others, key=others.get)
    if scores[model] > others[best_other]:
        return (f"{model} beats the linear probes on the held-out spots (mean r {scores[model]:.3f} vs "
                f"{best_other} {others[best_other]:.3f}).")
    return (f"{model} does NOT beat the linear probe {best_other} on the held-out spots (mean r "
            f"{scores[model]:.3f} vs {others[best_other]:.3f}); on this section a linear probe is as good or better.")
