"""Resuming :func:`~spatialtranscriptformer.tl.fit` from a checkpoint: only with the very same run settings."""

from __future__ import annotations

import hashlib
import os
import warnings

import numpy as np

RESUMABLE = ("max_epochs",)
"""Fit parameters that may change when resuming (training continues to the new ``max_epochs``)."""


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if v is None or isinstance(v, bool | int | float | str):
        return v
    return repr(v)


def run_settings(fit_params: dict, model_kwargs: dict, arrays: dict[str, np.ndarray]) -> dict:
    """Everything that defines a training run, stored in its checkpoints (plain types only).

    The fit parameters (seed, lr, weight decay, dropout and the other model hyperparameters, losses,
    splits, crops, ...), and a digest of the arrays derived from the training data (gene means, pathway
    membership), so that a run resumed on other data or with other settings is refused.
    """
    digest = hashlib.sha1()
    for k in sorted(arrays):
        a = np.ascontiguousarray(np.asarray(arrays[k], dtype=np.float32))
        digest.update(k.encode() + str(a.shape).encode() + a.tobytes())
    fit = {k: v for k, v in fit_params.items() if k not in RESUMABLE}
    return {"fit": _jsonable(fit), "model_kwargs": _jsonable(model_kwargs), "training_data_digest": digest.hexdigest()}


def check_resume(old: dict | None, new: dict, path: str | os.PathLike) -> None:
    """Raise a ``ValueError`` naming every setting of this run that differs from the checkpoint's run."""
    from .._validate import settings_diff

    if old is None:
        raise ValueError(f"{path} is not a checkpoint written by stf.tl.fit.")
    if "hparams" not in old:
        warnings.warn(
            f"{path} was written by an older version that did not record the run's hyper-parameters; only the "
            "model, genes and embedding are checked.",
            UserWarning,
            stacklevel=3,
        )
        old = {**old, "hparams": new["hparams"]}
    diff = settings_diff(old, new)
    if diff:
        raise ValueError(
            f"Cannot resume from {path}: {len(diff)} setting(s) differ from the interrupted run: "
            + "; ".join(diff[:12])
            + ". Resume with the same data and settings (only max_epochs may change)."
        )
