"""``stf.pp.highly_variable_genes``: mark the top-k most variable genes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import _constants as K
from .._data import as_slide_list, copy_data, get_table
from .._docs import doc_copy, doc_params, doc_slides, doc_table_key
from ._genes import select_top_genes

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


@doc_params(data=doc_slides, table_key=doc_table_key, copy=doc_copy)
def highly_variable_genes(
    data: AnnData | SpatialData | list,
    *,
    n_top: int = 50,
    layer: str | None = K.COUNTS_LAYER,
    exclude_prefixes: tuple[str, ...] = (),
    flavor: str = "variance",
    table_key: str | None = None,
    key_added: str = K.HVG_KEY,
    inplace: bool = True,
    copy: bool = False,
) -> list[str] | AnnData | SpatialData | list | None:
    """Mark the ``n_top`` most variable genes, chosen jointly over all given slides.

    ``flavor="variance"``: variance of ``log1p`` raw counts over all spots (the scale of HEST-Benchmark's
    targets); ``flavor="seurat"``: scanpy's dispersion-based selection on pooled log1p-CP10k expression
    (the kind of selection HEST-Benchmark's released gene panels come from). Among genes measured in
    every slide; see :func:`~spatialtranscriptformer.pp._genes.select_top_genes`. Give only training
    slides to avoid leakage.

    Parameters
    ----------
    {data}
    n_top
        Number of genes.
    layer
        Layer with raw counts (``None`` for ``X``).
    exclude_prefixes
        Gene-name prefixes never selected (e.g. ``("MT-",)``).
    flavor
        ``"variance"`` or ``"seurat"``.
    {table_key}
    key_added
        Boolean ``var`` column written (default ``"highly_variable"``).
    inplace
        ``False`` returns the gene list and writes nothing.
    {copy}

    Returns
    -------
    ``None`` (or a copy with ``copy=True``), writing ``table.var[key_added]`` (bool),
    ``table.var[key_added + "_rank"]`` (0 = most variable, -1 = not selected) and
    ``table.uns[key_added]["params"]`` on every slide. With ``inplace=False``: the gene list.
    """
    slides = as_slide_list(data)
    tables = [get_table(s, table_key) for s in slides]
    genes = select_top_genes(tables, n_top, layer=layer, exclude_prefixes=exclude_prefixes, flavor=flavor)
    if not inplace:
        return genes
    if copy:
        slides = [copy_data(s) for s in slides]
        tables = [get_table(s, table_key) for s in slides]
    rank = {g: i for i, g in enumerate(genes)}
    for t in tables:
        r = t.var_names.map(lambda g: rank.get(g, -1)).to_numpy()
        t.var[key_added] = r >= 0
        t.var[key_added + "_rank"] = r
        t.uns[key_added] = {"params": {"n_top": n_top, "layer": layer, "n_slides": len(tables), "flavor": flavor}}
    if copy:
        return slides if isinstance(data, list) else slides[0]
    return None
