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


class _Source:
    """One column of panels: a layer of the table (``"X"`` included) or a prediction output of ``stf.tl.predict``."""

    def __init__(self, data: Any, adata: AnnData, name: str, table_key: str | None = None):
        self.name, self.adata = name, adata
        self.pred_names: list[str] | None = None
        if name == X_LAYER or name in adata.layers:
            return
        from ..tl._prediction_table import read_predictions

        try:
            names, values, rec = read_predictions(data, adata, name, kind="expression", table_key=table_key)
        except KeyError:
            raise KeyError(
                f"{name!r} is neither a layer of the table ({[X_LAYER, *adata.layers.keys()]}) nor predictions "
                f"of `stf.tl.predict` (a table {name!r} of the SpatialData, or `obsm[{name!r}]` of an AnnData); "
                f"predictions are written by `stf.tl.predict` (key {K.PRED_KEY!r} by default)."
            ) from None
        if values is None:
            raise ValueError(f"{name!r} holds slide-level predictions (one profile per slide); there is no map to draw.")
        self.pred_names, self.values, self.record = names, values, rec
        self.index = {g: j for j, g in enumerate(names)}

    @property
    def is_prediction(self) -> bool:
        return self.pred_names is not None

    def check_genes(self, genes: list[str]) -> None:
        if self.is_prediction:
            missing = [g for g in genes if g not in self.index]
            if missing:
                raise KeyError(
                    f"{self.name!r} has no prediction for {missing[:10]}: the model predicts {len(self.pred_names)} "
                    f"genes (e.g. {self.pred_names[:5]}); a gene it does not predict has no predicted map. "
                    "Choose among the predicted genes, or drop this column from `layers`."
                )
            return
        missing = [g for g in genes if g not in self.adata.var_names]
        if missing:
            raise KeyError(f"Genes not in the table's var_names: {missing[:10]} ({len(missing)} missing).")

    def vector(self, gene: str) -> np.ndarray:
        if self.is_prediction:
            return np.asarray(self.values[:, self.index[gene]], dtype=float)
        return np.asarray(self.adata.obs_vector(gene, layer=None if self.name == X_LAYER else self.name), dtype=float)

    def holds_counts(self) -> bool:
        """Raw counts: the counts layer, an integer layer, integer-valued floats, or predictions in count space."""
        if self.is_prediction:
            return self.record.get("target_space") == "counts"
        if self.name == K.COUNTS_LAYER:
            return True
        m = self.adata.X if self.name == X_LAYER else self.adata.layers[self.name]
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
    :func:`spatialtranscriptformer.tl.predict`). A gene the model does not predict is an error, not a map
    of zeros. The colour scale is shared across the layers of a
    gene, so a map that is too flat or too bright stands out. Every panel after the first carries the
    Pearson r of its values with the first layer's, per gene across the spots where both are defined
    (the spot-level metric of the HEST-Benchmark, Jaume et al. 2024). Spots are drawn at their
    physical size (``uns['stf_slide']['spot_diameter_um']``) over the H&E.

    Parameters
    ----------
    {data}
    genes
        Gene name(s); one row each. Each must be in the table's ``var_names`` for a layer and among the
        predicted genes for a prediction key.
    layers
        What to show, one column each; the first is the reference for Pearson r. Each is a layer of the
        table (``"X"`` selects ``adata.X``) or the key of predictions written by
        :func:`~spatialtranscriptformer.tl.predict` (``key_added``: the table ``tables[key]`` of a
        SpatialData, ``obsm[key]`` of an AnnData), e.g. ``("counts", "stf_pred", "ridge_pred")``.
    log1p
        ``True``: apply ``log1p`` to what holds raw counts (the ``"counts"`` layer, any layer with
        non-negative integer values, predictions in count space), putting them on the log1p scale of the
        predictions. A sequence names the layers to transform; ``False`` transforms none.
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
    sources = {layer: _Source(data, adata, layer, table_key) for layer in layers}
    for src in sources.values():
        src.check_genes(genes)
    if isinstance(log1p, bool):
        to_log = {layer for layer in layers if log1p and sources[layer].holds_counts()}
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
            v = sources[layer].vector(g)
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
