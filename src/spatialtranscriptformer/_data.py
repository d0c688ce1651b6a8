"""Resolve the user's data: tables in SpatialData, slide lists, slide metadata."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _constants as K

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def is_spatialdata(obj: Any) -> bool:
    """Whether ``obj`` is a :class:`spatialdata.SpatialData` (without importing spatialdata)."""
    return type(obj).__name__ == "SpatialData" and hasattr(obj, "tables")


def is_anndata(obj: Any) -> bool:
    """Whether ``obj`` is an :class:`anndata.AnnData`."""
    from anndata import AnnData

    return isinstance(obj, AnnData)


def prediction_record(adata: AnnData, key: str | None = None) -> dict | None:
    """The ``uns[key]`` record of a prediction table written by ``stf.tl.predict`` (``None`` for other tables).

    A prediction table holds its values in ``X``: ``uns[key]['stored_in'] == 'X'``. Without ``key``, any such
    record in ``uns`` counts.
    """
    from collections.abc import Mapping

    for k in [key] if key is not None else list(adata.uns.keys()):
        rec = adata.uns.get(k)
        if isinstance(rec, Mapping) and rec.get("kind") in K.PRED_KINDS and rec.get("stored_in") == "X":
            return dict(rec)
    return None


def resolve_table_key(sdata: SpatialData, table_key: str | None) -> str:
    """Name of the table to use in ``sdata``; a clear error lists the tables otherwise.

    Without ``table_key``: the only table, else ``"table"``, else the only table that is not a prediction
    table of ``stf.tl.predict``.
    """
    names = list(sdata.tables.keys())
    if table_key is not None:
        if table_key not in sdata.tables:
            raise KeyError(f"Table {table_key!r} not found in the SpatialData; available tables: {names or 'none'}.")
        return table_key
    if len(names) == 1:
        return names[0]
    if K.TABLE_KEY in names:
        return K.TABLE_KEY
    if not names:
        raise ValueError("The SpatialData has no table: spot expression/metadata is required (no table found).")
    inputs = [n for n in names if prediction_record(sdata.tables[n]) is None]
    if len(inputs) == 1:
        return inputs[0]
    raise KeyError(f"The SpatialData has several tables {names}; pass `table_key=` to choose one.")


def get_table(data: AnnData | SpatialData, table_key: str | None = None) -> AnnData:
    """The :class:`~anndata.AnnData` of ``data`` (itself for AnnData, a table for SpatialData)."""
    if is_spatialdata(data):
        return data.tables[resolve_table_key(data, table_key)]
    if is_anndata(data):
        return data
    raise TypeError(f"Expected an AnnData or a SpatialData, got {type(data).__name__}.")


def as_slide_list(data: Any) -> list:
    """Return ``data`` as a list of slides (single slide -> one-element list)."""
    if isinstance(data, Sequence) and not isinstance(data, str | bytes):
        slides = list(data)
        if not slides:
            raise ValueError("Expected at least one slide, got an empty list.")
        for i, s in enumerate(slides):
            if not (is_spatialdata(s) or is_anndata(s)):
                raise TypeError(f"Slide {i} is a {type(s).__name__}, expected SpatialData or AnnData.")
        return slides
    if is_spatialdata(data) or is_anndata(data):
        return [data]
    raise TypeError(f"Expected a SpatialData, an AnnData or a list of them, got {type(data).__name__}.")


def slide_meta(adata: AnnData) -> dict:
    """Per-slide metadata written by the readers (``uns['stf_slide']``)."""
    meta = adata.uns.get(K.SLIDE_META_KEY)
    if meta is None:
        raise ValueError(
            f"The table has no `uns[{K.SLIDE_META_KEY!r}]` slide metadata (microns per pixel, element names). "
            "Load the slide with a `stf.io` reader or `stf.io.from_anndata`."
        )
    return dict(meta)


def slide_mpp(adata: AnnData) -> float:
    """Microns per full-resolution pixel of the slide's H&E image."""
    mpp = slide_meta(adata).get("mpp")
    if mpp is None or not np.isfinite(mpp) or mpp <= 0:
        raise ValueError(f"Unknown or invalid microns per pixel (mpp={mpp!r}) in `uns[{K.SLIDE_META_KEY!r}]`.")
    return float(mpp)


def slide_ids(adata: AnnData) -> np.ndarray:
    """Slide id of every spot (``obs['slide_id']``, else the metadata's slide id)."""
    if K.SLIDE_KEY in adata.obs:
        return adata.obs[K.SLIDE_KEY].astype(str).to_numpy()
    sid = adata.uns.get(K.SLIDE_META_KEY, {}).get("slide_id", "slide")
    return np.full(adata.n_obs, str(sid))


def spot_coords(adata: AnnData) -> np.ndarray:
    """Spot centres (x, y) in full-resolution pixels from ``obsm['spatial']``."""
    if K.SPATIAL_KEY not in adata.obsm:
        raise KeyError(f"The table has no `obsm[{K.SPATIAL_KEY!r}]` spot coordinates.")
    xy = np.asarray(adata.obsm[K.SPATIAL_KEY], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise ValueError(f"`obsm[{K.SPATIAL_KEY!r}]` must have shape (n_spots, 2), got {xy.shape}.")
    return xy[:, :2]


def get_embedding(adata: AnnData, key: str) -> np.ndarray:
    """Embedding matrix ``obsm[key]`` as float32, with a clear error when missing or not finite."""
    if key not in adata.obsm:
        avail = [k for k in adata.obsm.keys() if k.startswith(K.EMBEDDING_PREFIX)]
        raise KeyError(
            f"Embedding `obsm[{key!r}]` not found; available embeddings: {avail or 'none'}. "
            "Compute one with `stf.pp.embed`."
        )
    x = np.asarray(adata.obsm[key], dtype=np.float32)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise ValueError(f"Embedding `obsm[{key!r}]` has NaN/inf values in {bad} spots.")
    return x


def copy_data(data):
    """A deep copy of an AnnData or SpatialData (for ``copy=True``)."""
    if is_spatialdata(data):
        from spatialdata import deepcopy

        return deepcopy(data)
    return data.copy()
