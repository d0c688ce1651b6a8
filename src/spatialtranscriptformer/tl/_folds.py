"""One cross-validation fold: fit on training slides, predict and score held-out slides (and controls).

Shared by :func:`~spatialtranscriptformer.tl.cross_validate` and :func:`~spatialtranscriptformer.tl.benchmark`,
so that every model of a benchmark is fitted on the same slides, scored on the same held-out slides and
the same genes, and judged by the same metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .. import _constants as K

CONTROLS = ("none", "mirror", "rot90")
"""Held-out coordinate controls: unchanged, mirrored (x -> -x) and rotated by a quarter turn about the
slide's centroid. They keep every spot's neighbourhood but break the alignment with the training slides'
layout, which serial sections of one patient share: a model that memorised where tissue sits on the array
(e.g. through an absolute positional encoding) scores lower on them; a model that reads only the tissue
and its neighbourhood scores the same."""


def transform_coords(table, control: str):
    """A copy of ``table`` whose spot coordinates are mirrored / rotated about their centroid."""
    if control not in CONTROLS:
        raise ValueError(f"Unknown control {control!r}; valid: {list(CONTROLS)}.")
    t = table.copy()
    if control == "none":
        return t
    xy = np.asarray(t.obsm[K.SPATIAL_KEY], dtype=np.float64)
    c = xy[:, :2].mean(axis=0)
    v = xy[:, :2] - c
    v = v * np.array([-1.0, 1.0]) if control == "mirror" else np.stack([-v[:, 1], v[:, 0]], axis=1)
    xy = xy.copy()
    xy[:, :2] = v + c
    t.obsm[K.SPATIAL_KEY] = xy
    return t


def check_controls(controls: Sequence[str]) -> list[str]:
    """Validate a list of controls; ``"none"`` (the held-out slides as they are) always comes first."""
    controls = [controls] if isinstance(controls, str) else list(controls)
    bad = sorted(set(controls) - set(CONTROLS))
    if bad:
        raise ValueError(f"Unknown controls {bad}; valid: {list(CONTROLS)}.")
    return ["none"] + [c for c in dict.fromkeys(controls) if c != "none"]


@dataclass
class FoldResult:
    """Scores of one fitted model on one fold's held-out slides."""

    genes: pd.DataFrame
    pathways: pd.DataFrame | None
    slide_means: list[dict] = field(default_factory=list)
    model: object = None


def run_fold(
    train: list,
    test: list,
    *,
    model: str,
    genes: list[str],
    fit_kwargs: dict,
    controls: Sequence[str] = ("none",),
    layer: str | None,
    log_transform: bool,
    min_counts: float,
    slide_key: str,
    patient_key: str,
    progress: bool | None,
    pathway_targets: bool = True,
) -> FoldResult:
    """Fit ``model`` on ``train`` tables; predict / score the ``test`` tables (copies) under each control.

    Gene rows carry a ``control`` column; pathway rows are scored only on the unchanged slides and only for
    models with named pathway tokens. ``slide_means`` holds, per held-out slide, the predicted and measured
    slide-mean expression (for slide-level models, and the pseudo-bulk score of every model).
    """
    from ..train._data import collect_slides, counts_block, slide_features
    from ._evaluate import _to_space, evaluate
    from ._fit import fit
    from ._predict import predict

    kw = dict(fit_kwargs)
    data_kwargs = dict(kw.pop("data_kwargs", None) or {})
    shared = {"layer": layer, "log_transform": log_transform, "min_counts": min_counts, "slide_key": slide_key,
              "patient_key": patient_key}
    clash = sorted(set(data_kwargs) & set(shared))
    if clash:
        raise ValueError(f"{clash} are arguments of cross_validate / benchmark themselves (they score with them "
                         "too); pass them there, not in data_kwargs.")
    m = fit(train, model=model, genes=genes, data_kwargs={**data_kwargs, **shared}, progress=progress, **kw)
    gene_rows, pw = [], None
    slide_means = []
    for control in controls:
        copies = [transform_coords(t, control) for t in test]
        if m.level == "spot":
            predict(copies, m, slide_key=slide_key, progress=progress)
            res = evaluate(copies, true_layer=layer, log_transform=log_transform, slide_key=slide_key,
                           min_counts=min_counts)
            res = res[res["level"] == "spot"]
            res.insert(0, "control", control)
            gene_rows.append(res)
            named = bool(m.pathways) and not str(m.pathways[0]).startswith("token_")
            if control == "none" and named and pathway_targets:
                pw = evaluate(copies, features="pathways", true_layer=layer, slide_key=slide_key,
                              min_counts=min_counts)
        if control != "none":
            continue
        for t in copies:
            for r in collect_slides(t, slide_key=slide_key, patient_key=patient_key):
                y, tot = counts_block(r, m.genes, layer)
                keep = tot >= min_counts
                if not keep.any():
                    continue
                x, coords = slide_features(r, m.embedding_key)
                pred = np.asarray(m.predict_arrays(x, coords)["expr"], dtype=np.float64)
                pred = _to_space(pred[keep] if pred.ndim == 2 else pred, m.target_space, log_transform)
                pred = pred.mean(0) if pred.ndim == 2 else pred
                true = (np.log1p(y[keep]) if log_transform else y[keep]).mean(0)
                slide_means.append({"slide": r.slide_id, "genes": list(m.genes), "pred": pred, "true": true})
    genes_df = pd.concat(gene_rows, ignore_index=True) if gene_rows else pd.DataFrame()
    return FoldResult(genes=genes_df, pathways=pw, slide_means=slide_means, model=m)


def slide_mean_rows(records: list[dict]) -> pd.DataFrame:
    """Per gene: Pearson / Spearman r across held-out slides (pooled over folds) of slide-mean expression."""
    from .._stats import column_pearson, column_spearman, constant_columns

    per_gene: dict[str, list[tuple[float, float]]] = {}
    for b in records:
        for g, p, t in zip(b["genes"], b["pred"], b["true"], strict=True):
            per_gene.setdefault(g, []).append((p, t))
    out = []
    for g, pairs in per_gene.items():
        if len(pairs) < 3:
            continue
        a = np.asarray(pairs, dtype=np.float64)
        out.append({
            "gene": g, "pearson": float(column_pearson(a[:, :1], a[:, 1:])[0]),
            "spearman": float(column_spearman(a[:, :1], a[:, 1:])[0]),
            "mse": float(((a[:, 0] - a[:, 1]) ** 2).mean()), "n": len(pairs),
            "collapsed": bool(constant_columns(a[:, :1])[0]),
        })  # fmt: skip
    return pd.DataFrame(out, columns=["gene", "pearson", "spearman", "mse", "n", "collapsed"])
