"""Parameter descriptions shared by several docstrings (defined once, substituted in)."""

from __future__ import annotations

import inspect

doc_data = """\
data
    A :class:`~spatialdata.SpatialData` with an expression/spot table, or an
    :class:`~anndata.AnnData` (one slide)."""

doc_slides = """\
data
    One slide or a list of slides: :class:`~spatialdata.SpatialData` objects (or
    :class:`~anndata.AnnData` tables carrying embeddings and ``obsm['spatial']``)."""

doc_table_key = """\
table_key
    Name of the table inside a :class:`~spatialdata.SpatialData`. ``None`` picks the only table,
    or ``"table"``; the error lists the available tables otherwise. Ignored for AnnData input."""

doc_copy = """\
copy
    Return a modified copy instead of writing into ``data``."""

doc_progress = """\
progress
    Show a progress bar; ``None`` follows ``stf.settings.progress``."""


doc_show_save = """\
show
    Show the figure; ``None``: show unless ``return_fig`` or ``ax`` is given.
save
    File to write the figure to (format from the extension).
return_fig
    Return the :class:`~matplotlib.figure.Figure`."""


def doc_params(**kwds: str):
    """Substitute shared parameter text into a docstring (``{name}`` placeholders)."""

    def dec(obj):
        obj.__doc__ = inspect.cleandoc(obj.__doc__).format_map(kwds)
        return obj

    return dec
