"""Named pathway-score maps on the H&E."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .. import _constants as K
from .._docs import (
    doc_data,
    doc_params,
    doc_show_save,
    doc_slide_view,
    doc_spot_panels,
    doc_table_key,
)
from ._utils import (
    DEFAULT_MAX_SIDE,
    as_list,
    check_save,
    display_name,
    diverging_cmap,
    draw_spots,
    finish,
    make_axes,
    ncols_grid,
    panel_width,
    pearson_label,
    single_slide_table,
    slide_view,
    wrap_title,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def pathway_frame(data: Any, adata: AnnData, key: str, table_key: str | None = None) -> pd.DataFrame:
    """Scores ``key`` as a DataFrame (spots x pathways) aligned to ``adata`` (a clear error otherwise).

    Either a DataFrame ``obsm[key]`` of the table (targets of ``stf.pp``, predictions on an AnnData) or the
    prediction table ``tables[key]`` of a SpatialData.
    """
    from ..tl._prediction_table import read_predictions

    if key in adata.obsm:
        df = adata.obsm[key]
        if not isinstance(df, pd.DataFrame):
            raise ValueError(
                f"`obsm[{key!r}]` must be a DataFrame with pathway names as columns, got {type(df).__name__}."
            )
        return df
    try:
        names, values, _ = read_predictions(data, adata, key, kind="pathways", table_key=table_key)
    except KeyError:
        avail = [k for k in adata.obsm.keys() if isinstance(adata.obsm[k], pd.DataFrame)]
        raise KeyError(
            f"No pathway scores {key!r}: neither a DataFrame `obsm[{key!r}]` (present: {avail or 'none'}) nor a "
            f"prediction table {key!r}. Predicted scores are written by `stf.tl.predict` ({K.PRED_PATHWAY_KEY!r}), "
            f"targets by `stf.pp.pathway_activity` ({K.PATHWAY_KEY!r})."
        ) from None
    if values is None:
        raise ValueError(f"{key!r} holds slide-level pathway scores (one per slide); there is no map to draw.")
    return pd.DataFrame(values, index=adata.obs_names, columns=names)


def resolve_names(requested: list, available: Sequence[str], *, what: str) -> list[str]:
    """Match names exactly, then case-insensitively, then with the MSigDB ``HALLMARK_`` prefix."""
    avail = [str(a) for a in available]
    upper = {a.upper(): a for a in avail}
    out, missing = [], []
    for name in requested:
        if isinstance(name, int | np.integer) and not isinstance(name, bool):
            if not -len(avail) <= int(name) < len(avail):
                raise IndexError(f"{what} index {name} out of range ({len(avail)} available).")
            out.append(avail[int(name)])
            continue
        name = str(name)
        hit = name if name in avail else upper.get(name.upper()) or upper.get(f"HALLMARK_{name.upper()}")
        (out.append(hit) if hit is not None else missing.append(name))
    if missing:
        raise KeyError(
            f"{what} not found: {missing}; available: {avail[:8]}{' ...' if len(avail) > 8 else ''}."
        )
    return out


def score_norm(values: np.ndarray, center: float | None):
    """Colour normalisation: symmetric around ``center`` when the values straddle it, else min-max."""
    from matplotlib.colors import Normalize

    v = values[np.isfinite(values)]
    if not v.size:
        return Normalize(0.0, 1.0)
    lo, hi = float(v.min()), float(v.max())
    if center is not None and lo < center < hi:
        half = max(center - lo, hi - center)
        return Normalize(center - half, center + half)
    return Normalize(lo, hi if hi > lo else lo + 1e-9)


@doc_params(
    data=doc_data,
    table_key=doc_table_key,
    slide_view=doc_slide_view,
    spot_panels=doc_spot_panels,
    show_save=doc_show_save,
)
def pathways(
    data: Any,
    *,
    pathways: str | int | Sequence[str | int],
    key: str | Sequence[str] = K.PRED_PATHWAY_KEY,
    table_key: str | None = None,
    ncols: int = 4,
    image_key: str | None = None,
    level: int | None = None,
    max_side: int = DEFAULT_MAX_SIDE,
    crop: bool = True,
    show_image: bool = True,
    spot_scale: float = 1.0,
    cmap: str | None = None,
    center: float | None = 0.0,
    alpha: float = 1.0,
    panel_size: tuple[float, float] = (4.0, 4.0),
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    return_fig: bool = False,
) -> Figure | np.ndarray | None:
    """Map named pathway scores on the H&E.

    Shows where each pathway (e.g. an MSigDB Hallmark set, Liberzon et al. 2015) is active: the
    predicted scores of :func:`spatialtranscriptformer.tl.predict` (``"stf_pathways"``: the table
    ``tables['stf_pathways']`` of a SpatialData, ``obsm['stf_pathways']`` of an AnnData) or the
    expression-derived targets (``obsm['pathway_activity']``). With several ``key`` s, each pathway is a
    row and each key a column, and the panels after the first carry the Pearson r with the first key
    across spots. Each panel has its own colour scale (scores and targets live on different scales).
    Titles drop the ``HALLMARK_`` prefix and wrap to the panel width.

    Parameters
    ----------
    {data}
    pathways
        Pathway name(s) (columns of ``obsm[key]``; matched case-insensitively, the ``HALLMARK_`` prefix
        may be left out) or column positions.
    key
        Key(s) of scores (spots x pathways): a DataFrame ``obsm[key]`` of the table, or the prediction
        table ``tables[key]`` of a SpatialData (``pathway_key_added`` of :func:`~spatialtranscriptformer.tl.predict`).
    {table_key}
    ncols
        Panels per row when a single ``key`` is shown.
    {slide_view}
    cmap
        Colormap; ``None``: a diverging map that is dark (not white) at ``center`` when the scores straddle
        it — a near-zero spot stays visible on the pink/white H&E instead of looking like empty glass
        (see :func:`~spatialtranscriptformer.pl._utils.diverging_cmap`) — else ``"viridis"``.
    center
        Value at the colormap's centre when the scores straddle it; ``None`` for a min-max scale.
    {spot_panels}
    {show_save}

    Returns
    -------
    The figure if ``return_fig``, the array of axes if not shown, else ``None``.
    """
    save_path = check_save(save)
    adata = single_slide_table(data, table_key)
    keys = [str(k) for k in as_list(key, name="key")]
    frames = [pathway_frame(data, adata, k, table_key) for k in keys]
    names = resolve_names(as_list(pathways, name="pathways"), frames[0].columns, what="Pathways")
    for k, df in zip(keys[1:], frames[1:], strict=True):
        resolve_names(names, df.columns, what=f"Pathways of `obsm[{k!r}]`")
    view = slide_view(
        data,
        adata,
        image_key=image_key,
        level=level,
        max_side=max_side,
        crop=crop,
        spot_scale=spot_scale,
        show_image=show_image,
    )
    if len(keys) == 1:
        nrows, nc = ncols_grid(len(names), ncols, ax=ax)
        panels = [(n, keys[0], frames[0]) for n in names]
    else:
        nrows, nc = len(names), len(keys)
        panels = [(n, k, df) for n in names for k, df in zip(keys, frames, strict=True)]
    fig, axes = make_axes(nrows, nc, ax=ax, panel_size=panel_size)
    flat = axes.ravel()
    for i, (name, k, df) in enumerate(panels):
        a = flat[i]
        vals = np.asarray(pd.to_numeric(df[name], errors="coerce"), dtype=float)
        norm = score_norm(vals, center)
        straddles = center is not None and norm.vmin < center < norm.vmax
        cm = cmap if cmap is not None else (diverging_cmap() if straddles else "viridis")
        coll = draw_spots(a, view, vals, cmap=cm, norm=norm, alpha=alpha)
        title = display_name(name)
        if len(keys) > 1:
            title = f"{title} · {k}"
        title = wrap_title(title, width_in=0.75 * panel_width(a, panel_size))
        if len(keys) > 1 and k != keys[0]:
            title += pearson_label(np.asarray(frames[0][name], dtype=float), vals)
        a.set_title(title)
        fig.colorbar(coll, ax=a, shrink=0.7, label="score")
    for a in flat[len(panels) :]:
        a.set_visible(False)
    return finish(fig, axes, show=show, save=save_path, return_fig=return_fig, user_ax=ax is not None)
