"""The base class of every trained model: configuration, genes, history and one folder format.

A saved model is a folder written whole into a temporary sibling and moved into place when complete
(:mod:`~spatialtranscriptformer._atomic`):

- ``config.json``: ``format`` (``"spatialtranscriptformer.model"``), ``version``, ``kind`` (``"spot"``: a
  :class:`~spatialtranscriptformer.tl.TrainedModel`; ``"superres"``: a
  :class:`~spatialtranscriptformer.tl.SuperResModel`), ``model`` (registered name), ``genes``, ``loss``,
  ``target_space``, ``fit`` (the parameters of the fit), ``best_epoch`` and what the kind needs to rebuild
  the model;
- ``weights.pt`` (torch state dicts, read back with ``weights_only=True``) or ``ridge.npz``, ``arrays.npz``
  (read without pickle), ``history.csv`` and, for some super-resolution models, ``backbone.pt``.

No code is ever unpickled. Version-1 folders of both kinds (before the two were one format) are read too.
"""

from __future__ import annotations

import abc
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from .._logging import logger

FORMAT = "spatialtranscriptformer.model"
FORMAT_VERSION = 2
LEGACY_FORMATS = {"spatialtranscriptformer.model": "spot", "spatialtranscriptformer.superres": "superres"}
"""Version-1 formats (one per kind) and the kind each holds."""
CONFIG_FILE, HISTORY_FILE = "config.json", "history.csv"


def _jsonable(x: Any):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray | tuple | set):
        return list(x.tolist() if isinstance(x, np.ndarray) else x)
    if isinstance(x, os.PathLike):
        return str(x)
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def read_config(path: str | os.PathLike) -> tuple[dict, str]:
    """The configuration of the model saved in folder ``path`` and its kind (format and version checked)."""
    from .._validate import read_json

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"No saved model at {path} (folder not found).")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"No saved model in {path} ({CONFIG_FILE} not found).")
    cfg = read_json(cfg_path, "model configuration")
    fmt, version = cfg.get("format"), cfg.get("version")
    if fmt not in LEGACY_FORMATS:
        raise ValueError(f"{cfg_path} is not a saved spatialtranscriptformer model (format={fmt!r}).")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise ValueError(f"{cfg_path} has format version {version!r}; this version reads <= {FORMAT_VERSION}.")
    kind = cfg.get("kind") if version >= 2 else LEGACY_FORMATS[fmt]
    if version >= 2 and fmt != FORMAT:
        raise ValueError(f"{cfg_path}: format {fmt!r} with version {version} (expected {FORMAT!r}).")
    if kind not in BaseModel._KINDS:
        raise ValueError(f"{cfg_path}: unknown model kind {kind!r}; known: {sorted(BaseModel._KINDS)}.")
    return cfg, kind


class BaseModel(abc.ABC):
    """What every trained model has: a registered name, genes, loss, fit parameters and training history.

    Subclasses (:class:`~spatialtranscriptformer.tl.TrainedModel` for spot models,
    :class:`~spatialtranscriptformer.tl.SuperResModel` for 2 µm super-resolution) add what they predict
    from and how. All are saved in one folder format (:meth:`save`) and read back by :meth:`load`
    (``BaseModel.load`` reads any kind); :meth:`predict` and :meth:`evaluate` apply them to slides.

    Attributes
    ----------
    model_name
        Registered name (``"stf"``, ``"he2rna"``, ..., ``"ridge"``, ``"superres"``).
    genes
        Predicted genes, in output order.
    loss
        Training loss (an entry of the loss table).
    fit_params
        Parameters of the fit (also ``params``).
    history
        Per-epoch training history (``epoch``, ``train_loss``, ``val_loss``, ``lr``, ...).
    best_epoch
        Epoch whose weights were restored (``None`` without validation: the last weights).
    """

    kind: ClassVar[str] = ""
    """``"spot"`` or ``"superres"``: which class a saved folder holds."""
    _KINDS: ClassVar[dict[str, type[BaseModel]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("kind"):
            BaseModel._KINDS[cls.kind] = cls

    def __init__(
        self,
        *,
        model_name: str,
        genes,
        loss: str,
        fit_params: dict | None = None,
        history: pd.DataFrame | None = None,
        best_epoch: int | None = None,
    ) -> None:
        self.model_name = str(model_name)
        self.genes = [str(g) for g in genes]
        self.loss = str(loss)
        self.fit_params = dict(fit_params or {})
        self.history = history
        self.best_epoch = best_epoch

    # --- description ----------------------------------------------------------------------------------
    @property
    def params(self) -> dict:
        """The parameters of the fit (same as ``fit_params``)."""
        return self.fit_params

    @property
    @abc.abstractmethod
    def target_space(self) -> str:
        """What predictions are: ``"log1p"`` (log1p counts) or ``"counts"``."""

    def _config(self) -> dict:
        """Entries of ``config.json`` that only this kind has."""
        return {}

    @property
    def config(self) -> dict:
        """JSON description of the model (what :meth:`save` writes to ``config.json``)."""
        return {
            "format": FORMAT, "version": FORMAT_VERSION, "kind": self.kind, "model": self.model_name,
            "genes": list(self.genes), "loss": self.loss, "target_space": self.target_space,
            **self._config(), "fit": self.fit_params, "best_epoch": self.best_epoch,
        }  # fmt: skip

    # --- persistence ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def _write_state(self, folder: Path) -> None:
        """Write weights and arrays into ``folder`` (a new, empty temporary folder)."""

    @classmethod
    @abc.abstractmethod
    def _read(cls, path: Path, cfg: dict, **kwargs: Any) -> BaseModel:
        """Rebuild the model saved in ``path`` from its checked configuration ``cfg``."""

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write the model to folder ``path`` (``config.json``, weights, arrays, ``history.csv``).

        The folder is written whole into a temporary sibling and moved into place only when complete
        (:mod:`~spatialtranscriptformer._atomic`): an interrupted save leaves the previous model as it
        was, never one model's configuration beside another's weights. ``overwrite`` replaces only an
        empty folder or a saved model; a concurrent save to the same folder is refused.

        Parameters
        ----------
        path
            Folder to write (created; must be empty unless ``overwrite``).
        overwrite
            Replace a model already saved in ``path`` (never a folder holding anything else).
        """
        from .._atomic import atomic_output, saved_model_check

        text = json.dumps(self.config, indent=1, default=_jsonable)  # fails here, before anything is written
        with atomic_output(path, kind="dir", overwrite=overwrite, replaceable=saved_model_check) as tmp:
            self._write_state(tmp)
            if self.history is not None:
                pd.DataFrame(self.history).to_csv(tmp / HISTORY_FILE, index=False)
            (tmp / CONFIG_FILE).write_text(text)
        logger.info("Saved %r to %s.", self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs: Any) -> BaseModel:
        """Read a model written by :meth:`save`; its weights must match its configuration exactly.

        ``BaseModel.load`` returns whichever kind the folder holds; a subclass's ``load`` refuses another
        kind. ``kwargs`` go to the kind's reader (e.g. ``backbone=`` of
        :meth:`~spatialtranscriptformer.tl.SuperResModel.load`).
        """
        path = Path(path)
        cfg, kind = read_config(path)
        target = BaseModel._KINDS[kind]
        if cls is not BaseModel and not issubclass(target, cls):
            raise ValueError(
                f"{path / CONFIG_FILE} is not a saved {cls.__name__} (format {cfg.get('format')!r}, kind {kind!r}: a "
                f"{target.__name__}); load it with {target.__name__}.load or stf.tl.BaseModel.load."
            )
        model = target._read(path, cfg, **kwargs)
        logger.info("Loaded %r from %s.", model, path)
        return model

    @staticmethod
    def read_history(path: Path) -> pd.DataFrame | None:
        """``history.csv`` of a saved model (``None`` when it has none)."""
        from .._validate import reading

        hist_path = Path(path) / HISTORY_FILE
        if not hist_path.is_file():
            return None
        with reading(hist_path, "training history"):
            return pd.read_csv(hist_path)

    # --- application ----------------------------------------------------------------------------------
    def predict(self, data, **kwargs: Any):
        """:func:`stf.tl.predict(data, self, **kwargs) <spatialtranscriptformer.tl.predict>`."""
        from ._predict import predict

        return predict(data, self, **kwargs)

    @abc.abstractmethod
    def evaluate(self, data, **kwargs: Any) -> pd.DataFrame:
        """Predict held-out ``data`` (on copies: the data is not modified) and score it against its measurements."""


def as_model(model: Any) -> BaseModel:
    """A trained model, or the model saved in a folder; a ``TypeError`` otherwise."""
    if isinstance(model, BaseModel):
        return model
    if isinstance(model, str | os.PathLike):
        return BaseModel.load(model)
    raise TypeError(
        f"model must be a trained model (from stf.tl.fit) or the folder of a saved one, got {type(model).__name__}."
    )
