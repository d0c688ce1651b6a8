"""Bundled real data and a synthetic slide simulator."""

from ._her2st import her2st

__all__ = ["her2st"]
