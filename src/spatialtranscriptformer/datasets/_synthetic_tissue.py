"""Drawing blocks of the synthetic slide simulator: tissue compartments, cells, H&E image, gene model.

Everything here is plain numpy / scipy and deterministic given a :class:`numpy.random.Generator`.
The H&E image follows the Beer-Lambert stain model of Ruifrok & Johnston (2001): optical density =
haematoxylin concentration x OD_H + eosin concentration x OD_E, RGB = 255 * exp(-OD).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

GRID_UM = 2.0
"""Resolution of the simulation grid (µm per grid cell) = the finest Visium HD bin."""

COMPARTMENTS = ("stroma", "tumor", "immune", "adipose")
"""Compartment (and cell type) names, in order."""

# per compartment / cell type:       stroma tumor immune adipose
_KEEP = np.array([0.30, 0.85, 1.00, 0.06])  # fraction of lattice sites holding a cell (nuclei density)
_NUC_UM = np.array([2.0, 3.6, 2.4, 2.2])  # nucleus radius (µm)
_BODY_UM = np.array([4.0, 5.5, 3.2, 5.0])  # cell body radius (µm): what a 2 µm bin captures
_H_NUC = np.array([1.25, 0.95, 1.65, 1.15])  # haematoxylin concentration in the nucleus
_H_CYTO = np.array([0.05, 0.12, 0.10, 0.02])  # haematoxylin in the cytoplasm (tumour is basophilic)
_E_CYTO = np.array([0.55, 0.50, 0.30, 0.15])  # eosin in the cytoplasm
_E_BG = np.array([0.60, 0.35, 0.30, 0.05])  # eosin of the extracellular background
_OD_H = np.array([0.65, 0.70, 0.29], dtype=np.float32)
_OD_E = np.array([0.07, 0.99, 0.11], dtype=np.float32)
_LATTICE_UM = 7.0
_MIX = 0.12  # probability that a cell's type differs from its compartment (e.g. infiltrating immune cells)


@dataclass
class Tissue:
    """Compartments on the 2 µm grid and the cells placed on them (coordinates in µm)."""

    comp: np.ndarray  # (H2, W2) int8 compartment of each 2 µm grid cell
    tissue: np.ndarray  # (H2, W2) bool, tissue (True) or glass
    texture: np.ndarray  # (H2, W2) float32 smooth stain texture around 1
    cell_xy: np.ndarray  # (N, 2) cell centres (x, y) in µm
    cell_type: np.ndarray  # (N,) int8
    nuc_um: np.ndarray  # (N,) nucleus radius
    body_um: np.ndarray  # (N,) cell body radius


def _lerp_axis(f: np.ndarray, n_out: int, step: float, axis: int) -> np.ndarray:
    """Linear interpolation of ``f`` along ``axis`` from a grid with spacing ``step`` output cells."""
    pos = (np.arange(n_out) + 0.5) / step
    i0 = np.clip(np.floor(pos).astype(int), 0, f.shape[axis] - 2)
    w = (pos - i0).astype(np.float32)
    shape = [1, 1]
    shape[axis] = n_out
    w = w.reshape(shape)
    return np.take(f, i0, axis=axis) * (1 - w) + np.take(f, i0 + 1, axis=axis) * w


def _smooth_fields(
    rng: np.random.Generator, n: int, shape: tuple[int, int], scale_cells: float
) -> np.ndarray:
    """``n`` smooth standardised random fields of ``shape`` with features of about ``scale_cells`` cells.

    Gaussian-filtered white noise on a coarse grid, linearly interpolated (separably, without BLAS).
    """
    step = max(scale_cells / 3.0, 1.0)
    coarse = (int(np.ceil(shape[0] / step)) + 2, int(np.ceil(shape[1] / step)) + 2)
    out = np.empty((n, *shape), dtype=np.float32)
    for i in range(n):
        f = ndimage.gaussian_filter(rng.standard_normal(coarse), sigma=1.0, mode="wrap")
        f = ((f - f.mean()) / (f.std() + 1e-6)).astype(np.float32)
        out[i] = _lerp_axis(_lerp_axis(f, shape[0], step, 0), shape[1], step, 1)
    return out


def draw_tissue(
    rng: np.random.Generator,
    shape: tuple[int, int],
    *,
    n_compartments: int,
    region_um: float,
    background_fraction: float,
) -> Tissue:
    """Random compartments (thresholded low-frequency noise), a tissue mask and cells on a jittered lattice."""
    # fields at 4 µm (half the grid resolution; regions are ~100 µm), then repeated onto the 2 µm grid
    half = ((shape[0] + 1) // 2, (shape[1] + 1) // 2)
    fields = _smooth_fields(rng, n_compartments + 2, half, region_um / (2 * GRID_UM))
    bias = np.zeros(n_compartments, dtype=np.float32)
    bias[0] = 0.3  # stroma is the most common compartment
    if n_compartments > 3:
        bias[3] = -0.4  # adipose the rarest
    comp = np.zeros(half, dtype=np.int8)
    best = fields[0] + bias[0]
    for k in range(1, n_compartments):
        cand = fields[k] + bias[k]
        better = cand > best
        comp[better] = k
        best = np.where(better, cand, best)
    tissue = np.ones(half, dtype=bool)
    if background_fraction > 0:
        t = fields[n_compartments]
        tissue = t > np.quantile(t[::2, ::2], background_fraction)
    texture = (1.0 + 0.15 * fields[n_compartments + 1]).astype(np.float32)

    def up(a: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(a, 2, axis=0), 2, axis=1)[: shape[0], : shape[1]]

    comp, tissue, texture = up(comp), up(tissue), up(texture)

    h_um, w_um = shape[0] * GRID_UM, shape[1] * GRID_UM
    # jittered hexagonal lattice: roughly non-overlapping cells, density thinned per compartment
    dy = _LATTICE_UM * np.sqrt(3) / 2
    ys = np.arange(dy / 2, h_um, dy)
    xs = np.arange(_LATTICE_UM / 2, w_um, _LATTICE_UM)
    gx, gy = np.meshgrid(xs, ys)
    gx = gx + (np.arange(len(ys))[:, None] % 2) * _LATTICE_UM / 2
    xy = np.stack([gx.ravel(), gy.ravel()], axis=1)
    xy += rng.uniform(-0.3, 0.3, size=xy.shape) * _LATTICE_UM
    xy = xy[(xy[:, 0] >= 0) & (xy[:, 0] < w_um) & (xy[:, 1] >= 0) & (xy[:, 1] < h_um)]
    iy, ix = (xy[:, 1] / GRID_UM).astype(int), (xy[:, 0] / GRID_UM).astype(int)
    c = comp[iy, ix]
    keep = tissue[iy, ix] & (rng.random(len(xy)) < _KEEP[c])
    xy, c = xy[keep], c[keep]
    ctype = c.copy()
    swap = rng.random(len(c)) < _MIX
    ctype[swap] = rng.choice([2, 0, 1][: max(1, n_compartments - 1)], size=int(swap.sum()))
    ctype = np.minimum(ctype, n_compartments - 1).astype(np.int8)
    jitter = np.exp(0.12 * rng.standard_normal(len(xy)))
    order = rng.permutation(len(xy))
    return Tissue(
        comp=comp,
        tissue=tissue,
        texture=texture,
        cell_xy=xy[order],
        cell_type=ctype[order],
        nuc_um=(_NUC_UM[ctype] * jitter)[order],
        body_um=(_BODY_UM[ctype] * jitter)[order],
    )


def _disc_offsets(r: int) -> np.ndarray:
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    m = yy**2 + xx**2 <= r * r + r * 0.8
    return np.stack([yy[m], xx[m]], axis=1)


def paint_discs(
    canvas: np.ndarray, centers_yx: np.ndarray, radii: np.ndarray, values: np.ndarray, *, min_radius: int = 0
) -> None:
    """Write ``values[i]`` into a disc of ``radii[i]`` cells around ``centers_yx[i]`` of a 2-D ``canvas``.

    Where discs overlap, the one written last wins (discs are written by radius, then in order).
    """
    r_int = np.maximum(np.rint(radii).astype(int), min_radius)
    h, w = canvas.shape
    flat = canvas.reshape(-1)
    cy, cx = np.rint(centers_yx[:, 0]).astype(np.int64), np.rint(centers_yx[:, 1]).astype(np.int64)
    values = np.asarray(values)
    for r in np.unique(r_int):
        sel = np.flatnonzero(r_int == r)
        off = _disc_offsets(int(r))
        yy = cy[sel, None] + off[None, :, 0]
        xx = cx[sel, None] + off[None, :, 1]
        ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        idx = yy * w + xx
        vv = np.broadcast_to(values[sel, None], idx.shape)
        flat[idx[ok]] = vv[ok]


def cell_labels(t: Tissue) -> np.ndarray:
    """Cell index covering each 2 µm grid cell (-1 = extracellular), from the cell bodies."""
    lab = np.full(t.comp.shape, -1, dtype=np.int32)
    yx = t.cell_xy[:, ::-1] / GRID_UM - 0.5
    paint_discs(lab, yx, t.body_um / GRID_UM, np.arange(len(t.cell_xy), dtype=np.int32))
    return lab


def render_he(
    rng: np.random.Generator, t: Tissue, labels: np.ndarray, *, image_shape: tuple[int, int], mpp: float
) -> np.ndarray:
    """H&E-like RGB image (uint8) of the tissue covering the 2 µm grid, at ``mpp`` µm per pixel.

    Cell bodies (cytoplasm stain) come from the 2 µm cell ``labels``; nuclei are painted at full resolution.
    """
    h, w = image_shape
    gy = np.minimum(((np.arange(h) + 0.5) * mpp / GRID_UM).astype(int), t.comp.shape[0] - 1)
    gx = np.minimum(((np.arange(w) + 0.5) * mpp / GRID_UM).astype(int), t.comp.shape[1] - 1)
    inc = labels >= 0
    ctype = t.cell_type[np.maximum(labels, 0)]
    H2 = np.where(inc, _H_CYTO[ctype], 0.02).astype(np.float32) * t.tissue
    E2 = np.where(inc, _E_CYTO[ctype], _E_BG[t.comp]).astype(np.float32) * t.texture * t.tissue
    H = H2[np.ix_(gy, gx)]
    E = E2[np.ix_(gy, gx)]
    yx = t.cell_xy[:, ::-1] / mpp - 0.5
    paint_discs(
        H,
        yx,
        t.nuc_um / mpp,
        (_H_NUC[t.cell_type] * np.exp(0.1 * rng.standard_normal(len(yx)))).astype(np.float32),
        min_radius=1,
    )
    paint_discs(E, yx, t.nuc_um / mpp, np.full(len(yx), 0.1, np.float32), min_radius=1)
    noise = 1.0 + 0.06 * rng.standard_normal((2, 256, 256), dtype=np.float32)  # tiled pixel noise
    reps = (int(np.ceil(h / 256)), int(np.ceil(w / 256)))
    H *= np.tile(noise[0], reps)[:h, :w]
    E *= np.tile(noise[1], reps)[:h, :w]
    out = np.empty((h, w, 3), dtype=np.uint8)
    for c in range(3):
        out[..., c] = np.clip(255.0 * np.exp(-(H * _OD_H[c] + E * _OD_E[c] + 0.03)), 0, 255)
    return out


def gene_model(
    rng: np.random.Generator, gene_sets: dict[str, list[str]], genes: list[str], n_compartments: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, list[str]]]:
    """Compartment pathway activities ``A`` (K, P), loadings ``W`` (G, P), log baselines ``mu`` (G,).

    Pathway ``p`` is the marker programme of compartment ``p % K`` (strongly up there); the other
    entries are small random effects. Returns also the compartment -> marker pathways dict.
    """
    names = list(gene_sets)
    n_p = len(names)
    A = rng.normal(0.0, 0.25, size=(n_compartments, n_p))
    for p in range(n_p):
        A[p % n_compartments, p] = 1.5
    gidx = {g: i for i, g in enumerate(genes)}
    W = np.zeros((len(genes), n_p))
    for p, name in enumerate(names):
        for g in gene_sets[name]:
            if g in gidx:
                W[gidx[g], p] = rng.uniform(0.6, 1.0)
    mu = rng.normal(0.0, 0.6, size=len(genes)) - 0.5 * W.sum(1)
    comp_pw = {
        COMPARTMENTS[k]: [names[p] for p in range(n_p) if p % n_compartments == k]
        for k in range(n_compartments)
    }
    return A, W, mu, comp_pw
