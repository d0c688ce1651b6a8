"""Masked PCC and SSIM of 2 µm super-resolution predictions at 2/4/8/16 µm."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._data import as_slide_list

if TYPE_CHECKING:
    from ._superres import SuperResModel

COLUMNS = ["gene", "scale_um", "pcc", "ssim", "frac_nonzero", "n_bins"]


def superres_metrics(
    pred: np.ndarray,
    true: np.ndarray,
    mask: np.ndarray,
    genes: Sequence[str],
    *,
    scales: Sequence[int] = (2, 4, 8, 16),
) -> pd.DataFrame:
    """Per gene and scale: masked PCC, masked SSIM and the fraction of non-zero true bins.

    ``pred``/``true`` are ``(N, G, S, S)`` 2 µm rasters (expected / observed counts), ``mask`` ``(N, S, S)``.
    Coarser scales are sum-pooled; a pooled bin is tissue when at least half its 2 µm bins are. PCC is
    over all tissue bins of all patches. SSIM (Wang et al. 2004; 7 x 7 window) is computed per patch on
    values min-max normalised to 0-1 within the tissue mask (per gene over all patches), with
    ``skimage.metrics.structural_similarity(..., full=True)``, averaged over the tissue bins.
    """
    from skimage.metrics import structural_similarity

    from ..train._superres_data import sum_pool

    rows = []
    for scale in scales:
        f = scale // 2
        p, t = sum_pool(pred, f), sum_pool(true, f)
        m = sum_pool(mask.astype(np.float32), f) >= 0.5 * f * f
        n = int(m.sum())
        for g, gene in enumerate(genes):
            pv, tv = p[:, g][m], t[:, g][m]
            pcc = float(np.corrcoef(pv, tv)[0, 1]) if n > 2 and pv.std() > 0 and tv.std() > 0 else np.nan
            ssims, weights = [], []
            if n > 2 and p.shape[-1] >= 3:
                plo, phi, tlo, thi = pv.min(), pv.max(), tv.min(), tv.max()
                for k in range(len(p)):
                    if not m[k].any():
                        continue
                    a = np.where(m[k], (t[k, g] - tlo) / max(thi - tlo, 1e-12), 0.0)
                    b = np.where(m[k], (p[k, g] - plo) / max(phi - plo, 1e-12), 0.0)
                    _, smap = structural_similarity(
                        a, b, win_size=min(7, a.shape[0] - (1 - a.shape[0] % 2)), data_range=1.0, full=True
                    )
                    ssims.append(float(smap[m[k]].mean()))
                    weights.append(int(m[k].sum()))
            ssim = float(np.average(ssims, weights=weights)) if ssims else np.nan
            rows.append(
                {
                    "gene": gene,
                    "scale_um": int(scale),
                    "pcc": pcc,
                    "ssim": ssim,
                    "frac_nonzero": float((tv > 0).mean()) if n else np.nan,
                    "n_bins": n,
                }
            )
    return pd.DataFrame(rows, columns=COLUMNS)


def evaluate_superres(
    data,
    model: SuperResModel,
    *,
    truth: str = "counts",
    aggregate: bool = False,
    patient: str | None = None,
    scales: Sequence[int] = (2, 4, 8, 16),
    table_key: str | None = None,
    image_key: str | None = None,
    batch_size: int = 8,
    min_tissue: float = 0.05,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Evaluate a super-resolution model on Visium HD slides with 2 µm bins.

    Patches are cut exactly as for training; the model predicts each from the H&E alone and the
    predictions are compared with the measured counts (or, for simulated slides, the known rates) at
    2/4/8/16 µm: masked Pearson r and masked SSIM per gene, plus the fraction of non-zero bins — the
    metrics of the Virchow2 2 µm super-resolution design.

    Parameters
    ----------
    data
        One slide or a list with 2 µm bins and H&E.
    model
        A trained :class:`~spatialtranscriptformer.tl.SuperResModel`.
    truth
        ``"counts"`` or an ``obsm`` key with per-bin truth (e.g. ``"true_rates"`` of
        :func:`~spatialtranscriptformer.datasets.synthetic`).
    aggregate
        Return the mean PCC / SSIM / non-zero fraction per scale (rows: scales) instead of per gene.
    patient
        Evaluate only the patches of this patient (e.g. the held-out one). Patients the model was trained
        or validated on (``model.params['train_patients']``/``['val_patients']``) give a warning: their
        scores are not held out.
    scales
        Scales in µm.
    table_key, image_key
        Elements of the SpatialData.
    batch_size
        Patches per decoder batch.
    min_tissue
        Minimum tissue fraction of a patch.
    progress
        Progress bar; ``None`` follows ``stf.settings.progress``.

    Returns
    -------
    Long table with columns ``gene, scale_um, pcc, ssim, frac_nonzero, n_bins``, or the per-scale means.
    """
    from .._settings import settings
    from ..train._superres_data import superres_targets
    from ._superres import slide_tokens

    progress = settings.progress if progress is None else progress
    slides = as_slide_list(data)
    patches = superres_targets(
        slides,
        genes=model.genes,
        patch_um=model.patch_um,
        values=truth,
        min_tissue=min_tissue,
        table_key=table_key,
    )
    if patient is not None:
        keep = np.flatnonzero(patches.patient_ids == str(patient))
        if not len(keep):
            raise ValueError(
                f"No patch of patient {patient!r}; patients: {sorted(set(patches.patient_ids))}."
            )
        patches = patches.subset(keep)
    used = set(model.params.get("train_patients", [])) | set(model.params.get("val_patients", []))
    overlap = sorted(used & set(patches.patient_ids.tolist()))
    if overlap:
        warnings.warn(
            f"Evaluating on patient(s) {overlap} whose patches trained or validated (early stopping, best "
            "epoch) this model (matched by patient id): these scores are not held-out scores. Evaluate on "
            "patients not passed to `fit_superres`, or use `stf.tl.cross_validate_superres`.",
            stacklevel=2,
        )
    pred = np.empty_like(patches.values)
    for i, s in enumerate(slides):
        sel = np.flatnonzero(patches.slide_index == i)
        if len(sel):
            tok = slide_tokens(
                s,
                model.backbone,
                patches.centers_px[sel],
                patches.patch_px[sel],
                table_key=table_key,
                image_key=image_key,
                progress=progress,
            )
            pred[sel] = model.predict_tokens(tok, batch_size=batch_size)
    res = superres_metrics(pred, patches.values, patches.mask, patches.genes, scales=scales)
    if aggregate:
        return (
            res.groupby("scale_um")[["pcc", "ssim", "frac_nonzero"]]
            .mean()
            .rename(columns={"pcc": "mean_pcc", "ssim": "mean_ssim", "frac_nonzero": "mean_frac_nonzero"})
        )
    return res
