"""Registry of the models that :func:`spatialtranscriptformer.tl.fit` trains.

A model is registered by decorating its builder::

    @register_model("stf", levels=("spot", "slide"), description="SpatialTranscriptFormer")
    def build(input_dim: int, num_genes: int, *, level: str, loss: str, **model_kwargs) -> nn.Module: ...

The entry carries what ``fit`` needs to train the model without knowing its name:

- ``family``: how it is trained and what it reads. ``"spot"``: a :class:`torch.nn.Module` following the
  shared forward contract (``forward(x, coords, mask, *, return_attention=False) -> dict`` with ``"expr"``
  and the outputs of the loss's head, see :mod:`~spatialtranscriptformer.module._losses`) trained by the
  Lightning runner on spot embeddings; ``"probe"``: an object with ``fit(x, y, groups=, coords=)`` /
  ``predict(x)`` fitted in closed form on spot embeddings (the ridge probes); ``"superres"``: the 2 µm
  decoder on image-patch tokens of a frozen backbone.
- ``levels``: prediction levels (``"spot"``, ``"slide"``; ``"bin"`` for the 2 µm raster).
- ``losses``: the losses it accepts (``None``: every loss of the table whose head it provides).
- ``pathway_tokens``: named pathway tokens (gene sets, auxiliary pathway loss, pathway initialisation).
- ``defaults``: its defaults for the options of ``fit`` that depend on the model (e.g. ``lr``, ``loss``,
  ``context_radius``): the family's unless given.

Adding a model is one file: the module and its ``@register_model`` call (import the file, or list it in
``_PROVIDERS`` to have it registered on first use).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

_LEVELS = ("spot", "slide", "bin")
FAMILIES = ("spot", "probe", "superres")
"""How a model is trained: Lightning on spot embeddings, a closed-form probe, or the 2 µm decoder."""
# Modules whose import runs the ``@register_model`` decorators (imported lazily on first lookup).
_PROVIDERS = (
    "spatialtranscriptformer.module._stf",
    "spatialtranscriptformer.module._baselines",
    "spatialtranscriptformer.module._ridge",
    "spatialtranscriptformer.module._superres",
)
FAMILY_DEFAULTS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "spot": MappingProxyType({
        "loss": "mse_pcc", "lr": 3e-3, "batch_size": None, "early_stopping_patience": 15, "validation": None,
        "context_radius": None, "output_smoothing": 0.0, "pathway_loss_weight": 0.0,
    }),
    "probe": MappingProxyType({
        "loss": "mse", "lr": None, "batch_size": None, "early_stopping_patience": None, "validation": None,
        "context_radius": None, "output_smoothing": 0.0, "pathway_loss_weight": 0.0,
    }),
    "superres": MappingProxyType({
        "loss": "poisson", "lr": 5e-5, "batch_size": 8, "early_stopping_patience": 10, "validation": "patient",
    }),
})  # fmt: skip
"""Defaults of the model-dependent options of :func:`~spatialtranscriptformer.tl.fit`, per family
(``batch_size=None``: one slide per step for spot-level models, up to 8 for slide-level ones)."""


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its builder and what :func:`~spatialtranscriptformer.tl.fit` needs to train it."""

    name: str
    build: Callable[..., Any]
    levels: tuple[str, ...] = ("spot",)
    description: str = ""
    family: str = "spot"
    losses: tuple[str, ...] | None = None
    pathway_tokens: bool = False
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def default(self, option: str) -> Any:
        """The model's default for a model-dependent ``fit`` option (its own, else its family's)."""
        if option in self.defaults:
            return self.defaults[option]
        return FAMILY_DEFAULTS[self.family].get(option)

    def check_loss(self, loss: str) -> None:
        """A ``ValueError`` when the model does not accept ``loss`` (or the loss is not in the table)."""
        from ._losses import get_loss

        get_loss(loss)
        if self.losses is not None and loss not in self.losses:
            raise ValueError(f"Model {self.name!r} accepts loss(es) {list(self.losses)}, not {loss!r}.")

    def check_level(self, level: str) -> None:
        """A ``ValueError`` when the model does not predict at ``level``."""
        if level not in self.levels:
            raise ValueError(f"Model {self.name!r} supports level(s) {list(self.levels)}, not {level!r}.")

    def model_kwargs(self) -> dict[str, Any]:
        """The hyperparameters ``model_kwargs`` may set, with their defaults (from the built class's signature).

        Arguments that ``fit`` itself supplies (``input_dim``, ``num_genes``, ``level``, ``loss`` and the
        arrays derived from the training data: ``gene_means``, ``pathway_membership``) are left out.
        """
        import typing

        try:
            target = typing.get_type_hints(self.build).get("return") or self.build
        except Exception:  # noqa: BLE001  (unresolvable annotations: fall back to the builder itself)
            target = self.build
        if not callable(target):
            target = self.build
        fixed = {"self", "input_dim", "num_genes", "in_dim", "n_genes", "level", "loss", "gene_means",
                 "pathway_membership", "out_size", "grid"}  # fmt: skip
        sig = inspect.signature(target)
        out = {
            k: (None if p.default is inspect.Parameter.empty else p.default)
            for k, p in sig.parameters.items()
            if k not in fixed and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }
        out.update(self.defaults.get("model_kwargs", {}))
        return out


_REGISTRY: dict[str, ModelEntry] = {}
_loaded = False


def register_model(
    name: str,
    *,
    levels: tuple[str, ...] = ("spot",),
    description: str = "",
    family: str = "spot",
    losses: tuple[str, ...] | None = None,
    pathway_tokens: bool = False,
    defaults: Mapping[str, Any] | None = None,
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
    family
        ``"spot"`` (a torch module trained by the Lightning runner on spot embeddings), ``"probe"`` (a
        closed-form ``fit`` / ``predict`` object) or ``"superres"``.
    losses
        Losses the model accepts (``None``: any loss of the table, see
        :func:`~spatialtranscriptformer.module.register_loss`; the builder receives the name and builds the
        output head of :attr:`~spatialtranscriptformer.module._losses.LossSpec.head`).
    pathway_tokens
        The model has named pathway tokens: ``fit`` derives them from gene sets (``data_kwargs["gene_sets"]``),
        passes their membership matrix (``pathway_membership``) to the builder and may supervise them with the
        auxiliary pathway loss.
    defaults
        The model's own defaults of ``fit`` options (e.g. ``{"lr": 1e-3, "context_radius": 1.5}``); the
        family's otherwise (:data:`FAMILY_DEFAULTS`).

    Returns
    -------
    The decorator (it returns the builder unchanged).
    """
    levels = tuple(levels)
    bad = [lv for lv in levels if lv not in _LEVELS]
    if not levels or bad:
        raise ValueError(f"Model {name!r}: levels must be a non-empty subset of {_LEVELS}, got {levels}.")
    if family not in FAMILIES:
        raise ValueError(f"Model {name!r}: family must be one of {FAMILIES}, got {family!r}.")

    def decorator(build: Callable[..., Any]) -> Callable[..., Any]:
        if name in _REGISTRY and _REGISTRY[name].build is not build:
            old = _REGISTRY[name].build
            # Re-importing the same module (e.g. importlib.reload) re-registers the same function name.
            if (old.__module__, old.__qualname__) != (build.__module__, build.__qualname__):
                raise ValueError(f"A model named {name!r} is already registered (by {old.__module__}).")
        _REGISTRY[name] = ModelEntry(
            name=name, build=build, levels=levels, description=description, family=family,
            losses=None if losses is None else tuple(losses), pathway_tokens=bool(pathway_tokens),
            defaults=MappingProxyType(dict(defaults or {})),
        )  # fmt: skip
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


def available_models(*, details: bool = False):
    """The registered models.

    Parameters
    ----------
    details
        Return a table (one row per model: family, levels, losses, default loss, pathway tokens,
        ``model_kwargs`` with their defaults, description) instead of ``{name: description}``.

    Returns
    -------
    ``{name: description}``, or a :class:`pandas.DataFrame` indexed by name with ``details=True``.
    """
    _load_providers()
    if not details:
        return {k: v.description for k, v in sorted(_REGISTRY.items())}
    import pandas as pd

    from ._losses import available_losses

    rows = []
    for k, e in sorted(_REGISTRY.items()):
        rows.append({
            "model": k, "family": e.family, "levels": list(e.levels),
            "losses": list(e.losses) if e.losses is not None else list(available_losses()),
            "default_loss": e.default("loss"), "pathway_tokens": e.pathway_tokens, "model_kwargs": e.model_kwargs(),
            "description": e.description,
        })  # fmt: skip
    return pd.DataFrame(rows).set_index("model")


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
    entry.check_level(level)
    module = entry.build(int(input_dim), int(num_genes), level=level, loss=loss, **hparams)
    if getattr(module, "level", None) != level:
        raise ValueError(
            f"Model {name!r} built with level={level!r} reports level={getattr(module, 'level', None)!r}; "
            "the builder must set `module.level`."
        )
    return module
