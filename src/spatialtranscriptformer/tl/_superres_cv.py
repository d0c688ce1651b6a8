"""Leave-one-patient-out cross-validation of the 2 µm super-resolution model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd

from .._data import as_slide_list, get_table, slide_meta
from .._docs import doc_params, doc_progress, doc_table_key
from .._logging import logger

if TYPE_CHECKING:
    from spatialdata import SpatialData


@doc_params(table_key=doc_table_key, progress=doc_progress)
def cross_validate_superres(
    data: SpatialData | Sequence[SpatialData],
    *,
    groups: Literal["patient", "slide"] = "patient",
    truth: str = "counts",
    table_key: str | None = None,
    image_key: str | None = None,
    progress: bool | None = None,
    **fit_kwargs: Any,
) -> pd.DataFrame:
    """Leave-one-patient-out cross-validation of :func:`~spatialtranscriptformer.tl.fit_superres`.

    For each patient (or slide) the model is fitted on the slides of all other patients only: its
    top-variance genes are chosen on the fold's training patches, early stopping and the best epoch are
    decided on a validation patient drawn from the fold's training patients (with a single training
    patient: a random 20% of its patches, with a warning), and the held-out patient, never seen before,
    is then scored by :func:`~spatialtranscriptformer.tl.evaluate_superres` (masked PCC and SSIM per gene
    at 2/4/8/16 µm). The folds are those of :func:`~spatialtranscriptformer.tl.cross_validate`
    (patient-level, as in HEST-Benchmark; Jaume et al. 2024). Also reached through
    ``stf.tl.cross_validate(data, model="superres", ...)``. The slides are not modified.

    Parameters
    ----------
    data
        Slides (:class:`~spatialdata.SpatialData` with an H&E and a table of 2 µm Visium HD bins) of at
        least two patients (``uns['stf_slide']['patient_id']``); three or more give every fold a
        validation patient distinct from its training and test patients.
    groups
        ``"patient"`` (leave one patient out) or ``"slide"``.
    truth
        What the held-out predictions are scored against: ``"counts"`` or an ``obsm`` key with per-bin
        truth (e.g. the simulator's ``"true_rates"``).
    {table_key}
    image_key
        H&E image element.
    {progress}
    **fit_kwargs
        Further arguments of :func:`~spatialtranscriptformer.tl.fit_superres` (``genes``, ``max_epochs``,
        ``loss``, ``model_kwargs={{"backbone": ...}}``, ``plan_kwargs={{"gradnorm": ...}}``, ...).
        ``validation`` may only be ``"patient"`` (chosen in each fold among its training patients) or
        ``None`` (no validation).

    Returns
    -------
    The :func:`~spatialtranscriptformer.tl.evaluate_superres` tables of the held-out folds, with a
    ``fold`` column (the held-out patient or slide). ``result.attrs`` maps each fold to its genes
    (``"genes"``), training and validation patients (``"train_patients"``, ``"val_patients"``), best epoch
    (``"best_epoch"``) and training history (``"histories"``, with GradNorm's per-epoch weights
    ``w_<s>um``).
    """
    from ..train._splits import leave_one_group_out
    from ._superres import fit_superres
    from ._superres_evaluate import evaluate_superres

    if "val_patient" in fit_kwargs:  # the former name: None -> "patient", False -> None
        vp = fit_kwargs.pop("val_patient")
        fit_kwargs["validation"] = "patient" if vp is None else (None if vp is False else [vp])
    vp = fit_kwargs.get("validation", "patient")
    if vp not in ("patient", None):
        raise ValueError(
            "cross_validate_superres chooses the validation patient inside each fold (among its training "
            f"patients); pass validation='patient' or None, not {vp!r}."
        )
    data_kwargs = dict(fit_kwargs.pop("data_kwargs", None) or {})
    if image_key is not None:
        data_kwargs["image_key"] = image_key
    slides = as_slide_list(data)
    metas = [slide_meta(get_table(s, table_key)) for s in slides]
    slide_ids = [str(m.get("slide_id", f"slide_{i}")) for i, m in enumerate(metas)]
    patient_ids = [str(m.get("patient_id", slide_ids[i])) for i, m in enumerate(metas)]
    keys = [str(i) for i in range(len(slides))]  # slide ids need not be unique across the slides given
    folds = leave_one_group_out(keys, patient_ids, groups=groups)
    out, attrs = [], {k: {} for k in ("genes", "train_patients", "val_patients", "best_epoch", "histories")}
    for k, (group, train_keys, test_keys) in enumerate(folds):
        label = str(group) if groups == "patient" else slide_ids[int(group)]
        logger.info(
            "Fold %d/%d: held-out %s %r (%d slides), training on %d slides.",
            k + 1, len(folds), groups, label, len(test_keys), len(train_keys),
        )
        train = [slides[int(i)] for i in train_keys]
        test = [slides[int(i)] for i in test_keys]
        model = fit_superres(train, table_key=table_key, progress=progress, data_kwargs=data_kwargs, **fit_kwargs)
        res = evaluate_superres(
            test, model, truth=truth, table_key=table_key, image_key=image_key, progress=progress,
            min_tissue=data_kwargs.get("min_tissue", fit_kwargs.get("min_tissue", 0.05)),
        )
        res.insert(0, "fold", label)
        out.append(res)
        attrs["genes"][label] = list(model.genes)
        attrs["train_patients"][label] = list(model.params["train_patients"])
        attrs["val_patients"][label] = list(model.params["val_patients"])
        attrs["best_epoch"][label] = model.best_epoch
        attrs["histories"][label] = model.history
    result = pd.concat(out, ignore_index=True)
    result.attrs.update(attrs)
    return result
