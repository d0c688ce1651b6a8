"""Patient- and slide-level splits (validation hold-out, cross-validation folds).

Spots of one slide are strongly correlated, and so are slides of one patient: a held-out set must
never share a patient with the training set when that can be avoided (HEST-Benchmark uses
patient-level folds; Jaume et al. 2024).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from .._logging import logger


def split_validation(
    slide_ids: Sequence[str],
    patient_ids: Sequence[str],
    *,
    validation: Literal["patient", "slide"] | Sequence[str] | None = "patient",
    val_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[list[str], list[str]]:
    """Split slides into training and validation slides.

    Parameters
    ----------
    slide_ids, patient_ids
        Slide id and patient of every slide.
    validation
        ``"patient"``: hold out ``val_fraction`` of the patients (at least one); with a single
        patient this falls back to ``"slide"`` with a log warning. ``"slide"``: hold out
        ``val_fraction`` of the slides (at least one). ``None``: no validation. A list of slide ids:
        exactly those. With a single slide there is no validation (logged).
    val_fraction
        Fraction of patients / slides held out, in ``(0, 1)``.
    seed
        Seed of the random choice.

    Returns
    -------
    ``(train_slide_ids, val_slide_ids)``; ``val_slide_ids`` is empty without validation.
    """
    slide_ids = [str(s) for s in slide_ids]
    patient_ids = [str(p) for p in patient_ids]
    if len(slide_ids) != len(patient_ids):
        raise ValueError("slide_ids and patient_ids must have the same length.")
    if validation is None:
        return slide_ids, []
    if not isinstance(validation, str):
        val = [str(s) for s in validation]
        unknown = sorted(set(val) - set(slide_ids))
        if unknown:
            raise KeyError(f"Validation slides not found: {unknown}; slides: {slide_ids}.")
        if not val:
            return slide_ids, []
        if set(val) >= set(slide_ids):
            raise ValueError("All slides are validation slides; at least one must remain for training.")
        return [s for s in slide_ids if s not in set(val)], [s for s in slide_ids if s in set(val)]
    if validation not in ("patient", "slide"):
        raise ValueError(f"validation must be 'patient', 'slide', None or a list of slide ids, got {validation!r}.")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    if len(slide_ids) < 2:
        logger.warning("Only one slide: training without validation (no early stopping, last weights kept).")
        return slide_ids, []
    rng = np.random.default_rng(seed)
    groups = patient_ids
    if validation == "patient" and len(set(patient_ids)) < 2:
        logger.warning(
            "All %d slides come from one patient: validation falls back to held-out slides of that patient "
            "(validation is then not patient-independent).", len(slide_ids)
        )
        groups = slide_ids
    elif validation == "slide":
        groups = slide_ids
    uniq = sorted(set(groups))
    n_val = min(len(uniq) - 1, max(1, int(round(val_fraction * len(uniq)))))
    held = set(rng.permutation(uniq)[:n_val].tolist())
    train = [s for s, g in zip(slide_ids, groups, strict=True) if g not in held]
    val = [s for s, g in zip(slide_ids, groups, strict=True) if g in held]
    return train, val


def leave_one_group_out(
    slide_ids: Sequence[str], patient_ids: Sequence[str], *, groups: Literal["patient", "slide"] = "patient"
) -> list[tuple[str, list[str], list[str]]]:
    """Leave-one-group-out folds: ``[(group, train_slide_ids, test_slide_ids), ...]``.

    ``groups="patient"`` holds out all slides of one patient per fold, ``"slide"`` one slide.
    Fewer than two groups is a ``ValueError``.
    """
    if groups not in ("patient", "slide"):
        raise ValueError(f"groups must be 'patient' or 'slide', got {groups!r}.")
    slide_ids = [str(s) for s in slide_ids]
    lab = [str(p) for p in patient_ids] if groups == "patient" else slide_ids
    uniq = list(dict.fromkeys(lab))
    if len(uniq) < 2:
        hint = " (all slides come from one patient; use groups='slide')" if groups == "patient" else ""
        raise ValueError(f"Cross-validation needs at least 2 {groups} groups, got {len(uniq)}{hint}.")
    return [
        (g, [s for s, x in zip(slide_ids, lab, strict=True) if x != g], [s for s, x in zip(slide_ids, lab, strict=True) if x == g])
        for g in uniq
    ]
