"""Library-wide settings: ``stf.settings``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ._logging import logger

_ENV_DATA_DIR = "STF_DATA_DIR"
_ENV_CACHE_DIR = "STF_CACHE_DIR"


class Settings:
    """Global options of :mod:`spatialtranscriptformer`.

    Attributes
    ----------
    device
        ``"auto"`` (CUDA when available, else CPU), or any :class:`torch.device` string.
    progress
        Show :mod:`tqdm` progress bars.
    verbosity
        Level of the ``"spatialtranscriptformer"`` logger (``logging.WARNING`` by default).
    data_dir
        Folder with local copies of datasets (e.g. ``<data_dir>/her2st/<section>``). Defaults to the
        ``STF_DATA_DIR`` environment variable, else ``~/.cache/spatialtranscriptformer/data``.
    cache_dir
        Folder for downloads and cached features. Defaults to ``STF_CACHE_DIR``, else
        ``~/.cache/spatialtranscriptformer``.
    """

    def __init__(self) -> None:
        self.device: str = "auto"
        self.progress: bool = True
        self._data_dir: Path | None = None
        self._cache_dir: Path | None = None

    @property
    def verbosity(self) -> int:
        """Level of the library logger."""
        return logger.level or logging.WARNING

    @verbosity.setter
    def verbosity(self, level: int | str) -> None:
        logger.setLevel(level)

    @property
    def cache_dir(self) -> Path:
        """Folder for downloads and caches."""
        if self._cache_dir is not None:
            return self._cache_dir
        env = os.environ.get(_ENV_CACHE_DIR)
        return Path(env) if env else Path.home() / ".cache" / "spatialtranscriptformer"

    @cache_dir.setter
    def cache_dir(self, path: str | os.PathLike | None) -> None:
        self._cache_dir = None if path is None else Path(path)

    @property
    def data_dir(self) -> Path:
        """Folder with local dataset copies."""
        if self._data_dir is not None:
            return self._data_dir
        env = os.environ.get(_ENV_DATA_DIR)
        return Path(env) if env else self.cache_dir / "data"

    @data_dir.setter
    def data_dir(self, path: str | os.PathLike | None) -> None:
        self._data_dir = None if path is None else Path(path)

    def torch_device(self, device: str | None = None):
        """Resolve ``device`` (or :attr:`device`) to a :class:`torch.device`."""
        import torch

        dev = device or self.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.device(dev)

    def __repr__(self) -> str:
        return (
            f"Settings(device={self.device!r}, progress={self.progress}, verbosity={self.verbosity}, "
            f"data_dir={str(self.data_dir)!r}, cache_dir={str(self.cache_dir)!r})"
        )


settings = Settings()
