"""Bundled real data (her2st, a tiny Visium sample), HEST-1k cohorts and a synthetic slide simulator."""

from ._her2st import her2st
from ._hest import hest
from ._hest_metadata import hest_metadata
from ._synthetic import synthetic
from ._visium_tiny import visium_tiny, visium_tiny_path

__all__ = ["her2st", "hest", "hest_metadata", "synthetic", "visium_tiny", "visium_tiny_path"]
