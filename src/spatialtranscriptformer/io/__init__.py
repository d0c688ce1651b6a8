"""Readers that load slides into :class:`~spatialdata.SpatialData`."""

from ._anndata import from_anndata
from ._her2st import read_her2st
from ._hest import read_hest
from ._visium import read_visium
from ._visium_hd import read_visium_hd

__all__ = ["from_anndata", "read_her2st", "read_hest", "read_visium", "read_visium_hd"]
