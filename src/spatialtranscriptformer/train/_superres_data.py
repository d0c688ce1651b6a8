"""Targets and encoder inputs for 2 µm super-resolution (Visium HD bins -> patch rasters).

Each 256 µm x 256 µm tissue patch on a grid gives a 128 x 128 x G raw-count raster at 2 µm, its tissue
mask (the bins present in the table), and count-conserving sum-pooled rasters at 4, 8 and 16 µm
(``avg_pool2d(x, k) * k**2``), following the Virchow2 2 µm super-resolution design (vanbelkummax/
virchow2-st-2uM). The encoder input is the frozen backbone's patch-token grid of each patch's H&E,
resized to the backbone's input size, computed once and cached as zarr.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from .. import _constants as K
from .._data import as_slide_list, get_table, is_spatialdata, slide_meta, slide_mpp
from .._logging import logger

BIN_UM = 2
SCALES_UM = (2, 4, 8, 16)


@dataclass
class SuperresPatches:
    """Patch rasters of one or several slides (all arrays indexed by patch)."""

    values: np.ndarray  # (N, G, S, S) 2 µm counts (float32) or rates
    mask: np.ndarray  # (N, S, S) bool tissue mask
    genes: list[str]
    centers_px: np.ndarray  # (N, 2) patch centres (x, y) in full-resolution image pixels
    patch_px: np.ndarray  # (N,) patch edge in image pixels
    origin_rc: np.ndarray  # (N, 2) first bin row / column of the patch
    slide_index: np.ndarray  # (N,)
    slide_ids: np.ndarray  # (N,)
    patient_ids: np.ndarray  # (N,)
    patch_um: int = 256
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.values)

    def subset(self, idx) -> SuperresPatches:
        """The patches ``idx``."""
        idx = np.asarray(idx)
        return SuperresPatches(
            self.values[idx],
            self.mask[idx],
            self.genes,
            self.centers_px[idx],
            self.patch_px[idx],
            self.origin_rc[idx],
            self.slide_index[idx],
            self.slide_ids[idx],
            self.patient_ids[idx],
            self.patch_um,
            dict(self.meta),
        )

    def pooled(self, scale_um: int) -> np.ndarray:
        """Sum-pooled rasters at ``scale_um`` (count conserving)."""
        return sum_pool(self.values, scale_um // BIN_UM)

    def pooled_mask(self, scale_um: int) -> np.ndarray:
        """Tissue mask at ``scale_um``: at least half of the 2 µm bins of a pooled bin are tissue."""
        k = scale_um // BIN_UM
        return sum_pool(self.mask.astype(np.float32), k) >= 0.5 * k * k


def sum_pool(x: np.ndarray, k: int) -> np.ndarray:
    """Sum-pool the last two axes by ``k`` (count conserving)."""
    if k == 1:
        return x
    *lead, h, w = x.shape
    return x.reshape(*lead, h // k, k, w // k, k).sum(axis=(-3, -1))


def _bin_size(adata) -> float | None:
    meta = adata.uns.get(K.SLIDE_META_KEY, {})
    b = meta.get("bin_size_um")
    if b is None and meta.get("shape") == "square":
        b = meta.get("spot_diameter_um")
    return None if b is None else float(b)


def _table_2um(data, table_key: str | None, i: int):
    """The 2 µm bin table of slide ``i``; a clear error lists the bin sizes present otherwise."""
    adata = get_table(data, table_key)
    b = _bin_size(adata)
    if b is not None and np.isclose(b, BIN_UM):
        return adata
    sizes = []
    if is_spatialdata(data):
        sizes = sorted({_bin_size(t) for t in data.tables.values()} - {None})
    else:
        sizes = [b] if b is not None else []
    raise ValueError(
        f"Slide {i}: super-resolution needs Visium HD 2 µm bins, but the table has "
        f"{'no bin size (not Visium HD)' if b is None else f'{b:g} µm bins'}; bin sizes in this slide: "
        f"{[f'{s:g} µm' for s in sizes] or 'none'}. Read the slide with `stf.io.read_visium_hd(..., bin_size=2)`."
    )


def bin_grid(adata) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bin rows, columns and the affine ``(3, 2)`` mapping ``[col, row, 1]`` -> bin centre (x, y) px."""
    xy = np.asarray(adata.obsm[K.SPATIAL_KEY], dtype=np.float64)[:, :2]
    if "array_row" in adata.obs and "array_col" in adata.obs:
        rows = adata.obs["array_row"].to_numpy().astype(np.int64)
        cols = adata.obs["array_col"].to_numpy().astype(np.int64)
    else:
        pitch = BIN_UM / slide_mpp(adata)
        rows = np.rint((xy[:, 1] - xy[:, 1].min()) / pitch).astype(np.int64)
        cols = np.rint((xy[:, 0] - xy[:, 0].min()) / pitch).astype(np.int64)
    design = np.c_[cols, rows, np.ones(len(rows))]
    affine, *_ = np.linalg.lstsq(design, xy, rcond=None)
    return rows - rows.min(), cols - cols.min(), affine


def select_genes(
    tables: Sequence[Any],
    genes: int | Sequence[str],
    *,
    layer: str | None,
    rows: Sequence[np.ndarray | None] | None = None,
) -> list[str]:
    """``genes`` itself (all present, else ``KeyError``) or the top-``genes`` by variance.

    The variance of the raw counts per bin is computed per table over the bins ``rows[i]`` of table ``i``
    (all bins when ``rows`` or ``rows[i]`` is ``None``; a table with an empty selection is skipped) and
    summed over tables. Pass the bins of the training patches only, so that no held-out bin takes part
    in choosing the genes.
    """
    common = list(tables[0].var_names)
    for t in tables[1:]:
        common = [g for g in common if g in set(t.var_names)]
    if not isinstance(genes, int | np.integer):
        genes = [str(g) for g in genes]
        missing = [g for g in genes if g not in set(common)]
        if missing:
            raise KeyError(
                f"{len(missing)} of {len(genes)} genes are missing from the data, e.g. {missing[:5]}."
            )
        return genes
    if not 1 <= genes <= len(common):
        raise ValueError(
            f"genes must be between 1 and {len(common)} (genes shared by all slides), got {genes}."
        )
    rows = [None] * len(tables) if rows is None else list(rows)
    var = np.zeros(len(common))
    for t, r in zip(tables, rows, strict=True):
        X = _matrix(t, layer)
        if r is not None:
            if not len(r):
                continue
            X = X[np.asarray(r)]
        X = X[:, t.var_names.get_indexer(common)]
        mean = np.asarray(X.mean(0)).ravel()
        sq = np.asarray(X.multiply(X).mean(0)).ravel() if sp.issparse(X) else (X**2).mean(0)
        var += sq - mean**2
    return [common[i] for i in np.argsort(-var, kind="stable")[:genes]]


def _matrix(adata, layer: str | None):
    X = adata.layers[layer] if layer is not None and layer in adata.layers else adata.X
    return X if sp.issparse(X) else np.asarray(X)


@dataclass
class PatchLayout:
    """Where the tissue patches of one or several slides lie, before any gene is chosen.

    ``bins[k]`` are the table rows (2 µm bins) of patch ``k`` in table ``tables[slide_index[k]]`` and
    ``local[k]`` their (row, column) inside the patch raster.
    """

    tables: list
    bins: list[np.ndarray]
    local: list[tuple[np.ndarray, np.ndarray]]
    centers_px: np.ndarray
    patch_px: np.ndarray
    origin_rc: np.ndarray
    slide_index: np.ndarray
    slide_ids: np.ndarray
    patient_ids: np.ndarray
    patch_um: int
    values: str
    layer: str | None

    def __len__(self) -> int:
        return len(self.bins)

    def rows(self, idx: np.ndarray | None = None) -> list[np.ndarray]:
        """Per table, the bins (table rows) of the patches ``idx`` (default: all patches)."""
        idx = np.arange(len(self)) if idx is None else np.asarray(idx, dtype=int)
        out = [[] for _ in self.tables]
        for k in idx:
            out[self.slide_index[k]].append(self.bins[k])
        return [np.concatenate(b) if b else np.array([], dtype=np.int64) for b in out]

    def rasters(self, genes: Sequence[str]) -> SuperresPatches:
        """The patch rasters of ``genes`` (all patches)."""
        genes = [str(g) for g in genes]
        S = self.patch_um // BIN_UM
        vals = np.zeros((len(self), len(genes), S, S), dtype=np.float32)
        mask = np.zeros((len(self), S, S), dtype=bool)
        mats = []
        for t in self.tables:
            gi = t.var_names.get_indexer(genes)
            M = t.obsm[self.values][:, gi] if self.values != "counts" else _matrix(t, self.layer)[:, gi]
            mats.append(sp.csr_matrix(M) if not sp.issparse(M) else M.tocsr())
        for k, (idx, (lr, lc)) in enumerate(zip(self.bins, self.local, strict=True)):
            vals[k][:, lr, lc] = mats[self.slide_index[k]][idx].toarray().T
            mask[k][lr, lc] = True
        return SuperresPatches(
            vals,
            mask,
            genes,
            self.centers_px,
            self.patch_px,
            self.origin_rc,
            self.slide_index,
            self.slide_ids,
            self.patient_ids,
            int(self.patch_um),
            {"values": self.values, "layer": self.layer},
        )


def patch_layout(
    data,
    *,
    patch_um: int = 256,
    values: str = "counts",
    layer: str | None = K.COUNTS_LAYER,
    min_tissue: float = 0.05,
    table_key: str | None = None,
) -> PatchLayout:
    """Validate Visium HD slides with 2 µm bins and lay their tissue patches out (see :func:`superres_targets`)."""
    if not isinstance(patch_um, int | np.integer) or patch_um <= 0 or patch_um % 16:
        raise ValueError(
            f"patch_um must be a positive multiple of 16 µm (2/4/8/16 µm scales tile it), got {patch_um!r}."
        )
    slides = as_slide_list(data)
    tables = [_table_2um(s, table_key, i) for i, s in enumerate(slides)]
    if values == "counts":
        for i, t in enumerate(tables):
            X = _matrix(t, layer)
            d = X.data if sp.issparse(X) else X
            if d.size and (not np.all(np.isfinite(d)) or np.any(d < 0) or np.any(d != np.round(d))):
                raise ValueError(
                    f"Slide {i}: the Poisson targets need raw non-negative integer counts, but "
                    f"{'layer ' + repr(layer) if layer in t.layers else 'X'} holds non-integer or negative values "
                    "(normalised data?). Pass the raw counts layer with `layer=`."
                )
    elif any(values not in t.obsm for t in tables):
        raise KeyError(
            f"`obsm[{values!r}]` not found in every slide; use values='counts' or an existing obsm key."
        )
    S = patch_um // BIN_UM
    out: dict[str, list] = {k: [] for k in ("b", "l", "c", "p", "o", "si", "sid", "pid")}
    for i, t in enumerate(tables):
        meta = slide_meta(t)
        rows, cols, aff = bin_grid(t)
        pr, pc = rows // S, cols // S
        key = pr * (pc.max() + 1) + pc
        order = np.argsort(key, kind="stable")
        splits = np.flatnonzero(np.diff(key[order])) + 1
        px_per_bin = float(np.hypot(*aff[0]))
        for idx in np.split(order, splits):
            if len(idx) < min_tissue * S * S:
                continue
            r0, c0 = int(pr[idx[0]]) * S, int(pc[idx[0]]) * S
            out["b"].append(idx)
            out["l"].append((rows[idx] - r0, cols[idx] - c0))
            out["c"].append(np.array([c0 + (S - 1) / 2, r0 + (S - 1) / 2, 1.0]) @ aff)
            out["p"].append(S * px_per_bin)
            out["o"].append((r0, c0))
            out["si"].append(i)
            out["sid"].append(str(meta.get("slide_id", f"slide_{i}")))
            out["pid"].append(str(meta.get("patient_id", meta.get("slide_id", f"slide_{i}"))))
    if not out["b"]:
        raise ValueError(
            f"No {patch_um} µm patch has at least {min_tissue:.0%} tissue bins: the tissue mask is empty "
            "(no bins in the table?)."
        )
    return PatchLayout(
        tables,
        out["b"],
        out["l"],
        np.asarray(out["c"]),
        np.asarray(out["p"], dtype=float),
        np.asarray(out["o"]),
        np.asarray(out["si"]),
        np.asarray(out["sid"]),
        np.asarray(out["pid"]),
        int(patch_um),
        values,
        layer,
    )


def superres_targets(
    data,
    *,
    genes: int | Sequence[str] = 50,
    patch_um: int = 256,
    values: str = "counts",
    layer: str | None = K.COUNTS_LAYER,
    min_tissue: float = 0.05,
    table_key: str | None = None,
) -> SuperresPatches:
    """Patch rasters from Visium HD slides with 2 µm bins.

    Parameters
    ----------
    data
        One slide or a list (SpatialData or AnnData tables) with 2 µm bins.
    genes
        Number of top-variance genes (chosen over all bins of all slides given: pass the training slides
        only, or a gene list chosen on them), or a list of genes.
    patch_um
        Patch edge in µm (a multiple of 16 µm, so that every scale tiles it exactly).
    values
        ``"counts"`` (raw integer counts, from ``layer``) or an ``obsm`` key with per-bin values in the
        order of ``var_names`` (e.g. the simulator's ``"true_rates"``).
    layer
        Layer with the raw counts (``None`` or absent: ``X``).
    min_tissue
        Keep patches with at least this fraction of tissue bins.
    table_key
        Table of a SpatialData.
    """
    layout = patch_layout(
        data, patch_um=patch_um, values=values, layer=layer, min_tissue=min_tissue, table_key=table_key
    )
    genes = select_genes(layout.tables, genes, layer=layer)
    patches = layout.rasters(genes)
    logger.info("super-resolution targets: %d patches x %d genes", len(patches), len(genes))
    return patches


def patch_tokens(
    image,
    centers_px: np.ndarray,
    patch_px: float | np.ndarray,
    backbone,
    *,
    batch_size: int = 16,
    cache: str | Path | None = None,
    cache_key: str = "",
    progress: bool = False,
) -> np.ndarray:
    """Frozen backbone patch-token grids ``(N, h, w, D)`` float32 of square patches of the H&E.

    ``image`` is an ``ImageLevel``/array of the full-resolution H&E; each patch (``patch_px`` pixels
    around ``centers_px``) is resized to the backbone's input size. With ``cache`` (a folder), results
    are stored as zarr under a key of the backbone, geometry and ``cache_key`` and read back next time.
    """
    import torch
    from tqdm.auto import tqdm

    from ..pp._tiles import extract_tiles

    centers_px = np.asarray(centers_px, dtype=np.float64)
    sizes = np.broadcast_to(np.asarray(patch_px, dtype=np.float64), (len(centers_px),))
    size = int(backbone.spec.input_size)
    path = None
    if cache is not None:
        h = hashlib.sha1()
        for part in (
            cache_key,
            backbone.name,
            str(size),
            centers_px.round(3).tobytes(),
            sizes.round(3).tobytes(),
        ):
            h.update(part if isinstance(part, bytes) else part.encode())
        if hasattr(backbone.model, "state_dict"):
            for v in list(backbone.model.state_dict().values())[:3]:
                h.update(v.detach().cpu().numpy().tobytes()[:4096])
        path = Path(cache) / f"tokens_{h.hexdigest()[:20]}.zarr"
        if path.exists():
            import zarr

            return np.asarray(zarr.open_array(str(path), mode="r")[:])
    out = None
    scale_groups = np.unique(sizes)
    bar = tqdm(total=len(centers_px), disable=not progress, desc="token grids")
    for s in scale_groups:
        sel = np.flatnonzero(sizes == s)
        for idx, tiles in extract_tiles(image, centers_px[sel], size=size, scale=float(s) / size):
            for b in range(0, len(idx), batch_size):
                with torch.inference_mode():
                    tok = backbone.forward_tokens(backbone.preprocess(tiles[b : b + batch_size]))
                tok = np.asarray(tok, dtype=np.float32)
                if out is None:
                    out = np.empty((len(centers_px), *tok.shape[1:]), dtype=np.float32)
                out[sel[idx[b : b + batch_size]]] = tok
                bar.update(len(tok))
    bar.close()
    if path is not None:
        import zarr

        tmp = path.with_suffix(".tmp")
        arr = zarr.open_array(
            str(tmp), mode="w", shape=out.shape, dtype="float32", chunks=(64, *out.shape[1:])
        )
        arr[:] = out
        tmp.rename(path)
    return out
