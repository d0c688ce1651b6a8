"""A tiny Visium (Space Ranger) sample shipped with the package, for examples and reader tests."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spatialdata import SpatialData


def visium_tiny_path() -> Path:
    """Folder of the bundled tiny Visium sample, in the Space Ranger ``outs/`` layout.

    Read it with :func:`spatialtranscriptformer.io.read_visium` or :func:`scanpy.read_visium`. See
    :func:`visium_tiny` for what it holds and its licences.
    """
    return Path(str(files("spatialtranscriptformer.datasets") / "data" / "visium_tiny"))


def visium_tiny() -> SpatialData:
    """The bundled tiny Visium sample as a slide (100 spots, 100 genes, a 600 x 600 px low-resolution H&E).

    A Space Ranger folder from the scanpy test suite (BSD-3-Clause; the underlying 10x Genomics example data
    are CC BY 4.0 — see ``LICENSE-DATA.md`` and ``SCANPY_LICENSE.txt`` in :func:`visium_tiny_path`). Its
    counts are nearly all zero and genes are Ensembl ids: good for trying readers, plots and the scverse
    clients, useless for accuracy. Its hires PNG is blank and there is no full-resolution image, so the
    slide image ``"he"`` is the lowres PNG (13.7 µm/px): tiles for a pathology encoder would be upsampled
    ~27x, which :func:`spatialtranscriptformer.pp.tiles` refuses unless ``allow_upsampling=True``.

    Returns
    -------
    A :class:`~spatialdata.SpatialData` as returned by :func:`spatialtranscriptformer.io.read_visium`
    (slide id ``"visium_tiny"``).
    """
    from ..io import read_visium

    return read_visium(visium_tiny_path(), img_key="lowres", slide_id="visium_tiny")
