"""The option groups of :func:`~spatialtranscriptformer.tl.fit`: what goes in ``plan_kwargs`` and ``data_kwargs``.

``fit`` names what users tune most (model, genes, loss, epochs, learning rate, batch size, validation,
patience, seed, devices); the rest sits in three dictionaries, as in scvi-tools:

- ``model_kwargs``: the model's hyperparameters (its constructor's arguments, see
  :func:`~spatialtranscriptformer.module.available_models` with ``details=True``);
- ``plan_kwargs``: the training plan (loss weights, weight decay, warm-up, the early-stopping metric);
- ``data_kwargs``: how inputs and targets are made from the slides (layer, QC, standardisation,
  neighbourhood context, gene sets, crops).

The keys and defaults of each group per model family are the tables below; an unknown key is an error
that lists the valid ones. The names these options had as keywords of ``fit`` before they were grouped are
still accepted, with a ``FutureWarning`` naming their group.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from .. import _constants as K

SPOT_PLAN = {
    "weight_decay": 1e-2,
    "warmup_epochs": 5,
    "pcc_weight": 1.0,
    "pathway_loss_weight": "auto",
    "pathway_structure_weight": 1.0,
    "monitor": "val_loss",
}
"""``plan_kwargs`` of spot models: AdamW weight decay, warm-up epochs (then cosine decay), the weight of the
PCC term of ``mse_pcc``, of the auxiliary pathway loss (``"auto"``: the model's default when it has named
pathway tokens, else 0) and of the pathway-structure term, and the validation metric of early stopping and
best-weight restoration (``"val_loss"`` or ``"val_pcc"``)."""

SPOT_DATA = {
    "layer": K.COUNTS_LAYER,
    "slide_key": K.SLIDE_KEY,
    "patient_key": K.PATIENT_KEY,
    "log_transform": True,
    "min_counts": 1,
    "standardize": "slide",
    "context_radius": "auto",
    "output_smoothing": "auto",
    "gene_selection": "variance",
    "gene_sets": "hallmark",
    "val_fraction": 0.2,
    "max_spots": 4096,
    "crop": "spatial",
    "augment": True,
}
"""``data_kwargs`` of spot models (see :func:`~spatialtranscriptformer.tl.fit`)."""

SUPERRES_PLAN = {
    "scales": (2, 4, 8, 16),
    "gradnorm": True,
    "warmup_epochs": 2,
    "weight_decay": 1e-2,
    "alpha": 1.5,
    "gradnorm_lr": 0.025,
}
"""``plan_kwargs`` of the super-resolution model: supervision scales (µm), GradNorm (Chen et al. 2018) and its
asymmetry ``alpha`` and learning rate, AdamW weight decay and warm-up epochs."""

SUPERRES_DATA = {"min_tissue": 0.05, "cache_dir": None, "image_key": None}
"""``data_kwargs`` of the super-resolution model: minimum tissue fraction of a patch, the token cache folder
(``None``: ``stf.settings.cache_dir / "superres"``) and the H&E image element."""

SUPERRES_MODEL = {"backbone": "virchow2", "weights": None, "patch_um": 256}
"""``model_kwargs`` of the super-resolution model beyond the decoder's (``arch``, ``hidden``, ``n_layers``,
``n_heads``, ``dropout``): the frozen backbone (registered name, :class:`~spatialtranscriptformer.pp.Backbone`
or module), its weights (``None``: the Hugging Face cache; ``"random"``: tests only) and the patch edge in µm."""

GROUPS = {
    "spot": {"plan_kwargs": SPOT_PLAN, "data_kwargs": SPOT_DATA},
    "probe": {"plan_kwargs": SPOT_PLAN, "data_kwargs": SPOT_DATA},
    "superres": {"plan_kwargs": SUPERRES_PLAN, "data_kwargs": SUPERRES_DATA},
}

SPOT_LEGACY = {
    **dict.fromkeys(SPOT_PLAN, "plan_kwargs"),
    **dict.fromkeys(SPOT_DATA, "data_kwargs"),
    "interactions": "model_kwargs",
    "pathway_init": "model_kwargs",
}
"""Former keywords of ``fit`` and the group they moved to (``gradient_clip_val`` and ``strategy`` are
``Trainer`` arguments and pass through ``**trainer_kwargs`` as they are)."""

SUPERRES_LEGACY = {
    **dict.fromkeys(SUPERRES_PLAN, "plan_kwargs"),
    **dict.fromkeys(SUPERRES_DATA, "data_kwargs"),
    **dict.fromkeys(("backbone", "weights", "patch_um", "arch", "hidden", "n_layers"), "model_kwargs"),
}
"""Former keywords of ``fit_superres`` and the group they moved to."""


def group(name: str, given: Mapping[str, Any] | None, defaults: Mapping[str, Any], *, caller: str) -> dict:
    """``defaults`` updated with ``given``; a ``ValueError`` names unknown keys and lists the valid ones."""
    if given is not None and not isinstance(given, Mapping):
        raise TypeError(f"{caller}: {name} must be a dict, got {type(given).__name__}.")
    given = dict(given or {})
    bad = sorted(set(given) - set(defaults))
    if bad:
        raise ValueError(f"{caller}: unknown {name} key(s) {bad}; valid keys: {sorted(defaults)}.")
    return {**defaults, **given}


def route_legacy(
    trainer_kwargs: dict, groups: dict[str, dict], legacy: Mapping[str, str], *, caller: str, renamed=None
) -> dict:
    """Move former keywords out of ``trainer_kwargs`` into their group (``FutureWarning``); return renamed ones.

    ``groups`` maps a group name to the dict the user passed (it is updated); ``renamed`` maps former
    keyword names to their new keyword names (returned with their values, e.g. ``{"patience":
    "early_stopping_patience"}``).
    """
    moved: dict[str, str] = {}
    out = {}
    for k in list(trainer_kwargs):
        if renamed and k in renamed:
            out[renamed[k]] = trainer_kwargs.pop(k)
            moved[k] = renamed[k]
        elif k in legacy:
            g = legacy[k]
            if k in groups[g]:
                raise ValueError(f"{caller}: {k!r} is given both as a keyword and in {g}; pass it once, in {g}.")
            groups[g][k] = trainer_kwargs.pop(k)
            moved[k] = f"{g}={{{k!r}: ...}}"
    if moved:
        where = "; ".join(f"{k} -> {v}" for k, v in moved.items())
        warnings.warn(
            f"{caller}: these keywords moved ({where}); the old form will be removed in a future version.",
            FutureWarning,
            stacklevel=3,
        )
    return out
