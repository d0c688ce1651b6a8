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


def _is_lazy(a) -> bool:
    from dask import is_dask_collection

    return is_dask_collection(a)


def _as_cyx(a, *, name: str):
    """One image level as a uint8 ``(3, y, x)`` array (numpy, or dask kept lazy)."""
    lazy = _is_lazy(a)
    if not lazy:
        a = np.asarray(a)
    if a.ndim == 2:
        a = a[None][[0, 0, 0]] if lazy else np.repeat(a[None], 3, axis=0)
    elif a.ndim == 3 and a.shape[-1] in (3, 4):
        a = a.transpose(2, 0, 1)
    elif not (a.ndim == 3 and a.shape[0] in (3, 4)):
        raise ValueError(f"{name} must be (y, x, 3) or (3, y, x) RGB, got shape {a.shape}.")
    a = a[:3]
    if min(a.shape[1:]) < 1:
        raise ValueError(f"{name} is empty (shape {a.shape}).")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
            raise ValueError(f"{name}: expected a numeric image, got dtype {a.dtype}.")
        if np.issubdtype(a.dtype, np.floating) and float(a.max()) <= 1.0:  # a streaming reduction for dask
            a = a * 255
        a = (a.clip(0, 255) if lazy else np.clip(a, 0, 255)).astype(np.uint8)
    return a


def _image_levels(image) -> tuple[list, bool]:
    """``(3, y, x)`` uint8 levels of ``image`` (finest first) and whether they are lazy (dask)."""
    if isinstance(image, list | tuple):
        if not image:
            raise ValueError("Image: got an empty list of pyramid levels.")
        levels = [_as_cyx(a, name=f"Image level {i}") for i, a in enumerate(image)]
        for i in range(1, len(levels)):
            (h0, w0), (h, w) = levels[i - 1].shape[1:], levels[i].shape[1:]
            if h > h0 or w > w0:
                raise ValueError(
                    f"Image level {i} ({w} x {h} px) is larger than level {i - 1} ({w0} x {h0} px); "
                    "pyramid levels must go from the finest to the coarsest."
                )
    else:
        levels = [_as_cyx(image, name="Image")]
    lazy = [_is_lazy(a) for a in levels]
    return levels, all(lazy)


def _image_element(levels: list, *, lazy: bool, scale_factors, chunks: int, tf: dict):
    """The (multiscale) image element: given levels as a DataTree, else one level (and its pyramid)."""
    from spatialdata.models import Image2DModel

    kw = {"dims": ("c", "y", "x"), "c_coords": ["r", "g", "b"], "chunks": (3, chunks, chunks)}
    if len(levels) > 1:  # the file's own pyramid (e.g. a pyramidal TIFF): no resampling
        from spatialdata.transformations import set_transformation
        from spatialdata.transformations._utils import compute_coordinates
        from xarray import Dataset, DataTree

        tree = DataTree.from_dict(
            {f"scale{i}": Dataset({"image": Image2DModel.parse(a, **kw)}) for i, a in enumerate(levels)}
        )
        set_transformation(tree, dict(tf), set_all=True)  # Identity at scale0, Scale(level / scale0) below
        tree = compute_coordinates(tree)
        Image2DModel.validate(tree)
        return tree
    image = levels[0]
    if scale_factors is None:
        scale_factors, side = [], min(image.shape[1:])
        while side > 2048:
            scale_factors.append(2)
            side //= 2
    if scale_factors and not lazy:  # an in-memory image: coarser levels are pooled on first use, then kept
        from ._lazy import lazy_pyramid

        return _image_element(lazy_pyramid(image, scale_factors, chunks=chunks), lazy=True, scale_factors=None,
                              chunks=chunks, tf=tf)
    return Image2DModel.parse(image, scale_factors=scale_factors or None, transformations=tf, **kw)


def build_slide(
    image,
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
    image_scalef: float = 1.0,
    library_id: str | None = None,
    spatial_uns: dict | None = None,
) -> SpatialData:
    """Build a one-slide :class:`~spatialdata.SpatialData`.

    Parameters
    ----------
    image
        RGB image at full resolution, ``(y, x, 3)`` or ``(c, y, x)`` (grey ``(y, x)`` is repeated), as a numpy or
        a dask array, or its pyramid as a list of such arrays (finest first, e.g. the levels of a pyramidal
        TIFF), or ``None`` for a slide without image. uint8 is kept, other dtypes are clipped to 0..255
        (floats <= 1 scaled by 255). A dask image is never computed: it stays lazy (out of core), its
        pyramid is coarsened lazily and only its shape is validated (a float dask image has its maximum
        computed once, chunk by chunk, to choose the scaling).
    adata
        Spots x genes; copied, never modified. ``X`` holds raw counts (also stored in ``layers['counts']``).
    coords
        Spot centres ``(x, y)`` in the slide's coordinate units (``obsm['spatial']``, coordinate system
        ``"global"``): full-resolution pixels of the scan.
    mpp
        Microns per coordinate unit (per full-resolution pixel).
    spot_diameter_um
        Physical spot (or bin edge) size in µm.
    slide_id, patient_id
        Identifiers written to ``obs['slide_id']`` and ``obs['patient_id']`` (patient defaults to slide).
    shape
        ``"circle"`` for spots, ``"square"`` for Visium HD bins.
    image_key, shapes_key, table_key
        Element names.
    scale_factors
        Downscaling factors of the image pyramid of a single-level ``image``; default: halve until the smallest
        side is < 2048 px. Not allowed with a list of levels (the pyramid is given).
    chunks
        Chunk edge of the image arrays (of every pyramid level).
    validate
        Validate counts and coordinates (disable only for trusted, very large inputs).
    extra_meta
        More entries for ``uns['stf_slide']``.
    image_scalef
        Pixels of ``image`` (of its finest level) per coordinate unit: 1 when the image is the full-resolution
        scan, e.g. 0.15 for a Space Ranger hires PNG. The image element carries ``Scale(1 / image_scalef)``
        to ``"global"``; coordinates are never rescaled.
    library_id
        Key of the slide in ``uns['spatial']`` (default: ``slide_id``).
    spatial_uns
        The slide's ``uns['spatial'][library_id]`` entry (images and scalefactors referring to ``coords``),
        e.g. Space Ranger's or the user's; ``None`` builds it from ``image`` (hires: longest side 2,000 px,
        lowres: 600 px; see :mod:`spatialtranscriptformer.io._spatial_uns`).

    Every element has two coordinate systems: ``"global"`` (coordinate units) and ``"micron"`` (µm).
    """
    import geopandas as gpd
    import shapely
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel

    from ._spatial_uns import element_levels, scanpy_library

    coords = np.asarray(coords, dtype=np.float64)
    ids = pd.Index(adata.obs_names.astype(str))
    if not (isinstance(image_scalef, int | float | np.number) and np.isfinite(image_scalef) and image_scalef > 0):
        raise ValueError(f"image_scalef must be a positive number (image px per coordinate unit), got {image_scalef!r}.")
    levels, lazy = (None, False) if image is None else _image_levels(image)
    if levels is not None and len(levels) > 1 and scale_factors is not None:
        raise ValueError("Pass either pyramid levels (a list of images) or scale_factors=, not both.")
    if adata.n_obs == 0:
        raise ValueError(f"slide {slide_id!r}: no spots (the expression table has 0 rows).")
    if validate:
        from .._validate import check_counts

        check_counts(adata.X, element=f"slide {slide_id!r} counts", hint="The readers expect raw counts in X (an AnnData with raw counts in a layer: "
                     "copy it and set X to that layer first).")
        validate_spots(
            coords,
            image_shape=None if levels is None else tuple(s / image_scalef for s in levels[0].shape[1:]),
            mpp=mpp,
            spot_diameter_um=spot_diameter_um,
            spot_ids=ids,
        )
    if len(ids) != len(coords):
        raise ValueError(f"{len(coords)} coordinates for {len(ids)} spots.")

    tf, tf_image = slide_transformations(mpp, image_scalef=image_scalef)
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
    if table.var_names.has_duplicates:
        from .._validate import unique_gene_names

        unique_gene_names(table, source=f"slide {slide_id!r}")
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
        "image_scalef": float(image_scalef) if image is not None else None,
        "image_mpp": float(mpp) / float(image_scalef) if image is not None else None,
        "library_id": str(library_id if library_id is not None else slide_id),
    }
    if extra_meta:
        meta.update({k: v for k, v in extra_meta.items() if v is not None})
    table.uns[K.SLIDE_META_KEY] = {k: v for k, v in meta.items() if v is not None}

    images = {}
    if levels is not None:
        images[image_key] = _image_element(
            levels, lazy=lazy, scale_factors=scale_factors, chunks=chunks, tf=tf_image
        )
    if spatial_uns is None:  # from the given levels when lazy (never compute a lazy pyramid), else the element's
        src = [] if levels is None else (levels if lazy else element_levels(images[image_key]))
        spatial_uns = scanpy_library(
            src, px_per_unit=image_scalef, mpp=mpp, spot_diameter_um=spot_diameter_um, lazy=lazy
        )
    table.uns[K.UNS_SPATIAL_KEY] = {meta["library_id"]: spatial_uns}
    table = TableModel.parse(table, region=shapes_key, region_key=K.REGION_KEY, instance_key=K.INSTANCE_KEY)
    return SpatialData(images=images, shapes={shapes_key: shapes}, tables={table_key: table})


def slide_transformations(mpp: float, *, image_scalef: float = 1.0) -> tuple[dict, dict]:
    """Transformations of a slide's shapes and of its image to ``"global"`` and ``"micron"``.

    ``"global"`` is the unit of ``obsm['spatial']`` (full-resolution pixels), ``"micron"`` is µm
    (``mpp`` µm per unit). The image's pixels are ``image_scalef`` per unit.
    """
    from spatialdata.transformations import Identity, Scale

    def scale(f: float):
        return Identity() if f == 1.0 else Scale([f, f], axes=("x", "y"))

    shapes = {K.COORDINATE_SYSTEM: Identity(), K.MICRON_COORDINATE_SYSTEM: scale(float(mpp))}
    unit = 1.0 / float(image_scalef)
    image = {K.COORDINATE_SYSTEM: scale(unit), K.MICRON_COORDINATE_SYSTEM: scale(float(mpp) * unit)}
    return shapes, image
