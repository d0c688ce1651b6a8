"""Whole-slide mosaic of 2 µm super-resolution maps: the high-signal patches in place, grey off tissue."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .. import _constants as K
from .._data import get_table, slide_meta, slide_mpp
from .._docs import doc_params, doc_show_save
from ._superres import _LEVELS, OFF_TISSUE, _truth_raster, check_truth, prediction_element
from ._utils import as_list, check_save, finish, make_axes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

NOT_SHOWN = (1.0, 1.0, 1.0)
"""Colour of tissue outside the patches shown."""


def _pool_mean(x: np.ndarray, f: int) -> np.ndarray:
    """Mean over ``f x f`` blocks (the trailing partial block is dropped)."""
    if f == 1:
        return x
    h, w = x.shape[0] // f * f, x.shape[1] // f * f
    return x[:h, :w].reshape(h // f, f, w // f, f).mean((1, 3))


def _pool_sum(x: np.ndarray, f: int) -> np.ndarray:
    return _pool_mean(x, f) * (f * f)


def _tissue_mask_2um(sdata, adata, shape: tuple[int, int], mpp: float, image_key: str | None) -> np.ndarray:
    """Tissue at 2 µm: the bins of a 2 µm Visium HD table, else the non-background (not near-white) H&E."""
    meta = slide_meta(adata)
    b = meta.get("bin_size_um") or (meta.get("spot_diameter_um") if meta.get("shape") == "square" else None)
    if b is not None and np.isclose(float(b), 2.0):
        xy = np.asarray(adata.obsm[K.SPATIAL_KEY])
        rr, cc = np.floor(xy[:, 1] * mpp / 2).astype(int), np.floor(xy[:, 0] * mpp / 2).astype(int)
        ok = (rr >= 0) & (rr < shape[0]) & (cc >= 0) & (cc < shape[1])
        mask = np.zeros(shape, dtype=bool)
        mask[rr[ok], cc[ok]] = True
        return mask
    from ..pp._image import choose_level, resolve_image

    level = choose_level(resolve_image(sdata, adata, image_key), slide_mpp=mpp, target_mpp=2.0)
    img = level.read(0, level.shape_yx[0], 0, level.shape_yx[1]).astype(np.int16)
    tissue = img.min(-1) < 220
    um_per_px = mpp * level.downscale
    ys = np.minimum(((np.arange(shape[0]) + 0.5) * 2 / um_per_px).astype(int), tissue.shape[0] - 1)
    xs = np.minimum(((np.arange(shape[1]) + 0.5) * 2 / um_per_px).astype(int), tissue.shape[1] - 1)
    return tissue[np.ix_(ys, xs)]


@doc_params(show_save=doc_show_save)
def superres_mosaic(
    sdata: SpatialData,
    *,
    genes: str | Sequence[str],
    key: str | Sequence[str] = K.SUPERRES_KEY,
    truth: str | None = "counts",
    scale_um: int = 2,
    n_patches: int | None = 36,
    min_counts: float = 50,
    metrics: bool = True,
    table_key: str | None = None,
    image_key: str | None = None,
    cmap: str = "magma",
    panel_size: tuple[float, float] = (4.0, 4.0),
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    return_fig: bool = False,
) -> Figure | np.ndarray | None:
    """Whole-slide mosaic of 2 µm predictions: per gene, the high-signal patches in place on the slide.

    The figure of the Virchow2 2 µm super-resolution design (vanbelkummax/virchow2-st-2uM): for each gene,
    the patches of :func:`~spatialtranscriptformer.tl.predict_superres` whose measured counts of the gene
    reach ``min_counts`` (at most ``n_patches``, highest first) are drawn at their place on the whole
    slide at ``scale_um``; bins outside the tissue mask are grey, tissue outside the shown patches white.
    One column per prediction element ``key`` (e.g. a Poisson and an MSE model side by side) after the
    ground truth; with ``metrics`` each prediction's title carries its masked Pearson r and masked SSIM
    against the truth over the shown patches (as in
    :func:`~spatialtranscriptformer.tl.evaluate_superres`). Each panel's colour scale spans its 1st to
    99th percentile over the shown tissue bins.

    Parameters
    ----------
    sdata
        Slide with the prediction element(s) ``key`` and, for ``truth``, its 2 µm Visium HD table.
    genes
        One gene or several (one row each).
    key
        Prediction image element, or several (one column each).
    truth
        ``"counts"`` (the table's counts), an ``obsm`` key (e.g. ``"true_rates"`` of simulated slides) or
        ``None`` (no truth column; patches ranked by the first prediction, no metrics).
    scale_um
        Bin size shown: 2, 4, 8 or 16 µm (sums of 2 µm bins).
    n_patches
        Most patches shown per gene (``None``: all that reach ``min_counts``).
    min_counts
        Least total of the gene (truth, else the first prediction) in a patch for it to be shown
        (the design: 50 UMI). No patch reaching it is an error naming the largest patch total.
    metrics
        Masked PCC and SSIM of each prediction over the shown patches in its title.
    table_key, image_key
        Elements of ``sdata``; the tissue mask is the table's 2 µm bins, else the non-white H&E.
    cmap
        Colour map.
    panel_size
        Width and height (inches) of one panel.
    ax
        Axes to draw into, one per panel (row-major: genes x (truth, keys)).
    {show_save}

    Returns
    -------
    The figure if ``return_fig``, the (genes x panels) array of axes if not shown, else ``None``.
    """
    from matplotlib.colors import Normalize

    from ..tl._superres_evaluate import superres_metrics

    save_path = check_save(save)
    genes = [str(g) for g in as_list(genes, name="genes")]
    keys = [str(k) for k in as_list(key, name="key")]
    if scale_um not in _LEVELS:
        raise ValueError(f"scale_um must be one of {list(_LEVELS)}, got {scale_um!r}.")
    if n_patches is not None and (not isinstance(n_patches, int | np.integer) or n_patches < 1):
        raise ValueError(f"n_patches must be a positive integer or None, got {n_patches!r}.")
    if not np.isfinite(min_counts) or min_counts < 0:
        raise ValueError(f"min_counts must be a finite number >= 0, got {min_counts!r}.")
    els = [prediction_element(sdata, k, genes) for k in keys]
    adata = get_table(sdata, table_key)
    check_truth(adata, truth)
    patch_um = {int(adata.uns.get(k, {}).get("params", {}).get("patch_um", 0)) for k in keys}
    if len(patch_um) != 1 or 0 in patch_um:
        raise ValueError(
            f"The prediction elements {keys} need their parameters in the table's uns (written by "
            "`stf.tl.predict_superres`) with one patch size."
        )
    patch_um = patch_um.pop()
    shapes = {tuple(el["scale0"]["image"].shape[1:]) for el in els}
    if len(shapes) != 1:
        raise ValueError(f"The prediction elements {keys} have different shapes {sorted(shapes)}.")
    shape = shapes.pop()
    mpp = slide_mpp(adata)
    S, f = patch_um // 2, scale_um // 2
    n_rows, n_cols = shape[0] // S, shape[1] // S
    mask2 = _tissue_mask_2um(sdata, adata, shape, mpp, image_key)
    mask_s = _pool_mean(mask2.astype(np.float32), f) >= 0.5
    rows_t, cols_t = np.nonzero(mask_s)
    if not len(rows_t):
        raise ValueError("The tissue mask is empty: no 2 µm bin of the table / no tissue in the H&E.")
    pad = max(1, S // f // 4)
    crop = (
        slice(max(rows_t.min() - pad, 0), rows_t.max() + pad + 1),
        slice(max(cols_t.min() - pad, 0), cols_t.max() + pad + 1),
    )
    background = np.where(mask_s[..., None], np.array(NOT_SHOWN), np.array(OFF_TISSUE))[crop]
    ncol = len(keys) + (truth is not None)
    fig, axes = make_axes(len(genes), ncol, ax=ax, panel_size=panel_size)
    level = _LEVELS[scale_um]
    e = S // f  # patch edge at scale_um
    for i, gene in enumerate(genes):
        t2 = None
        if truth is not None:
            t2 = np.nan_to_num(_truth_raster(adata, gene, truth, (0, shape[0], 0, shape[1]), 2 / mpp)) * mask2
            tot = t2[: n_rows * S, : n_cols * S].reshape(n_rows, S, n_cols, S).sum((1, 3))
        else:  # rank by the first prediction, from its 16 µm level (a patch is 8 x smaller there)
            p16 = np.asarray(els[0]["scale3"]["image"].sel(c=gene).values, dtype=np.float64)
            m16 = _pool_mean(mask2.astype(np.float32), 8) >= 0.5
            q = S // 8
            tot = (p16 * m16)[: n_rows * q, : n_cols * q].reshape(n_rows, q, n_cols, q).sum((1, 3))
        order = np.argsort(-tot, axis=None, kind="stable")
        order = order[tot.ravel()[order] >= min_counts]
        if not len(order):
            raise ValueError(
                f"Gene {gene!r}: no patch has a total of at least min_counts={min_counts:g} "
                f"({'truth' if t2 is not None else 'prediction'}; largest patch total {tot.max():.3g}). "
                "Lower `min_counts`."
            )
        order = order[:n_patches]
        pr, pc = np.unravel_index(order, tot.shape)
        shown = np.zeros(mask_s.shape, dtype=bool)
        for r, c in zip(pr, pc, strict=True):
            shown[r * e : (r + 1) * e, c * e : (c + 1) * e] = True
        shown &= mask_s
        panels = [("truth", _pool_sum(t2, f))] if t2 is not None else []
        scores = {}
        for k, el in zip(keys, els, strict=True):  # only the shown patches are read from the stores
            lv, p0 = el[f"scale{level}"]["image"].sel(c=gene), el["scale0"]["image"].sel(c=gene)
            canvas = np.zeros(mask_s.shape, dtype=np.float32)
            patches2 = []
            for r, c in zip(pr, pc, strict=True):
                canvas[r * e : (r + 1) * e, c * e : (c + 1) * e] = lv.isel(
                    y=slice(r * e, (r + 1) * e), x=slice(c * e, (c + 1) * e)
                ).values
                if metrics and t2 is not None:
                    patches2.append(p0.isel(y=slice(r * S, (r + 1) * S), x=slice(c * S, (c + 1) * S)).values)
            panels.append((k, canvas))
            if patches2:
                tp = np.stack([t2[r * S : (r + 1) * S, c * S : (c + 1) * S] for r, c in zip(pr, pc, strict=True)])
                mp = np.stack([mask2[r * S : (r + 1) * S, c * S : (c + 1) * S] for r, c in zip(pr, pc, strict=True)])
                res = superres_metrics(
                    np.stack(patches2)[:, None].astype(np.float32), tp[:, None], mp, [gene], scales=(scale_um,)
                )
                scores[k] = (float(res["pcc"].iloc[0]), float(res["ssim"].iloc[0]))
        for j, (name, v) in enumerate(panels):
            a = axes[i, j]
            lo, hi = (float(q) for q in np.percentile(v[shown], [1, 99]))
            a.imshow(background, interpolation="nearest")
            a.imshow(
                np.ma.masked_array(v, ~shown)[crop], cmap=cmap, norm=Normalize(lo, hi if hi > lo else lo + 1.0),
                interpolation="nearest",
            )
            title = ("truth" + (f" ({truth})" if truth != "counts" else "")) if name == "truth" else name
            if name in scores:
                pcc, ssim = scores[name]
                title += f"\nPCC {pcc:.2f} · SSIM {ssim:.2f}"
            elif name == "truth":
                title += f"\n{len(order)} patches ≥ {min_counts:g}"
            a.set_title(title, fontsize="medium")
            a.set_xticks([])
            a.set_yticks([])
        axes[i, 0].set_ylabel(f"{gene} ({scale_um} µm)")
    return finish(fig, axes, show=show, save=save_path, return_fig=return_fig, user_ax=ax is not None)
