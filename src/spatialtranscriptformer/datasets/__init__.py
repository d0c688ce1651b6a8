"""Bundled real data and a synthetic slide simulator."""

from ._her2st import her2st
from ._synthetic import synthetic

__all__ = ["her2st", "synthetic"]
