"""Reader for legacy Spatial Transcriptomics sections in the her2st layout."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._logging import logger
from .._validate import check_spot_extent, grid_mpp, header_duplicates, reading, warn_duplicate_genes
from ._build import build_slide

if TYPE_CHECKING:
    from spatialdata import SpatialData

ST_SPOT_DIAMETER_UM = 100.0
"""Spot diameter of the legacy ST array (Ståhl et al. 2016)."""
ST_PITCH_UM = 200.0
"""Centre-to-centre distance of the legacy ST array."""


def _find_one(folder: Path, patterns: list[str], what: str) -> Path:
    for pat in patterns:
        hits = sorted(folder.glob(pat))
        if hits:
            return hits[0]
    raise FileNotFoundError(f"No {what} found in {folder} (looked for {', '.join(patterns)}).")


def _read_counts(path: Path) -> pd.DataFrame:
    """A spots x genes counts table (tab-separated, optionally gzipped; first column = spot ids).

    Integer tables are parsed by :func:`numpy.loadtxt` (C), about 4x faster than :func:`pandas.read_csv`
    on these wide tables; anything else (quotes, decimals, missing or non-numeric values, ragged rows,
    duplicate gene names) goes through pandas, whose result the caller validates.
    """
    import gzip
    import io

    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    try:
        lines = raw.decode("utf-8").splitlines()
        if not lines:
            raise ValueError("empty")
        header = lines[0].split("\t")
        body = [ln for ln in lines[1:] if ln]
        genes = header[1:]
        if not body or '"' in lines[0] or '"' in body[0] or body[0].count("\t") != len(genes) or len(set(genes)) != len(genes):
            raise ValueError("not a plain table")
        values = np.loadtxt(body, delimiter="\t", usecols=range(1, len(header)), dtype=np.int64, comments=None, ndmin=2)
        index = pd.Index([ln[: ln.index("\t")] for ln in body], name=header[0] or None)
        return pd.DataFrame(values, index=index, columns=pd.Index(genes))
    except ValueError:
        return pd.read_csv(io.BytesIO(raw), sep="\t", index_col=0)


def estimate_mpp_from_grid(
    array_xy: np.ndarray, pixel_xy: np.ndarray, *, pitch_um: float = ST_PITCH_UM, source: str = "spot grid"
) -> float:
    """Microns per pixel from a least-squares fit of pixel vs array coordinates of a spot grid.

    The fit's residual and the result's plausibility are checked
    (:func:`spatialtranscriptformer._validate.grid_mpp`).
    """
    return grid_mpp(array_xy, pixel_xy, pitch_um=pitch_um, source=source)


def read_her2st(
    path: str | os.PathLike,
    *,
    section: str | None = None,
    mpp: float | None = None,
    patient_id: str | None = None,
    load_image: bool = True,
) -> SpatialData:
    """Read a legacy ST section in the her2st layout.

    The layout (Andersson et al. 2021, *Nat. Commun.* 12:6012) holds, per section ``S``: ``S.tsv.gz``
    (spots x genes raw counts, index ``"{{x}}x{{y}}"`` array coordinates), ``S_selection.tsv`` (array and
    full-resolution pixel coordinates per spot) and the full-resolution H&E ``*.jpg``.

    Parameters
    ----------
    path
        Folder of one section (containing the three files).
    section
        Section name (``"C2"``); defaults to the name of the counts file.
    mpp
        Microns per pixel of the H&E. ``None`` estimates it from the spot grid pitch (200 µm between
        array positions); her2st scans are about 0.69 µm/px.
    patient_id
        Patient identifier; defaults to the section's letter (``"C2"`` -> ``"C"``).
    load_image
        Attach the H&E image (set ``False`` for expression-only work). Its pixels are not decoded here: each
        pyramid level of the JPEG is decoded on first use (tiles, plots, writing), the coarse ones directly
        at their scale (:func:`~spatialtranscriptformer.io._lazy.jpeg_levels`), and kept while the
        SpatialData lives.

    Returns
    -------
    A :class:`~spatialdata.SpatialData` with image ``"he"``, circles ``"spots"`` (100 µm diameter) and
    table ``"table"`` (raw counts in ``X`` and ``layers['counts']``, ``obsm['spatial']`` in pixels,
    ``obs['slide_id']``, ``obs['patient_id']``, ``uns['stf_slide']`` with the µm/px).
    """
    import anndata as ad
    import scipy.sparse as sp

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"her2st section folder not found: {folder}")
    counts_path = _find_one(folder, ["*.tsv.gz", "*.tsv"] if section is None else [f"{section}.tsv.gz", f"{section}.tsv"], "counts file (S.tsv.gz)")
    if counts_path.name.endswith("_selection.tsv"):
        counts_path = _find_one(folder, ["*[!n].tsv.gz"], "counts file (S.tsv.gz)")
    section = section or counts_path.name.split(".")[0]
    sel_path = _find_one(folder, [f"{section}_selection.tsv", "*_selection.tsv"], "spot selection file (S_selection.tsv)")

    with reading(counts_path, "counts table"):
        counts = _read_counts(counts_path)
    if counts.shape[0] == 0:
        raise ValueError(f"{counts_path}: no spots (the counts table has no rows).")
    warn_duplicate_genes(header_duplicates(counts_path), source=str(counts_path),
                         how="pandas kept the repeats as 'NAME.1', 'NAME.2', ...")
    if counts.index.has_duplicates:
        raise ValueError(f"{counts_path.name}: duplicate spot ids {counts.index[counts.index.duplicated()][:5].tolist()}.")
    non_numeric = [c for c, t in counts.dtypes.items() if not np.issubdtype(t, np.number)]
    if non_numeric:
        raise ValueError(f"{counts_path.name}: non-numeric counts in genes {non_numeric[:5]}.")
    with reading(sel_path, "spot selection table"):
        sel = pd.read_csv(sel_path, sep="\t")
    missing_cols = {"x", "y", "pixel_x", "pixel_y"} - set(sel.columns)
    if missing_cols:
        raise ValueError(f"{sel_path.name}: missing columns {sorted(missing_cols)}.")
    sel.index = [f"{int(x)}x{int(y)}" for x, y in zip(sel["x"], sel["y"], strict=True)]
    sel = sel[~sel.index.duplicated()]
    common = counts.index.intersection(sel.index)
    unmatched = len(counts) - len(common)
    if unmatched:
        raise ValueError(f"{counts_path.name}: {unmatched} spots have no row in {sel_path.name}.")
    if len(common) < len(sel):
        logger.info("%s: %d selection rows without counts dropped", section, len(sel) - len(common))
    sel = sel.loc[counts.index]
    pixel_xy = sel[["pixel_x", "pixel_y"]].to_numpy(float)
    if mpp is None:
        arr_cols = ["new_x", "new_y"] if {"new_x", "new_y"} <= set(sel.columns) else ["x", "y"]
        mpp = estimate_mpp_from_grid(sel[arr_cols].to_numpy(float), pixel_xy, source=str(sel_path))

    image = None
    if load_image:  # lazy: JPEG levels are decoded on first use, coarse ones directly at their scale
        from ._visium import open_image_file

        img_path = _find_one(folder, ["*.jpg", "*.jpeg", "*.png", "*.tif", "*.tiff"], "H&E image (*.jpg)")
        with reading(img_path, "H&E image"):  # a truncated or corrupt file is refused here, not at first use
            image = open_image_file(img_path)[0]
        full = image[0] if isinstance(image, list) else image
        check_spot_extent(pixel_xy, full.shape[:2], mpp=mpp, source=f"her2st section {section!r} ({img_path.name})")

    X = sp.csr_matrix(counts.to_numpy())
    adata = ad.AnnData(X=X, obs=pd.DataFrame(index=counts.index.astype(str)), var=pd.DataFrame(index=counts.columns.astype(str)))
    adata.obs["array_row"] = sel["y"].to_numpy(int)
    adata.obs["array_col"] = sel["x"].to_numpy(int)
    adata.var_names_make_unique()
    pid = patient_id if patient_id is not None else "".join(ch for ch in section if ch.isalpha()) or section
    return build_slide(
        image,
        adata,
        coords=pixel_xy,
        mpp=mpp,
        spot_diameter_um=ST_SPOT_DIAMETER_UM,
        slide_id=section,
        patient_id=pid,
        extra_meta={"technology": "ST", "pitch_um": ST_PITCH_UM},
    )
