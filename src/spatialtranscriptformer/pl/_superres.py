"""Plots of 2 µm super-resolution maps: H&E | prediction at 8/4/2 µm | ground truth."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .. import _constants as K
from .._data import get_table, slide_mpp
from .._docs import doc_params, doc_show_save
from ._utils import as_list, check_save, finish, make_axes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

_LEVELS = {2: 0, 4: 1, 8: 2, 16: 3}
OFF_TISSUE = (0.62, 0.62, 0.62)
"""Colour of bins outside the tissue mask."""


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


def prediction_element(sdata, key: str, genes: list[str]):
    """The prediction image element ``key`` holding ``genes`` (clear errors otherwise)."""
    if key not in sdata.images:
        raise KeyError(
            f"Prediction image {key!r} not found; available images: {list(sdata.images.keys())}. "
            "Run `stf.tl.predict_superres` first."
        )
    el = sdata.images[key]
    avail = list(el["scale0"]["image"].coords["c"].values)
    missing = [g for g in genes if g not in avail]
    if missing:
        raise KeyError(f"Genes {missing} not in the prediction {key!r}; predicted genes: {avail[:10]}...")
    return el


def check_truth(adata, truth: str | None) -> None:
    """``truth`` is ``None``, ``"counts"`` or an ``obsm`` key of the table."""
    if truth is not None and truth != "counts" and truth not in adata.obsm:
        raise KeyError(f"truth `obsm[{truth!r}]` not found; use 'counts', an obsm key or None.")


@doc_params(show_save=doc_show_save)
def superres(
    sdata: SpatialData,
    *,
    genes: str | Sequence[str],
    key: str = K.SUPERRES_KEY,
    region_um: tuple[float, float, float, float] | None = None,
    scales: Sequence[int] = (8, 4, 2),
    truth: str | None = "counts",
    image_key: str | None = None,
    table_key: str | None = None,
    cmap: str = "magma",
    panel_size: tuple[float, float] = (2.6, 2.6),
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    return_fig: bool = False,
) -> Figure | np.ndarray | None:
    """Per gene: H&E | predicted expected counts at 8, 4 and 2 µm | ground truth at 2 µm, in a window.

    Shows the maps written by :func:`~spatialtranscriptformer.tl.predict_superres` (layout of the Virchow2
    2 µm super-resolution figures). Each panel has its own colour scale (a bin at 8 µm sums sixteen 2 µm
    bins). For the whole slide see :func:`~spatialtranscriptformer.pl.superres_mosaic`.

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
    image_key, table_key
        Elements of ``sdata``.
    cmap
        Colour map of the expression panels.
    panel_size
        Width and height (inches) of one panel.
    ax
        Axes to draw into, one per panel (row-major: genes x (H&E, scales, truth)).
    {show_save}

    Returns
    -------
    The figure if ``return_fig``, the (genes x panels) array of axes if not shown, else ``None``.
    """
    from ..pp._image import resolve_image

    save_path = check_save(save)
    genes = [str(g) for g in as_list(genes, name="genes")]
    el = prediction_element(sdata, key, genes)
    scales = [int(s) for s in as_list(scales, name="scales")]
    bad = [s for s in scales if s not in _LEVELS]
    if bad:
        raise ValueError(f"scales must be among {list(_LEVELS)}, got {bad}.")
    adata = get_table(sdata, table_key)
    check_truth(adata, truth)
    mpp = slide_mpp(adata)
    level = resolve_image(sdata, adata, image_key)[0]
    h_um, w_um = level.extent_yx[0] * mpp, level.extent_yx[1] * mpp
    if region_um is None:
        xy = np.asarray(adata.obsm[K.SPATIAL_KEY]) * mpp
        cx, cy = np.median(xy, axis=0)
        region_um = (cx - 128, cy - 128, cx + 128, cy + 128)
    x0, y0, x1, y1 = (float(v) for v in region_um)
    x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, w_um), min(y1, h_um)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"region_um must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {region_um}.")
    import matplotlib.pyplot as plt

    cmap_t = plt.get_cmap(cmap).with_extremes(bad=OFF_TISSUE)  # truth: grey outside the tissue bins
    ncol = 1 + len(scales) + (truth is not None)
    fig, axes = make_axes(len(genes), ncol, ax=ax, panel_size=panel_size)
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
            bins = (int(y0 / 2), int(np.ceil(y1 / 2)), int(x0 / 2), int(np.ceil(x1 / 2)))
            t = _truth_raster(adata, gene, truth, bins, 2 / mpp)
            axes[i, -1].imshow(np.ma.masked_invalid(t), cmap=cmap_t)
            axes[i, -1].set_title("truth 2 µm" if i == 0 else "")
    for a in axes.ravel():
        a.set_xticks([])
        a.set_yticks([])
    return finish(fig, axes, show=show, save=save_path, return_fig=return_fig, user_ax=ax is not None)
