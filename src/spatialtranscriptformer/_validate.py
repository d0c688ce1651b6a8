"""Validation at the boundary: clear errors (or warnings where the data may be legitimate) naming the element.

Shared by the readers (``io``), preprocessing (``pp``) and tools (``tl``): raw counts (numeric, finite,
non-negative, integer, not log-normalised), unique gene names and spot ids, parameter ranges, finite
outputs, and file parsing errors that name the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

LOG_MAX = 20.0
"""Largest value of a matrix taken to be log-transformed (log1p of 5e8 counts); above: scaled counts."""
_SAMPLE = 2_000_000


def _values(X) -> np.ndarray:
    """The stored values of a dense or sparse matrix (a strided sample of at most 2e6 for large ones)."""
    if sp.issparse(X):
        data = X.data
    elif hasattr(X, "compute") and not isinstance(X, np.ndarray):  # dask: a sample of the first block
        data = np.asarray(X[: min(X.shape[0], 10_000)].compute())
    else:
        data = np.asarray(X)
    data = data.ravel()
    if data.size > _SAMPLE:
        data = data[:: data.size // _SAMPLE + 1]
    return data


def check_counts(X, *, element: str, hint: str = "", integer: str = "warn") -> None:
    """Check that ``X`` holds raw counts: numeric, finite, >= 0, integer and not log-normalised.

    Parameters
    ----------
    X
        Dense or sparse matrix.
    element
        What ``X`` is, for messages (``"slide 'A1' layer 'counts'"``).
    hint
        Appended to the messages (e.g. ``"pass layer= with the raw counts"``).
    integer
        Non-integer values that do not look log-normalised: ``"warn"`` (corrected or scaled counts may be
        legitimate), ``"error"`` (e.g. a Poisson likelihood), or ``"ignore"``. Values that look
        log-normalised (non-integer, all <= 20) are always an error: ``log1p`` would be applied twice.
    """
    hint = f" {hint.strip()}" if hint else ""
    if X.shape[0] == 0:
        raise ValueError(f"{element}: no spots (0 rows).")
    data = _values(X)
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise ValueError(f"{element}: expected numeric counts, got dtype {data.dtype}.{hint}")
    if data.size == 0:
        return
    finite = np.isfinite(data)
    if not finite.all():
        raise ValueError(f"{element}: {int((~finite).sum())} NaN/inf values found; raw counts expected.{hint}")
    if (data < 0).any():
        raise ValueError(
            f"{element}: {int((data < 0).sum())} negative values found (scaled or centred data?); raw counts "
            f"must be >= 0.{hint}"
        )
    if np.issubdtype(data.dtype, np.integer) or integer == "ignore":
        return
    frac = data != np.floor(data)
    if not frac.any():
        return
    example = float(data[frac][0])
    top = float(data.max())
    if top <= LOG_MAX:
        raise ValueError(
            f"{element} looks log-normalised (non-integer values such as {example:.4g}, maximum {top:.3g}), "
            f"but raw counts are needed here (log1p would be applied twice).{hint}"
        )
    msg = (
        f"{element} holds non-integer values (e.g. {example:.4g}, {frac.mean():.0%} of the stored values) where "
        f"raw integer counts are expected.{hint}"
    )
    if integer == "error":
        raise ValueError(msg)
    warnings.warn(msg, UserWarning, stacklevel=3)


def check_unique(index, *, what: str, element: str, hint: str = "") -> None:
    """Raise a ``ValueError`` listing duplicated names (gene names, spot ids) of ``element``."""
    idx = pd.Index(index)
    if idx.has_duplicates:
        dup = idx[idx.duplicated()].unique()
        raise ValueError(
            f"{element}: {len(dup)} duplicate {what} {dup[:5].tolist()}; {what} must be unique.{' ' + hint if hint else ''}"
        )


def check_table(adata, *, element: str) -> None:
    """Unique gene names and spot ids and at least one spot in a table used by ``pp`` / ``tl``."""
    if adata.n_obs == 0:
        raise ValueError(f"{element}: no spots (the table has 0 rows).")
    check_unique(adata.var_names, what="gene names", element=element,
                 hint="Aggregate them or call `adata.var_names_make_unique()` on purpose.")
    check_unique(adata.obs_names, what="spot ids", element=element)


def check_number(name: str, value: Any, *, minimum: float | None = None, exclusive: bool = False,
                 integer: bool = False, none_ok: bool = False) -> None:
    """Raise a ``ValueError`` (``TypeError`` for a non-number) for a parameter out of range."""
    if value is None and none_ok:
        return
    ok_type = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, ok_type):
        kind = "an integer" if integer else "a number"
        raise TypeError(f"{name} must be {kind}, got {value!r}.")
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}.")
    if minimum is not None and (value <= minimum if exclusive else value < minimum):
        raise ValueError(f"{name} must be {'>' if exclusive else '>='} {minimum}, got {value!r}.")


def check_finite_output(arr, *, what: str, hint: str = "") -> None:
    """Refuse NaN/inf in an output before it is written."""
    a = np.asarray(arr)
    bad = ~np.isfinite(a)
    if bad.any():
        raise ValueError(
            f"{what}: {int(bad.sum())} of {a.size} values are NaN/inf; nothing was written."
            f"{' ' + hint if hint else ''}"
        )


@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str = "file") -> Iterator[None]:
    """Re-raise a parser's error (truncated gz / JPEG / h5 / parquet / TIFF, bad JSON) as a ``ValueError`` naming the file."""
    path = Path(path)
    try:
        yield
    except (FileNotFoundError, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001  (any parser error: name the file)
        text = str(err)
        if str(path) in text or (path.name in text and isinstance(err, ValueError | KeyError)):
            raise
        raise ValueError(f"Cannot read {what} {path}: {type(err).__name__}: {text or 'no details'}") from err


def read_json(path: str | os.PathLike, what: str = "JSON file") -> dict:
    """A JSON object from ``path``; a ``ValueError`` naming the file when it is not valid JSON or not an object."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path} is not UTF-8 text: {err}.") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON: {err}.") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what} {path} must hold a JSON object, got {type(obj).__name__}.")
    return obj


def header_duplicates(path: str | os.PathLike, *, sep: str = "\t") -> list[str]:
    """Column names that occur more than once in the header line of a (gzipped) text table."""
    import gzip

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with reading(path, "table"), opener(path, "rt") as fh:
        header = fh.readline().rstrip("\r\n").split(sep)
    seen, dup = set(), []
    for h in header[1:]:
        if h in seen and h not in dup:
            dup.append(h)
        seen.add(h)
    return dup


MPP_RANGE = (0.1, 20.0)
"""Plausible microns per pixel of an H&E image used with spot data (40x scans ~0.25, low-res images ~10)."""


def grid_mpp(array_xy: np.ndarray, pixel_xy: np.ndarray, *, pitch_um: float, source: str,
             max_residual: float = 0.25) -> float:
    """Microns per pixel from a least-squares fit of pixel vs array coordinates of a spot grid, checked.

    The fit must explain the positions (root-mean-square residual at most ``max_residual`` grid steps)
    and give a µm/px within :data:`MPP_RANGE`; otherwise a ``ValueError`` names the problem and asks for
    ``mpp=``.
    """
    array_xy = np.asarray(array_xy, dtype=float)
    pixel_xy = np.asarray(pixel_xy, dtype=float)
    if len(array_xy) < 3 or not (np.isfinite(array_xy).all() and np.isfinite(pixel_xy).all()):
        raise ValueError(f"{source}: cannot estimate microns per pixel from {len(array_xy)} spot positions; pass mpp=.")
    scales, resid = [], []
    for d in range(2):
        a = np.c_[array_xy[:, d], np.ones(len(array_xy))]
        coef, *_ = np.linalg.lstsq(a, pixel_xy[:, d], rcond=None)
        scales.append(abs(coef[0]))
        resid.append(pixel_xy[:, d] - a @ coef)
    step = float(np.mean(scales))
    if not np.isfinite(step) or step <= 0:
        raise ValueError(f"{source}: cannot estimate microns per pixel from the spot grid (degenerate coordinates); pass mpp=.")
    rms = float(np.sqrt(np.mean(np.square(resid))))
    if rms > max_residual * step:
        raise ValueError(
            f"{source}: the pixel positions do not follow the array grid (RMS residual {rms:.1f} px = "
            f"{rms / step:.2f} grid steps of {step:.1f} px); are the array and pixel columns of the same spots? "
            "Pass mpp= to skip the estimate."
        )
    mpp = pitch_um / step
    lo, hi = MPP_RANGE
    if not lo <= mpp <= hi:
        raise ValueError(
            f"{source}: the spot grid gives {mpp:.3g} µm/px ({step:.3g} px per {pitch_um:g} µm step), outside the "
            f"plausible range {lo}–{hi} µm/px; are the pixel coordinates in pixels of the image? Pass mpp= if it is right."
        )
    return mpp


def check_spot_extent(coords: np.ndarray, image_shape: tuple[int, int], *, mpp: float, source: str,
                      min_fraction: float = 0.25) -> None:
    """Warn when the spots cover only a small corner of the image (coordinates of a downscaled image?)."""
    coords = np.asarray(coords, dtype=float)
    if len(coords) < 3:
        return
    h, w = image_shape
    span = coords.max(0) - coords.min(0)
    fx, fy = span[0] / max(w, 1), span[1] / max(h, 1)
    if fx < min_fraction and fy < min_fraction:
        warnings.warn(
            f"{source}: the spots cover only {fx:.0%} x {fy:.0%} of the {w} x {h} px image (at {mpp:.3g} µm/px); "
            "are the pixel coordinates in pixels of this image (not of a downscaled copy)? Check the image "
            "and the µm/px, or pass mpp=.",
            UserWarning,
            stacklevel=3,
        )


def check_config_types(cfg: dict, types: dict[str, type | tuple], *, path: str | os.PathLike) -> None:
    """Raise a ``ValueError`` naming the file and the entry when a configuration entry has the wrong type."""
    for key, t in types.items():
        if key in cfg and cfg[key] is not None and (not isinstance(cfg[key], t) or isinstance(cfg[key], bool) and bool not in (t if isinstance(t, tuple) else (t,))):
            want = " or ".join(x.__name__ for x in (t if isinstance(t, tuple) else (t,)))
            raise ValueError(f"{path}: entry {key!r} must be {want}, got {type(cfg[key]).__name__} {cfg[key]!r:.60}.")


def check_fit_params(**params) -> None:
    """Ranges of the numeric options of :func:`~spatialtranscriptformer.tl.fit` (each named in the error)."""
    rules = {
        "lr": {"minimum": 0, "exclusive": True},
        "weight_decay": {"minimum": 0},
        "pcc_weight": {"minimum": 0},
        "pathway_loss_weight": {"minimum": 0},
        "warmup_epochs": {"minimum": 0, "integer": True},
        "min_counts": {"minimum": 0},
        "max_spots": {"minimum": 2, "integer": True, "none_ok": True},
        "early_stopping_patience": {"minimum": 1, "integer": True, "none_ok": True},
        "gradient_clip_val": {"minimum": 0, "exclusive": True, "none_ok": True},
        "seed": {"integer": True},
    }
    for name, value in params.items():
        if name in rules:
            check_number(name, value, **rules[name])
    vf = params.get("val_fraction")
    if vf is not None:
        check_number("val_fraction", vf, minimum=0, exclusive=True)
        if vf >= 1:
            raise ValueError(f"val_fraction must be < 1, got {vf!r}.")


def settings_diff(old: dict, new: dict, *, prefix: str = "") -> list[str]:
    """Entries that differ between two (nested) settings dicts, as ``"key: old -> new"``."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k, "<absent>"), new.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += settings_diff(a, b, prefix=f"{prefix}{k}.")
        elif _norm(a) != _norm(b):
            out.append(f"{prefix}{k}: {a!r:.80} (checkpoint) vs {b!r:.80} (now)")
    return out


def _norm(v):
    if isinstance(v, tuple | list):
        return [_norm(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def check_tables(data, *, table_key: str | None = None, caller: str) -> None:
    """:func:`check_table` on the table of every slide of ``data`` (one slide or a list)."""
    from ._data import as_slide_list, get_table

    slides = as_slide_list(data)
    for i, s in enumerate(slides):
        check_table(get_table(s, table_key), element=f"{caller}: slide {i}" if len(slides) > 1 else caller)


def check_target_counts(y, *, slide_id: str, layer: str | None, loss: str, log_transform: bool) -> None:
    """Training targets: raw integer counts for the count losses, raw counts (not log-normalised) for ``log1p``."""
    element = f"Slide {slide_id!r}: layer {layer!r}" if layer else f"Slide {slide_id!r}: X"
    hint = "Pass layer= with the raw counts (or log_transform=False for targets already transformed)."
    from .module._losses import get_loss

    if get_loss(loss).counts:
        check_counts(y, element=element, hint=f"Loss {loss!r} needs raw integer counts; pass layer= with them.",
                     integer="error")
    elif log_transform:
        check_counts(y, element=element, hint=hint, integer="warn")


def warn_duplicate_genes(dups, *, source: str, how: str) -> None:
    """Warn that gene names occur several times in ``source`` and how they were told apart."""
    dups = list(dups)
    if dups:
        warnings.warn(
            f"{source}: {len(dups)} duplicate gene names {dups[:5]} (e.g. gene symbols shared by several genes); "
            f"{how}. Aggregate or drop them if they measure the same gene.",
            UserWarning,
            stacklevel=3,
        )


def unique_gene_names(adata, *, source: str) -> None:
    """Make duplicate ``var_names`` unique (scanpy's ``-1`` suffixes) with a warning naming them."""
    if adata.var_names.has_duplicates:
        dups = adata.var_names[adata.var_names.duplicated()].unique().tolist()
        adata.var_names_make_unique()
        warn_duplicate_genes(dups, source=source, how="the repeats were renamed with suffixes '-1', '-2', ...")


def check_tiff_complete(tf, path: str | os.PathLike) -> None:
    """Raise a ``ValueError`` naming the file when pixel data of a TIFF lie beyond its end (a truncated file).

    Lazy reading would otherwise open such a file without complaint and fail much later, when tiles
    are cut. Only the tile / strip tables are read, no pixels.
    """
    size = Path(path).stat().st_size
    for series in tf.series[:1]:
        for i, level in enumerate(series.levels):
            for page in level.pages:
                if page is None:
                    raise ValueError(f"{path}: level {i} of the TIFF has a missing page (truncated or corrupt file).")
                offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                counts = np.asarray(page.databytecounts, dtype=np.int64)
                if offsets.size and int((offsets + counts).max()) > size:
                    raise ValueError(
                        f"{path}: the TIFF is truncated: level {i} needs {int((offsets + counts).max())} bytes, the "
                        f"file has {size}. Copy or download it again."
                    )
