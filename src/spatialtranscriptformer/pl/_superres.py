"""Plots of 2 µm super-resolution maps: H&E | prediction at 8/4/2 µm | ground truth."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .. import _constants as K
from .._data import get_table, slide_mpp
from ._utils import figure_dpi

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

_LEVELS = {2: 0, 4: 1, 8: 2, 16: 3}


def _truth_raster(
    adata, gene: str, truth: str, bounds_bins: tuple[int, int, int, int], affine_origin
) -> np.ndarray:
    """2 µm truth of ``gene`` inside ``bounds_bins`` (rows/cols of the prediction raster), NaN off tissue."""
    import scipy.sparse as sp

    r0, r1, c0, c1 = bounds_bins
    out = np.full((r1 - r0, c1 - c0), np.nan, dtype=np.float32)
    gi = adata.var_names.get_loc(gene)
    vals = adata.obsm[truth][:, gi] if truth != "counts" else adata.layers.get(K.COUNTS_LAYER, adata.X)[:, gi]
    vals = np.asarray(vals.toarray() if sp.issparse(vals) else vals).ravel()
    xy = np.asarray(adata.obsm[K.SPATIAL_KEY])
    rr = np.floor(xy[:, 1] / affine_origin).astype(int) - r0
    cc = np.floor(xy[:, 0] / affine_origin).astype(int) - c0
    ok = (rr >= 0) & (rr < r1 - r0) & (cc >= 0) & (cc < c1 - c0)
    out[rr[ok], cc[ok]] = vals[ok]
    return out


def superres(
    sdata: SpatialData,
    *,
    genes: str | Sequence[str],
    key: str = K.SUPERRES_KEY,
    region_um: tuple[float, float, float, float] | None = None,
    scales: Sequence[int] = (8, 4, 2),
    truth: str | None = "counts",
    mosaic: bool = False,
    image_key: str | None = None,
    table_key: str | None = None,
    cmap: str = "magma",
    figsize_per_panel: float = 2.6,
) -> Figure:
    """Per gene: H&E | predicted expected counts at 8, 4 and 2 µm | ground truth at 2 µm.

    Shows the maps written by :func:`~spatialtranscriptformer.tl.predict_superres` (layout of the Virchow2
    2 µm super-resolution figures). ``mosaic=True`` shows the whole slide at the 16 µm level instead.

    Parameters
    ----------
    sdata
        Slide with the prediction element ``key`` and the H&E.
    genes
        One gene or several (one row each).
    key
        Prediction image element.
    region_um
        ``(x0, y0, x1, y1)`` in µm of the H&E; default: the first 256 µm x 256 µm window centred on tissue.
    scales
        Prediction scales to show (µm).
    truth
        ``"counts"`` (table counts, 2 µm bins), an ``obsm`` key (e.g. ``"true_rates"``) or ``None``.
    mosaic
        Whole-slide view (16 µm level for the prediction, truth summed to 16 µm).
    image_key, table_key
        Elements of ``sdata``.
    cmap
        Colour map of the expression panels.
    figsize_per_panel
        Inches per panel.

    Returns
    -------
    The matplotlib figure.
    """
    import matplotlib.pyplot as plt

    from ..pp._image import resolve_image

    if key not in sdata.images:
        raise KeyError(
            f"Prediction image {key!r} not found; available images: {list(sdata.images.keys())}. "
            "Run `stf.tl.predict_superres` first."
        )
    el = sdata.images[key]
    genes = [genes] if isinstance(genes, str) else list(genes)
    avail = list(el["scale0"]["image"].coords["c"].values)
    missing = [g for g in genes if g not in avail]
    if missing:
        raise KeyError(f"Genes {missing} not in the prediction {key!r}; predicted genes: {avail[:10]}...")
    bad = [s for s in scales if s not in _LEVELS]
    if bad:
        raise ValueError(f"scales must be among {list(_LEVELS)}, got {bad}.")
    adata = get_table(sdata, table_key)
    if truth is not None and truth != "counts" and truth not in adata.obsm:
        raise KeyError(f"truth `obsm[{truth!r}]` not found; use 'counts', an obsm key or None.")
    mpp = slide_mpp(adata)
    level = resolve_image(sdata, adata, image_key)[0]
    h_um, w_um = level.extent_yx[0] * mpp, level.extent_yx[1] * mpp
    if mosaic:
        region_um, scales = (0.0, 0.0, w_um, h_um), [16]
    elif region_um is None:
        xy = np.asarray(adata.obsm[K.SPATIAL_KEY]) * mpp
        cx, cy = np.median(xy, axis=0)
        region_um = (cx - 128, cy - 128, cx + 128, cy + 128)
    x0, y0, x1, y1 = (float(v) for v in region_um)
    x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, w_um), min(y1, h_um)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"region_um must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {region_um}.")
    ncol = 1 + len(scales) + (truth is not None)
    fig, axes = plt.subplots(
        len(genes), ncol, figsize=(figsize_per_panel * ncol, figsize_per_panel * len(genes)), squeeze=False,
        dpi=figure_dpi(),
    )
    px = mpp * level.downscale  # µm per pixel of the image's finest level
    he = level.read(int(y0 / px), int(np.ceil(y1 / px)), int(x0 / px), int(np.ceil(x1 / px)))
    for i, gene in enumerate(genes):
        axes[i, 0].imshow(he)
        axes[i, 0].set_title("H&E" if i == 0 else "")
        axes[i, 0].set_ylabel(gene)
        for j, s in enumerate(scales):
            arr = el[f"scale{_LEVELS[s]}"]["image"].sel(c=gene)
            ys, xs = slice(int(y0 / s), int(np.ceil(y1 / s))), slice(int(x0 / s), int(np.ceil(x1 / s)))
            axes[i, 1 + j].imshow(np.asarray(arr.isel(y=ys, x=xs).values), cmap=cmap)
            axes[i, 1 + j].set_title(f"pred {s} µm" if i == 0 else "")
        if truth is not None:
            t_scale = scales[0] if mosaic else 2
            bins = (int(y0 / 2), int(np.ceil(y1 / 2)), int(x0 / 2), int(np.ceil(x1 / 2)))
            t = _truth_raster(adata, gene, truth, bins, 2 / mpp)
            if t_scale > 2:
                f = t_scale // 2
                hh, ww = t.shape[0] // f * f, t.shape[1] // f * f
                t = np.nansum(t[:hh, :ww].reshape(hh // f, f, ww // f, f), axis=(1, 3))
            axes[i, -1].imshow(np.ma.masked_invalid(t), cmap=cmap)
            axes[i, -1].set_title(f"truth {t_scale} µm" if i == 0 else "")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig
