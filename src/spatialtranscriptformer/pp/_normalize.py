"""``stf.pp.normalize``: log1p or CP10k + log1p, raw counts kept in a layer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from .. import _constants as K
from .._data import copy_data, get_table
from .._docs import doc_copy, doc_data, doc_params, doc_table_key
from ._genes import layer_matrix
from ._pathways import normalized_log1p

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


@doc_params(data=doc_data, table_key=doc_table_key, copy=doc_copy)
def normalize(
    data: AnnData | SpatialData,
    *,
    method: Literal["log1p", "cp10k_log1p"] = "cp10k_log1p",
    target_sum: float = 1e4,
    layer: str | None = K.COUNTS_LAYER,
    key_added: str | None = None,
    table_key: str | None = None,
    copy: bool = False,
) -> AnnData | SpatialData | None:
    """Normalise raw counts, keeping the raw counts in ``layers['counts']``.

    Parameters
    ----------
    {data}
    method
        ``"log1p"`` (``log(1 + counts)``, the HEST-Benchmark target) or ``"cp10k_log1p"`` (counts scaled to
        ``target_sum`` per spot, then ``log1p``, as scanpy's ``normalize_total`` + ``log1p``).
    target_sum
        Per-spot total for ``"cp10k_log1p"``.
    layer
        Layer with raw counts (``None`` for ``X``; copied to ``layers['counts']`` first if absent).
    key_added
        Layer to write; ``None`` writes ``X``.
    {table_key}
    {copy}

    Returns
    -------
    ``None`` (or a copy with ``copy=True``), writing ``X`` (or ``layers[key_added]``) and
    ``uns['normalize']['params']``; ``layers['counts']`` holds the raw counts.
    """
    if method not in ("log1p", "cp10k_log1p"):
        raise ValueError(f"method must be 'log1p' or 'cp10k_log1p', got {method!r}.")
    from .._validate import check_counts, check_number

    if method == "cp10k_log1p":
        check_number("target_sum", target_sum, minimum=0, exclusive=True)
    adata = get_table(data, table_key)
    raw = layer_matrix(adata, layer)
    check_counts(raw, element=f"normalize: layer {layer!r}" if layer else "normalize: X",
                 hint="Pass layer= with the raw counts (e.g. layer='counts').")
    if copy:
        data = copy_data(data)
        adata = get_table(data, table_key)
        raw = layer_matrix(adata, layer)
    if K.COUNTS_LAYER not in adata.layers:
        adata.layers[K.COUNTS_LAYER] = raw.copy()
    out = normalized_log1p(raw, target_sum=target_sum if method == "cp10k_log1p" else None).astype("float32")
    if key_added is None:
        adata.X = out
    else:
        adata.layers[key_added] = out
    adata.uns["normalize"] = {"params": {"method": method, "target_sum": target_sum, "layer": layer, "key_added": key_added}}
    return data if copy else None
