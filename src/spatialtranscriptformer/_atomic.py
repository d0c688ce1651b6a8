"""Atomic outputs: write to a temporary sibling, move into place when complete, one writer at a time.

Every file or folder (model folder, zarr store, report file, figure) the library writes goes through
:func:`atomic_output`:

1. a lock on the target (an ``fcntl.flock`` on the sibling ``.<name>.stf-lock``; an ``O_EXCL`` lock file
   where ``fcntl`` does not exist) refuses a second concurrent writer with :class:`OutputLockedError`;
2. leftovers of earlier writers that died (``.<name>.stf-tmp-<pid>-<hex>``, ``.<name>.stf-old-<pid>-<hex>``)
   are removed, and an old output moved aside by a writer killed before it could move the new one in
   is moved back first, so nothing is ever lost;
3. the caller writes into a temporary sibling (same folder, hence same file system);
4. only when the caller returns without error is the temporary moved into place: a file with
   :func:`os.replace` (atomic), a folder by renaming the old one aside, renaming the new one in and
   only then deleting the old one (on failure the old one is renamed back). An error (including
   ``KeyboardInterrupt`` or a full disk) removes the temporary and leaves the previous output as it was.

A ``SIGKILL`` cannot be caught: it leaves the previous output intact and a temporary that the next
writer of the same target removes (step 2).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from ._logging import logger

_TMP, _OLD, _LOCK = "stf-tmp", "stf-old", "stf-lock"


class OutputLockedError(RuntimeError):
    """Another process (or another call in this one) is writing the same output right now."""


def _hidden(target: Path, tag: str, suffix: str = "") -> Path:
    return target.with_name(f".{target.name}.{tag}{suffix}")


def temporary_sibling(target: str | os.PathLike, tag: str = _TMP) -> Path:
    """A new, unused hidden sibling of ``target``: ``.<name>.<tag>-<pid>-<hex><suffix>``.

    The suffix is kept for writers that infer the format from it (e.g. matplotlib).
    """
    target = Path(target)
    return _hidden(target, tag, f"-{os.getpid()}-{uuid.uuid4().hex[:8]}{target.suffix}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's process)
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def leftovers(target: str | os.PathLike) -> list[Path]:
    """Temporaries and moved-aside copies of ``target`` left by earlier writers (any state)."""
    target = Path(target)
    pat = re.compile(rf"^\.{re.escape(target.name)}\.(?:{_TMP}|{_OLD})-\d+-[0-9a-f]{{8}}")
    if not target.parent.is_dir():
        return []
    return sorted(p for p in target.parent.iterdir() if pat.match(p.name))


def clean_stale(target: str | os.PathLike, *, locked: bool = False) -> list[Path]:
    """Remove leftovers of writers of ``target`` that are gone; restore an old output moved aside.

    A leftover is stale when no writer holds the target's lock (a killed process's lock is released
    by the operating system): with ``locked`` the caller holds it; otherwise the lock is taken here
    for the cleaning, and nothing is done while another writer holds it.

    Returns
    -------
    The paths removed (or restored).
    """
    target = Path(target)
    if not locked:
        if not leftovers(target):
            return []
        lock = _Lock(target)
        try:
            lock.acquire()
        except OutputLockedError:
            return []  # its writer is still running
        try:
            return clean_stale(target, locked=True)
        finally:
            lock.release()
    done = []
    for p in leftovers(target):
        if f".{_OLD}-" in p.name[len(target.name) + 1 :] and not os.path.lexists(target):
            # a writer died between moving the old output aside and moving the new one in: put it back
            os.rename(p, target)
            logger.warning("Restored %s from %s (left by an interrupted write).", target, p.name)
        else:
            _remove(p)
        done.append(p)
    return done


_LOCK_FILE = re.compile(rf"^\.(?P<name>.+)\.{_LOCK}$")
_ANY = re.compile(rf"^\.(?P<name>.+)\.(?P<tag>{_TMP}|{_OLD})-(?P<pid>\d+)-[0-9a-f]{{8}}")


def clean_stale_siblings(folder: str | os.PathLike) -> list[Path]:
    """:func:`clean_stale` for the leftovers of *any* output in ``folder`` (whose writers are gone).

    Outputs with generated names (e.g. a default zarr store in the cache folder) are never written
    twice, so a later writer of the same name would never find their leftovers.
    """
    folder = Path(folder)
    try:
        entries = [p.name for p in folder.iterdir()]
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []
    names = {m.group("name") for n in entries if (m := _ANY.match(n))}
    done = []
    for name in sorted(names):
        done += clean_stale(folder / name)
    for n in entries:  # lock files of killed writers (a free lock): taking and releasing one removes it
        m = _LOCK_FILE.match(n)
        if m:
            lock = _Lock(folder / m.group("name"))
            try:
                lock.acquire()
            except (OutputLockedError, OSError):
                continue
            lock.release()
            done.append(folder / n)
    return done


class _Lock:
    """An exclusive, non-blocking lock on ``target`` through its sibling lock file."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.path = _hidden(target, _LOCK)
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover (Windows)
            return self._acquire_excl()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise self._busy() from None
                raise
            # the holder before us may have removed the lock file after we opened it: lock the current one
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                self.fd = fd
                return None
            os.close(fd)

    def _acquire_excl(self) -> None:  # pragma: no cover (Windows)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and _pid_alive(pid):
                    raise self._busy() from None
                _remove(self.path)  # a dead writer's lock
                continue
            os.write(fd, str(os.getpid()).encode())
            self.fd = fd
            return
        raise self._busy()

    def _busy(self) -> OutputLockedError:
        try:
            who = f" (process {int(self.path.read_text())})"
        except (OSError, ValueError):
            who = ""
        return OutputLockedError(
            f"{self.target} is being written by another writer{who}; wait for it to finish or write elsewhere. "
            f"(Lock file: {self.path}.)"
        )

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still holding the lock: see the samestat check in acquire
        os.close(self.fd)
        self.fd = None


@contextlib.contextmanager
def target_lock(target: str | os.PathLike) -> Iterator[None]:
    """Hold the write lock of ``target``; :class:`OutputLockedError` if another writer holds it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = _Lock(target)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _commit(tmp: Path, target: Path, *, is_dir: bool) -> None:
    """Move ``tmp`` into place; an existing ``target`` is removed only once ``tmp`` is in place."""
    if not is_dir and not (target.is_dir() and not target.is_symlink()):
        with contextlib.suppress(OSError):
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, target)  # atomic for files
        _fsync_dir(target.parent)
        return
    if not os.path.lexists(target):
        os.rename(tmp, target)
        _fsync_dir(target.parent)
        return
    old = temporary_sibling(target, _OLD)
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    _fsync_dir(target.parent)
    _remove(old)


@contextlib.contextmanager
def atomic_output(
    target: str | os.PathLike,
    *,
    kind: str = "file",
    overwrite: bool = True,
    replaceable: Callable[[Path], str | None] | None = None,
) -> Iterator[Path]:
    """Write ``target`` through a temporary sibling; move it into place only when the block succeeds.

    Parameters
    ----------
    target
        The output file or folder.
    kind
        ``"file"`` (the block writes the file at the yielded path) or ``"dir"`` (the yielded folder exists
        and is empty; the block fills it).
    overwrite
        Replace an existing ``target`` (a folder only when empty, unless ``overwrite``); ``False`` raises
        :class:`FileExistsError` before anything is written.
    replaceable
        For folders: called with an existing, non-empty ``target`` when ``overwrite`` is set; returns
        ``None`` if it may be replaced, else the reason it may not (raised as :class:`FileExistsError`),
        so that a folder that holds something else is never deleted.

    Yields
    ------
    The temporary path to write to.
    """
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}.")
    target = Path(target)
    with target_lock(target):
        clean_stale(target, locked=True)
        clean_stale_siblings(target.parent)
        if os.path.lexists(target):
            if kind == "dir" and not target.is_dir():
                raise FileExistsError(f"{target} exists and is not a folder.")
            if kind == "file" and target.is_dir():
                raise FileExistsError(f"{target} is a folder; expected a file path.")
            nonempty = kind == "file" or any(target.iterdir())
            if nonempty and not overwrite:
                what = "exists" if kind == "file" else "exists and is not empty"
                raise FileExistsError(f"{target} {what}; pass overwrite=True to replace it.")
            if nonempty and replaceable is not None:
                why = replaceable(target)
                if why:
                    raise FileExistsError(f"{target} was not replaced: {why}")
        tmp = temporary_sibling(target)
        if kind == "dir":
            tmp.mkdir()
        try:
            yield tmp
            if kind == "file" and not tmp.is_file():
                raise FileNotFoundError(f"Nothing was written for {target}.")
            _commit(tmp, target, is_dir=kind == "dir")
        except BaseException:
            _remove(tmp)
            raise


def atomic_write_text(target: str | os.PathLike, text: str, *, encoding: str = "utf-8", overwrite: bool = True) -> None:
    """Write ``text`` to ``target`` atomically (see :func:`atomic_output`)."""
    with atomic_output(target, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding=encoding)


def write_spatialdata(sdata, target: str | os.PathLike, *, overwrite: bool = False) -> None:
    """``sdata.write`` into a temporary zarr store moved into place when complete (``sdata.path`` = ``target``)."""
    import warnings

    target = Path(target)
    with atomic_output(target, kind="dir", overwrite=overwrite, replaceable=_is_zarr_store) as tmp:
        tmp.rmdir()  # spatialdata creates the store itself
        with warnings.catch_warnings():  # zarr's notice about a future default, not actionable here
            warnings.filterwarnings("ignore", message=".*autosharding.*")
            sdata.write(tmp, overwrite=False)
    with contextlib.suppress(AttributeError, TypeError, ValueError):
        sdata.path = target


def _is_zarr_store(path: Path) -> str | None:
    markers = ("zarr.json", ".zgroup", ".zattrs")
    if any((path / m).is_file() for m in markers):
        return None
    return "it is not a zarr store (no zarr.json / .zgroup), so it is left alone."


def saved_model_check(path: Path) -> str | None:
    """``replaceable`` for model folders: only a folder holding a saved model of this library is replaced."""
    import json

    cfg = path / "config.json"
    try:
        fmt = json.loads(cfg.read_text()).get("format", "")
    except (OSError, ValueError, AttributeError):
        fmt = ""
    if isinstance(fmt, str) and fmt.startswith("spatialtranscriptformer."):
        return None
    return "it is not empty and does not hold a saved spatialtranscriptformer model, so it is left alone."
