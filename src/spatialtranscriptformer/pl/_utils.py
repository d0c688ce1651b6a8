"""Shared plotting helpers: the H&E at a pyramid level, spots drawn at their physical size, figure output."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .. import _constants as K
from .._data import get_table, is_spatialdata, slide_ids, spot_coords
from .._logging import logger

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DEFAULT_MAX_SIDE = 1000
"""Longest side (px) of the displayed H&E crop when no pyramid level is chosen."""
MIN_DPI = 100
"""Figures made by :mod:`spatialtranscriptformer.pl` have at least this resolution (dots per inch)."""
DIVERGING_CMAP = "stf_diverging"
"""Default colormap of signed scores (pathway activity) centred on 0: grey at 0, see :func:`diverging_cmap`."""


def figure_dpi() -> float:
    """The dpi of new figures: matplotlib's ``figure.dpi``, at least :data:`MIN_DPI`."""
    import matplotlib as mpl

    return max(float(mpl.rcParams["figure.dpi"]), MIN_DPI)


def diverging_cmap():
    """A diverging colormap that is neutral grey at its centre, for signed scores drawn over H&E.

    Maps such as ``"RdBu_r"`` are white at 0: on an H&E a near-zero spot then looks like empty glass or
    pale eosin, i.e. like no data. Here 0 is a mid grey (lightness ~60 %), unlike any stain colour, and
    the colour saturates towards blue below and red above, darkening at the extremes (the blue and red
    arms of ColorBrewer's RdBu, Harrower & Brewer 2003), so every spot stands out from the stain and the
    sign stays readable.
    """
    import matplotlib as mpl
    from matplotlib.colors import LinearSegmentedColormap

    if DIVERGING_CMAP in mpl.colormaps:
        return mpl.colormaps[DIVERGING_CMAP]
    anchors = ["#053061", "#2166ac", "#4393c3", "#999999", "#d6604d", "#b2182b", "#67001f"]
    cmap = LinearSegmentedColormap.from_list(DIVERGING_CMAP, anchors)
    mpl.colormaps.register(cmap, name=DIVERGING_CMAP)
    return cmap


def display_name(name: str) -> str:
    """A pathway name for a title: without the MSigDB ``HALLMARK_`` prefix, underscores as spaces."""
    text = str(name)
    if text.upper().startswith("HALLMARK_"):
        text = text[len("HALLMARK_") :]
    return text.replace("_", " ")


def panel_width(ax, panel_size: tuple[float, float]) -> float:
    """Width (inches) a panel title may take: the figure's width per column for the user's axes, else the panel's."""
    try:
        fig_w = ax.figure.get_figwidth()
        ncols = ax.get_subplotspec().get_gridspec().ncols
        return min(float(panel_size[0]), fig_w / ncols)
    except AttributeError:  # axes not on a grid
        return float(panel_size[0])


def wrap_title(text: str, *, width_in: float, fontsize: float | None = None) -> str:
    """Wrap each line of ``text`` to the width of a panel of ``width_in`` inches (so it never runs over a colorbar)."""
    import textwrap

    import matplotlib as mpl
    from matplotlib.font_manager import FontProperties

    size = fontsize or FontProperties(size=mpl.rcParams["axes.titlesize"]).get_size_in_points()
    chars = max(8, int(width_in * 72 / (0.72 * size)))  # upper-case glyphs are ~0.7 em wide
    return "\n".join(textwrap.fill(line, width=chars, break_on_hyphens=False) or line for line in text.split("\n"))


@dataclass
class SlideView:
    """What a spatial panel needs: spot positions/sizes and the background image.

    ``coords`` and ``radius`` are in full-resolution pixels; ``extent`` places ``image`` in the same
    coordinates (``imshow(image, extent=extent)``), so spots never need rescaling.
    """

    coords: np.ndarray
    radius: np.ndarray
    shape: str
    image: np.ndarray | None
    extent: tuple[float, float, float, float] | None
    scale: float
    xlim: tuple[float, float]
    ylim: tuple[float, float]


def check_save(save: str | os.PathLike | None) -> Path | None:
    """Validate ``save`` before drawing: a file path whose folder exists."""
    if save is None:
        return None
    if isinstance(save, bool):
        raise TypeError("`save` must be a file path (e.g. 'figure.png'), not a boolean.")
    path = Path(save)
    if not path.suffix:
        raise ValueError(f"`save={str(save)!r}` needs a file extension (e.g. '.png', '.pdf').")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"`save`: folder {str(path.parent)!r} does not exist.")
    return path


def single_slide_table(data: Any, table_key: str | None) -> AnnData:
    """Get the table of ``data``, which must hold exactly one slide (spot coordinates refer to one image)."""
    adata = get_table(data, table_key)
    ids = pd.unique(slide_ids(adata))
    if len(ids) > 1:
        raise ValueError(
            f"The table holds {len(ids)} slides ({list(ids[:5])}); spatial plots need one slide: "
            f"subset it, e.g. `adata[adata.obs[{K.SLIDE_KEY!r}] == {ids[0]!r}]`."
        )
    return adata


def _spot_radius(adata: AnnData, coords: np.ndarray, spot_scale: float) -> np.ndarray:
    meta = adata.uns.get(K.SLIDE_META_KEY, {}) or {}
    mpp, diam = meta.get("mpp"), meta.get("spot_diameter_um")
    if mpp and diam and np.isfinite(mpp) and mpp > 0:
        r = float(diam) / float(mpp) / 2
    elif len(coords) >= 2:
        from scipy.spatial import cKDTree

        d, _ = cKDTree(coords).query(coords, k=2)
        r = 0.5 * float(np.median(d[:, 1]))
        logger.info(
            "No spot diameter/mpp in `uns[%r]`; spot radius set to half the spot spacing.", K.SLIDE_META_KEY
        )
    else:
        r = 1.0
    return np.full(len(coords), r * spot_scale)


def _pyramid(element) -> list:
    """Levels of an image element (DataTree -> list of DataArrays, DataArray -> [itself])."""
    if hasattr(element, "children") and len(element.children):
        keys = sorted(element.children, key=lambda k: int("".join(ch for ch in k if ch.isdigit()) or 0))
        return [next(iter(element[k].data_vars.values())) for k in keys]
    return [element]


def _graph_depth(arr) -> int:
    data = getattr(arr, "data", arr)
    graph = getattr(data, "dask", None)
    return len(getattr(graph, "layers", {})) if graph is not None else 0


def _read_level(levels: list, idx: int, box: tuple[float, float, float, float]):
    """Read the crop ``box`` (full-res x0, x1, y0, y1) at pyramid level ``idx`` as a (y, x, c) array.

    A level that is computed lazily from level 0 (an in-memory pyramid, where dask would downsample the
    whole image on every read) is replaced by an equally sized strided read of level 0.
    """
    full = levels[0]
    full_hw = full.shape[-2:]
    chosen = levels[idx]
    x0, x1, y0, y1 = box
    if idx > 0 and _graph_depth(chosen) > _graph_depth(full) + 1:
        step = max(1, int(round(full_hw[1] / chosen.shape[-1])))
        ix0, iy0 = int(np.floor(x0)), int(np.floor(y0))
        arr = full.data[..., iy0 : int(np.ceil(y1)) : step, ix0 : int(np.ceil(x1)) : step]
        arr = np.asarray(arr.compute() if hasattr(arr, "compute") else arr)
        extent = (ix0, ix0 + arr.shape[-1] * step, iy0 + arr.shape[-2] * step, iy0)
        scale = 1.0 / step
    else:
        scale = chosen.shape[-1] / full_hw[1]
        sy = chosen.shape[-2] / full_hw[0]
        ix0, ix1 = int(np.floor(x0 * scale)), int(np.ceil(x1 * scale))
        iy0, iy1 = int(np.floor(y0 * sy)), int(np.ceil(y1 * sy))
        arr = chosen.data[..., iy0:iy1, ix0:ix1]
        arr = np.asarray(arr.compute() if hasattr(arr, "compute") else arr)
        extent = (ix0 / scale, ix1 / scale, iy1 / sy, iy0 / sy)
    image = np.moveaxis(arr, 0, -1) if arr.ndim == 3 else arr
    if image.ndim == 3 and image.shape[-1] > 3:
        image = image[..., :3]
    return image, tuple(float(e) for e in extent), float(scale)


def _crop_box(coords: np.ndarray, radius: np.ndarray, full_hw: tuple[int, int], crop: bool, margin: float):
    h, w = full_hw
    if not crop or len(coords) == 0:
        return 0.0, float(w), 0.0, float(h)
    pad = float(radius.max()) * (1 + margin)
    x0, y0 = coords.min(0) - pad
    x1, y1 = coords.max(0) + pad
    return max(0.0, x0), min(float(w), x1), max(0.0, y0), min(float(h), y1)


def slide_view(
    data: Any,
    adata: AnnData,
    *,
    image_key: str | None = None,
    level: int | None = None,
    max_side: int = DEFAULT_MAX_SIDE,
    crop: bool = True,
    spot_scale: float = 1.0,
    show_image: bool = True,
) -> SlideView:
    """Spot geometry and the H&E crop around the spots at a pyramid level.

    Parameters
    ----------
    data
        The object the user passed (SpatialData holds the image; AnnData may carry a scanpy-style
        ``uns['spatial'][library]['images']['hires']`` with ``scalefactors``).
    adata
        Its table (one slide).
    image_key
        Image element; default ``uns['stf_slide']['image_key']``, else ``"he"``.
    level
        Pyramid level (0 = full resolution). ``None``: the coarsest level whose crop still has a side
        of at least ``max_side`` px (full resolution when the crop is smaller).
    max_side
        Target longest side of the displayed crop when ``level`` is ``None``.
    crop
        Crop the image to the spots (plus one spot radius).
    spot_scale
        Multiplier of the physical spot radius.
    show_image
        Load the image at all (``False``: spots only).
    """
    coords = spot_coords(adata)
    if spot_scale <= 0:
        raise ValueError(f"`spot_scale` must be > 0, got {spot_scale}.")
    radius = _spot_radius(adata, coords, spot_scale)
    meta = adata.uns.get(K.SLIDE_META_KEY, {}) or {}
    shape = meta.get("shape", "circle")
    image, extent, scale = None, None, 1.0
    pad = float(radius.max()) * 0.25 if len(radius) else 0.0
    lo, hi = coords.min(0) - radius.max() - pad, coords.max(0) + radius.max() + pad
    xlim, ylim = (float(lo[0]), float(hi[0])), (float(hi[1]), float(lo[1]))

    if show_image and is_spatialdata(data):
        key = image_key or meta.get("image_key") or K.IMAGE_KEY
        if key not in data.images:
            if image_key is not None:
                raise KeyError(
                    f"Image {image_key!r} not found; available images: {list(data.images) or 'none'}."
                )
            logger.info("No image %r in the SpatialData; drawing spots only.", key)
        else:
            from ..pp._image import units_per_pixel

            levels = _pyramid(data.images[key])
            unit = units_per_pixel(data.images[key], name=key)  # coordinate units per level-0 pixel
            full_hw = tuple(int(s) for s in levels[0].shape[-2:])
            extent_hw = (full_hw[0] * unit, full_hw[1] * unit)
            if level is not None:
                if not -len(levels) <= level < len(levels):
                    raise ValueError(f"`level={level}`: image {key!r} has {len(levels)} pyramid levels.")
                idx = level % len(levels)
            else:
                bx0, bx1, by0, by1 = _crop_box(coords, radius, extent_hw, crop, 0.25)
                side = max(bx1 - bx0, by1 - by0) / unit
                idx = 0
                for i, lv in enumerate(levels[1:], start=1):
                    if side * lv.shape[-1] / full_hw[1] >= max_side:
                        idx = i
            box = tuple(b / unit for b in _crop_box(coords, radius, extent_hw, crop, 0.25))
            image, extent, scale = _read_level(levels, idx, box)
            extent = tuple(e * unit for e in extent)
            scale = scale / unit
            xlim, ylim = (extent[0], extent[1]), (extent[2], extent[3])
    elif show_image and isinstance(getattr(adata, "uns", {}).get("spatial"), dict) and adata.uns["spatial"]:
        lib = next(iter(adata.uns["spatial"].values()))
        img = (lib.get("images") or {}).get("hires")
        sf = (lib.get("scalefactors") or {}).get("tissue_hires_scalef")
        if img is not None and sf:
            image, scale = np.asarray(img), float(sf)
            extent = (0.0, image.shape[1] / scale, image.shape[0] / scale, 0.0)
            if not crop:
                xlim, ylim = (extent[0], extent[1]), (extent[2], extent[3])
    if image is not None and np.issubdtype(image.dtype, np.floating) and image.max() > 1:
        image = np.clip(image / 255.0, 0, 1)
    return SlideView(coords, radius, shape, image, extent, scale, xlim, ylim)


def draw_spots(ax: Axes, view: SlideView, values: np.ndarray, *, cmap, norm, alpha: float = 1.0):
    """Draw the H&E (if any) and the spots coloured by ``values`` at their physical size.

    Returns the spot collection (a mappable for colorbars). NaN values are drawn in light grey.
    """
    import matplotlib.pyplot as plt
    from matplotlib.collections import EllipseCollection, PolyCollection

    cmap = plt.get_cmap(cmap).with_extremes(bad=(0.83, 0.83, 0.83, 0.6))
    if view.image is not None:
        ax.imshow(view.image, extent=view.extent, interpolation="antialiased")
    vals = np.ma.masked_invalid(np.asarray(values, dtype=float))
    if view.shape == "square":
        r = view.radius[:, None, None]
        unit = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float)[None]
        coll = PolyCollection(view.coords[:, None, :] + unit * r, linewidths=0)
        ax.add_collection(coll)
    else:
        d = 2 * view.radius
        coll = EllipseCollection(
            d,
            d,
            np.zeros_like(d),
            units="xy",
            offsets=view.coords,
            offset_transform=ax.transData,
            linewidths=0,
        )
        ax.add_collection(coll)
    coll.set_array(vals)
    coll.set_cmap(cmap)
    coll.set_norm(norm)
    coll.set_alpha(alpha)
    ax.set_xlim(*view.xlim)
    ax.set_ylim(*view.ylim)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    return coll


def make_axes(
    nrows: int, ncols: int, *, ax: Axes | Sequence[Axes] | None, panel_size: tuple[float, float]
) -> tuple[Figure, np.ndarray]:
    """Make a (nrows, ncols) array of axes: new ones (at :func:`figure_dpi`), or the user's ``ax`` (one per panel)."""
    import matplotlib.pyplot as plt

    n = nrows * ncols
    if ax is None:
        fig, axes = plt.subplots(
            nrows,
            ncols,
            figsize=(panel_size[0] * ncols, panel_size[1] * nrows),
            squeeze=False,
            layout="constrained",
            dpi=figure_dpi(),
        )
        return fig, axes
    axs = np.atleast_1d(np.asarray(ax, dtype=object)).ravel()
    if len(axs) != n:
        raise ValueError(f"`ax`: this plot has {n} panels ({nrows} x {ncols}), got {len(axs)} axes.")
    return axs[0].figure, axs.reshape(nrows, ncols)


def finish(
    fig: Figure,
    axes: Any,
    *,
    show: bool | None,
    save: Path | None,
    return_fig: bool,
    user_ax: bool,
    dpi: int = 150,
):
    """Save / show and return what scanpy returns: the Figure, the axes, or ``None`` when shown."""
    import matplotlib.pyplot as plt

    if save is not None:
        from .._atomic import atomic_output

        with atomic_output(save) as tmp:  # the figure file appears whole or not at all
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=Path(save).suffix[1:].lower() or None)
        logger.info("Saved figure to %s", save)
    if show is None:
        show = not return_fig and not user_ax
    if show:
        plt.show()
    if return_fig:
        return fig
    if not show:
        return axes
    return None


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r of ``y`` against reference ``x`` over the entries finite in both.

    NaN when fewer than 3 entries or a constant reference; 0 for a constant ``y`` (a collapsed prediction
    scores 0, as in :func:`~spatialtranscriptformer.tl.evaluate`).
    """
    from .._stats import column_pearson

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    m = np.isfinite(x) & np.isfinite(y)
    if m.sum() < 3:
        return float("nan")
    return float(column_pearson(y[m, None], x[m, None])[0])


def pearson_label(ref: np.ndarray, values: np.ndarray, *, suffix: str = "") -> str:
    """Panel-title line with the Pearson r of ``values`` against ``ref`` (``n/a`` when undefined)."""
    r = pearson(ref, values)
    return f"\nPearson r{suffix} = {r:.2f}" if np.isfinite(r) else f"\nPearson r{suffix} = n/a"


def outline_spots(ax: Axes, view: SlideView, mask: np.ndarray, *, color: str = "black") -> None:
    """Outline the spots where ``mask`` is True (e.g. a held-out region) on a panel drawn by :func:`draw_spots`."""
    from matplotlib.collections import EllipseCollection, PolyCollection

    coords, radius = view.coords[mask], view.radius[mask]
    if view.shape == "square":
        unit = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float)[None]
        coll = PolyCollection(coords[:, None, :] + unit * radius[:, None, None], facecolors="none",
                              edgecolors=color, linewidths=0.8)
    else:
        d = 2 * radius
        coll = EllipseCollection(d, d, np.zeros_like(d), units="xy", offsets=coords,
                                 offset_transform=ax.transData, facecolors="none", edgecolors=color, linewidths=0.8)
    ax.add_collection(coll)


def as_list(value, *, name: str) -> list:
    """Return a string or a sequence of names as a non-empty list."""
    if isinstance(value, str | int):
        return [value]
    if value is None:
        raise ValueError(f"`{name}` is required.")
    out = list(value)
    if not out:
        raise ValueError(f"`{name}` is empty.")
    return out


def ncols_grid(n: int, ncols: int, *, ax: Any = None) -> tuple[int, int]:
    """Rows and columns for ``n`` panels with at most ``ncols`` per row (one row for the user's ``ax``)."""
    if ax is not None:
        return 1, n
    if ncols < 1:
        raise ValueError(f"`ncols` must be >= 1, got {ncols}.")
    c = min(n, ncols)
    return int(np.ceil(n / c)), c
