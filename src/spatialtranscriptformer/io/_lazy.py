"""Lazy image pyramids: levels that are decoded or computed on first access, then kept.

A reader should cost what the user asks for: opening a slide decodes no pixels, and a pyramid level
is only produced when something reads it (tiles, a plot, ``sdata.write``). Each level is a
:class:`LazyLevel` (an array-like for :func:`dask.array.from_array`) that computes the whole level once,
on the first read of any of its chunks, and keeps it for the next reads.

- JPEG (:func:`jpeg_levels`): the full resolution is decoded with libjpeg-turbo through
  :mod:`imagecodecs` (Gohlke) into one array (Pillow when it is absent); coarser levels are decoded
  *directly* at 1/2, 1/4 and 1/8 scale by libjpeg's scaled inverse DCT (Pillow's ``draft`` mode, Independent
  JPEG Group), which costs a fraction of a full decode and never needs the full-resolution pixels.
- In-memory images (:func:`lazy_pyramid`): each coarser level is the 2 x 2 (or f x f) mean of the
  previous one, computed in row bands on first access.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

JPEG_SUFFIXES = (".jpg", ".jpeg")
_DCT_SCALES = (1, 2, 4, 8)
"""Scales libjpeg can decode to directly (scaled inverse DCT)."""


class LazyLevel:
    """One image level, produced by ``load()`` on first access and kept (thread-safe, picklable).

    Parameters
    ----------
    shape
        Shape of the level (as ``load`` returns it).
    load
        Function returning the level as a numpy array (a picklable function: a module-level function or
        a :func:`functools.partial` of one).
    token
        Deterministic identity for dask (e.g. file path, modification time, scale); ``None`` for a unique one.
    dtype
        Data type.
    """

    def __init__(self, shape: Sequence[int], load: Callable[[], np.ndarray], *, token: tuple | None = None,
                 dtype=np.uint8) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self._load = load
        self._token = token if token is not None else ("stf-lazy", uuid.uuid4().hex)
        self._lock = threading.Lock()
        self._data: np.ndarray | None = None

    @property
    def loaded(self) -> bool:
        """Whether the level has been produced (is held in memory)."""
        return self._data is not None

    def array(self) -> np.ndarray:
        """The whole level (produced on the first call)."""
        with self._lock:
            if self._data is None:
                a = np.asarray(self._load())
                if a.shape != self.shape or a.dtype != self.dtype:
                    raise RuntimeError(f"Lazy image level: expected {self.shape} {self.dtype}, got {a.shape} {a.dtype}.")
                self._data = a
            return self._data

    def __getitem__(self, key) -> np.ndarray:
        return self.array()[key]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        a = self.array()
        return a if dtype is None else a.astype(dtype)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_data=None, _lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __dask_tokenize__(self):
        return self._token

    def to_dask(self, chunks: int = 1024):
        """A dask array over this level (chunks of about ``chunks`` px along y and x)."""
        import dask.array as da
        from dask.base import tokenize

        ch = tuple(min(n, chunks) if i < 2 else n for i, n in enumerate(self.shape))
        return da.from_array(self, chunks=ch, name=f"stf-lazy-{tokenize(self)}", lock=False, asarray=True,
                             meta=np.empty((0,) * self.ndim, dtype=self.dtype))


# --- JPEG ------------------------------------------------------------------------------------------------
def _jpeg_token(path: Path, scale: int) -> tuple:
    st = path.stat()
    return ("stf-jpeg", str(path), st.st_mtime_ns, st.st_size, int(scale))


def _as_rgb(a: np.ndarray) -> np.ndarray:
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=-1)
    return a if a.shape[-1] == 3 else np.ascontiguousarray(a[..., :3])


def decode_jpeg(path: str | os.PathLike, scale: int = 1) -> np.ndarray:
    """Decode a JPEG as ``(y, x, 3)`` uint8, at ``1 / scale`` resolution (``scale`` in 1, 2, 4, 8: DCT scaling)."""
    from PIL import Image

    path = Path(path)
    if scale == 1:
        try:
            import imagecodecs

            with Image.open(path) as im:
                mode = im.mode
            if mode in ("RGB", "L"):  # libjpeg-turbo straight into one array (Pillow decodes, then copies)
                return _as_rgb(imagecodecs.jpeg8_decode(path.read_bytes()))
        except ImportError:  # pragma: no cover - imagecodecs comes with spatialdata-io / squidpy
            pass
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(path) as im:
        if scale > 1:
            im.draft("RGB", (max(1, im.width // scale), max(1, im.height // scale)))
        return _as_rgb(np.asarray(im.convert("RGB") if im.mode not in ("RGB", "L") else im))


def _decode_and_pool(path: str, scale: int) -> np.ndarray:
    """A JPEG at ``1 / scale`` (> 8): decoded at 1/8 by DCT scaling, then mean-pooled."""
    return box_downsample(decode_jpeg(path, 8), scale // 8, channel_axis=-1)


def check_jpeg_complete(path: str | os.PathLike) -> None:
    """Refuse a truncated JPEG at open (its pixels are decoded later, on first use).

    A complete JPEG ends with the end-of-image marker ``FF D9`` (possibly followed by padding); inside
    the entropy-coded data a ``FF`` byte is always followed by ``00`` or a restart marker, so the marker
    in the last few KiB is the end of the image.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        fh.seek(max(0, size - 4096))
        tail = fh.read()
    if b"\xff\xd9" not in tail:
        raise ValueError(f"{path.name} is truncated or corrupt: no JPEG end-of-image marker ({size} bytes).")


def jpeg_levels(path: str | os.PathLike, *, min_side: int = 2048, chunks: int = 1024) -> list:
    """Lazy ``(y, x, 3)`` dask levels of a JPEG, finest first: halved until the smaller side is below ``min_side``.

    Nothing is decoded here (only the header is read); see :mod:`~spatialtranscriptformer.io._lazy`.
    """
    from PIL import Image

    path = Path(path)
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(path) as im:
        if im.format != "JPEG":
            raise ValueError(f"{path.name} is not a JPEG file (format {im.format}).")
        w, h = im.size
        sizes = {1: (w, h)}
        for s in _DCT_SCALES[1:]:
            with Image.open(path) as im2:
                im2.draft("RGB", (max(1, w // s), max(1, h // s)))
                sizes[s] = im2.size
    check_jpeg_complete(path)
    levels = [LazyLevel((h, w, 3), partial(decode_jpeg, str(path), 1), token=_jpeg_token(path, 1))]
    scale, side = 1, min(h, w)
    while side > min_side:
        scale, side = scale * 2, side // 2
        if scale in sizes:
            lw, lh = sizes[scale]
            load = partial(decode_jpeg, str(path), scale)
        else:
            lw, lh = sizes[8][0] // (scale // 8), sizes[8][1] // (scale // 8)
            load = partial(_decode_and_pool, str(path), scale)
        levels.append(LazyLevel((lh, lw, 3), load, token=_jpeg_token(path, scale)))
    return [lv.to_dask(chunks) for lv in levels]


# --- in-memory images ----------------------------------------------------------------------------------
def box_downsample(a: Any, f: int, *, channel_axis: int = 0, band: int = 512) -> np.ndarray:
    """``f x f`` mean pooling of a uint8 image (``(c, y, x)`` or ``(y, x, c)``), trimmed, rounded, in row bands."""
    a = np.asarray(a) if not isinstance(a, LazyLevel) else a.array()
    if channel_axis not in (0, -1, 2):
        raise ValueError("channel_axis must be 0 (c, y, x) or -1 (y, x, c).")
    first = channel_axis == 0
    h, w = (a.shape[1], a.shape[2]) if first else (a.shape[0], a.shape[1])
    oh, ow = h // f, w // f
    c = a.shape[0] if first else a.shape[-1]
    out = np.empty((c, oh, ow) if first else (oh, ow, c), dtype=np.uint8)
    acc = np.uint32 if f * f * 255 >= 2**16 else np.uint16
    for y in range(0, oh, band):
        y1 = min(oh, y + band)
        if first:
            blk = a[:, y * f : y1 * f, : ow * f].reshape(c, y1 - y, f, ow, f)
            s = blk.sum(axis=(2, 4), dtype=acc)
            out[:, y:y1] = (s + (f * f) // 2) // (f * f)
        else:
            blk = a[y * f : y1 * f, : ow * f].reshape(y1 - y, f, ow, f, c)
            s = blk.sum(axis=(1, 3), dtype=acc)
            out[y:y1] = (s + (f * f) // 2) // (f * f)
    return out


def lazy_pyramid(image: np.ndarray, scale_factors: Sequence[int], *, chunks: int = 1024) -> list:
    """``(c, y, x)`` dask levels: ``image`` and its lazily computed mean-pooled coarser levels."""
    import dask.array as da

    image = np.asarray(image)
    levels = [da.from_array(image, chunks=(image.shape[0], chunks, chunks))]
    parent: np.ndarray | LazyLevel = image
    for f in scale_factors:
        c, h, w = parent.shape
        lv = LazyLevel((c, h // f, w // f), partial(box_downsample, parent, int(f), channel_axis=0))
        ch = (c, min(chunks, h // f), min(chunks, w // f))
        levels.append(da.from_array(lv, chunks=ch, name=f"stf-lazy-{lv._token[1]}", lock=False, asarray=True,
                                    meta=np.empty((0, 0, 0), dtype=np.uint8)))
        parent = lv
    return levels
