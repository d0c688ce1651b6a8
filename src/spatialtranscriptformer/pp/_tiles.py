"""Square tiles centred on spots at a physical scale, cut from in-memory image regions."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

import numpy as np

from .. import _constants as K
from .._data import get_table, slide_mpp, spot_coords
from .._docs import doc_data, doc_params, doc_table_key, doc_upsampling
from ._image import ImageLevel, choose_level, resolve_image

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

PadMode = Literal["reflect", "constant"]


def _pad_region(region: np.ndarray, pads: tuple[int, int, int, int], mode: PadMode, cval: int) -> np.ndarray:
    top, bottom, left, right = pads
    if not any(pads):
        return region
    width = ((top, bottom), (left, right), (0, 0))
    if mode == "constant":
        return np.pad(region, width, mode="constant", constant_values=cval)
    if max(top, bottom) >= region.shape[0] or max(left, right) >= region.shape[1]:
        return np.pad(region, width, mode="symmetric" if min(region.shape[:2]) > 1 else "edge")
    return np.pad(region, width, mode="reflect")


def cut_tiles(
    region: np.ndarray,
    centers: np.ndarray,
    *,
    size: int,
    scale: float,
    origin: tuple[int, int] = (0, 0),
    out: np.ndarray | None = None,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Cut ``size`` x ``size`` tiles centred on ``centers`` (x, y; region pixels) from ``region``.

    ``scale`` is the number of region pixels per output pixel. Unless ``scale == 1`` (plain slices),
    the region is resampled once to the output scale with bilinear interpolation (Pillow) and tiles are
    sliced from it; tile origins are rounded to the slide-wide output pixel grid. ``origin`` is the
    slide position (x, y) of ``region[0, 0]``. With ``out`` and ``rows``, tile ``i`` is written to
    ``out[rows[i]]`` (no intermediate copy). The region must already
    contain every tile's window (see :func:`extract_tiles`).
    """
    from PIL import Image

    n = len(centers)
    out = np.empty((n, size, size, 3), dtype=np.uint8) if out is None else out
    rows = np.arange(n) if rows is None else rows
    half = size * scale / 2
    if abs(scale - 1.0) < 1e-6:
        x0 = np.round(centers[:, 0] - half).astype(int)
        y0 = np.round(centers[:, 1] - half).astype(int)
        for i in range(n):
            out[rows[i]] = region[y0[i] : y0[i] + size, x0[i] : x0[i] + size, :3]
        return out
    # resample the whole region once onto the slide-wide output grid (output pixel k sits at source
    # coordinate k * scale), then slice: a spot's tile does not depend on which block it was read in
    rx0, ry0 = origin
    rh, rw = region.shape[:2]
    ox, oy = int(np.ceil(rx0 / scale)), int(np.ceil(ry0 / scale))
    nw = int(np.floor((rx0 + rw - 1) / scale)) - ox
    nh = int(np.floor((ry0 + rh - 1) / scale)) - oy
    box = (ox * scale - rx0, oy * scale - ry0, (ox + nw) * scale - rx0, (oy + nh) * scale - ry0)
    img = Image.fromarray(np.ascontiguousarray(region[..., :3]))
    big = np.asarray(img.resize((max(nw, 1), max(nh, 1)), Image.Resampling.BILINEAR, box=box, reducing_gap=None))
    x0 = (np.round((centers[:, 0] + rx0) / scale - size / 2).astype(int) - ox).clip(0, max(0, nw - size))
    y0 = (np.round((centers[:, 1] + ry0) / scale - size / 2).astype(int) - oy).clip(0, max(0, nh - size))
    for i in range(n):
        out[rows[i]] = big[y0[i] : y0[i] + size, x0[i] : x0[i] + size]
    return out


def extract_tiles(
    image: ImageLevel | np.ndarray,
    centers_xy: np.ndarray,
    *,
    size: int,
    scale: float,
    pad_mode: PadMode = "reflect",
    cval: int = 255,
    block_px: int = 4096,
    out: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Yield ``(indices, tiles)`` for tiles centred on ``centers_xy`` (pixels of ``image``).

    Spots are grouped into blocks of about ``block_px`` source pixels; each block's region is read
    once (whole chunks, one read) and padded at the slide edges with ``pad_mode``, then tiles are cut
    in memory. ``scale`` is source pixels per output pixel. With ``out`` (``(n, size, size, 3)``
    uint8), tiles are written straight into ``out[indices]`` and ``None`` is yielded in their place.
    """
    from concurrent.futures import ThreadPoolExecutor

    from ._image import array_levels

    level = image if isinstance(image, ImageLevel) else array_levels(image)[0]
    h, w = level.shape_yx
    centers_xy = np.asarray(centers_xy, dtype=np.float64)
    half = size * scale / 2 + 2 * max(scale, 1.0) + 2
    bx = np.floor(centers_xy[:, 0] / block_px).astype(np.int64)
    by = np.floor(centers_xy[:, 1] / block_px).astype(np.int64)
    order = np.lexsort((bx, by))
    keys = by[order] * (1 << 32) + bx[order]
    groups = np.split(order, np.flatnonzero(np.diff(keys)) + 1) if len(order) else []

    def bounds(idx):
        c = centers_xy[idx]
        ry0, ry1 = int(np.floor(c[:, 1].min() - half)), int(np.ceil(c[:, 1].max() + half)) + 1
        rx0, rx1 = int(np.floor(c[:, 0].min() - half)), int(np.ceil(c[:, 0].max() + half)) + 1
        return ry0, ry1, rx0, rx1

    def read(idx):
        ry0, ry1, rx0, rx1 = bounds(idx)
        region = level.read(ry0, ry1, rx0, rx1)
        pads = (max(0, -ry0), max(0, ry1 - h), max(0, -rx0), max(0, rx1 - w))
        return _pad_region(region, pads, pad_mode, cval)

    # read block k + 1 (decompression releases the GIL) while block k is cut
    with ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(read, groups[0]) if groups else None
        for k, idx in enumerate(groups):
            region = nxt.result()
            nxt = pool.submit(read, groups[k + 1]) if k + 1 < len(groups) else None
            ry0, _, rx0, _ = bounds(idx)
            local = centers_xy[idx] - np.array([rx0, ry0], dtype=np.float64)
            if out is None:
                yield idx, cut_tiles(region, local, size=size, scale=scale, origin=(rx0, ry0))
            else:
                cut_tiles(region, local, size=size, scale=scale, origin=(rx0, ry0), out=out, rows=idx)
                yield idx, None


def check_upsampling(
    upsampling: float, *, image_mpp: float, tile_mpp: float, allow_upsampling: bool, adata: AnnData, stacklevel: int = 3
) -> None:
    """Warn above ``UPSAMPLING_WARN``-fold upsampling of the slide image, refuse above ``UPSAMPLING_MAX``.

    A tile cut at ``tile_mpp`` from an image of ``image_mpp`` µm/px is magnified ``image_mpp / tile_mpp``
    times. Above 2× the tile is visibly blurred; above 4× (e.g. a Space Ranger hires PNG at ~4 µm/px, or
    the lowres PNG at ~14 µm/px, for 0.5 µm/px tiles) it no longer holds the cell-scale detail a pathology
    encoder was trained on, and its embedding describes blur: refused unless ``allow_upsampling=True``.
    """
    if upsampling <= K.UPSAMPLING_WARN * 1.001:
        return
    meta = adata.uns.get(K.SLIDE_META_KEY, {}) or {}
    sid = meta.get("slide_id", "slide")
    src = meta.get("image_source")
    what = f"the {src!r} image" if src else "the slide image"
    msg = (
        f"Slide {sid!r}: tiles at {tile_mpp:g} µm/px need {upsampling:.1f}x upsampling of {what} "
        f"({image_mpp:.3g} µm/px)"
    )
    if upsampling > K.UPSAMPLING_MAX * 1.001 and not allow_upsampling:
        hint = (
            " Read the full-resolution H&E (e.g. `stf.io.read_visium(..., fullres_image_file=...)`,"
            " `stf.io.from_anndata(adata, image=..., image_scalef=...)`)"
            if src in ("hires", "lowres")
            else " Use a finer image or a coarser tile resolution (`mpp=`)"
        )
        raise ValueError(
            f"{msg}, more than the {K.UPSAMPLING_MAX:g}x limit: the tiles would be blur, not tissue.{hint}, "
            "or pass allow_upsampling=True to proceed anyway."
        )
    import warnings

    warnings.warn(f"{msg}; the tiles will be blurred.", UserWarning, stacklevel=stacklevel)


def tile_plan(
    data,
    adata: AnnData,
    *,
    tile_size: int,
    mpp: float,
    image_key: str | None,
    allow_upsampling: bool = False,
    warn: bool = True,
) -> tuple[ImageLevel, np.ndarray, float]:
    """Choose the pyramid level and return ``(level, centres in level px, source px per tile px)``.

    Checks the upsampling the tiles need (see :func:`check_upsampling`; ``warn=False`` only refuses).
    """
    if tile_size < 1:
        raise ValueError(f"tile_size must be a positive number of pixels, got {tile_size}.")
    if not mpp or mpp <= 0:
        raise ValueError(f"Tile resolution mpp must be > 0, got {mpp}.")
    levels = resolve_image(data, adata, image_key)
    smpp = slide_mpp(adata)
    level = choose_level(levels, slide_mpp=smpp, target_mpp=mpp)
    xy = spot_coords(adata)
    h0, w0 = levels[0].extent_yx
    out = (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= w0) | (xy[:, 1] >= h0)
    if out.any():
        raise ValueError(f"{int(out.sum())} spots lie outside the image ({w0:.0f} x {h0:.0f} coordinate units).")
    scale = mpp / (smpp * level.downscale)
    if warn or (1.0 / scale) > K.UPSAMPLING_MAX * 1.001:
        check_upsampling(1.0 / scale, image_mpp=smpp * level.downscale, tile_mpp=mpp,
                         allow_upsampling=allow_upsampling, adata=adata, stacklevel=4)
    return level, xy / level.downscale, scale


@doc_params(data=doc_data, table_key=doc_table_key, upsampling=doc_upsampling)
def iter_tiles(
    data: SpatialData,
    *,
    tile_size: int = K.DEFAULT_TILE_SIZE,
    mpp: float = K.DEFAULT_TILE_MPP,
    batch_size: int = 256,
    pad_mode: PadMode = "reflect",
    cval: int = 255,
    image_key: str | None = None,
    table_key: str | None = None,
    allow_upsampling: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Iterate over spot tiles in batches, reading the slide block by block.

    Parameters
    ----------
    {data}
    tile_size
        Tile edge in pixels (default 224).
    mpp
        Tile resolution in µm per pixel (default 0.5, i.e. 112 µm tiles as in HEST-Benchmark).
    batch_size
        Tiles per yielded batch.
    pad_mode
        ``"reflect"`` or ``"constant"`` (filled with ``cval``) where a tile crosses the slide edge.
    cval
        Fill value of constant padding (255 = white background).
    image_key
        Image element; defaults to the one recorded by the reader.
    {table_key}
    {upsampling}

    Yields
    ------
    ``(indices, tiles)``: integer positions of the spots in the table, and a ``(n, tile_size, tile_size, 3)``
    uint8 array with ``n <= batch_size`` (batches do not span the slide's reading blocks). Spots come
    in spatial-block order, not table order.
    """
    if pad_mode not in ("reflect", "constant"):
        raise ValueError(f"pad_mode must be 'reflect' or 'constant', got {pad_mode!r}.")
    adata = get_table(data, table_key)
    from .._validate import check_number

    check_number("batch_size", batch_size, minimum=1, integer=True)
    plan = tile_plan(data, adata, tile_size=tile_size, mpp=mpp, image_key=image_key, allow_upsampling=allow_upsampling)
    yield from planned_batches(plan, tile_size=tile_size, batch_size=batch_size, pad_mode=pad_mode, cval=cval)


def planned_batches(
    plan: tuple[ImageLevel, np.ndarray, float], *, tile_size: int, batch_size: int, pad_mode: PadMode, cval: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The batches of :func:`iter_tiles` for a :func:`tile_plan` already made (and checked)."""
    if pad_mode not in ("reflect", "constant"):
        raise ValueError(f"pad_mode must be 'reflect' or 'constant', got {pad_mode!r}.")
    level, centers, scale = plan
    for idx, tiles in extract_tiles(level, centers, size=tile_size, scale=scale, pad_mode=pad_mode, cval=cval):
        for s in range(0, len(idx), batch_size):  # no copies: views of each block's tiles
            yield idx[s : s + batch_size], tiles[s : s + batch_size]


@doc_params(data=doc_data, table_key=doc_table_key, upsampling=doc_upsampling)
def tiles(
    data: SpatialData,
    *,
    tile_size: int = K.DEFAULT_TILE_SIZE,
    mpp: float = K.DEFAULT_TILE_MPP,
    spots: np.ndarray | list | None = None,
    pad_mode: PadMode = "reflect",
    cval: int = 255,
    image_key: str | None = None,
    table_key: str | None = None,
    allow_upsampling: bool = False,
) -> np.ndarray:
    """Tiles centred on the spots, in table order, at a physical scale.

    Tiles are resampled from the slide's own µm/px (from the pyramid level closest to, but not
    coarser than, ``mpp``) and padded at the slide edges. The slide is read in blocks into memory and
    sliced there — never one spatial query per tile. Nothing is written into ``data``.

    Parameters
    ----------
    {data}
    tile_size
        Tile edge in pixels (default 224).
    mpp
        Tile resolution in µm per pixel (default 0.5).
    spots
        Subset of spots (positions or obs names); default all.
    pad_mode
        ``"reflect"`` or ``"constant"`` padding at slide edges.
    cval
        Fill value for constant padding.
    image_key
        Image element; defaults to the one recorded by the reader.
    {table_key}
    {upsampling}

    Returns
    -------
    A ``(n_spots, tile_size, tile_size, 3)`` uint8 array.
    """
    adata = get_table(data, table_key)
    level, centers, scale = tile_plan(
        data, adata, tile_size=tile_size, mpp=mpp, image_key=image_key, allow_upsampling=allow_upsampling
    )
    pos = np.arange(adata.n_obs)
    if spots is not None:
        spots = np.asarray(spots)
        pos = adata.obs_names.get_indexer(spots) if spots.dtype.kind in "OUS" else spots.astype(int)
        if (pos < 0).any():
            raise KeyError(f"Unknown spot ids: {spots[pos < 0][:5].tolist()}.")
    out = np.empty((len(pos), tile_size, tile_size, 3), dtype=np.uint8)
    for _ in extract_tiles(level, centers[pos], size=tile_size, scale=scale, pad_mode=pad_mode, cval=cval, out=out):
        pass
    return out
