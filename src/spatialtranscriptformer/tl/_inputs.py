"""What a model reads: per-slide standardised embeddings and the embeddings of each spot's neighbours.

Both transforms are functions of one slide's own embeddings and spot positions (no targets, no other
slide), applied identically at training and prediction time, so they leak nothing across slides.

- **Per-slide standardisation** z-scores every embedding feature over the spots of its slide, removing
  per-slide offsets from staining and scanning.
- **Neighbourhood context** appends, for every spot, the mean embedding of the spots within
  ``context_radius`` times the slide's median nearest-neighbour distance (the grid pitch: 1.5 takes the
  4 edge and 4 diagonal neighbours of a square grid, the 6 of a hexagonal Visium grid). It carries only
  *relative* spatial information, so it is unchanged by flipping or rotating a slide, unlike an absolute
  positional encoding, which on serial sections of one patient learns where tissue sits on the array
  (the ``benchmarks/bench_her2st_accuracy.py`` control: held-out sections mirrored and rotated).
  Neighbourhood averaging of image features is the spatial smoothing of, e.g., the "neighbour" features
  of HisToGene / Hist2ST-style models (Pang et al. 2021; Zeng et al. 2022), done here in closed form.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

_ZSCORE_BLOCK = 8192
"""Rows per float64 block of :func:`zscore_features` (768-d: 48 MB; 65,536 rows added ~240 MB at 80k bins)."""


def zscore_features(x: np.ndarray) -> np.ndarray:
    """Standardise each embedding feature over the spots of one slide (constant features -> 0)."""
    x = np.asarray(x, dtype=np.float32)
    out = x - x.mean(axis=0, dtype=np.float64).astype(np.float32)  # the only copy of the slide's embeddings
    var = np.zeros(x.shape[1:], dtype=np.float64)
    for i in range(0, len(out), _ZSCORE_BLOCK):  # blocks of rows: no further slide-sized temporaries
        blk = out[i : i + _ZSCORE_BLOCK].astype(np.float64)
        var += np.einsum("ij,ij->j", blk, blk)
    sd = np.sqrt(var / max(len(out), 1))
    out /= np.where(sd > 0, sd, 1.0).astype(np.float32)
    return out


def grid_pitch(coords: np.ndarray) -> float:
    """Median distance of each spot to its nearest neighbour (the grid pitch of a spot array)."""
    from scipy.spatial import cKDTree

    coords = np.asarray(coords, dtype=np.float64)
    if len(coords) < 2:
        return 0.0
    d, _ = cKDTree(coords).query(coords, k=2)
    return float(np.median(d[:, 1]))


def neighbour_mean(x: np.ndarray, coords: np.ndarray, *, radius: float = 1.5) -> np.ndarray:
    """Mean of ``x`` over each spot's neighbours (itself excluded) within ``radius`` grid pitches.

    Parameters
    ----------
    x
        ``(S, F)`` values of one slide.
    coords
        ``(S, 2)`` spot centres (any unit; the radius is relative to the median nearest-neighbour distance).
    radius
        Neighbourhood radius in multiples of the grid pitch (:func:`grid_pitch`).

    Returns
    -------
    ``(S, F)`` float32; a spot without neighbours keeps its own value. Linear in the number of spots.
    """
    import scipy.sparse as sp
    from scipy.spatial import cKDTree

    x = np.asarray(x, dtype=np.float32)
    coords = np.asarray(coords, dtype=np.float64)
    n = len(x)
    pitch = grid_pitch(coords)
    if n < 2 or pitch <= 0:
        return x.copy()
    pairs = cKDTree(coords).query_pairs(r=float(radius) * pitch * (1 + 1e-6), output_type="ndarray")
    if len(pairs) == 0:
        return x.copy()
    i = np.concatenate([pairs[:, 0], pairs[:, 1]])
    j = np.concatenate([pairs[:, 1], pairs[:, 0]])
    adj = sp.csr_matrix((np.ones(len(i), dtype=np.float32), (i, j)), shape=(n, n))
    deg = np.asarray(adj.sum(axis=1)).ravel()
    out = np.asarray(adj @ x) / np.maximum(deg, 1)[:, None]
    lonely = deg == 0
    out[lonely] = x[lonely]
    return out.astype(np.float32)


@dataclass(frozen=True)
class InputSpec:
    """How a model's input is built from one slide's embeddings and spot centres.

    Attributes
    ----------
    standardize
        ``"slide"``: z-score each feature over the slide's spots; ``None``: raw embeddings.
    context_radius
        Append the neighbours' mean embedding (within this many grid pitches; standardised like the
        embedding itself); ``None``: no context.
    """

    standardize: str | None = "slide"
    context_radius: float | None = 1.5

    def __post_init__(self) -> None:
        if self.standardize not in ("slide", None):
            raise ValueError(f"standardize must be 'slide' or None, got {self.standardize!r}.")
        if self.context_radius is not None and not (np.isfinite(self.context_radius) and self.context_radius > 0):
            raise ValueError(f"context radius must be a positive number or None, got {self.context_radius!r}.")

    def width(self, input_dim: int) -> int:
        """Width of the prepared input for ``input_dim``-wide embeddings."""
        return int(input_dim) * (2 if self.context_radius is not None else 1)

    def prepare(self, x: np.ndarray, coords: np.ndarray) -> np.ndarray:
        """The model input ``(S, width)`` of one slide from embeddings ``(S, F)`` and centres ``(S, 2)``."""
        x = np.asarray(x, dtype=np.float32)
        parts = [x]
        if self.context_radius is not None:
            parts.append(neighbour_mean(x, coords, radius=self.context_radius))
        if self.standardize == "slide":
            parts = [zscore_features(p) for p in parts]
        return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]

    def to_dict(self) -> dict:
        """JSON form (stored in a saved model's ``fit`` parameters)."""
        return asdict(self)
