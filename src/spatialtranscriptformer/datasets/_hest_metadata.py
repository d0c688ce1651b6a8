"""The HEST-1k metadata table: find it, download it, select samples by its fields."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._logging import logger
from .._settings import settings

if TYPE_CHECKING:
    import pandas as pd

HEST_REPO = "MahmoodLab/hest"
"""The HEST-1k dataset on the Hugging Face Hub (gated: accept its terms once, then log in)."""
_ENV_DIR = "STF_HEST_DIR"
_CSV_RE = re.compile(r"^HEST_v(\d+)_(\d+)_(\d+)\.csv$")
LOGIN_HELP = (
    "HEST-1k is a gated dataset on the Hugging Face Hub: accept its terms at "
    f"https://huggingface.co/datasets/{HEST_REPO} (once, while logged in), then log in on this machine with "
    "`huggingface-cli login` (or `hf auth login`), or set the HF_TOKEN environment variable to an access token."
)


def hest_root(path: str | os.PathLike | None) -> Path:
    """The local HEST folder: ``path``, else ``$STF_HEST_DIR``, else ``stf.settings.data_dir / "hest"``."""
    if path is not None:
        return Path(path)
    if os.environ.get(_ENV_DIR):
        return Path(os.environ[_ENV_DIR])
    return settings.data_dir / "hest"


def _version(name: str) -> tuple[int, ...] | None:
    m = _CSV_RE.match(name)
    return tuple(int(g) for g in m.groups()) if m else None


def newest_csv(names) -> str | None:
    """The newest ``HEST_v<major>_<minor>_<patch>.csv`` among ``names`` (file names or repo paths)."""
    best = None
    for n in names:
        v = _version(Path(str(n)).name)
        if v is not None and (best is None or v > best[0]):
            best = (v, str(n))
    return None if best is None else best[1]


def hub_error(err: Exception, *, what: str) -> Exception:
    """A clear error for a failed Hugging Face Hub call (gated / not logged in / offline)."""
    name = type(err).__name__
    text = str(err)
    if name in ("GatedRepoError", "LocalTokenNotFoundError") or any(c in text for c in ("401", "403")):
        return PermissionError(f"Could not download {what}: access denied ({name}). {LOGIN_HELP}")
    return ConnectionError(
        f"Could not download {what} from the Hugging Face Hub ({name}: {text.splitlines()[0] if text else ''}). "
        "Check the internet connection, or download the samples where the Hub is reachable and point `path=` "
        f"(or ${_ENV_DIR}) to that folder. {LOGIN_HELP}"
    )


def _download_csv(root: Path) -> Path:
    try:
        from huggingface_hub import HfApi, hf_hub_download

        files = HfApi().list_repo_files(HEST_REPO, repo_type="dataset")
        name = newest_csv(files)
        if name is None:
            raise FileNotFoundError(f"No HEST_v*.csv metadata table in the Hub repository {HEST_REPO}.")
        logger.info("HEST: downloading the metadata table %s", name)
        return Path(hf_hub_download(HEST_REPO, name, repo_type="dataset", local_dir=root))
    except (ImportError, FileNotFoundError):
        raise
    except Exception as err:  # network, authentication: a message that says what to do
        raise hub_error(err, what=f"the HEST-1k metadata table ({HEST_REPO})") from err


def read_metadata(
    root: Path, metadata: str | os.PathLike | pd.DataFrame | None, *, download: bool
) -> tuple[pd.DataFrame, Path | None]:
    """The metadata table (one row per sample, column ``id``) and the file it came from."""
    import pandas as pd

    if isinstance(metadata, pd.DataFrame):
        df, src = metadata.copy(), None
    else:
        if metadata is not None:
            src = Path(metadata)
            if not src.is_file():
                raise FileNotFoundError(f"HEST metadata file not found: {src}")
        else:
            name = newest_csv(p.name for p in root.glob("HEST_v*.csv")) if root.is_dir() else None
            if name is not None:
                src = root / name
            elif download:
                src = _download_csv(root)
            else:
                raise FileNotFoundError(
                    f"No HEST-1k metadata table (HEST_v*.csv) in {root}. Pass `metadata=` (the csv), "
                    f"download=True to fetch it from https://huggingface.co/datasets/{HEST_REPO}, or point `path=` "
                    f"(or ${_ENV_DIR}) to your HEST folder."
                )
        df = pd.read_csv(src)
    if "id" not in df.columns:
        raise ValueError(f"HEST metadata {src or 'table'}: no 'id' column (columns: {list(df.columns)[:12]}).")
    df["id"] = df["id"].astype(str)
    if df["id"].duplicated().any():
        raise ValueError(f"HEST metadata {src or 'table'}: duplicate ids {df['id'][df['id'].duplicated()].tolist()[:5]}.")
    return df.reset_index(drop=True), src


def _mask(col: pd.Series, value: Any, name: str):
    """Rows of ``col`` matching ``value``: equal (strings case-insensitively), in a list, or a predicate."""
    import numpy as np

    if callable(value):
        m = value(col)
        m = np.asarray(m, dtype=bool)
        if m.shape != (len(col),):
            raise ValueError(f"The filter on {name!r} must return one boolean per sample, got shape {m.shape}.")
        return m
    values = list(value) if isinstance(value, Sequence | set | frozenset) and not isinstance(value, str) else [value]
    if not values:
        raise ValueError(f"The filter on {name!r} is an empty list.")
    keep = np.zeros(len(col), dtype=bool)
    as_text = col.astype(str).str.strip().str.lower()
    for v in values:
        if isinstance(v, str):
            keep |= (as_text == v.strip().lower()).to_numpy()
        elif v is None:
            keep |= col.isna().to_numpy()
        else:
            keep |= (col == v).to_numpy()
    return keep


def select(df: pd.DataFrame, ids: str | Sequence[str] | None, filters: dict[str, Any | Callable]) -> pd.DataFrame:
    """Rows of the metadata table selected by ``ids`` and by field filters (all must hold)."""
    import numpy as np

    keep = np.ones(len(df), dtype=bool)
    if ids is not None:
        ids = [ids] if isinstance(ids, str) else [str(i) for i in ids]
        unknown = sorted(set(ids) - set(df["id"]))
        if unknown:
            raise KeyError(f"HEST sample ids not in the metadata table: {unknown[:10]}.")
        keep &= df["id"].isin(ids).to_numpy()
    for name, value in filters.items():
        if name not in df.columns:
            raise KeyError(
                f"{name!r} is not a field of the HEST metadata table; fields: {sorted(map(str, df.columns))}."
            )
        m = _mask(df[name], value, name)
        if not (keep & m).any():
            seen = sorted(map(str, df.loc[keep, name].dropna().unique()))[:20]
            raise ValueError(
                f"No HEST sample matches {name}={value!r} (after the other filters); values of {name!r} "
                f"among the remaining samples: {seen}."
            )
        keep &= m
    out = df[keep]
    if ids is not None:  # in the order asked for
        out = out.set_index("id").loc[[i for i in ids if i in set(out["id"])]].reset_index()
    return out.reset_index(drop=True)


def hest_metadata(
    path: str | os.PathLike | None = None,
    *,
    ids: str | Sequence[str] | None = None,
    metadata: str | os.PathLike | pd.DataFrame | None = None,
    download: bool = False,
    **filters: Any,
) -> pd.DataFrame:
    """Select HEST-1k samples by the fields of its metadata table, without loading them.

    The table is the HEST-1k release csv (``HEST_v<version>.csv``, one row per sample; Jaume et al. 2024,
    *NeurIPS Datasets and Benchmarks*) with fields such as ``id``, ``organ``, ``disease_state``,
    ``oncotree_code``, ``species``, ``patient``, ``st_technology``, ``preservation_method``, ``spot_diameter``,
    ``inter_spot_dist``, ``pixel_size_um_estimated``, ``license`` and ``dataset_title``.

    Parameters
    ----------
    path
        The local HEST folder (``st/``, ``wsis/``, ``metadata/``, the release csv); ``None``: ``$STF_HEST_DIR``,
        else ``stf.settings.data_dir / "hest"``.
    ids
        Sample id(s) to keep (e.g. ``"TENX95"``).
    metadata
        The metadata csv (or a DataFrame); ``None``: the newest ``HEST_v*.csv`` in ``path``.
    download
        Download the newest release csv from the Hugging Face Hub when none is found locally (the dataset is
        gated: accept its terms on https://huggingface.co/datasets/MahmoodLab/hest, then log in with
        ``huggingface-cli login`` or set ``HF_TOKEN``).
    **filters
        ``field=value`` (strings compared case-insensitively), ``field=[v1, v2]`` (any of them) or
        ``field=callable`` (a function of the column returning one boolean per sample); all must hold. E.g.
        ``organ="Bowel", species="Homo sapiens", st_technology="Visium", oncotree_code=["COAD", "READ"]``.

    Returns
    -------
    The selected rows of the metadata table (in table order, or in the order of ``ids``).
    """
    root = hest_root(path)
    df, _ = read_metadata(root, metadata, download=download)
    return select(df, ids, filters)
