"""The backbone registry: pathology foundation models and their preprocessing, filled by a decorator."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone: architecture, preprocessing and provenance.

    Attributes
    ----------
    name
        Registry name (``stf.pp.embed(backbone=name)``).
    dim
        Output embedding dimension.
    input_size
        Input edge in pixels; tiles are resized to it.
    mpp
        Native resolution in µm per pixel (tiles are cut at this scale by default).
    mean, std
        Per-channel normalisation of ``[0, 1]`` RGB input.
    license
        Licence of the weights.
    citation
        Paper to cite.
    hf_repo
        Hugging Face repository of the weights (read from the local cache only), or ``None``.
    weight_files
        Candidate weight file names inside ``hf_repo``.
    pooling
        ``"avg"`` (pooled CNN / Swin features), ``"cls"`` (class token of the final-normed sequence),
        ``"cls+mean"`` (class token concatenated with the mean of the patch tokens, register tokens
        excluded), or ``"features"`` (numpy feature extractor).
    timm_kwargs
        JSON-compatible keyword arguments of ``timm.create_model`` (layer classes, e.g. a SwiGLU
        feed-forward or a LayerNorm epsilon, are added by ``build``).
    arch
        timm architecture name (``None`` for non-timm backbones).
    build
        Function ``build(spec) -> torch.nn.Module | callable`` creating the (weight-less) model.
    key_map
        Optional function converting a checkpoint's state dict to the model's key names:
        ``key_map(state_dict)``, or ``key_map(state_dict, model=model)`` to see the built model (e.g. its
        patch grid).
    """

    name: str
    dim: int
    input_size: int
    mpp: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    license: str
    citation: str
    hf_repo: str | None = None
    weight_files: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")
    pooling: str = "cls"
    arch: str | None = None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    build: Callable | None = None
    key_map: Callable | None = None
    needs_weights: bool = True

    @property
    def is_torch(self) -> bool:
        """Whether the backbone is a torch model (else a numpy feature extractor)."""
        return self.pooling != "features"


_BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(name: str, **spec: Any) -> Callable:
    """Register a backbone; decorates ``build(spec) -> model``.

    Examples
    --------
    >>> @register_backbone("my_vit", arch="vit_small_patch16_224", dim=384, input_size=224, mpp=0.5,
    ...                    mean=IMAGENET_MEAN, std=IMAGENET_STD, license="MIT", citation="me",
    ...                    needs_weights=False)  # doctest: +SKIP
    ... def _build(spec):
    ...     return timm_model(spec)
    """

    def deco(fn: Callable) -> Callable:
        _BACKBONES[name.lower()] = BackboneSpec(name=name, build=fn, **spec)
        return fn

    return deco


def get_spec(name: str) -> BackboneSpec:
    """The registered spec of ``name`` (error lists the registered names)."""
    from . import _backbones  # noqa: F401  (fills the registry)

    key = str(name).lower()
    if key not in _BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}; registered backbones: {sorted(_BACKBONES)}.")
    return _BACKBONES[key]


def list_backbones() -> pd.DataFrame:
    """The registered backbones as a table.

    Returns
    -------
    One row per backbone with columns ``name``, ``arch``, ``dim``, ``input_size``, ``mpp``, ``pooling``,
    ``hf_repo``, ``license``, ``citation``, ``mean`` and ``std``.
    """
    from . import _backbones  # noqa: F401

    cols = ["name", "arch", "dim", "input_size", "mpp", "pooling", "hf_repo", "license", "citation", "mean", "std"]
    rows = []
    for s in _BACKBONES.values():
        d = asdict(s)
        rows.append({c: d[c] for c in cols})
    return pd.DataFrame(rows, columns=cols).set_index("name", drop=False)
