"""numba kernels of :mod:`~spatialtranscriptformer.pp._resample` (imported only when tiles are cut).

Written for the compiler: the horizontal pass gathers taps from contiguous source rows into a float
buffer, the vertical pass and the copies run along contiguous rows (vectorised), and output pixels are
written in order. All kernels release the GIL.
"""

from __future__ import annotations

import numba
import numpy as np

_OPTS = {"cache": True, "nogil": True, "boundscheck": False, "error_model": "numpy"}


@numba.njit(**_OPTS)
def scratch_size(C, yi, yw, xw):  # pragma: no cover - compiled
    """Float32 elements of scratch :func:`resample` needs for ``C`` channels and these taps."""
    return C * (yi.max() + yw.shape[1] - yi.min()) * xw.shape[0]


@numba.njit(**_OPTS)
def resample(region, ry0, rx0, yi, yw, xi, xw, out, scratch):  # pragma: no cover - compiled
    """``out[r, k, c] = sum_ty yw[r, ty] sum_tx xw[k, tx] region[c, yi[r] + ty - ry0, xi[k] + tx - rx0]``, rounded.

    ``region`` is ``(c, y, x)`` uint8 with slide origin ``(ry0, rx0)``; ``yi``/``xi`` hold the first
    source pixel of each output row / column and ``yw``/``xw`` the weights of consecutive source pixels;
    ``out`` is ``(ny, nx, c)`` uint8; ``scratch`` a float32 buffer of at least :func:`scratch_size` elements
    (reused between calls: fresh memory costs page faults).
    """
    C = region.shape[0]
    ny, ty = yw.shape
    nx, tx = xw.shape
    y0 = yi.min()
    y1 = yi.max() + ty
    x0 = xi.min()
    x1 = xi.max() + tx
    tmp = scratch[: C * (y1 - y0) * nx].reshape(C, y1 - y0, nx)
    rowf = np.empty(x1 - x0, np.float32)
    xs = xi - x0
    w0 = np.ascontiguousarray(xw[:, 0])
    w1 = np.ascontiguousarray(xw[:, 1]) if tx > 1 else w0
    for c in range(C):  # horizontal pass: source rows -> output columns (gathers)
        for y in range(y0, y1):
            src = region[c, y - ry0]
            for j in range(x1 - x0):
                rowf[j] = src[x0 - rx0 + j]
            trow = tmp[c, y - y0]
            if tx == 2:  # enlarging: bilinear, two taps
                for k in range(nx):
                    b = xs[k]
                    trow[k] = w0[k] * rowf[b] + w1[k] * rowf[b + 1]
            else:
                for k in range(nx):
                    acc = np.float32(0.0)
                    b = xs[k]
                    for t in range(tx):
                        acc += xw[k, t] * rowf[b + t]
                    trow[k] = acc
    acc = np.empty((C, nx), np.float32)
    plane = np.empty((C, nx), np.uint8)
    for r in range(ny):  # vertical pass along output rows (vectorised), then round and interleave channels
        for c in range(C):
            a = acc[c]
            s = tmp[c, yi[r] - y0]
            w = yw[r, 0]
            for k in range(nx):
                a[k] = w * s[k] + np.float32(0.5)
            for t in range(1, ty):
                s = tmp[c, yi[r] + t - y0]
                w = yw[r, t]
                for k in range(nx):
                    a[k] += w * s[k]
            q = plane[c]
            for k in range(nx):
                q[k] = np.uint8(min(max(a[k], np.float32(0.0)), np.float32(255.0)))
        o = out[r].reshape(-1)
        if C == 3:
            p0, p1, p2 = plane[0], plane[1], plane[2]
            for k in range(nx):
                o[3 * k] = p0[k]
                o[3 * k + 1] = p1[k]
                o[3 * k + 2] = p2[k]
        else:
            for k in range(nx):
                for c in range(C):
                    o[C * k + c] = plane[c, k]


@numba.njit(**_OPTS)
def resample_tiles(region, ry0, rx0, yi, yw, xi, xw, rows, out):  # pragma: no cover - compiled
    """:func:`resample` of tile ``i`` (taps ``yi[i]``, ``xi[i]``, ...) into ``out[rows[i]]``, for every tile."""
    n = 0
    for i in range(len(rows)):
        n = max(n, scratch_size(region.shape[0], yi[i], yw[i], xw[i]))
    scratch = np.empty(n, np.float32)
    for i in range(len(rows)):
        resample(region, ry0, rx0, yi[i], yw[i], xi[i], xw[i], out[rows[i]], scratch)


@numba.njit(**_OPTS)
def gather(region, ys, xs, size, rows, out):  # pragma: no cover - compiled
    """``out[rows[i], y, x, c] = region[c, ys[i] + y, xs[i] + x]``: native-scale tiles, ``(c, y, x) -> (y, x, c)``."""
    C = region.shape[0]
    for i in range(len(ys)):
        o = out[rows[i]]
        x0 = xs[i]
        for y in range(size):
            d = o[y]
            for c in range(C):
                src = region[c, ys[i] + y, x0 : x0 + size]
                for x in range(size):
                    d[x, c] = src[x]
