"""``stf.tl.cross_validate``: leave-one-patient-out (or leave-one-slide-out) evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .. import _constants as K
from .._docs import doc_params, doc_progress, doc_slides, doc_table_key
from .._logging import logger

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


@doc_params(data=doc_slides, table_key=doc_table_key, progress=doc_progress)
def cross_validate(
    data: AnnData | SpatialData | Sequence[AnnData | SpatialData],
    *,
    model: str = "stf",
    groups: Literal["patient", "slide"] = "patient",
    genes: int | Sequence[str] | None = None,
    gene_selection: Literal["variance", "seurat"] = "variance",
    controls: Sequence[str] = (),
    slide_key: str = K.SLIDE_KEY,
    patient_key: str = K.PATIENT_KEY,
    layer: str | None = K.COUNTS_LAYER,
    log_transform: bool = True,
    min_counts: float = 1,
    table_key: str | None = None,
    progress: bool | None = None,
    **fit_kwargs: Any,
) -> pd.DataFrame:
    """Leave-one-group-out cross-validation of :func:`~spatialtranscriptformer.tl.fit`.

    For each patient (or slide) the model is fitted on all other groups, with any validation split
    (early stopping, best-weight restoration) drawn from those training groups only, never from the
    held-out fold. Genes chosen by number are selected on each fold's training slides, before any
    validation split, as in HEST-Benchmark (Jaume et al. 2024). The model then predicts the held-out
    slides (on copies: the user's data is not modified) and :func:`~spatialtranscriptformer.tl.evaluate`
    scores them.

    Parameters
    ----------
    {data}
    model
        Model name passed to :func:`~spatialtranscriptformer.tl.fit`; ``"superres"`` runs
        :func:`~spatialtranscriptformer.tl.cross_validate_superres` (``fit_kwargs`` go to ``fit_superres``).
    groups
        ``"patient"`` (leave one patient out) or ``"slide"``. Fewer than two groups is a ``ValueError``.
    genes
        Number of most variable genes (chosen per fold on its training slides) or a list of genes.
        ``None``: 50 (the super-resolution model: its own default).
    gene_selection
        ``"variance"`` or ``"seurat"`` (see :func:`~spatialtranscriptformer.pp.highly_variable_genes`).
    controls
        Also score the held-out slides with their coordinates ``"mirror"``-ed and/or rotated (``"rot90"``):
        the shortcut control for serial sections of one patient, which share their layout (a model that
        memorised where tissue sits on the array loses on them). Rows carry a ``control`` column.
    slide_key, patient_key
        ``obs`` columns with slide and patient ids.
    layer
        Raw-count layer used for training targets and evaluation.
    log_transform
        Passed to ``fit`` and ``evaluate``.
    min_counts
        Spots with fewer total counts are left out of training and scoring.
    {table_key}
    {progress}
    **fit_kwargs
        Further arguments of :func:`~spatialtranscriptformer.tl.fit` (e.g. ``max_epochs``).

    Returns
    -------
    Spot-level models: the concatenated gene tables of :func:`~spatialtranscriptformer.tl.evaluate` with
    ``fold`` and ``control`` columns (a collapsed prediction scores r = 0, flagged in ``collapsed``).
    Slide-level models (one profile per slide): per gene, the Pearson / Spearman r across all held-out
    slides (pooled over folds) between predicted and measured slide-mean log1p expression; at least
    three held-out slides are needed. ``result.attrs`` holds each fold's training history
    (``"histories"``), genes (``"genes"``), validation slides (``"val_slides"``) and, for models with named
    pathway tokens, the pathway table of :func:`~spatialtranscriptformer.tl.evaluate` (``"pathways"``,
    with a ``fold`` column): genes and pathways are never mixed in one column.
    """
    from ..module._registry import get_model_entry

    if get_model_entry(model).family == "superres":  # 2 µm super-resolution: the same folds over the patients
        from ._superres_cv import cross_validate_superres

        if (slide_key, patient_key, layer, log_transform) != (K.SLIDE_KEY, K.PATIENT_KEY, K.COUNTS_LAYER, True):
            raise ValueError("slide_key, patient_key, layer and log_transform do not apply to model='superres' "
                             "(patients come from uns['stf_slide'], targets are raw 2 µm counts).")
        if tuple(controls):
            raise ValueError("controls apply to spot models, not to model='superres'.")
        if genes is not None:
            fit_kwargs["genes"] = genes
        return cross_validate_superres(data, groups=groups, table_key=table_key, progress=progress, **fit_kwargs)
    from ..pp._genes import select_top_genes
    from ..train._data import collect_slides
    from ..train._splits import leave_one_group_out
    from ._folds import check_controls, run_fold, slide_mean_rows

    if "validation" in fit_kwargs and not isinstance(fit_kwargs["validation"], str | type(None)):
        raise ValueError("cross_validate chooses validation slides inside each fold; pass 'patient', 'slide' or None.")
    genes = 50 if genes is None else genes
    controls = check_controls(controls)
    refs = collect_slides(data, slide_key=slide_key, patient_key=patient_key, table_key=table_key)
    folds = leave_one_group_out([r.slide_id for r in refs], [r.patient_id for r in refs], groups=groups)
    by_id = {r.slide_id: r for r in refs}
    out, pws, bulk, histories, fold_genes, val_slides = [], [], [], {}, {}, {}
    level = None
    for k, (group, train_ids, test_ids) in enumerate(folds):
        logger.info("Fold %d/%d: held-out %s %r (%d slides), training on %d slides.",
                    k + 1, len(folds), groups, group, len(test_ids), len(train_ids))
        train = [by_id[s].table[by_id[s].rows] for s in train_ids]
        test = [by_id[s].table[by_id[s].rows] for s in test_ids]
        g = (select_top_genes(train, int(genes), layer=layer, flavor=gene_selection)
             if isinstance(genes, int | np.integer) else [str(x) for x in genes])
        res = run_fold(train, test, model=model, genes=g, fit_kwargs=fit_kwargs, controls=controls, layer=layer,
                       log_transform=log_transform, min_counts=min_counts, slide_key=slide_key,
                       patient_key=patient_key, progress=progress)
        level = res.model.level
        if len(res.genes):
            res.genes.insert(0, "fold", str(group))
            out.append(res.genes)
        if res.pathways is not None:
            p = res.pathways.copy()
            p.insert(0, "fold", str(group))
            pws.append(p)
        bulk += res.slide_means
        histories[str(group)] = res.model.history
        fold_genes[str(group)] = list(res.model.genes)
        val_slides[str(group)] = list(res.model.fit_params.get("val_slides", []))
    if level == "slide":
        result = slide_mean_rows(bulk)
        if result.empty:
            raise ValueError(
                f"Model {model!r} predicts one profile per slide; it is scored across held-out slides, which needs "
                f"at least 3 of them (got {len(bulk)}). Use more slides or a spot-level model."
            )
    else:
        result = pd.concat(out, ignore_index=True)
    result.attrs["histories"] = histories
    result.attrs["genes"] = fold_genes
    result.attrs["val_slides"] = val_slides
    if pws:
        result.attrs["pathways"] = pd.concat(pws, ignore_index=True)
    return result
