"""``stf.tl.prediction_table``: predictions as a table that scanpy, squidpy and spatialdata-plot read as it is.

Also the helpers that write and read the outputs of :func:`~spatialtranscriptformer.tl.predict`, for every
reader of predictions (``evaluate``, the plots, the demo). Layout (``docs/outputs.md``):

- SpatialData: one table per output, ``tables[key]``: spots x features (the model's genes, or its pathways),
  values in ``X``, the expression table's ``obs`` (same index, same region / instance keys, so it is linked
  to the same shapes), ``obsm['spatial']``, ``uns['spatial']`` and ``uns['stf_slide']``; the record
  ``uns[key]`` (``kind``, ``stored_in='X'``, ``params``, ...). The expression table is left unchanged.
- AnnData: ``obsm[key]``, a DataFrame (spots x features), and ``uns[key]`` (``stored_in='obsm'``);
  :func:`prediction_table` makes the table above from them.
- Slide-level models: DataFrames (slides x features) in ``uns[key]`` of the expression table
  (``stored_in='uns'``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .. import _constants as K
from .._data import get_table, is_spatialdata, prediction_record, resolve_table_key
from .._docs import doc_params, doc_table_key

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

SLIDE_FRAMES = {"expression": "slide_expr", "pathways": "slide_pathways"}
"""``uns[key]`` entry holding the slides x features DataFrame of a slide-level model, by kind."""


def _scanpy_store(store: Mapping) -> dict:
    """A copy of ``uns['spatial']`` whose dictionaries are new and whose image arrays are shared (not copied)."""
    return {lib: {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in entry.items()} if isinstance(entry, Mapping)
            else entry for lib, entry in store.items()}


def build_table(source: AnnData, values: np.ndarray, names, *, key: str, record: Mapping) -> AnnData:
    """A prediction table: ``values`` (one row per spot of ``source``) in ``X``, linked like ``source``.

    ``obs`` (a copy, same index), ``obsm['spatial']``, ``uns['spatial']`` (images shared with ``source``)
    and ``uns['stf_slide']`` come from ``source``; ``uns[key]`` is ``record`` with ``stored_in='X'``.
    When ``source`` annotates SpatialData elements, so does the table (same region / instance keys).
    """
    import anndata as ad

    names = pd.Index([str(n) for n in names])
    var = pd.DataFrame(index=names)
    if record.get("kind") == "expression":
        var["measured"] = names.isin(source.var_names)
    new = ad.AnnData(np.asarray(values, dtype=np.float32), obs=source.obs.copy(), var=var)
    if K.SPATIAL_KEY in source.obsm:
        new.obsm[K.SPATIAL_KEY] = np.asarray(source.obsm[K.SPATIAL_KEY]).copy()
    if isinstance(source.uns.get(K.UNS_SPATIAL_KEY), Mapping):
        new.uns[K.UNS_SPATIAL_KEY] = _scanpy_store(source.uns[K.UNS_SPATIAL_KEY])
    if isinstance(source.uns.get(K.SLIDE_META_KEY), Mapping):
        new.uns[K.SLIDE_META_KEY] = dict(source.uns[K.SLIDE_META_KEY])
    new.uns[key] = {**dict(record), "stored_in": "X"}
    attrs = source.uns.get("spatialdata_attrs")
    if attrs:
        from spatialdata.models import TableModel

        new = TableModel.parse(new, region=attrs["region"], region_key=attrs["region_key"],
                               instance_key=attrs["instance_key"])
    return new


def _slide_table(frame: pd.DataFrame, *, key: str, record: Mapping) -> AnnData:
    import anndata as ad

    rec = {k: v for k, v in record.items() if k not in SLIDE_FRAMES.values()}
    new = ad.AnnData(np.asarray(frame, dtype=np.float32), obs=pd.DataFrame(index=frame.index.astype(str)),
                     var=pd.DataFrame(index=frame.columns.astype(str)))
    new.uns[key] = {**rec, "stored_in": "X"}
    return new


def _missing(data, table: AnnData, key: str, i: int | None, what: str) -> KeyError:
    where = f"Slide {i}: " if i is not None else ""
    found = []
    if is_spatialdata(data):
        found += [f"tables[{n!r}]" for n, t in data.tables.items() if prediction_record(t, n) is not None]
    found += [f"obsm[{k!r}]" for k, v in table.obsm.items() if isinstance(v, pd.DataFrame)
              and isinstance(table.uns.get(k), Mapping) and table.uns[k].get("stored_in") == "obsm"]
    hint = ""
    if not is_spatialdata(data) and (K.SLIDE_META_KEY in table.uns or "spatialdata_attrs" in table.uns):
        hint = (" If this table comes from a SpatialData, pass the SpatialData: its predictions are its table "
                f"{key!r} (use `spots=` to score a subset of spots).")
    return KeyError(
        f"{where}no {what} {key!r}: no table {key!r} in a SpatialData, no DataFrame `obsm[{key!r}]` of an AnnData "
        f"(predictions present: {found or 'none'}); run `stf.tl.predict` first.{hint}"
    )


def read_predictions(data, table: AnnData, key: str, *, kind: str = "expression", i: int | None = None,
                     table_key: str | None = None) -> tuple[list[str], np.ndarray | None, dict]:
    """The predictions ``key`` of the slide ``data`` (whose expression table is ``table``), whatever the layout.

    Returns ``(names, values, record)``: ``values`` is ``(table.n_obs, len(names))`` float64, aligned to
    ``table``'s spots, or ``None`` for a slide-level model, whose ``record[SLIDE_FRAMES[kind]]`` is a slides x
    features DataFrame. A clear ``KeyError`` when there is nothing under ``key``; a ``ValueError`` when the
    prediction table lacks some of ``table``'s spots.
    """
    what = "predicted expression" if kind == "expression" else "predicted pathway scores"
    if is_spatialdata(data) and key in data.tables and key != resolve_table_key(data, table_key):
        pred = data.tables[key]
        rec = prediction_record(pred, key) or dict(pred.uns.get(key, {}) or {})
        if rec.get("level") == "slide":
            return list(map(str, pred.var_names)), None, {**rec, SLIDE_FRAMES[kind]: pred.to_df()}
        idx = pred.obs_names.get_indexer(table.obs_names)
        if (idx < 0).any():
            miss = table.obs_names[idx < 0]
            where = f"Slide {i}: " if i is not None else ""
            raise ValueError(
                f"{where}the prediction table {key!r} has no row for "
                f"{len(miss)} spots of the expression table (e.g. {list(miss[:3])}); predict them again with "
                "`stf.tl.predict`."
            )
        x = pred.X[idx]
        x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
        return list(map(str, pred.var_names)), np.asarray(x, dtype=np.float64), rec
    rec = table.uns.get(key)
    rec = dict(rec) if isinstance(rec, Mapping) else {}
    if rec.get("stored_in") == "uns" or rec.get("level") == "slide":
        frame = rec.get(SLIDE_FRAMES[kind])
        if isinstance(frame, pd.DataFrame):
            return list(map(str, frame.columns)), None, rec
    frame = table.obsm.get(key) if key in table.obsm else None
    if isinstance(frame, pd.DataFrame):
        return list(map(str, frame.columns)), np.asarray(frame, dtype=np.float64), rec
    raise _missing(data, table, key, i, what)


@doc_params(table_key=doc_table_key)
def prediction_table(data: AnnData | SpatialData, *, key: str = K.PRED_KEY, table_key: str | None = None) -> AnnData:
    """The predictions ``key`` of one slide as a table that scanpy, squidpy and spatialdata-plot read as it is.

    Spots x features (the model's genes for ``key="stf_pred"``, its pathways for ``key="stf_pathways"``),
    predicted values in ``X``, the expression table's ``obs`` (same index), ``obsm['spatial']`` and
    ``uns['spatial']``, so that ``sc.pl.spatial(t, color="HALLMARK_HYPOXIA")`` draws on the H&E and
    ``sq.gr.spatial_autocorr(t)`` scores every predicted feature. For a SpatialData this is the table
    ``tables[key]`` that :func:`~spatialtranscriptformer.tl.predict` wrote (itself, not a copy); for an
    AnnData it is made from ``obsm[key]`` (a new object). Slide-level models give a slides x features table.

    Parameters
    ----------
    data
        A slide after :func:`~spatialtranscriptformer.tl.predict`: a :class:`~spatialdata.SpatialData` or an
        :class:`~anndata.AnnData`.
    key
        ``key_added`` (genes) or ``pathway_key_added`` (pathways) given to
        :func:`~spatialtranscriptformer.tl.predict`.
    {table_key}

    Returns
    -------
    An :class:`~anndata.AnnData`.

    Examples
    --------
    >>> stf.tl.predict(adata, model)  # doctest: +SKIP
    >>> pw = stf.tl.prediction_table(adata, key="stf_pathways")  # doctest: +SKIP
    >>> sc.pl.spatial(pw, color="HALLMARK_HYPOXIA")  # doctest: +SKIP
    """
    table = get_table(data, table_key)
    if is_spatialdata(data) and key in data.tables and key != resolve_table_key(data, table_key):
        return data.tables[key]
    rec = table.uns.get(key) if isinstance(table.uns.get(key), Mapping) else {}
    kind = rec.get("kind", "pathways" if key == K.PRED_PATHWAY_KEY else "expression")
    names, values, rec = read_predictions(data, table, key, kind=kind, table_key=table_key)
    if values is None:
        return _slide_table(rec[SLIDE_FRAMES[kind]], key=key, record=rec)
    return build_table(table, values, names, key=key, record=rec)
