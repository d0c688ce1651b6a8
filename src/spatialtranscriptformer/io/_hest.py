"""Reader for HEST-1k samples (Jaume et al. 2024)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._logging import logger
from .._validate import reading
from ._build import build_slide
from ._visium import VISIUM_SPOT_DIAMETER_UM, check_mpp, open_image_file

if TYPE_CHECKING:
    from spatialdata import SpatialData

_SPOT_DIAMETER_BY_TECH = {"visium": VISIUM_SPOT_DIAMETER_UM, "spatial transcriptomics": 100.0, "st": 100.0}
"""Spot diameters (µm) by HEST ``st_technology`` when the metadata has no ``spot_diameter``."""
_MPP_FIELDS = ("pixel_size_um_estimated", "pixel_size_um_embedded")
"""HEST metadata fields with the µm/px of the WSI, in order of preference (HEST uses the estimate)."""


def _num(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _sample_ids(st_dir: Path) -> list[str]:
    return sorted(p.name[: -len(".h5ad")] for p in st_dir.glob("*.h5ad"))


def _read_metadata(root: Path, sample_id: str, metadata: str | os.PathLike | None) -> tuple[dict, str | None]:
    """Metadata of one sample from ``metadata/<id>.json`` or a HEST csv (``id`` column)."""
    import pandas as pd

    if metadata is not None:
        mpath = Path(metadata)
        if not mpath.is_file():
            raise FileNotFoundError(f"HEST metadata file not found: {mpath}")
        cands = [mpath]
    else:
        cands = [
            root / "metadata" / f"{sample_id}.json",
            *sorted(root.glob("*.csv")),
            *sorted((root / "metadata").glob("*.csv")),
        ]
    for p in cands:
        if not p.is_file():
            continue
        if p.suffix.lower() == ".json":
            with reading(p, "HEST metadata"):
                meta = json.loads(p.read_text())
            if isinstance(meta, list):
                meta = next((m for m in meta if str(m.get("id")) == sample_id), None)
            if meta is not None:
                return dict(meta), str(p)
            continue
        with reading(p, "HEST metadata"):
            df = pd.read_csv(p)
        if "id" not in df.columns:
            if metadata is not None:
                raise ValueError(f"{p}: HEST metadata csv has no 'id' column.")
            continue
        rows = df[df["id"].astype(str) == sample_id]
        if len(rows):
            return rows.iloc[0].to_dict(), str(p)
        if metadata is not None:
            raise KeyError(f"{p}: no row with id {sample_id!r}.")
    return {}, None


def read_hest(
    path: str | os.PathLike,
    *,
    sample_id: str | None = None,
    metadata: str | os.PathLike | None = None,
    mpp: float | None = None,
    spot_diameter_um: float | None = None,
    level: int = 0,
    load_image: bool = True,
    patient_id: str | None = None,
) -> SpatialData:
    """Read one HEST-1k sample.

    HEST-1k (Jaume et al. 2024, *NeurIPS Datasets and Benchmarks*, "HEST-1k: A Dataset for Spatial
    Transcriptomics and Histology Image Analysis") stores per sample ``st/<id>.h5ad`` (counts,
    ``obsm['spatial']`` in full-resolution WSI pixels), ``wsis/<id>.tif`` (pyramidal TIFF) and metadata
    ``metadata/<id>.json`` or the release csv (``HEST_v1_1_0.csv``, one row per ``id``). The microns
    per pixel come from ``pixel_size_um_estimated`` (else ``pixel_size_um_embedded``), the spot size from
    ``spot_diameter`` (else from ``st_technology``), the patient from ``patient``.

    Parameters
    ----------
    path
        The HEST root folder (with ``st/``, ``wsis/``, ``metadata/``).
    sample_id
        Sample id (``"TENX95"``); ``None`` if the folder holds one sample.
    metadata
        A metadata json/csv file; ``None`` looks for ``metadata/<id>.json`` then ``*.csv`` in ``path``.
    mpp
        Microns per level-0 pixel, overriding the metadata.
    spot_diameter_um
        Spot diameter in µm, overriding the metadata.
    level
        Finest pyramid level of the WSI to use; coordinates and µm/px are rescaled to it (recorded as
        ``image_level`` / ``image_downsample`` in ``uns['stf_slide']``). The WSI is not read into memory:
        this level and the file's coarser levels become the lazy (dask) levels of the multiscale image
        ``"he"``, read region by region when tiles are cut, so the TIFF must stay in place while the
        SpatialData is in use (``sdata.write`` copies the pixels into the zarr store).
    load_image
        Read the WSI (set ``False`` for expression-only work).
    patient_id
        Patient identifier, overriding the metadata's ``patient`` (default: the sample id).

    Returns
    -------
    A :class:`~spatialdata.SpatialData` with image ``"he"``, circles (squares for Visium HD) ``"spots"``
    and table ``"table"``, as :func:`spatialtranscriptformer.io.read_her2st`.
    """
    root = Path(path)
    check_mpp(mpp, source=f"HEST folder {root}")
    if not root.is_dir():
        raise FileNotFoundError(f"HEST folder not found: {root}")
    st_dir = root / "st"
    if sample_id is None:
        ids = _sample_ids(st_dir) if st_dir.is_dir() else []
        if len(ids) != 1:
            if not ids:
                raise FileNotFoundError(f"No HEST expression file found: {st_dir}/<id>.h5ad")
            raise ValueError(f"{st_dir} holds {len(ids)} samples {ids[:10]}; pass sample_id= to choose one.")
        sample_id = ids[0]
    h5ad = st_dir / f"{sample_id}.h5ad"
    if not h5ad.is_file():
        raise FileNotFoundError(f"HEST expression file not found: {h5ad}")
    wsi = None
    if load_image:
        exts = (".tif", ".tiff", ".ome.tif", ".btf")
        hits = [p for ext in exts if (p := root / "wsis" / f"{sample_id}{ext}").is_file()]
        if not hits:
            raise FileNotFoundError(f"HEST whole-slide image not found: {root / 'wsis' / f'{sample_id}.tif'}")
        wsi = hits[0]

    meta, meta_src = _read_metadata(root, sample_id, metadata)
    if mpp is None:
        mpp = next((v for f in _MPP_FIELDS if (v := _num(meta.get(f))) is not None), None)
        if mpp is None:
            where = meta_src or f"{root / 'metadata' / (sample_id + '.json')} (not found)"
            raise ValueError(
                f"Unknown microns per pixel for HEST sample {sample_id!r}: no {' / '.join(_MPP_FIELDS)} in "
                f"{where}. Pass mpp= (µm per level-0 pixel of the WSI) or metadata= (the HEST metadata csv)."
            )
    tech = str(meta.get("st_technology") or "")
    if spot_diameter_um is None:
        spot_diameter_um = _num(meta.get("spot_diameter")) or _SPOT_DIAMETER_BY_TECH.get(tech.lower())
        if spot_diameter_um is None:
            raise ValueError(
                f"Unknown spot diameter for HEST sample {sample_id!r} (no 'spot_diameter' in the metadata, "
                f"technology {tech or 'unknown'!r}); pass spot_diameter_um=."
            )
    if patient_id is None:
        p = meta.get("patient")
        patient_id = str(p) if p is not None and str(p) not in ("", "nan", "None") else sample_id

    import anndata as ad

    with reading(h5ad, "HEST expression file"):
        adata = ad.read_h5ad(h5ad)
    if "spatial" not in adata.obsm:
        raise KeyError(f"{h5ad}: no obsm['spatial'] spot coordinates.")
    coords = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    image, ds = None, 1.0
    if wsi is not None:
        image, ds = open_image_file(wsi, level=level)
        logger.info(
            "HEST %s: %s level %d, %s px, downsample %.3g, %d pyramid level(s), read lazily",
            sample_id, wsi.name, level, image[0].shape, ds, len(image),
        )
    if ds != 1.0 and "spatial" in adata.uns:
        del adata.uns["spatial"]  # scanpy scalefactors refer to level 0
    extra = {
        "technology": tech or None,
        "sample_id": sample_id,
        "image_level": int(level) if wsi is not None else None,
        "image_downsample": ds,
        "mpp_fullres": float(mpp),
        "metadata_source": meta_src,
    }
    for f in ("organ", "species", "oncotree_code", "disease_state", "inter_spot_dist"):
        v = meta.get(f)
        if v is not None and str(v) != "nan":
            extra[f] = v.item() if isinstance(v, np.generic) else v
    return build_slide(
        image,
        adata,
        coords=coords / ds,
        mpp=float(mpp) * ds,
        spot_diameter_um=float(spot_diameter_um),
        slide_id=sample_id,
        patient_id=patient_id,
        shape="square" if "hd" in tech.lower() else "circle",
        extra_meta=extra,
    )
