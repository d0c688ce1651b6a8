"""Lazy (out-of-core) reading of TIFF / BigTIFF whole-slide images as dask arrays.

A level of a pyramidal TIFF is wrapped as a dask array whose chunks are read on demand: memory-mapped
when the pixels are stored uncompressed and contiguously, else decoded tile by tile (or strip by strip)
through :mod:`tifffile`'s Zarr store (``tifffile.imread(path, aszarr=True)``; Gohlke, tifffile). Nothing
of the image is read until a region is computed.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .._logging import logger

_KEEP_AXES = "YXSC"
"""TIFF series axes kept in the image (rows, columns, samples/channels); others must have length 1."""


class TiffLevel:
    """One pyramid level of a TIFF series, read on demand (an array-like for :func:`dask.array.from_array`).

    The file is opened lazily by each process that reads it (the object pickles without its file
    handle), so dask workers and forked DataLoader workers never share a file offset. Reads are
    thread-safe (tifffile locks seeks and reads; decoding runs outside the lock).

    Parameters
    ----------
    path
        The TIFF file.
    series
        Series index in the file.
    level
        Pyramid level of the series (0 = full resolution).
    """

    def __init__(self, path: str | os.PathLike, *, series: int = 0, level: int = 0) -> None:
        self.path = str(path)
        self.series = int(series)
        self.level = int(level)
        self._lock = threading.Lock()
        self._src: Any = None
        self._pid: int | None = None
        self.memmapped = False
        src = self._source()
        self.shape = tuple(int(s) for s in src.shape)
        self.dtype = np.dtype(src.dtype)
        self.ndim = len(self.shape)
        self.file_chunks = self.shape if self.memmapped else tuple(int(c) for c in src.chunks)

    def _source(self):
        with self._lock:
            if self._src is None or self._pid != os.getpid():
                import tifffile

                try:  # uncompressed, contiguous pixels: let the OS page them in
                    self._src = tifffile.memmap(self.path, series=self.series, level=self.level, mode="r")
                    self.memmapped = True
                except ValueError:  # compressed or non-contiguous: decode the chunks that are asked for
                    import zarr

                    store = tifffile.imread(self.path, aszarr=True, series=self.series, level=self.level)
                    self._src = zarr.open(store, mode="r")
                    self.memmapped = False
                self._pid = os.getpid()
            return self._src

    def __getitem__(self, key) -> np.ndarray:
        return np.array(self._source()[key])  # a copy: never a view on the memory map

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_src=None, _pid=None, _lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __dask_tokenize__(self):
        st = Path(self.path).stat()
        return ("stf-tiff-level", self.path, st.st_mtime_ns, st.st_size, self.series, self.level)


def _dask_chunks(lv: TiffLevel, axes: str, edge: int) -> tuple[int, ...]:
    """Dask chunks about ``edge`` px that are whole multiples of the file's tiles / strips."""
    out = []
    for ax, n, c in zip(axes, lv.shape, lv.file_chunks, strict=True):
        if ax not in "YX":
            out.append(n)
        elif c >= n:  # memory map, or strips spanning the whole width
            out.append(min(n, edge))
        else:
            out.append(min(n, max(1, round(edge / c)) * c))
    return tuple(out)


def _to_yxc(arr, axes: str, *, path: Path):
    """Reorder a level with TIFF ``axes`` to ``(y, x, c)`` (or ``(y, x)``), lazily."""
    extra = [(i, ax) for i, ax in enumerate(axes) if ax not in _KEEP_AXES]
    big = [f"{ax}={arr.shape[i]}" for i, ax in extra if arr.shape[i] != 1]
    if big:
        raise ValueError(
            f"{path.name}: the image has non-spatial axes {', '.join(big)} (axes {axes!r}); expected one RGB plane."
        )
    arr = arr[tuple(0 if ax not in _KEEP_AXES else slice(None) for ax in axes)]
    axes = "".join(ax for ax in axes if ax in _KEEP_AXES)
    if "Y" not in axes or "X" not in axes:
        raise ValueError(f"{path.name}: the image has no Y/X axes (axes {axes!r}).")
    order = [axes.index("Y"), axes.index("X")] + [i for i, ax in enumerate(axes) if ax in "SC"]
    if len(order) > 3:
        raise ValueError(f"{path.name}: expected at most one channel axis, got axes {axes!r}.")
    return arr.transpose(order) if order != list(range(arr.ndim)) else arr


def tiff_levels(path: str | os.PathLike, *, level: int = 0, chunks: int = 1024) -> tuple[list, float]:
    """Open pyramid levels ``level, level + 1, ...`` of a TIFF's first series without reading pixels.

    Parameters
    ----------
    path
        A TIFF / OME-TIFF / BigTIFF file.
    level
        The finest level to return (it becomes full resolution for the caller).
    chunks
        Approximate chunk edge (px) of the dask arrays, rounded to whole file tiles.

    Returns
    -------
    The levels as ``(y, x, c)`` (or ``(y, x)``) dask arrays, finest first, and the downsampling factor
    of ``level`` relative to level 0. A level stored as a single compressed strip cannot be read in
    parts; it is read into memory (a numpy array) instead.
    """
    import dask.array as da
    import tifffile
    from dask.base import tokenize

    from .._validate import check_tiff_complete, reading

    path = Path(path)
    with reading(path, "TIFF image"), tifffile.TiffFile(path) as tf:
        check_tiff_complete(tf, path)  # a truncated file fails here, not later when tiles are read
        series = tf.series[0]
        n_levels = len(series.levels)
        axes = series.axes
        full_w = series.levels[0].shape[axes.index("X")]
    if not 0 <= level < n_levels:
        raise ValueError(f"{path.name}: pyramid level {level} requested, the file has levels 0..{n_levels - 1}.")
    out = []
    for i in range(level, n_levels):
        lv = TiffLevel(path, level=i)
        lv_axes = axes[-lv.ndim :] if len(axes) >= lv.ndim else axes
        if len(lv_axes) != lv.ndim:
            raise ValueError(f"{path.name}: level {i} has shape {lv.shape}, which does not match axes {axes!r}.")
        whole = not lv.memmapped and all(c >= n for c, n in zip(lv.file_chunks, lv.shape, strict=True))
        if whole and lv.shape[lv_axes.index("Y")] * lv.shape[lv_axes.index("X")] > chunks * chunks:
            logger.info("%s: level %d is one compressed strip; reading it into memory", path.name, i)
            arr = lv[tuple(slice(None) for _ in lv.shape)]
        else:
            arr = da.from_array(
                lv,
                chunks=_dask_chunks(lv, lv_axes, chunks),
                name=f"stf-tiff-{tokenize(lv)}",
                lock=False,
                asarray=True,
                meta=np.empty((0,) * lv.ndim, dtype=lv.dtype),
            )
        out.append(_to_yxc(arr, lv_axes, path=path))
    return out, float(full_w / out[0].shape[1])
