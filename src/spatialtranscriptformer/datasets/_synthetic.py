"""Synthetic H&E + spatial expression slides with known ground truth."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import _constants as K
from ._synthetic_tissue import COMPARTMENTS, GRID_UM, cell_labels, draw_tissue, gene_model, render_he

if TYPE_CHECKING:
    from spatialdata import SpatialData

_GEOMETRY = {"visium": (55.0, 100.0), "st": (100.0, 200.0)}  # spot diameter, centre-to-centre pitch (µm)
_HD_BINS = (2, 8, 16)
TRUTH_IMAGE_KEY = "true_rates"
"""Image element (Visium HD only) with the true 2 µm expected counts (channels = genes)."""


def _make_gene_sets(n_genes: int, n_pathways: int, rng: np.random.Generator) -> tuple[list[str], dict]:
    """Gene names and pathway memberships: ~80 % of genes in pathways (some in two), the rest background."""
    genes = [f"GENE{i:04d}" for i in range(n_genes)]
    n_in = max(n_pathways, int(round(0.8 * n_genes)))
    members = {f"PATHWAY_{p:02d}": [] for p in range(n_pathways)}
    names = list(members)
    for i in range(n_in):
        members[names[i % n_pathways]].append(genes[i])
    for g in rng.choice(n_in, size=n_in // 10, replace=False):  # overlapping memberships
        p = names[int(rng.integers(n_pathways))]
        if genes[g] not in members[p]:
            members[p].append(genes[g])
    return genes, members


def _pool(x: np.ndarray, f: int) -> np.ndarray:
    """Sum-pool the first two axes of ``x`` by ``f`` (count conserving)."""
    h, w = x.shape[0] // f, x.shape[1] // f
    return x[: h * f, : w * f].reshape(h, f, w, f, *x.shape[2:]).sum(axis=(1, 3))


def _sample(rng: np.random.Generator, rates: np.ndarray, counts: str, dispersion: float) -> sp.csr_matrix:
    lam = rates
    if counts == "nb":  # gamma-Poisson mixture with mean `rates` and inverse dispersion `dispersion`
        lam = rates * rng.gamma(dispersion, 1.0 / dispersion, size=rates.shape)
    return sp.csr_matrix(rng.poisson(lam).astype(np.float32))


def synthetic(
    *,
    n_spots: int | None = None,
    technology: Literal["visium", "st", "visium_hd"] = "visium",
    bin_size_um: int = 2,
    size_um: float | None = None,
    n_genes: int = 100,
    n_pathways: int = 10,
    gene_sets: Mapping[str, Sequence[str]] | None = None,
    n_compartments: int = 4,
    n_slides: int = 1,
    n_patients: int | None = None,
    mpp: float = 1.0,
    counts: Literal["poisson", "nb"] = "poisson",
    dispersion: float = 10.0,
    depth: float = 1.0,
    background_fraction: float | None = None,
    region_um: float = 150.0,
    patient_effect: float = 0.2,
    seed: int = 0,
) -> SpatialData | list[SpatialData]:
    """Simulate H&E slides with spatial expression generated from their morphology.

    An H&E-like image is drawn with the stain model of Ruifrok & Johnston (2001, *Anal. Quant. Cytol.
    Histol.* 23:291): smooth random tissue compartments (thresholded low-frequency noise: stroma,
    tumour, immune, adipose) with their own nuclei densities, nuclear sizes and stain intensities;
    cells are discs on a jittered lattice. Each compartment (and cell type) activates its marker
    pathways; every gene belongs to pathways (or none) and each cell's expected counts are
    ``exp(mu_g + W_g . activity_cell)``. A spot or bin collects the cells under it (so its rates depend
    on the compartment mix and the nuclei density) plus a little ambient RNA; counts are Poisson or
    negative binomial around those rates.

    Geometry: Visium (55 µm spots, 100 µm hexagonal pitch), legacy ST (100 µm spots, 200 µm square
    pitch) or Visium HD square bins of 2, 8 or 16 µm. At 2 µm, bins follow the drawn cells and about
    90-97 % of the bin x gene entries are zero, as in real Visium HD data.

    Parameters
    ----------
    n_spots
        Number of spot positions (square/hexagonal grid) or, for Visium HD, of bins in a square
        capture area. Default: 500 spots; Visium HD: a 512 µm x 512 µm capture area. Spots over
        glass (``background_fraction``) are dropped, so a slide can hold fewer.
    technology
        ``"visium"``, ``"st"`` or ``"visium_hd"``.
    bin_size_um
        Visium HD bin edge (2, 8 or 16 µm).
    size_um
        Side of a square capture area in µm, instead of ``n_spots``.
    n_genes, n_pathways
        Number of genes and of pathways (random memberships; ignored when ``gene_sets`` is given).
    gene_sets
        Pathway name -> member genes; the genes are their union (plus background genes up to ``n_genes``).
    n_compartments
        Number of tissue compartments (2-4, in the order stroma, tumor, immune, adipose).
    n_slides
        Number of slides; more than one returns a list.
    n_patients
        Number of patients the slides are spread over (round robin); default one per slide. Patients
        differ by a gene-wise shift of the baselines (``patient_effect``) and by their tissue layout.
    mpp
        Microns per pixel of the drawn H&E image.
    counts
        ``"poisson"`` or ``"nb"`` (gamma-Poisson with inverse dispersion ``dispersion``).
    dispersion
        Inverse dispersion of the negative binomial.
    depth
        Multiplier of every expected count (sequencing depth).
    background_fraction
        Fraction of the area that is glass (no cells, no spots/bins). Default 0 for spots, 0.15 for Visium HD.
    region_um
        Typical size of the tissue compartments (µm).
    patient_effect
        Standard deviation of the per-patient log-baseline shift of each gene.
    seed
        Random seed; the output is a deterministic function of all arguments.

    Returns
    -------
    One :class:`~spatialdata.SpatialData` (or a list) following the reader conventions: image ``"he"``,
    shapes ``"spots"`` (circles; squares for bins), table ``"table"`` with raw counts in ``X`` and
    ``layers['counts']``, and the ground truth: ``obsm['true_rates']`` (expected counts),
    ``obsm['true_pathways']`` (DataFrame of pathway activities), ``obsm['compartment_fractions']``,
    ``obs['compartment']`` (dominant compartment) and ``uns['synthetic']`` (``gene_sets``,
    ``compartments``, ``compartment_pathways`` = marker pathways of each compartment, ``params``).
    Visium HD slides carry ``obs['array_row'|'array_col']`` and the true 2 µm rates as the image
    element ``"true_rates"`` (genes x y x x, 2 µm per pixel, mapped onto the H&E pixels of ``"global"``).
    """
    if technology not in ("visium", "st", "visium_hd"):
        raise ValueError(f"technology must be 'visium', 'st' or 'visium_hd', got {technology!r}.")
    if technology == "visium_hd" and bin_size_um not in _HD_BINS:
        raise ValueError(f"bin_size_um must be one of {_HD_BINS} for Visium HD, got {bin_size_um!r}.")
    if n_spots is not None and size_um is not None:
        raise ValueError("Give either n_spots or size_um, not both.")
    if n_spots is not None and n_spots < 1:
        raise ValueError(f"n_spots must be >= 1, got {n_spots}.")
    if size_um is not None and size_um <= 0:
        raise ValueError(f"size_um must be > 0, got {size_um}.")
    if not 2 <= n_compartments <= len(COMPARTMENTS):
        raise ValueError(f"n_compartments must be between 2 and {len(COMPARTMENTS)}, got {n_compartments}.")
    if not (np.isfinite(mpp) and 0.1 <= mpp <= GRID_UM):
        raise ValueError(f"mpp must be between 0.1 and {GRID_UM} µm per pixel, got {mpp!r}.")
    if counts not in ("poisson", "nb"):
        raise ValueError(f"counts must be 'poisson' or 'nb', got {counts!r}.")
    if n_slides < 1 or (n_patients is not None and not 1 <= n_patients <= n_slides):
        raise ValueError(f"Need n_slides >= 1 and 1 <= n_patients <= n_slides, got {n_slides}, {n_patients}.")
    if background_fraction is None:
        background_fraction = 0.15 if technology == "visium_hd" else 0.0
    if not 0 <= background_fraction < 0.9:
        raise ValueError(f"background_fraction must be in [0, 0.9), got {background_fraction}.")

    rng = np.random.default_rng([seed, 0])
    if gene_sets is not None:
        gene_sets = {str(k): [str(g) for g in v] for k, v in gene_sets.items()}
        if not gene_sets or not all(gene_sets.values()):
            raise ValueError("gene_sets must be a non-empty dict of non-empty gene lists.")
        genes = list(dict.fromkeys(g for v in gene_sets.values() for g in v))
        genes += [f"BACKGROUND{i:04d}" for i in range(max(0, n_genes - len(genes)))]
    else:
        if n_genes < 2 or not 1 <= n_pathways <= n_genes:
            raise ValueError(
                f"Need n_genes >= 2 and 1 <= n_pathways <= n_genes, got {n_genes}, {n_pathways}."
            )
        genes, gene_sets = _make_gene_sets(n_genes, n_pathways, rng)
    A, W, mu, comp_pw = gene_model(rng, gene_sets, genes, n_compartments)
    n_patients = n_slides if n_patients is None else n_patients
    params = {
        "technology": technology,
        "bin_size_um": int(bin_size_um),
        "n_genes": len(genes),
        "n_pathways": len(gene_sets),
        "n_compartments": n_compartments,
        "mpp": float(mpp),
        "counts": counts,
        "dispersion": float(dispersion),
        "depth": float(depth),
        "background_fraction": float(background_fraction),
        "region_um": float(region_um),
        "patient_effect": float(patient_effect),
        "seed": int(seed),
    }
    slides = []
    for i in range(n_slides):
        p = i % n_patients
        shift = np.random.default_rng([seed, 1, p]).normal(0.0, patient_effect, size=len(genes))
        slides.append(
            _one_slide(
                np.random.default_rng([seed, 2, i]),
                technology=technology,
                bin_size=int(bin_size_um),
                n_spots=n_spots,
                size_um=size_um,
                genes=genes,
                gene_sets=gene_sets,
                A=A,
                W=W,
                mu=mu + shift,
                comp_pw=comp_pw,
                mpp=mpp,
                counts=counts,
                dispersion=dispersion,
                depth=depth,
                background_fraction=background_fraction,
                region_um=region_um,
                slide_id=f"synthetic_{i}",
                patient_id=f"P{p}",
                params=params,
            )
        )
    return slides[0] if n_slides == 1 else slides


def _layout(technology: str, bin_size: int, n_spots: int | None, size_um: float | None):
    """Spot centres (µm, relative to the capture area), spot size and capture-area extent (µm)."""
    if technology == "visium_hd":
        if size_um is None:
            side = int(np.ceil(np.sqrt(n_spots))) * bin_size if n_spots is not None else 512
        else:
            side = int(np.ceil(size_um / bin_size)) * bin_size
        nb = side // bin_size
        rr, cc = np.meshgrid(np.arange(nb), np.arange(nb), indexing="ij")
        xy = np.stack([(cc.ravel() + 0.5) * bin_size, (rr.ravel() + 0.5) * bin_size], 1).astype(float)
        return xy, float(bin_size), (float(side), float(side)), (rr.ravel(), cc.ravel())
    diam, pitch = _GEOMETRY[technology]
    row_step = pitch * np.sqrt(3) / 2 if technology == "visium" else pitch
    if size_um is not None:
        ncol = max(1, int(size_um // pitch))
        nrow = max(1, int(size_um // row_step))
        n = ncol * nrow
    else:
        n = 500 if n_spots is None else n_spots
        ncol = int(np.ceil(np.sqrt(n * row_step / pitch)))
        nrow = int(np.ceil(n / ncol))
    rr, cc = np.divmod(np.arange(n), ncol)
    off = (rr % 2) * pitch / 2 if technology == "visium" else 0.0
    xy = np.stack([cc * pitch + off + pitch / 2, rr * row_step + pitch / 2], 1).astype(float)
    extent = (float(ncol * pitch + pitch / 2), float(nrow * row_step + pitch / 2))
    return xy, diam, extent, (rr, cc)


def _one_slide(
    rng,
    *,
    technology,
    bin_size,
    n_spots,
    size_um,
    genes,
    gene_sets,
    A,
    W,
    mu,
    comp_pw,
    mpp,
    counts,
    dispersion,
    depth,
    background_fraction,
    region_um,
    slide_id,
    patient_id,
    params,
):
    import anndata as ad

    from ..io._build import build_slide

    xy, diam, extent, (rows, cols) = _layout(technology, bin_size, n_spots, size_um)
    margin = 16.0 if technology == "visium_hd" else 50.0  # µm of tissue around the capture area
    shape = (
        int(np.ceil((extent[1] + 2 * margin) / GRID_UM)),
        int(np.ceil((extent[0] + 2 * margin) / GRID_UM)),
    )
    K_ = A.shape[0]
    t = draw_tissue(
        rng, shape, n_compartments=K_, region_um=region_um, background_fraction=background_fraction
    )
    # per-cell pathway activity and expected counts (bigger cells hold more RNA)
    act = A[t.cell_type] + rng.normal(0.0, 0.3, size=(len(t.cell_xy), A.shape[1]))
    size = (t.body_um / 4.5) ** 2
    loading = np.asarray(sp.csr_matrix(W) @ act.T).T  # = act @ W.T; sparse, so no multi-threaded BLAS
    cell_expr = (depth * size[:, None] * np.exp(mu[None, :] + loading)).astype(np.float32)
    ambient = (0.1 * depth / 25.0) * np.exp(mu[None, :] + A @ W.T).astype(np.float32)  # per 2 µm cell, (K, G)
    comp_oh = np.eye(K_, dtype=np.float32)
    labels = cell_labels(t)
    xy = xy + margin
    if technology == "visium_hd":
        f = bin_size // int(GRID_UM)
        o = int(margin / GRID_UM)
        nb = int(extent[0] // bin_size)
        sl = (slice(o, o + nb * f), slice(o, o + nb * f))
        lab = labels[sl]
        comp, tis = t.comp[sl], t.tissue[sl]
        nbins = np.bincount(lab[lab >= 0], minlength=len(t.cell_xy)).astype(np.float32)
        inc = lab >= 0
        rates2 = ambient[comp] * tis[..., None]
        rates2[inc] += cell_expr[lab[inc]] / nbins[lab[inc], None]
        act2 = A[comp].astype(np.float32)
        act2[inc] = act[lab[inc]]
        rates = _pool(rates2, f).reshape(-1, len(genes))
        frac = _pool(comp_oh[comp] * tis[..., None], f).reshape(-1, K_)
        pw = _pool(act2 * tis[..., None], f).reshape(-1, A.shape[1])
        keep = frac.sum(1) > 0
        rates = rates[keep]
        pw = pw[keep] / frac[keep].sum(1, keepdims=True)
        frac = frac[keep] / frac[keep].sum(1, keepdims=True)
        ids = [f"s_{bin_size:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(rows[keep], cols[keep], strict=True)]
    else:
        from scipy.spatial import cKDTree

        gy, gx = (xy[:, 1] / GRID_UM).astype(int), (xy[:, 0] / GRID_UM).astype(int)
        keep = t.tissue[gy, gx]
        xy = xy[keep]
        r_um = diam / 2
        hits = cKDTree(t.cell_xy).query_ball_point(xy, r_um) if len(t.cell_xy) else [[] for _ in xy]
        ri = np.repeat(np.arange(len(xy)), [len(h) for h in hits])
        M = sp.csr_matrix(
            (np.ones(len(ri), np.float32), (ri, np.concatenate(hits).astype(int))),
            shape=(len(xy), len(t.cell_xy)),
        )
        # compartment mix of the 2 µm grid cells under each spot
        d = int(np.ceil(r_um / GRID_UM))
        oy, ox = np.mgrid[-d : d + 1, -d : d + 1]
        m = (oy**2 + ox**2) * GRID_UM**2 <= r_um**2
        py = np.clip((xy[:, 1] / GRID_UM).astype(int)[:, None] + oy[m][None], 0, shape[0] - 1)
        px = np.clip((xy[:, 0] / GRID_UM).astype(int)[:, None] + ox[m][None], 0, shape[1] - 1)
        under = comp_oh[t.comp[py, px]] * t.tissue[py, px][..., None]  # (n, pixels, K)
        frac = under.sum(1)
        rates = M @ cell_expr + frac @ ambient
        n_cells = np.asarray(M.sum(1)).ravel()
        frac = frac / np.maximum(frac.sum(1, keepdims=True), 1)
        dom = np.argmax(frac, 1)
        pw = np.where(n_cells[:, None] > 0, (M @ act) / np.maximum(n_cells, 1)[:, None], A[dom])
        ids = [f"spot_{i:05d}" for i in np.flatnonzero(keep)]
    if not len(ids):
        raise ValueError("No spot or bin lies on tissue: lower background_fraction or enlarge the slide.")
    X = _sample(rng, rates, counts, dispersion)
    obs = pd.DataFrame(index=pd.Index(ids))
    obs["compartment"] = pd.Categorical.from_codes(np.argmax(frac, 1), categories=list(COMPARTMENTS[:K_]))
    if technology == "visium_hd":
        obs["array_row"], obs["array_col"] = rows[keep], cols[keep]
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    adata.obsm["true_rates"] = np.asarray(rates, dtype=np.float32)
    adata.obsm["true_pathways"] = pd.DataFrame(pw, index=obs.index, columns=list(gene_sets), dtype=np.float32)
    adata.obsm["compartment_fractions"] = pd.DataFrame(
        frac, index=obs.index, columns=list(COMPARTMENTS[:K_]), dtype=np.float32
    )
    adata.uns["synthetic"] = {
        "gene_sets": {k: list(v) for k, v in gene_sets.items()},
        "compartments": list(COMPARTMENTS[:K_]),
        "compartment_pathways": comp_pw,
        "params": dict(params),
    }
    img_shape = (int(np.ceil(shape[0] * GRID_UM / mpp)), int(np.ceil(shape[1] * GRID_UM / mpp)))
    image = render_he(rng, t, labels, image_shape=img_shape, mpp=mpp)
    extra = {"technology": technology}
    if technology == "visium_hd":
        extra["bin_size_um"] = int(bin_size)
    sdata = build_slide(
        image,
        adata,
        coords=xy[keep] / mpp if technology == "visium_hd" else xy / mpp,
        mpp=mpp,
        spot_diameter_um=diam,
        slide_id=slide_id,
        patient_id=patient_id,
        shape="square" if technology == "visium_hd" else "circle",
        extra_meta=extra,
    )
    if technology == "visium_hd":
        from spatialdata.models import Image2DModel
        from spatialdata.transformations import Scale, Sequence, Translation

        tf = Sequence(
            [Scale([GRID_UM / mpp] * 2, axes=("y", "x")), Translation([margin / mpp] * 2, axes=("y", "x"))]
        )
        sdata.images[TRUTH_IMAGE_KEY] = Image2DModel.parse(
            np.moveaxis(rates2, -1, 0),
            dims=("c", "y", "x"),
            c_coords=list(genes),
            transformations={
                K.COORDINATE_SYSTEM: tf,
                K.MICRON_COORDINATE_SYSTEM: Sequence([tf, Scale([mpp, mpp], axes=("y", "x"))]),
            },
        )
    return sdata
