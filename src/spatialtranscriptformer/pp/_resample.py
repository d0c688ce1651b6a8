"""Compiled kernels that cut (and resample) ``(y, x, 3)`` uint8 tiles from a ``(c, y, x)`` image region.

Resampling is separable with a triangle (tent) filter, the filter of Pillow's ``BILINEAR`` (Pillow's
``ImagingResample``): plain bilinear interpolation when enlarging, and a tent of width ``scale`` (an
antialiasing filter) when reducing. Every output pixel is placed on a *slide-wide* output grid: output
pixel ``K`` (a slide-wide index) is centred at source coordinate ``(K + 0.5) * scale`` (pixel edges at
integers). A tile is therefore the same whether it is resampled on its own or sliced from a resampled
block, and does not depend on the other spots read with it: :func:`axis_taps` computes the taps of a
global output index the same way in both cases, and both strategies run the same kernel.

Kernels are compiled once per machine by numba (Lam et al. 2015, "Numba: a LLVM-based Python JIT
compiler") and cached on disk; they release the GIL, so a reader thread decodes the next block while
tiles are cut.
"""

from __future__ import annotations

import numpy as np


def axis_taps(first: np.ndarray, size: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """First source pixel ``(n, size)`` and weights ``(n, size, taps)`` of output pixels ``first[i] + k``.

    ``first`` holds slide-wide output indices; source pixels are slide-wide (subtract the region's origin
    before use) and tap ``t`` reads source pixel ``start + t``. The triangle filter has support
    ``max(scale, 1)`` (Pillow's ``BILINEAR``); weights of a pixel sum to one, and taps unused by every
    pixel are dropped (two taps when enlarging).
    """
    first = np.asarray(first, dtype=np.int64)
    support = max(scale, 1.0)
    taps = int(np.ceil(support)) * 2 + 1
    centre = (first[:, None] + np.arange(size)[None, :] + 0.5) * scale  # (n, size), float64
    lo = np.floor(centre - support + 0.5).astype(np.int64)
    w = 1.0 - np.abs((lo[..., None] + np.arange(taps) + 0.5 - centre[..., None]) / support)
    w = np.clip(w, 0.0, None)
    w /= w.sum(-1, keepdims=True)
    # drop leading / trailing taps that are zero for every output pixel (shift the start accordingly)
    used = np.flatnonzero((w > 0).any(axis=(0, 1)))
    a, b = (int(used[0]), int(used[-1]) + 1) if len(used) else (0, 1)
    return lo + a, np.ascontiguousarray(w[..., a:b], dtype=np.float32)


def tap_range(first: np.ndarray, size: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """First and last source pixel (inclusive) that :func:`axis_taps` may read for ``first[i] + k``, ``k < size``."""
    first = np.asarray(first, dtype=np.int64)
    support = max(scale, 1.0)
    taps = int(np.ceil(support)) * 2 + 1
    lo = np.floor((first + 0.5) * scale - support + 0.5).astype(np.int64)
    hi = np.floor((first + size - 0.5) * scale - support + 0.5).astype(np.int64) + taps - 1
    return lo, hi


def kernels():
    """The compiled kernels module (:mod:`~spatialtranscriptformer.pp._resample_kernels`), imported on first use."""
    from . import _resample_kernels

    return _resample_kernels
