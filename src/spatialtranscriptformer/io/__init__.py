"""Readers that load slides into :class:`~spatialdata.SpatialData`."""

from ._her2st import read_her2st

__all__ = ["read_her2st"]
