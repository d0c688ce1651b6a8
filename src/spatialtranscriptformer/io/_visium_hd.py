"""Reader for 10x Genomics Visium HD binned outputs (Space Ranger >= 3)."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._validate import read_json, reading, unique_gene_names
from ._build import build_slide
from ._visium import ImgKey, check_mpp, choose_image, open_image_file, read_image_file, space_ranger_uns

if TYPE_CHECKING:
    from spatialdata import SpatialData

_BIN_DIR = re.compile(r"^square_(\d{3})um$")
_POSITION_COLUMNS = ("barcode", "pxl_row_in_fullres", "pxl_col_in_fullres")


def _bins_root(folder: Path) -> Path:
    for cand in (folder / "binned_outputs", folder):
        if cand.is_dir() and any(_BIN_DIR.match(p.name) for p in cand.iterdir() if p.is_dir()):
            return cand
    raise FileNotFoundError(
        f"No Visium HD bins found in {folder}: expected binned_outputs/square_<NNN>um/ folders "
        "(the Space Ranger `outs` folder)."
    )


def available_bin_sizes(path: str | os.PathLike) -> list[int]:
    """Bin sizes (µm) present in a Visium HD ``outs`` (or ``binned_outputs``) folder."""
    root = _bins_root(Path(path))
    return sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _BIN_DIR.match(p.name)))


def _first_file(paths: list[Path]) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def read_visium_hd(
    path: str | os.PathLike,
    *,
    bin_size: int = 8,
    fullres_image_file: str | os.PathLike | None = None,
    img_key: ImgKey = "auto",
    counts_file: str = "filtered_feature_bc_matrix.h5",
    mpp: float | None = None,
    slide_id: str | None = None,
    patient_id: str | None = None,
) -> SpatialData:
    """Read one bin size of a 10x Genomics Visium HD slide.

    Reads ``binned_outputs/square_<NNN>um/`` of a Space Ranger ``outs`` folder directly:
    ``filtered_feature_bc_matrix.h5`` (with :func:`scanpy.read_10x_h5`), ``spatial/tissue_positions.parquet``
    (bin centres in full-resolution pixels) and ``spatial/scalefactors_json.json``. The layout is that of
    Space Ranger 3 (10x Genomics, Visium HD output overview); :func:`spatialdata_io.visium_hd` needs the
    whole ``outs`` folder (``feature_slice.h5``, all bins) and loads every bin size, so it is not used here.
    Bins become squares of ``bin_size`` µm. The microns per full-resolution pixel are
    ``microns_per_pixel`` of the scalefactors (else ``bin_size_um / spot_diameter_fullres``).

    As in :func:`spatialtranscriptformer.io.read_visium`, ``obsm['spatial']`` stays in full-resolution
    pixels and ``uns['spatial']`` holds Space Ranger's PNGs and scalefactors; without a full-resolution image
    the hires (else lowres) image becomes ``"he"`` (with ``Scale(1 / scalefactor)`` to ``"global"``); the
    choice is recorded in ``uns['stf_slide']`` (``image_source``, ``image_scalef``, ``image_mpp``).

    Parameters
    ----------
    path
        The Space Ranger ``outs`` folder (or its ``binned_outputs`` folder).
    bin_size
        Bin edge in µm (2, 8 or 16 in standard outputs); the error lists the sizes present.
    fullres_image_file
        The full-resolution H&E given to Space Ranger, absolute or relative to ``path``. A TIFF is opened
        lazily (read region by region when tiles are cut; its own pyramid levels are used).
    img_key
        ``"auto"``, ``"fullres"``, ``"hires"``, ``"lowres"`` or ``None`` (no image); see
        :func:`~spatialtranscriptformer.io.read_visium`.
    counts_file
        Counts file inside the bin folder (``raw_feature_bc_matrix.h5`` for all bins).
    mpp
        Microns per full-resolution pixel; ``None`` reads it from the scalefactors.
    slide_id
        Slide identifier; defaults to the name of the ``outs`` folder's parent (else of the folder).
    patient_id
        Patient identifier; defaults to the slide id.

    Returns
    -------
    A :class:`~spatialdata.SpatialData` with image ``"he"``, squares ``"spots"`` and table ``"table"``.
    """
    folder = Path(path)
    check_mpp(mpp, source=f"Visium HD folder {folder}")
    if not folder.is_dir():
        raise FileNotFoundError(f"Visium HD folder not found: {folder}")
    root = _bins_root(folder)
    present = available_bin_sizes(folder)
    if not isinstance(bin_size, int | np.integer) or int(bin_size) not in present:
        raise ValueError(f"{folder}: bin size {bin_size!r} µm not found; bin sizes present: {present} µm.")
    bin_dir = root / f"square_{int(bin_size):03d}um"
    spatial = bin_dir / "spatial"
    counts_path = bin_dir / counts_file
    pos_path = spatial / "tissue_positions.parquet"
    sf_path = spatial / "scalefactors_json.json"
    for p, what in ((counts_path, "counts file"), (pos_path, "bin positions"), (sf_path, "scalefactors file")):
        if not p.is_file():
            raise FileNotFoundError(f"Visium HD {what} not found: {p}")
    fullres_path = None
    if fullres_image_file is not None:
        fullres_path = folder / fullres_image_file
        if not fullres_path.is_file():
            raise FileNotFoundError(f"Full-resolution image not found: {fullres_path}")

    sf = read_json(sf_path, "scalefactors file")
    if "bin_size_um" in sf and not np.isclose(float(sf["bin_size_um"]), bin_size):
        raise ValueError(f"{sf_path}: bin_size_um is {sf['bin_size_um']}, but the folder is for {bin_size} µm bins.")
    if mpp is None:
        if sf.get("microns_per_pixel"):
            mpp = float(sf["microns_per_pixel"])
        elif sf.get("spot_diameter_fullres"):
            mpp = float(bin_size) / float(sf["spot_diameter_fullres"])
        else:
            raise ValueError(
                f"{sf_path}: unknown µm/px (no microns_per_pixel nor spot_diameter_fullres); pass mpp= "
                "(microns per full-resolution pixel)."
            )
        check_mpp(mpp, source=str(sf_path))

    import scanpy as sc

    with reading(counts_path, "counts file"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Variable names are not unique")  # reported below
        adata = sc.read_10x_h5(counts_path)
    unique_gene_names(adata, source=str(counts_path))
    with reading(pos_path, "bin positions file"):
        pos = pd.read_parquet(pos_path)
    missing_cols = [c for c in _POSITION_COLUMNS if c not in pos.columns]
    if missing_cols:
        raise ValueError(f"{pos_path}: missing columns {missing_cols}.")
    pos = pos.set_index("barcode")
    pos.index = pos.index.astype(str)
    if pos.index.has_duplicates:
        raise ValueError(f"{pos_path}: duplicate barcodes {pos.index[pos.index.duplicated()][:5].tolist()}.")
    absent = ~adata.obs_names.isin(pos.index)
    if absent.any():
        raise ValueError(
            f"{int(absent.sum())} bins of {counts_path.name} have no row in {pos_path.name}, "
            f"e.g. {adata.obs_names[absent][:3].tolist()}."
        )
    pos = pos.loc[adata.obs_names]
    for col in ("in_tissue", "array_row", "array_col"):
        if col in pos:
            adata.obs[col] = pos[col].to_numpy()
    coords = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64)

    outs = root.parent if root.name == "binned_outputs" else root
    slide_id = slide_id or (outs.parent.name if outs.name == "outs" else outs.name)

    def _img(name: str):
        p = _first_file([spatial / f"tissue_{name}_image.png", outs / "spatial" / f"tissue_{name}_image.png"])
        return None if p is None else (lambda: read_image_file(p)[0]), str(p or spatial / f"tissue_{name}_image.png")

    hires_loader, hires_desc = _img("hires")
    lowres_loader, lowres_desc = _img("lowres")
    fullres_loader = None if fullres_path is None else (lambda: open_image_file(fullres_path)[0])
    candidates = [
        ("fullres", 1.0, fullres_loader, str(fullres_path or "no fullres_image_file given")),
        ("hires", sf.get("tissue_hires_scalef"), hires_loader, hires_desc),
        ("lowres", sf.get("tissue_lowres_scalef"), lowres_loader, lowres_desc),
    ]
    name, image, scalef = choose_image(candidates, img_key, source=f"Visium HD slide {slide_id!r}")
    return build_slide(
        image,
        adata,
        coords=coords,
        mpp=mpp,
        spot_diameter_um=float(bin_size),
        slide_id=slide_id,
        patient_id=patient_id,
        shape="square",
        image_scalef=scalef,
        spatial_uns=space_ranger_uns(
            {"hires": hires_loader, "lowres": lowres_loader}, sf, source=f"Visium HD slide {slide_id!r}"
        ),
        extra_meta={
            "technology": "Visium HD",
            "bin_size_um": float(bin_size),
            "pitch_um": float(bin_size),
            "image_source": name,
            "mpp_fullres": float(mpp),
        },
    )
