"""spatialtranscriptformer: predict spatially resolved gene expression from H&E histology.

Use as ``import spatialtranscriptformer as stf``; the namespaces follow scanpy: ``stf.io`` (readers),
``stf.datasets`` (bundled and synthetic data), ``stf.pp`` (tiles, embeddings, targets), ``stf.tl``
(models: fit, predict, evaluate), ``stf.pl`` (plots) and ``stf.module`` (the model layer: torch modules,
the model registry and the loss table). Heavy libraries (torch, lightning, timm,
spatialdata) are imported only inside the functions that need them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from ._notices import silence_third_party_notices
from ._progress import import_tqdm_auto

import_tqdm_auto()  # before any dependency imports it: tqdm's "IProgress not found" notice, silenced once
silence_third_party_notices()

from . import datasets, io, module, pl, pp, tl  # noqa: E402
from ._settings import settings  # noqa: E402

try:
    __version__ = version("spatialtranscriptformer")
except PackageNotFoundError:  # pragma: no cover - not installed
    __version__ = "0.0.0"

__all__ = ["datasets", "io", "module", "pl", "pp", "settings", "tl", "__version__"]
