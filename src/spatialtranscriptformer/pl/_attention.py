"""Which patches each pathway token attends to."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._data import get_embedding, slide_mpp, spot_coords
from .._docs import (
    doc_data,
    doc_params,
    doc_show_save,
    doc_slide_view,
    doc_spot_panels,
    doc_table_key,
)
from ._pathways import resolve_names
from ._utils import (
    DEFAULT_MAX_SIDE,
    as_list,
    check_save,
    display_name,
    draw_spots,
    finish,
    make_axes,
    ncols_grid,
    panel_width,
    single_slide_table,
    slide_view,
    wrap_title,
)

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=float)


def attention_frame(
    weights: Any, *, n_spots: int, obs_names: pd.Index, layer: int, names: Sequence[str] | None
) -> pd.DataFrame:
    """Pathway-to-patch attention as a (spots x pathway tokens) DataFrame.

    ``weights`` is a DataFrame (spots x pathways), an array ``(S,)`` or ``(P, S)``, one layer's map
    ``(heads, P + S, P + S)`` / ``(1, heads, P + S, P + S)``, or the list of per-layer maps returned by the
    module with ``return_attention=True`` (``layer`` picks one; heads are averaged).
    """
    if isinstance(weights, pd.DataFrame):
        df = weights
        if len(df) != n_spots:
            raise ValueError(f"`weights` has {len(df)} rows, the table {n_spots} spots.")
        return df.set_axis(obs_names, axis=0) if not df.index.equals(obs_names) else df
    if isinstance(weights, list | tuple):
        if not weights:
            raise ValueError("`weights` is an empty list of attention maps.")
        if not -len(weights) <= layer < len(weights):
            raise ValueError(f"`layer={layer}`: the attention has {len(weights)} layers.")
        weights = weights[layer]
    w = _to_numpy(weights)
    if w.ndim == 4:
        if w.shape[0] != 1:
            raise ValueError(
                f"Attention maps hold a batch of {w.shape[0]} slides; pass the one for this slide."
            )
        w = w[0]
    if w.ndim == 3:
        if w.shape[-1] != w.shape[-2] or w.shape[-1] <= n_spots:
            raise ValueError(
                f"An attention map must be (heads, P + S, P + S) with S = {n_spots} spots; got {w.shape}."
            )
        n_path = w.shape[-1] - n_spots
        w = w.mean(0)[:n_path, n_path:]
    if w.ndim == 1:
        w = w[None, :]
    if w.ndim != 2 or w.shape[1] != n_spots:
        raise ValueError(
            f"`weights` must be (S,), (P, S) or a (heads, P + S, P + S) map with S = {n_spots}; got {w.shape}."
        )
    if names is None or len(names) != w.shape[0]:
        names = [f"token {i}" for i in range(w.shape[0])] if w.shape[0] > 1 else ["attention"]
    return pd.DataFrame(w.T, index=obs_names, columns=[str(n) for n in names])


MAX_ATTENTION_SPOTS = 20_000
"""Largest slide whose explicit attention maps (O((P + S)^2) memory per layer) are computed."""


def model_attention(model: Any, adata: AnnData, *, device: str | None = None) -> list:
    """Per-layer attention maps of a fitted SpatialTranscriptFormer on one slide (whole slide, no windows).

    Runs ``model.module(x, coords, mask, return_attention=True)`` on the slide's embeddings
    ``obsm[model.embedding_key]`` and spot centres in µm, as :func:`spatialtranscriptformer.tl.predict`
    feeds them.
    """
    module = getattr(model, "module", None)
    if (
        module is None
        or not callable(getattr(module, "forward", None))
        or not getattr(model, "pathways", None)
    ):
        raise TypeError(
            f"`model` ({type(model).__name__}) is not a fitted model with pathway tokens (a `.module` and "
            "`.pathways`, e.g. `stf.tl.fit(..., model='stf')`); pass precomputed attention maps with `weights=`."
        )
    if adata.n_obs > MAX_ATTENTION_SPOTS:
        raise ValueError(
            f"The slide has {adata.n_obs} spots; explicit attention maps need O((P + S)^2) memory per layer. "
            f"Plot a region (at most {MAX_ATTENTION_SPOTS} spots) or pass `weights=`."
        )
    import torch

    from .._settings import settings

    x = get_embedding(adata, model.embedding_key)
    coords = (spot_coords(adata) * slide_mpp(adata)).astype(np.float32)
    if callable(getattr(model, "prepare_inputs", None)):
        x = model.prepare_inputs(x, coords)  # the model's own input (per-slide z-scores, neighbourhood context)
    dev = settings.torch_device(device)
    module = module.to(dev).eval()
    with torch.inference_mode():
        out = module(
            torch.from_numpy(x).unsqueeze(0).to(dev),
            torch.from_numpy(coords).unsqueeze(0).to(dev),
            torch.ones(1, len(x), dtype=torch.bool, device=dev),
            return_attention=True,
        )
    maps = out.get("attention") if isinstance(out, dict) else None
    if not maps:
        raise TypeError(f"The model's module ({type(module).__name__}) returned no attention maps.")
    return [m.float().cpu().numpy() for m in maps]


@doc_params(
    data=doc_data,
    table_key=doc_table_key,
    slide_view=doc_slide_view,
    spot_panels=doc_spot_panels,
    show_save=doc_show_save,
)
def attention(
    model: Any,
    data: Any,
    *,
    pathway: str | int | Sequence[str | int] | None = None,
    layer: int = -1,
    weights: Any = None,
    table_key: str | None = None,
    device: str | None = None,
    ncols: int = 4,
    image_key: str | None = None,
    level: int | None = None,
    max_side: int = DEFAULT_MAX_SIDE,
    crop: bool = True,
    show_image: bool = True,
    spot_scale: float = 1.0,
    cmap: str = "magma",
    alpha: float = 0.9,
    panel_size: tuple[float, float] = (4.0, 4.0),
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    return_fig: bool = False,
) -> Figure | np.ndarray | None:
    """Where each pathway token looks: its attention over the slide's patches.

    In the SpatialTranscriptFormer, pathway tokens query the patch tokens (the P→H flow, a
    perceiver-style bottleneck); the head-averaged attention a pathway token pays to each spot's patch
    shows which tissue it reads its evidence from. Maps come from the model's forward pass with
    ``return_attention=True`` (explicit attention, for diagnostics only).

    Parameters
    ----------
    model
        A fitted model with pathway tokens from :func:`spatialtranscriptformer.tl.fit` (``model="stf"``):
        its module is run once on the whole slide (embeddings ``obsm[model.embedding_key]``) with
        ``return_attention=True``; its ``pathways`` name the tokens. An object with a method
        ``attention(data, *, layer, table_key)`` returning a DataFrame (spots x pathways) is asked
        instead. May be ``None`` when ``weights`` is given.
    {data}
    pathway
        Pathway token(s) to show, by name (case-insensitive, ``HALLMARK_`` prefix optional) or position;
        ``None``: all tokens (at most 12).
    layer
        Transformer layer whose attention is shown (``-1``: the last).
    weights
        Precomputed attention instead of asking ``model``: a DataFrame (spots x pathways), an array
        ``(S,)`` or ``(P, S)``, one layer's ``(heads, P + S, P + S)`` map, or the module's list of per-layer
        maps (``return_attention=True`` output, batch of one slide).
    {table_key}
    device
        Torch device for the forward pass (``None``: ``stf.settings.device``).
    ncols
        Panels per row.
    {slide_view}
    cmap
        Colormap.
    {spot_panels}
    {show_save}

    Returns
    -------
    The figure if ``return_fig``, the array of axes if not shown, else ``None``.
    """
    from matplotlib.colors import Normalize

    save_path = check_save(save)
    adata = single_slide_table(data, table_key)
    if weights is None:
        if callable(getattr(model, "attention", None)):
            weights = model.attention(data, layer=layer, table_key=table_key)
        else:
            weights = model_attention(model, adata, device=device)
    names = getattr(model, "pathways", None) if model is not None else None
    df = attention_frame(weights, n_spots=adata.n_obs, obs_names=adata.obs_names, layer=layer, names=names)
    if pathway is None:
        chosen = list(df.columns[:12])
    else:
        chosen = resolve_names(as_list(pathway, name="pathway"), df.columns, what="Pathway tokens")
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
    nrows, nc = ncols_grid(len(chosen), ncols, ax=ax)
    fig, axes = make_axes(nrows, nc, ax=ax, panel_size=panel_size)
    flat = axes.ravel()
    layer_label = "last layer" if layer == -1 else f"layer {layer}"
    for a, name in zip(flat, chosen, strict=False):
        vals = df[name].to_numpy(dtype=float)
        finite = vals[np.isfinite(vals)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        coll = draw_spots(
            a, view, vals, cmap=cmap, norm=Normalize(lo, hi if hi > lo else lo + 1e-12), alpha=alpha
        )
        a.set_title(wrap_title(f"{display_name(name)}\nattention, {layer_label}", width_in=0.75 * panel_width(a, panel_size)))
        fig.colorbar(coll, ax=a, shrink=0.7, label="attention weight")
    for a in flat[len(chosen) :]:
        a.set_visible(False)
    return finish(fig, axes, show=show, save=save_path, return_fig=return_fig, user_ax=ax is not None)
