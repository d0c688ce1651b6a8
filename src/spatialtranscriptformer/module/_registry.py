"""Registry of the torch models that :func:`spatialtranscriptformer.tl.fit` can train.

A model is registered by decorating its builder::

    @register_model("stf", levels=("spot", "slide"), description="SpatialTranscriptFormer")
    def build(input_dim: int, num_genes: int, *, level: str, loss: str, **hparams) -> nn.Module: ...

The builder returns a plain :class:`torch.nn.Module` following the shared forward contract
(``forward(x, coords, mask, *, return_attention=False) -> dict``). ``"ridge"`` (scikit-learn) and
``"superres"`` are dispatched by :func:`~spatialtranscriptformer.tl.fit`, not by this registry.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_LEVELS = ("spot", "slide")
# Modules whose import runs the ``@register_model`` decorators (imported lazily on first lookup).
_PROVIDERS = ("spatialtranscriptformer.module._stf", "spatialtranscriptformer.module._baselines")


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its builder, supported prediction levels and a one-line description."""

    name: str
    build: Callable[..., Any]
    levels: tuple[str, ...] = ("spot",)
    description: str = ""


_REGISTRY: dict[str, ModelEntry] = {}
_loaded = False


def register_model(
    name: str,
    *,
    levels: tuple[str, ...] = ("spot",),
    description: str = "",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a model builder under ``name``.

    Parameters
    ----------
    name
        Name passed as ``model=`` to :func:`~spatialtranscriptformer.tl.fit`.
    levels
        Prediction levels the model supports: ``"spot"`` (dense, one prediction per spot) and/or
        ``"slide"`` (one vector per slide). The first one is the default.
    description
        One line shown by :func:`available_models`.

    Returns
    -------
    The decorator (it returns the builder unchanged).
    """
    levels = tuple(levels)
    bad = [lv for lv in levels if lv not in _LEVELS]
    if not levels or bad:
        raise ValueError(f"Model {name!r}: levels must be a non-empty subset of {_LEVELS}, got {levels}.")

    def decorator(build: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY and _REGISTRY[name].build is not build:
            old = _REGISTRY[name].build
            # Re-importing the same module (e.g. importlib.reload) re-registers the same function name.
            if (old.__module__, old.__qualname__) != (build.__module__, build.__qualname__):
                raise ValueError(f"A model named {name!r} is already registered (by {old.__module__}).")
        _REGISTRY[name] = ModelEntry(name=name, build=build, levels=levels, description=description)
        return build

    return decorator


def _load_providers() -> None:
    global _loaded
    if _loaded:
        return
    for mod in _PROVIDERS:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:  # the provider file itself is absent in this version
            if err.name != mod:
                raise
    _loaded = True


def available_models() -> dict[str, str]:
    """Registered torch models: ``{name: description}``."""
    _load_providers()
    return {k: v.description for k, v in sorted(_REGISTRY.items())}


def get_model_entry(name: str) -> ModelEntry:
    """The :class:`ModelEntry` registered as ``name``; a ``ValueError`` lists the names otherwise."""
    _load_providers()
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model {name!r}; registered models: {sorted(_REGISTRY) or 'none'}.")
    return _REGISTRY[name]


def build_model(name: str, input_dim: int, num_genes: int, *, level: str | None = None, loss: str, **hparams):
    """Build the registered model ``name`` at prediction ``level`` (default: its first level)."""
    entry = get_model_entry(name)
    level = entry.levels[0] if level is None else level
    if level not in entry.levels:
        raise ValueError(f"Model {name!r} supports level(s) {list(entry.levels)}, not {level!r}.")
    module = entry.build(int(input_dim), int(num_genes), level=level, loss=loss, **hparams)
    if getattr(module, "level", None) != level:
        raise ValueError(
            f"Model {name!r} built with level={level!r} reports level={getattr(module, 'level', None)!r}; "
            "the builder must set `module.level`."
        )
    return module
