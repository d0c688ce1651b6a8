"""Slides as training data: validation, targets, subsampling / crops, augmentation and padding.

One dataset item is one slide (all its spots, or a subsample / spatial crop of ``max_spots`` spots
during training). :func:`collate_slides` pads a batch of slides to the longest one with zero rows and
``mask=False``, the batch contract of every module in :mod:`spatialtranscriptformer.module`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch.utils.data import Dataset, Sampler

from .. import _constants as K
from .._data import as_slide_list, get_table, slide_meta, slide_mpp, spot_coords
from .._logging import logger
from .._validate import check_target_counts

if TYPE_CHECKING:
    from anndata import AnnData


@dataclass
class SlideRef:
    """A slide inside a table: the table, its id, patient and the table rows of its spots."""

    table: AnnData
    slide_id: str
    patient_id: str
    rows: np.ndarray


@dataclass
class SlideArrays:
    """The arrays of one slide used for training or prediction (spots that passed QC only)."""

    slide_id: str
    patient_id: str
    x: np.ndarray
    coords: np.ndarray
    rows: np.ndarray
    y: np.ndarray | None = None
    pathway_targets: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    @property
    def n_spots(self) -> int:
        """Number of spots."""
        return int(self.x.shape[0])


def collect_slides(
    data, *, slide_key: str = K.SLIDE_KEY, patient_key: str = K.PATIENT_KEY, table_key: str | None = None
) -> list[SlideRef]:
    """Split one slide / a list of slides into :class:`SlideRef` s (a table may hold several slides)."""
    refs: list[SlideRef] = []
    for i, d in enumerate(as_slide_list(data)):
        t = get_table(d, table_key)
        if slide_key in t.obs:
            sid = t.obs[slide_key].astype(str).to_numpy()
        else:
            sid = np.full(t.n_obs, str(t.uns.get(K.SLIDE_META_KEY, {}).get("slide_id", f"slide_{i}")))
        for s in pd.unique(sid):
            rows = np.flatnonzero(sid == s)
            if patient_key in t.obs:
                pats = pd.unique(t.obs[patient_key].astype(str).to_numpy()[rows])
                if len(pats) > 1:
                    raise ValueError(f"Slide {s!r} has spots of several patients in obs[{patient_key!r}]: {list(pats)[:5]}.")
                pat = str(pats[0])
            else:
                pat = str(t.uns.get(K.SLIDE_META_KEY, {}).get("patient_id", s))
            refs.append(SlideRef(table=t, slide_id=str(s), patient_id=pat, rows=rows))
    ids = [r.slide_id for r in refs]
    dup = sorted({s for s in ids if ids.count(s) > 1})
    if dup:
        raise ValueError(f"Slide ids occur in several tables: {dup[:5]}; slide ids (obs[{slide_key!r}]) must be unique.")
    return refs


def check_embeddings(refs: Sequence[SlideRef], embedding_key: str) -> int:
    """Check that every slide has ``obsm[embedding_key]`` of one width, finite; return the width."""
    dims: dict[str, int] = {}
    for r in refs:
        if embedding_key not in r.table.obsm:
            avail = sorted(k for k in r.table.obsm.keys() if k != K.SPATIAL_KEY)
            raise KeyError(
                f"Slide {r.slide_id!r}: embedding `obsm[{embedding_key!r}]` not found; available: {avail or 'none'}. "
                "Compute one with `stf.pp.embed`."
            )
        e = r.table.obsm[embedding_key]
        if np.ndim(e) != 2:
            raise ValueError(f"Slide {r.slide_id!r}: `obsm[{embedding_key!r}]` must be 2-D, got shape {np.shape(e)}.")
        dims[r.slide_id] = int(np.shape(e)[1])
    if len(set(dims.values())) > 1:
        raise ValueError(f"Embedding `obsm[{embedding_key!r}]` widths differ between slides: {dims}.")
    return next(iter(dims.values()))


def slide_features(ref: SlideRef, embedding_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings (S, F) float32 and spot centres (S, 2) in µm of a slide (all its rows)."""
    x = np.asarray(ref.table.obsm[embedding_key], dtype=np.float32)[ref.rows]
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise ValueError(f"Slide {ref.slide_id!r}: embedding `obsm[{embedding_key!r}]` has NaN/inf in {bad} spots.")
    try:
        slide_meta(ref.table)
    except ValueError as err:
        raise ValueError(f"Slide {ref.slide_id!r}: {err}") from None
    coords = (spot_coords(ref.table)[ref.rows] * slide_mpp(ref.table)).astype(np.float32)
    if not np.isfinite(coords).all():
        raise ValueError(f"Slide {ref.slide_id!r}: spot coordinates `obsm[{K.SPATIAL_KEY!r}]` contain NaN/inf.")
    return x, coords


def layer_of(table: AnnData, layer: str | None, slide_id: str):
    """The count matrix ``layers[layer]`` (``X`` for ``None``) with a clear error when missing."""
    if layer is None:
        return table.X
    if layer not in table.layers:
        raise KeyError(f"Slide {slide_id!r}: layer {layer!r} not found; available layers: {list(table.layers) or 'none'}.")
    return table.layers[layer]


def check_genes(refs: Sequence[SlideRef], genes: Sequence[str]) -> None:
    """Raise a ``KeyError`` naming the requested genes absent from any slide."""
    if len(genes) == 0:
        raise ValueError("No genes requested (empty gene list).")
    dup = pd.Index(genes)[pd.Index(genes).duplicated()].unique().tolist()
    if dup:
        raise ValueError(f"Duplicate genes requested: {dup[:10]}.")
    for r in refs:
        missing = pd.Index(genes).difference(r.table.var_names, sort=False).tolist()
        if missing:
            raise KeyError(
                f"Slide {r.slide_id!r}: {len(missing)} requested genes are absent from `var_names`: {missing[:10]}."
            )


def counts_block(ref: SlideRef, genes: Sequence[str], layer: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Counts of ``genes`` (S, G) float64 and total counts over all genes (S,) of a slide's spots."""
    mat = layer_of(ref.table, layer, ref.slide_id)
    mat = mat[ref.rows]
    idx = ref.table.var_names.get_indexer(list(genes))
    tot = np.asarray(mat.sum(axis=1), dtype=np.float64).ravel()
    y = mat[:, idx]
    y = y.toarray() if sp.issparse(y) else np.asarray(y)
    y = np.asarray(y, dtype=np.float64)
    if not np.isfinite(y).all() or not np.isfinite(tot).all():
        raise ValueError(f"Slide {ref.slide_id!r}: layer {layer or 'X'!r} has NaN/inf values.")
    if (y < 0).any():
        raise ValueError(f"Slide {ref.slide_id!r}: layer {layer or 'X'!r} has negative values; raw counts expected.")
    return y, tot


def build_slide_arrays(
    ref: SlideRef,
    *,
    embedding_key: str,
    genes: Sequence[str],
    layer: str | None,
    loss: str,
    log_transform: bool,
    min_counts: float = 1,
    pathway_sets: dict[str, list[str]] | None = None,
    pathway_zscore: bool = True,
    input_spec=None,
) -> SlideArrays:
    """Features and targets of a slide's spots that pass QC (``total counts >= min_counts``).

    Targets are ``log1p`` counts when ``log_transform`` and the loss is not a count loss of the loss table
    (:mod:`~spatialtranscriptformer.module._losses`), raw counts otherwise (integers required for the count
    losses, e.g. ``zinb`` / ``poisson``). With ``pathway_sets`` (name -> member genes), pathway
    targets are computed from *all* measured genes of the slide: log1p-CP10k, z-scored over the slide's
    QC-passed spots (``pathway_zscore``; slide-level models use the unscaled member means, whose slide
    means differ between slides), averaged over the members of each set
    (:func:`~spatialtranscriptformer.pp._pathways.slide_pathway_activity`). ``input_spec``
    (:class:`~spatialtranscriptformer.tl._inputs.InputSpec`) builds the model input from all the slide's
    spots before the QC filter.
    """
    x, coords = slide_features(ref, embedding_key)
    if input_spec is not None:
        x = input_spec.prepare(x, coords)
    y, tot = counts_block(ref, genes, layer)
    from ..module._losses import get_loss

    counts = get_loss(loss).counts  # the loss table: raw counts, or log1p counts when log_transform
    check_target_counts(y, slide_id=ref.slide_id, layer=layer, loss=loss, log_transform=log_transform)
    if counts and not np.allclose(y, np.round(y)):
        raise ValueError(
            f"Slide {ref.slide_id!r}: loss {loss!r} needs raw integer counts but layer {layer or 'X'!r} "
            "holds non-integer values; pass the raw-count layer (`layer=`) or a Gaussian loss."
        )
    keep = tot >= min_counts
    if not keep.all():
        logger.info("Slide %s: %d of %d spots fail QC (total counts < %s) and are excluded.",
                    ref.slide_id, int((~keep).sum()), len(keep), min_counts)
    if keep.sum() < 2:
        raise ValueError(
            f"Slide {ref.slide_id!r} has {int(keep.sum())} usable spot(s) (of {len(keep)}; total counts >= "
            f"{min_counts}); at least 2 are needed."
        )
    pw = None
    if pathway_sets is not None:
        pw = slide_pathway_targets(ref, pathway_sets, layer=layer, keep=keep, zscore=pathway_zscore)[keep]
    x, coords, y, rows = x[keep], coords[keep], y[keep], ref.rows[keep]
    target = np.log1p(y) if (not counts and log_transform) else y
    return SlideArrays(
        slide_id=ref.slide_id, patient_id=ref.patient_id, x=x, coords=coords, rows=rows,
        y=target.astype(np.float32), pathway_targets=pw,
    )


def slide_pathway_targets(
    ref: SlideRef, pathway_sets: dict[str, list[str]], *, layer: str | None, keep: np.ndarray, zscore: bool = True
) -> np.ndarray:
    """``(S, P)`` pathway activity of a slide's spots from all its measured genes (NaN at QC-failed spots)."""
    from ..pp._gene_sets import membership_matrix
    from ..pp._pathways import slide_pathway_activity

    m = membership_matrix(pathway_sets, ref.table.var_names.astype(str), min_genes=0)
    empty = m.columns[m.sum(axis=0) == 0].tolist()
    if empty:
        raise ValueError(f"Slide {ref.slide_id!r}: gene sets {empty[:5]} have no member among its measured genes.")
    counts = layer_of(ref.table, layer, ref.slide_id)[ref.rows]
    return slide_pathway_activity(counts, m.to_numpy(), keep=keep, zscore=zscore)


def dihedral(coords: np.ndarray, k: int) -> np.ndarray:
    """Apply element ``k`` (0-7) of the dihedral group D4 to ``coords`` about their centroid.

    ``k % 4`` quarter-turns, then a mirror of x when ``k >= 4``; ``k = 0`` is the identity.
    """
    c = coords.mean(axis=0, keepdims=True)
    v = coords - c
    for _ in range(k % 4):
        v = np.stack([-v[:, 1], v[:, 0]], axis=1)
    if k >= 4:
        v = v * np.array([-1.0, 1.0], dtype=v.dtype)
    return (v + c).astype(coords.dtype)


class SlideDataset(Dataset):
    """One item per slide; in training mode a random subsample / crop and a dihedral transform.

    Randomness is a function of ``(seed, epoch, slide index)`` only, so runs are reproducible and a
    resumed run sees the same crops as an uninterrupted one (:meth:`set_epoch` is called by the
    sampler each epoch).

    Parameters
    ----------
    slides
        The slides.
    train
        Subsample / crop and augment (``False``: whole slides, unchanged; for validation/prediction).
    max_spots
        Spots per slide per step; larger slides are cropped (``None``: all spots).
    crop
        ``"spatial"``: the ``max_spots`` spots nearest a random centre spot (a contiguous region, keeps
        neighbourhoods intact); ``"random"``: a uniform random subset.
    augment
        Random dihedral flip / rotation of the coordinates (8 transforms).
    seed
        Base seed.
    """

    def __init__(
        self,
        slides: Sequence[SlideArrays],
        *,
        train: bool = True,
        max_spots: int | None = None,
        crop: str = "spatial",
        augment: bool = True,
        seed: int = 0,
    ) -> None:
        if crop not in ("spatial", "random"):
            raise ValueError(f"crop must be 'spatial' or 'random', got {crop!r}.")
        if max_spots is not None and max_spots < 2:
            raise ValueError(f"max_spots must be >= 2 or None, got {max_spots}.")
        self.slides = list(slides)
        self.train, self.max_spots, self.crop, self.augment, self.seed = train, max_spots, crop, augment, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the random crops and transforms."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.slides)

    def __getitem__(self, i: int) -> dict:
        s = self.slides[i]
        idx = np.arange(s.n_spots)
        coords = s.coords
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            if self.max_spots is not None and s.n_spots > self.max_spots:
                if self.crop == "random":
                    idx = np.sort(rng.choice(s.n_spots, self.max_spots, replace=False))
                else:
                    centre = s.coords[rng.integers(s.n_spots)]
                    d = ((s.coords - centre) ** 2).sum(axis=1)
                    idx = np.sort(np.argsort(d, kind="stable")[: self.max_spots])
            coords = coords[idx]
            if self.augment:
                coords = dihedral(coords, int(rng.integers(8)))
        item = {"x": s.x[idx], "coords": coords, "slide": s.slide_id}
        if s.y is not None:
            item["y"] = s.y[idx]
        if s.pathway_targets is not None:
            item["pathway_targets"] = s.pathway_targets[idx]
        return item


class EpochSampler(Sampler):
    """Slide order shuffled from ``(seed, epoch)`` (reproducible, also after resuming a run)."""

    def __init__(self, n: int, *, seed: int = 0, shuffle: bool = True, dataset: SlideDataset | None = None) -> None:
        self.n, self.seed, self.shuffle, self.dataset = n, seed, shuffle, dataset
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = int(epoch)
        if self.dataset is not None:
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        return iter(np.random.default_rng([self.seed, self.epoch, 7]).permutation(self.n).tolist())


def collate_slides(items: Sequence[dict]) -> dict:
    """Pad a list of slide items to the longest: zero rows, ``mask=False`` at padding."""
    b, s = len(items), max(len(it["x"]) for it in items)
    out = {
        "x": torch.zeros(b, s, items[0]["x"].shape[1]),
        "coords": torch.zeros(b, s, 2),
        "mask": torch.zeros(b, s, dtype=torch.bool),
        "slide": [it["slide"] for it in items],
    }
    for key in ("y", "pathway_targets"):
        if all(key in it for it in items):
            out[key] = torch.zeros(b, s, items[0][key].shape[1])
    for i, it in enumerate(items):
        n = len(it["x"])
        out["mask"][i, :n] = True
        out["x"][i, :n] = torch.from_numpy(np.ascontiguousarray(it["x"], dtype=np.float32))
        out["coords"][i, :n] = torch.from_numpy(np.ascontiguousarray(it["coords"], dtype=np.float32))
        for key in ("y", "pathway_targets"):
            if key in out:
                out[key][i, :n] = torch.from_numpy(np.ascontiguousarray(it[key], dtype=np.float32))
    return out
