"""``stf.tl.cross_validate``: leave-one-patient-out (or leave-one-slide-out) evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

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
    slide_key: str = K.SLIDE_KEY,
    patient_key: str = K.PATIENT_KEY,
    layer: str | None = K.COUNTS_LAYER,
    log_transform: bool = True,
    table_key: str | None = None,
    progress: bool | None = None,
    **fit_kwargs: Any,
) -> pd.DataFrame:
    """Leave-one-group-out cross-validation of :func:`~spatialtranscriptformer.tl.fit`.

    For each patient (or slide) the model is fitted on all other groups, with its validation split
    (early stopping, best-weight restoration) drawn from those training groups only, never from the
    held-out fold. It then predicts the held-out slides (on copies: the user's data is not modified)
    and :func:`~spatialtranscriptformer.tl.evaluate` scores them. Genes chosen by number (``genes=50``)
    are re-selected on each fold's training slides, as in HEST-Benchmark (Jaume et al. 2024).

    Parameters
    ----------
    {data}
    model
        Model name passed to :func:`~spatialtranscriptformer.tl.fit`; ``"superres"`` runs
        :func:`~spatialtranscriptformer.tl.cross_validate_superres` (``fit_kwargs`` go to ``fit_superres``).
    groups
        ``"patient"`` (leave one patient out) or ``"slide"``. Fewer than two groups is a ``ValueError``.
    slide_key, patient_key
        ``obs`` columns with slide and patient ids.
    layer
        Raw-count layer used for training targets and evaluation.
    log_transform
        Passed to ``fit`` and ``evaluate``.
    {table_key}
    {progress}
    **fit_kwargs
        Further arguments of :func:`~spatialtranscriptformer.tl.fit` (e.g. ``genes``, ``max_epochs``).

    Returns
    -------
    The concatenated :func:`~spatialtranscriptformer.tl.evaluate` tables of the folds with a ``fold``
    column (the held-out group). ``result.attrs`` maps each fold to its training history
    (``"histories"``), its genes (``"genes"``) and its validation slides (``"val_slides"``).
    """
    if model == "superres":  # 2 µm super-resolution: the same folds over the slides' patients
        from ._superres_cv import cross_validate_superres

        if (slide_key, patient_key, layer, log_transform) != (K.SLIDE_KEY, K.PATIENT_KEY, K.COUNTS_LAYER, True):
            raise ValueError("slide_key, patient_key, layer and log_transform do not apply to model='superres' "
                             "(patients come from uns['stf_slide'], targets are raw 2 µm counts).")
        return cross_validate_superres(data, groups=groups, table_key=table_key, progress=progress, **fit_kwargs)
    from ..train._data import collect_slides
    from ..train._splits import leave_one_group_out
    from ._evaluate import evaluate
    from ._fit import fit
    from ._predict import predict

    if "validation" in fit_kwargs and not isinstance(fit_kwargs["validation"], str | type(None)):
        raise ValueError("cross_validate chooses validation slides inside each fold; pass 'patient', 'slide' or None.")
    refs = collect_slides(data, slide_key=slide_key, patient_key=patient_key, table_key=table_key)
    folds = leave_one_group_out([r.slide_id for r in refs], [r.patient_id for r in refs], groups=groups)
    by_id = {r.slide_id: r for r in refs}
    out, histories, genes, val_slides = [], {}, {}, {}
    for k, (group, train_ids, test_ids) in enumerate(folds):
        logger.info("Fold %d/%d: held-out %s %r (%d slides), training on %d slides.",
                    k + 1, len(folds), groups, group, len(test_ids), len(train_ids))
        train = [by_id[s].table[by_id[s].rows] for s in train_ids]
        test = [by_id[s].table[by_id[s].rows].copy() for s in test_ids]
        m = fit(train, model=model, slide_key=slide_key, patient_key=patient_key, layer=layer,
                log_transform=log_transform, progress=progress, **fit_kwargs)
        predict(test, m, slide_key=slide_key, progress=progress)
        res = evaluate(test, true_layer=layer, log_transform=log_transform, slide_key=slide_key)
        res.insert(0, "fold", str(group))
        out.append(res)
        histories[str(group)] = m.history
        genes[str(group)] = list(m.genes)
        val_slides[str(group)] = list(m.fit_params.get("val_slides", []))
    result = pd.concat(out, ignore_index=True)
    result.attrs["histories"] = histories
    result.attrs["genes"] = genes
    result.attrs["val_slides"] = val_slides
    return result
