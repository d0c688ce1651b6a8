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


_DENSE_OVERLAP = 1.25
"""Resample a block once (then slice its tiles) when its tiles cover its area at least this many times."""
_BAND = 256
"""Output rows resampled at a time on the block path (bounds the float scratch)."""


def _padded_read(level: ImageLevel, ry0: int, ry1: int, rx0: int, rx1: int, mode: PadMode, cval: int) -> np.ndarray:
    """Region ``[ry0:ry1, rx0:rx1]`` as ``(c, y, x)``, padded where it leaves the image.

    ``"reflect"`` mirrors the image about its edge pixels (numpy's ``reflect``), reading the mirrored pixels
    too, so a padded pixel does not depend on how large the region is; ``"constant"`` fills with ``cval``.
    """
    h, w = level.shape_yx
    if ry0 >= 0 and rx0 >= 0 and ry1 <= h and rx1 <= w:
        return level.read_chw(ry0, ry1, rx0, rx1)
    if mode == "constant":
        region = level.read_chw(ry0, ry1, rx0, rx1)
        pads = ((0, 0), (max(0, -ry0), max(0, ry1 - h)), (max(0, -rx0), max(0, rx1 - w)))
        return np.pad(region, pads, mode="constant", constant_values=cval)

    def span(a0, a1, n):  # source rows / columns the mirrored region needs
        lo, hi = max(0, a0), min(n, a1)
        if a0 < 0:
            hi = max(hi, min(n, -a0 + 1))
        if a1 > n:
            lo = min(lo, max(0, 2 * n - a1 - 1))
        return lo, max(hi, lo + 1)

    (y0, y1), (x0, x1) = span(ry0, ry1, h), span(rx0, rx1, w)
    region = level.read_chw(y0, y1, x0, x1)
    pads = ((0, 0), (max(0, y0 - ry0), max(0, ry1 - y1)), (max(0, x0 - rx0), max(0, rx1 - x1)))
    region = np.pad(region, pads, mode="reflect" if min(h, w) > 1 else "edge")
    oy = ry0 - (y0 - pads[1][0])
    ox = rx0 - (x0 - pads[2][0])
    return region[:, oy : oy + ry1 - ry0, ox : ox + rx1 - rx0]


def _native(scale: float) -> bool:
    return abs(scale - 1.0) < 1e-6


def tile_origins(centers: np.ndarray, *, size: int, scale: float) -> np.ndarray:
    """Slide-wide integer ``(x, y)`` of each tile's first output pixel (native scale: its first source pixel).

    Output pixel ``K`` of the slide-wide output grid is centred at source coordinate ``(K + 0.5) * scale``;
    a tile starts at the grid pixel nearest to ``centre / scale - size / 2``.
    """
    if _native(scale):
        return np.round(np.asarray(centers, dtype=np.float64) - size / 2).astype(np.int64)
    return np.round(np.asarray(centers, dtype=np.float64) / scale - size / 2).astype(np.int64)


def _source_bounds(first: np.ndarray, size: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """First and last source pixel (inclusive) each tile reads along one axis."""
    if _native(scale):
        return first, first + size - 1
    from ._resample import tap_range

    return tap_range(first, size, scale)


def _to_hwc(region: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """A ``(c, y, x)`` region as a C-contiguous ``(y, x, c)`` array.

    One strided write per channel: about 4x faster than ``np.ascontiguousarray(np.moveaxis(...))``.
    """
    out = np.empty((*region.shape[1:], region.shape[0]), dtype=region.dtype) if out is None else out
    for c in range(region.shape[0]):
        out[..., c] = region[c]
    return out


def _slice(big: np.ndarray, ys: np.ndarray, xs: np.ndarray, size: int, rows: np.ndarray, out: np.ndarray) -> None:
    for i in range(len(rows)):  # each tile: `size` row copies (memcpy) of a (y, x, c) array
        out[rows[i]] = big[ys[i] : ys[i] + size, xs[i] : xs[i] + size]


class _Buffers:
    """Scratch arrays reused from block to block (fresh memory costs a page fault per 4 KiB)."""

    def __init__(self) -> None:
        self._bufs: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        n = int(np.prod(shape))
        buf = self._bufs.get(name)
        if buf is None or buf.size < n or buf.dtype != dtype:
            buf = self._bufs[name] = np.empty(max(n, 0 if buf is None else buf.size), dtype=dtype)
        return buf[:n].reshape(shape)


def _cut_block(region: np.ndarray, ry0: int, rx0: int, first: np.ndarray, *, size: int, scale: float,
               out: np.ndarray, rows: np.ndarray, strategy: str = "auto", buffers: _Buffers | None = None) -> None:
    """Write the tiles starting at output pixels ``first`` (x, y) into ``out[rows]`` from a ``(c, y, x)`` region.

    The region starts at slide pixel ``(ry0, rx0)`` and holds every pixel the tiles read. Where the tiles
    overlap (``strategy="auto"`` and at least :data:`_DENSE_OVERLAP` tile pixels per pixel of their
    bounding box; or ``"block"``) the bounding box is converted once, to ``(y, x, c)`` at native scale or
    resampled onto the output grid otherwise (:mod:`~spatialtranscriptformer.pp._resample`), and the
    tiles are sliced from it; where they are sparse (``"tile"``) each tile is copied / cropped and
    resampled on its own, at a cost proportional to the tiles. Both give identical tiles.
    """
    from ._resample import axis_taps, kernels

    buffers = buffers or _Buffers()
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    ox, oy = np.ascontiguousarray(first[:, 0]), np.ascontiguousarray(first[:, 1])
    OX0, OY0 = int(ox.min()), int(oy.min())
    nx, ny = int(ox.max()) + size - OX0, int(oy.max()) + size - OY0
    dense = strategy == "block" or (strategy == "auto" and len(rows) * size * size >= _DENSE_OVERLAP * nx * ny)
    k = kernels()
    if _native(scale):
        if dense:
            box = region[:, OY0 - ry0 : OY0 - ry0 + ny, OX0 - rx0 : OX0 - rx0 + nx]
            _slice(_to_hwc(box, buffers.get("hwc", (ny, nx, box.shape[0]), np.uint8)), oy - OY0, ox - OX0, size, rows, out)
        else:
            k.gather(region, oy - ry0, ox - rx0, size, rows, out)
        return
    if not dense:
        yi, yw = axis_taps(oy, size, scale)
        xi, xw = axis_taps(ox, size, scale)
        k.resample_tiles(region, ry0, rx0, yi, yw, xi, xw, rows, out)
        return
    xi, xw = axis_taps(np.array([OX0]), nx, scale)
    big = buffers.get("big", (ny, nx, out.shape[-1]), np.uint8)
    bands = [axis_taps(np.array([OY0 + b]), min(_BAND, ny - b), scale) for b in range(0, ny, _BAND)]
    scratch = buffers.get("scratch", (max(k.scratch_size(region.shape[0], yi[0], yw[0], xw[0]) for yi, yw in bands),),
                          np.float32)
    for b, (yi, yw) in zip(range(0, ny, _BAND), bands, strict=True):
        k.resample(region, ry0, rx0, yi[0], yw[0], xi[0], xw[0], big[b : b + _BAND], scratch)
    _slice(big, oy - OY0, ox - OX0, size, rows, out)


def cut_tiles(
    region: np.ndarray,
    centers: np.ndarray,
    *,
    size: int,
    scale: float,
    origin: tuple[int, int] = (0, 0),
    out: np.ndarray | None = None,
    rows: np.ndarray | None = None,
    strategy: str = "auto",
) -> np.ndarray:
    """Cut ``size`` x ``size`` tiles centred on ``centers`` (x, y; region pixels) from a ``(y, x, 3)`` ``region``.

    ``scale`` is the number of region pixels per output pixel. Tiles are placed on the slide-wide output
    grid (:func:`tile_origins`; ``origin`` is the slide position (x, y) of ``region[0, 0]``) and
    resampled with a triangle filter (bilinear when enlarging); see :func:`_cut_block` for
    ``strategy``. With ``out`` and ``rows``, tile ``i`` is written to ``out[rows[i]]``. The region must
    contain every pixel the tiles read (see :func:`extract_tiles`, which also pads at slide edges).
    """
    n = len(centers)
    out = np.empty((n, size, size, 3), dtype=np.uint8) if out is None else out
    rows = np.arange(n) if rows is None else rows
    rx0, ry0 = (int(v) for v in origin)
    first = tile_origins(np.asarray(centers, dtype=np.float64) + np.array([rx0, ry0]), size=size, scale=scale)
    chw = np.ascontiguousarray(np.moveaxis(np.asarray(region)[..., :3], -1, 0))
    _cut_block(chw, ry0, rx0, first, size=size, scale=scale, out=out, rows=rows, strategy=strategy)
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
    strategy: str = "auto",
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Yield ``(indices, tiles)`` for tiles centred on ``centers_xy`` (pixels of ``image``).

    Spots are grouped into blocks of about ``block_px`` source pixels; each block's region (the pixels its
    tiles read) is read once (whole chunks, one read) by a background thread, padded at the slide edges
    with ``pad_mode``, and its tiles are cut in memory by compiled kernels: copied at native scale,
    resampled tile by tile where spots are sparse or once per block where their tiles overlap
    (``strategy``: ``"auto"``, ``"tile"`` or ``"block"``; identical results). ``scale`` is source pixels
    per output pixel. With ``out`` (``(n, size, size, 3)`` uint8), tiles are written straight into
    ``out[indices]`` and ``None`` is yielded in their place.
    """
    from concurrent.futures import ThreadPoolExecutor

    from ._image import array_levels

    if strategy not in ("auto", "tile", "block"):
        raise ValueError(f"strategy must be 'auto', 'tile' or 'block', got {strategy!r}.")
    level = image if isinstance(image, ImageLevel) else array_levels(image)[0]
    centers_xy = np.asarray(centers_xy, dtype=np.float64)
    first = tile_origins(centers_xy, size=size, scale=scale)
    lo_x, hi_x = _source_bounds(first[:, 0], size, scale)
    lo_y, hi_y = _source_bounds(first[:, 1], size, scale)
    bx = np.floor(centers_xy[:, 0] / block_px).astype(np.int64)
    by = np.floor(centers_xy[:, 1] / block_px).astype(np.int64)
    order = np.lexsort((bx, by))
    keys = by[order] * (1 << 32) + bx[order]
    groups = np.split(order, np.flatnonzero(np.diff(keys)) + 1) if len(order) else []

    def bounds(idx):
        return int(lo_y[idx].min()), int(hi_y[idx].max()) + 1, int(lo_x[idx].min()), int(hi_x[idx].max()) + 1

    def read(idx):
        return np.ascontiguousarray(_padded_read(level, *bounds(idx), pad_mode, cval))

    buffers = _Buffers()
    # read (decompress, pad) block k + 1 in a thread while block k is cut (the kernels release the GIL)
    with ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(read, groups[0]) if groups else None
        for k, idx in enumerate(groups):
            region = nxt.result()
            nxt = pool.submit(read, groups[k + 1]) if k + 1 < len(groups) else None
            ry0, _, rx0, _ = bounds(idx)
            if out is None:
                tiles = np.empty((len(idx), size, size, 3), dtype=np.uint8)
                _cut_block(region, ry0, rx0, first[idx], size=size, scale=scale, out=tiles,
                           rows=np.arange(len(idx)), strategy=strategy, buffers=buffers)
                yield idx, tiles
            else:
                _cut_block(region, ry0, rx0, first[idx], size=size, scale=scale, out=out, rows=idx, strategy=strategy,
                           buffers=buffers)
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
