"""Assemble one slide into a :class:`~spatialdata.SpatialData` and validate what goes in."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import _constants as K

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def validate_counts(X, *, element: str = "counts") -> None:
    """Raise a ``ValueError`` for non-numeric, NaN/inf or negative counts."""
    data = X.data if sp.issparse(X) else np.asarray(X)
    if not np.issubdtype(data.dtype, np.number):
        raise ValueError(f"{element}: expected numeric counts, got dtype {data.dtype}.")
    if data.size and not np.isfinite(data).all():
        raise ValueError(f"{element}: {int((~np.isfinite(data)).sum())} NaN/inf values found.")
    if data.size and (data < 0).any():
        raise ValueError(f"{element}: {int((data < 0).sum())} negative values found; counts must be >= 0.")


def validate_spots(
    coords: np.ndarray,
    *,
    image_shape: tuple[int, int] | None,
    mpp: float,
    spot_diameter_um: float,
    spot_ids: pd.Index,
) -> None:
    """Check spot ids, mpp, coordinate units and that spots lie on the image."""
    if mpp is None or not np.isfinite(mpp) or mpp <= 0:
        raise ValueError(f"Microns per pixel must be a positive number, got {mpp!r}.")
    if spot_ids.has_duplicates:
        dup = spot_ids[spot_ids.duplicated()].unique()[:5].tolist()
        raise ValueError(f"Duplicate spot ids: {dup} (spot ids must be unique).")
    coords = np.asarray(coords, dtype=float)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"Spot coordinates must have shape (n_spots, 2), got {coords.shape}.")
    if not np.isfinite(coords).all():
        raise ValueError("Spot coordinates contain NaN/inf.")
    if image_shape is not None:
        h, w = image_shape
        out = (coords[:, 0] < 0) | (coords[:, 1] < 0) | (coords[:, 0] >= w) | (coords[:, 1] >= h)
        if out.any():
            ex = spot_ids[out][:3].tolist()
            raise ValueError(
                f"{int(out.sum())} spots lie outside the image ({w} x {h} px), e.g. {ex}; "
                "are the coordinates in full-resolution pixels of this image?"
            )
    if len(coords) >= 3:
        from scipy.spatial import cKDTree

        d, _ = cKDTree(coords).query(coords, k=2)
        nn_um = float(np.median(d[:, 1])) * mpp
        if nn_um < 0.5 * spot_diameter_um:
            raise ValueError(
                f"Spot coordinates look like they are in the wrong units: the median distance between "
                f"neighbouring spots is {nn_um:.2f} µm at {mpp} µm/px, less than half the spot diameter "
                f"({spot_diameter_um} µm). Are they low-resolution pixels (scalefactor) with a full-resolution "
                "image, or is the µm/px wrong?"
            )


def build_slide(
    image: np.ndarray | None,
    adata: AnnData,
    *,
    coords: np.ndarray,
    mpp: float,
    spot_diameter_um: float,
    slide_id: str,
    patient_id: str | None = None,
    shape: Literal["circle", "square"] = "circle",
    image_key: str = K.IMAGE_KEY,
    shapes_key: str = K.SHAPES_KEY,
    table_key: str = K.TABLE_KEY,
    scale_factors: list[int] | None = None,
    chunks: int = 1024,
    validate: bool = True,
    extra_meta: dict | None = None,
) -> SpatialData:
    """Build a one-slide :class:`~spatialdata.SpatialData`.

    Parameters
    ----------
    image
        RGB image ``(y, x, 3)`` uint8 at full resolution, or ``None`` for a slide without image.
    adata
        Spots x genes; copied, never modified. ``X`` holds raw counts (also stored in ``layers['counts']``).
    coords
        Spot centres ``(x, y)`` in full-resolution pixels of ``image``.
    mpp
        Microns per full-resolution pixel.
    spot_diameter_um
        Physical spot (or bin edge) size in µm.
    slide_id, patient_id
        Identifiers written to ``obs['slide_id']`` and ``obs['patient_id']`` (patient defaults to slide).
    shape
        ``"circle"`` for spots, ``"square"`` for Visium HD bins.
    image_key, shapes_key, table_key
        Element names.
    scale_factors
        Downscaling factors of the image pyramid; default: halve until the smallest side is < 2048 px.
    chunks
        Chunk edge of the image arrays.
    validate
        Validate counts and coordinates (disable only for trusted, very large inputs).
    extra_meta
        More entries for ``uns['stf_slide']``.
    """
    import geopandas as gpd
    import shapely
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity

    coords = np.asarray(coords, dtype=np.float64)
    ids = pd.Index(adata.obs_names.astype(str))
    if image is not None:
        image = np.asarray(image)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        if image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise ValueError(f"Image must be (y, x, 3) RGB, got shape {image.shape}.")
        image = image[..., :3]
        if image.dtype != np.uint8:
            if np.issubdtype(image.dtype, np.floating) and image.max() <= 1.0:
                image = image * 255
            image = np.clip(image, 0, 255).astype(np.uint8)
    if validate:
        validate_counts(adata.X, element=f"slide {slide_id!r} counts")
        validate_spots(
            coords,
            image_shape=None if image is None else image.shape[:2],
            mpp=mpp,
            spot_diameter_um=spot_diameter_um,
            spot_ids=ids,
        )
    if len(ids) != len(coords):
        raise ValueError(f"{len(coords)} coordinates for {len(ids)} spots.")

    tf = {K.COORDINATE_SYSTEM: Identity()}
    radius_px = spot_diameter_um / mpp / 2
    if shape == "circle":
        shapes = ShapesModel.parse(
            coords, geometry=0, radius=np.full(len(coords), radius_px), index=ids, transformations=tf
        )
    else:
        x, y = coords[:, 0], coords[:, 1]
        geoms = shapely.box(x - radius_px, y - radius_px, x + radius_px, y + radius_px)  # vectorised
        shapes = ShapesModel.parse(gpd.GeoDataFrame(geometry=geoms, index=ids), transformations=tf)

    table = adata.copy()
    table.uns.pop("spatialdata_attrs", None)  # a table taken from another SpatialData gets new annotations
    table.obs_names = ids
    table.obs[K.SLIDE_KEY] = pd.Categorical([str(slide_id)] * table.n_obs)
    table.obs[K.PATIENT_KEY] = pd.Categorical([str(patient_id if patient_id is not None else slide_id)] * table.n_obs)
    table.obs[K.REGION_KEY] = pd.Categorical([shapes_key] * table.n_obs)
    table.obs[K.INSTANCE_KEY] = ids.to_numpy()
    if K.COUNTS_LAYER not in table.layers:
        table.layers[K.COUNTS_LAYER] = table.X.copy()
    table.obsm[K.SPATIAL_KEY] = coords.copy()
    meta = {
        "slide_id": str(slide_id),
        "patient_id": str(patient_id if patient_id is not None else slide_id),
        "mpp": float(mpp),
        "spot_diameter_um": float(spot_diameter_um),
        "image_key": image_key if image is not None else None,
        "shapes_key": shapes_key,
        "shape": shape,
    }
    if extra_meta:
        meta.update(extra_meta)
    table.uns[K.SLIDE_META_KEY] = {k: v for k, v in meta.items() if v is not None}
    table = TableModel.parse(table, region=shapes_key, region_key=K.REGION_KEY, instance_key=K.INSTANCE_KEY)

    images = {}
    if image is not None:
        if scale_factors is None:
            scale_factors, side = [], min(image.shape[:2])
            while side > 2048:
                scale_factors.append(2)
                side //= 2
        arr = np.moveaxis(image, -1, 0)
        images[image_key] = Image2DModel.parse(
            arr,
            dims=("c", "y", "x"),
            c_coords=["r", "g", "b"],
            scale_factors=scale_factors or None,
            chunks=(3, chunks, chunks),
            transformations=tf,
        )
        if scale_factors:  # the pyramid of an in-memory image: compute the levels once, keep them as dask
            images[image_key] = images[image_key].persist()
    return SpatialData(images=images, shapes={shapes_key: shapes}, tables={table_key: table})
