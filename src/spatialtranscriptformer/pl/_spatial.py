"""Observed vs predicted expression maps on the H&E."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

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
    draw_spots,
    finish,
    make_axes,
    outline_spots,
    pearson_label,
    single_slide_table,
    slide_view,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

X_LAYER = "X"
"""Name that selects ``adata.X`` in ``layers=``."""


def _layer_matrix(adata: AnnData, layer: str):
    if layer == X_LAYER:
        return adata.X
    if layer not in adata.layers:
        raise KeyError(
            f"Layer {layer!r} not found in the table; available layers: {[X_LAYER, *adata.layers.keys()]}. "
            f"Predictions are written by `stf.tl.predict` (layer {K.PRED_KEY!r})."
        )
    return adata.layers[layer]


def _holds_counts(adata: AnnData, layer: str) -> bool:
    """Whether a layer holds raw counts: the counts layer, an integer dtype, or integer-valued floats."""
    if layer == K.COUNTS_LAYER:
        return True
    m = _layer_matrix(adata, layer)
    if m is None:
        return False
    vals = m.data if sp.issparse(m) else np.asarray(m).ravel()
    if np.issubdtype(vals.dtype, np.integer):
        return True
    sample = vals[:100_000]
    sample = sample[np.isfinite(sample)]
    return bool(sample.size) and bool(np.all(sample == np.round(sample))) and bool((sample >= 0).all())


@doc_params(
    data=doc_data,
    table_key=doc_table_key,
    slide_view=doc_slide_view,
    spot_panels=doc_spot_panels,
    show_save=doc_show_save,
)
def spatial(
    data: Any,
    *,
    genes: str | Sequence[str],
    layers: Sequence[str] = (K.COUNTS_LAYER, K.PRED_KEY),
    log1p: bool | Sequence[str] = True,
    table_key: str | None = None,
    image_key: str | None = None,
    level: int | None = None,
    max_side: int = DEFAULT_MAX_SIDE,
    crop: bool = True,
    show_image: bool = True,
    spot_scale: float = 1.0,
    cmap: str = "viridis",
    alpha: float = 1.0,
    highlight: str | None = None,
    panel_size: tuple[float, float] = (4.0, 4.0),
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    return_fig: bool = False,
) -> Figure | np.ndarray | None:
    """Observed vs predicted expression of genes, side by side on the H&E.

    One row per gene, one column per layer (default: observed counts, then the prediction of
    :func:`spatialtranscriptformer.tl.predict`). The colour scale is shared across the layers of a
    gene, so a map that is too flat or too bright stands out. Every panel after the first carries the
    Pearson r of its values with the first layer's, per gene across the spots where both are defined
    (the spot-level metric of the HEST-Benchmark, Jaume et al. 2024). Spots are drawn at their
    physical size (``uns['stf_slide']['spot_diameter_um']``) over the H&E.

    Parameters
    ----------
    {data}
    genes
        Gene name(s) in ``var_names``; one row each.
    layers
        Layers to show, one column each; the first is the reference for Pearson r. ``"X"`` selects
        ``adata.X``.
    log1p
        ``True``: apply ``log1p`` to the layers holding raw counts (the ``"counts"`` layer and any layer
        with non-negative integer values), putting them on the log1p scale of the predictions. A
        sequence names the layers to transform; ``False`` transforms none.
    {table_key}
    {slide_view}
    cmap
        Colormap.
    highlight
        A boolean ``obs`` column (e.g. the held-out spots of a split): those spots are outlined and the
        Pearson r in the titles is computed on them only (a model scored on its own training spots
        looks better than it is).
    {spot_panels}
    {show_save}

    Returns
    -------
    The figure if ``return_fig``, the (genes x layers) array of axes if not shown, else ``None``.
    """
    from matplotlib.colors import Normalize

    save_path = check_save(save)
    adata = single_slide_table(data, table_key)
    genes = [str(g) for g in as_list(genes, name="genes")]
    layers = [str(layer) for layer in as_list(layers, name="layers")]
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise KeyError(f"Genes not in the table's var_names: {missing[:10]} ({len(missing)} missing).")
    for layer in layers:
        _layer_matrix(adata, layer)
    if isinstance(log1p, bool):
        to_log = {layer for layer in layers if log1p and _holds_counts(adata, layer)}
    else:
        to_log = {str(x) for x in as_list(log1p, name="log1p")}
        unknown = to_log - set(layers)
        if unknown:
            raise ValueError(
                f"`log1p` names layers that are not plotted: {sorted(unknown)} (layers={layers})."
            )

    values: dict[tuple[str, str], np.ndarray] = {}
    for layer in layers:
        for g in genes:
            v = np.asarray(adata.obs_vector(g, layer=None if layer == X_LAYER else layer), dtype=float)
            if layer in to_log:
                if np.nanmin(v, initial=0.0) < 0:
                    raise ValueError(f"Layer {layer!r} has negative values for {g!r}; cannot apply log1p.")
                v = np.log1p(v)
            values[(g, layer)] = v

    mask = None
    if highlight is not None:
        if highlight not in adata.obs:
            raise KeyError(f"`highlight`: no obs column {highlight!r}; available: {list(adata.obs.columns)[:10]}.")
        col = adata.obs[highlight]
        if col.dtype != bool or col.isna().any():
            raise ValueError(f"`highlight`: obs[{highlight!r}] must be a boolean column (True = highlighted spot).")
        mask = col.to_numpy(dtype=bool)
        if not mask.any():
            raise ValueError(f"`highlight`: obs[{highlight!r}] marks no spot.")
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
    fig, axes = make_axes(len(genes), len(layers), ax=ax, panel_size=panel_size)
    for i, g in enumerate(genes):
        stacked = np.concatenate([values[(g, layer)] for layer in layers])
        finite = stacked[np.isfinite(stacked)]
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        norm = Normalize(vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1e-9)
        ref = values[(g, layers[0])]
        coll = None
        for j, layer in enumerate(layers):
            a = axes[i, j]
            coll = draw_spots(a, view, values[(g, layer)], cmap=cmap, norm=norm, alpha=alpha)
            if mask is not None:
                outline_spots(a, view, mask)
            title = f"{g} · {layer}"
            if j > 0:
                sel = slice(None) if mask is None else mask
                title += pearson_label(ref[sel], values[(g, layer)][sel], suffix="" if mask is None else f" ({highlight.removeprefix('stf_').replace('_', '-')})")
            a.set_title(title)
        label = "log1p expression" if to_log & set(layers) else "expression"
        fig.colorbar(coll, ax=list(axes[i, :]), shrink=0.8, label=label)
    return finish(fig, axes, show=show, save=save_path, return_fig=return_fig, user_ax=ax is not None)
