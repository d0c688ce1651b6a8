"""Plots (matplotlib; scanpy-style keyword-only options)."""

from ._attention import attention
from ._history import history
from ._metrics import metrics
from ._pathways import pathways
from ._spatial import spatial
from ._superres import superres
from ._superres_mosaic import superres_mosaic

__all__ = ["attention", "history", "metrics", "pathways", "spatial", "superres", "superres_mosaic"]
