"""The model layer: torch modules, the model registry and the loss table.

Every model :func:`stf.tl.fit <spatialtranscriptformer.tl.fit>` trains is an entry of the registry
(:func:`available_models`; ``available_models(details=True)`` lists each model's family, levels, losses and
``model_kwargs`` with their defaults) and every training loss an entry of the loss table
(:func:`available_losses`). A new model is one file: a :class:`torch.nn.Module` following the forward contract
(``forward(x, coords, mask, *, return_attention=False) -> dict`` with ``"expr"``, ``(B, S, G)`` per spot or
``(B, G)`` per slide) and its :func:`register_model` builder; a new loss is one :func:`register_loss` call.

The modules are plain :class:`torch.nn.Module` s (the Lightning plans live in ``spatialtranscriptformer.train``);
importing this namespace does not import torch: each name is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SpatialTranscriptFormer": "._stf",
    "HE2RNA": "._he2rna",
    "AttentionMIL": "._mil",
    "TransMIL": "._transmil",
    "RidgeProbe": "._ridge",
    "SuperResDecoder": "._superres",
    "register_model": "._registry",
    "available_models": "._registry",
    "ModelEntry": "._registry",
    "register_loss": "._losses",
    "available_losses": "._losses",
    "LossSpec": "._losses",
    "compute_loss": "._losses",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
