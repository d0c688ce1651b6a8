"""Library-wide settings: ``stf.settings``."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from ._logging import logger

_ENV_DATA_DIR = "STF_DATA_DIR"
_ENV_CACHE_DIR = "STF_CACHE_DIR"
_ENV_THREADS = ("STF_N_THREADS", "OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK")
"""Environment variables giving a thread count, in order of precedence."""


def _cgroup_cpu_limit() -> int | None:
    """CPUs allowed by a cgroup v2 / v1 CPU quota (containers, Slurm, Kubernetes), or ``None``."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return max(1, int(-(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return max(1, -(-quota // period))
    except (OSError, ValueError):
        pass
    return None


def available_cpus() -> int:
    """CPUs this process may use: its CPU affinity, capped by a cgroup CPU quota (never the host's total)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        n = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    return max(1, min(n, limit) if limit else n)


def default_n_threads() -> int:
    """The ``"auto"`` thread count.

    ``STF_N_THREADS``, ``OMP_NUM_THREADS`` or ``SLURM_CPUS_PER_TASK`` if set, else :func:`available_cpus`.
    """
    for var in _ENV_THREADS:
        try:
            n = int(os.environ.get(var, ""))
        except ValueError:
            continue
        if n >= 1:
            return n
    return available_cpus()


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
    n_threads
        CPU threads of torch's intra-op pool while :func:`~spatialtranscriptformer.tl.fit`,
        :func:`~spatialtranscriptformer.tl.predict` and :func:`~spatialtranscriptformer.pp.embed` run (the
        previous setting is restored afterwards). ``"auto"`` (default): the ``STF_N_THREADS``,
        ``OMP_NUM_THREADS`` or ``SLURM_CPUS_PER_TASK`` environment variable if set, else the CPUs this
        process may use (its CPU affinity and cgroup quota, so a container or a Slurm job never starts
        one thread per core of the host, as torch's own default does). An integer fixes the count;
        ``None`` leaves torch's setting alone. On a machine shared with other jobs, or for small models,
        ``1`` is often several times faster: threads that wait for busy cores stall every operation.
    """

    def __init__(self) -> None:
        self.device: str = "auto"
        self.progress: bool = True
        self._n_threads: int | str | None = "auto"
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

    @property
    def n_threads(self) -> int | str | None:
        """Torch intra-op threads used by fit / predict / embed (``"auto"``, an integer or ``None``)."""
        return self._n_threads

    @n_threads.setter
    def n_threads(self, value: int | str | None) -> None:
        if value is None or value == "auto":
            self._n_threads = value
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"n_threads must be a positive integer, 'auto' or None, got {value!r}.")
        self._n_threads = int(value)

    def resolved_n_threads(self) -> int | None:
        """The thread count :attr:`n_threads` stands for (``None``: torch's setting is left alone)."""
        if self._n_threads is None:
            return None
        return default_n_threads() if self._n_threads == "auto" else int(self._n_threads)

    @contextlib.contextmanager
    def torch_threads(self) -> Iterator[None]:
        """Run a block with torch's intra-op thread count set to :attr:`n_threads`, then restore it."""
        import torch

        n = self.resolved_n_threads()
        old = torch.get_num_threads()
        if n is None or n == old:
            yield
            return
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(old)

    def torch_device(self, device: str | None = None):
        """Resolve ``device`` (or :attr:`device`) to a :class:`torch.device`."""
        import torch

        dev = device or self.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.device(dev)

    def __repr__(self) -> str:
        return (
            f"Settings(device={self.device!r}, n_threads={self.n_threads!r}, progress={self.progress}, verbosity={self.verbosity}, "
            f"data_dir={str(self.data_dir)!r}, cache_dir={str(self.cache_dir)!r})"
        )


settings = Settings()
