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


def run_demo(
    out: str | os.PathLike,
    *,
    backbone: str = "handcrafted",
    weights: str | None = None,
    model: str = "stf",
    n_genes: int = 50,
    max_epochs: int = 60,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Run the demo and write its outputs to ``out``.

    On the bundled her2st section (Andersson et al. 2021, CC BY 4.0): embed spot tiles with ``backbone``,
    compute Hallmark pathway activity, hold out the right-most 30 % of the section, fit ``model`` and
    the HEST ridge probe on the rest (top ``n_genes`` variable genes of the training spots), predict
    the whole section and report per-gene Pearson r on the held-out region.

    Parameters
    ----------
    out
        Output folder: ``her2st_C2.zarr`` (SpatialData with embeddings, targets and predictions),
        ``demo_maps.png`` (observed vs predicted maps), ``metrics.csv`` and ``summary.json``. Each is
        written to a temporary sibling and moved into place when complete (an earlier run's output
        is replaced only then).
    backbone
        Backbone name (``handcrafted`` needs no weights).
    weights
        Backbone weights (path), when the backbone needs them.
    model
        Model to fit (``"stf"`` or a baseline).
    n_genes
        Number of most variable genes.
    max_epochs
        Training epochs.
    seed
        Random seed.
    progress
        Show progress bars.

    Returns
    -------
    Per-gene metrics on the held-out region for ``model`` and ``"ridge"``.
    """
    import matplotlib

    matplotlib.use("Agg")
    from . import datasets, pl, pp, tl

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sdata = datasets.her2st()
    table = sdata.tables[K.TABLE_KEY]
    key = f"{K.EMBEDDING_PREFIX}{backbone}"
    pp.embed(sdata, backbone=backbone, weights=weights, key_added=key, progress=progress)
    pp.pathway_activity(sdata)
    test = spatial_holdout(table.obsm[K.SPATIAL_KEY])
    train = table[~test].copy()
    logger.info("demo: %d training spots, %d held-out spots", int((~test).sum()), int(test.sum()))
    results = []
    for name in dict.fromkeys([model, "ridge"]):
        fitted = tl.fit(train, model=name, embedding_key=key, genes=n_genes, max_epochs=max_epochs, seed=seed,
                        progress=progress, pathway_loss_weight=0.1 if name == "stf" else 0.0)
        pred_key = K.PRED_KEY if name == model else f"{name}_pred"
        tl.predict(sdata, fitted, key_added=pred_key, pathway_key_added=K.PRED_PATHWAY_KEY if name == model else f"{name}_pathways")
        res = tl.evaluate(table[test].copy(), pred_key=pred_key)
        res = res[res["feature_type"] == "gene"]
        res.insert(0, "model", name)
        results.append(res)
    metrics = pd.concat(results, ignore_index=True)
    with atomic_output(out / "metrics.csv") as tmp:
        metrics.to_csv(tmp, index=False)
    summary = metrics.groupby("model")["pearson"].agg(["mean", "median", "count"]).round(4)
    best = metrics[metrics.model == model].sort_values("pearson", ascending=False)["gene"].head(3).tolist()
    pl.spatial(sdata, genes=best, layers=(K.COUNTS_LAYER, K.PRED_KEY), save=out / "demo_maps.png", show=False)
    write_spatialdata(sdata, out / "her2st_C2.zarr", overwrite=True)
    info = {"backbone": backbone, "model": model, "n_genes": n_genes, "held_out_spots": int(test.sum()),
            "mean_pearson_held_out": summary["mean"].to_dict(), "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_text(out / "summary.json", json.dumps(info, indent=2))
    return metrics
