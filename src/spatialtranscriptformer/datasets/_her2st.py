"""The her2st HER2+ breast cancer sections (Andersson et al. 2021)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from .._settings import settings

if TYPE_CHECKING:
    from spatialdata import SpatialData

BUNDLED_SECTION = "C2"
"""The section shipped inside the package (cropped to the tissue)."""
SECTIONS = ("C2", "C3", "C4", "C5")
"""Sections of patient C known to this loader (more can be read from a local folder)."""
_ENV_DIR = "STF_HER2ST_DIR"
_BASE_URL = "https://github.com/almaan/her2st/raw/master/data/"
# Upstream file layout (Andersson et al. 2021; CC BY 4.0) and the sha256 of each file as we hold it.
_REMOTE = {
    "C2": {
        "5714_HE_BT_C2.jpg": ("ST-imgs/C/C2/5714_HE_BT_C2.jpg", "26e2f73ae840cdd46c5bba405aae181f13a56a376b9848dff23f7a9c5de7f19e"),
        "C2.tsv.gz": ("ST-cnts/C2.tsv.gz", "c1c59ea6cffae36b9ecb561b8e2a97e3aa5f4085f748e991a0e330ed9d09773d"),
        "C2_selection.tsv": ("ST-spotfiles/C2_selection.tsv", "235b5f4306b3b57c628ffc82c98c7109602474fbcc79a917b9c50517f99b6b1c"),
    },
    "C3": {
        "5714_HE_BT_D1.jpg": ("ST-imgs/C/C3/5714_HE_BT_D1.jpg", "0005a92674014d473040a28f0afca89ce5fa5c44019b479b638ceb3272ceb568"),
        "C3.tsv.gz": ("ST-cnts/C3.tsv.gz", "e00c55a3eb9caac5d9c71b8906aae8be8b38f93e23938f4a0ebee17683ef6a2a"),
        "C3_selection.tsv": ("ST-spotfiles/C3_selection.tsv", "7fd76c13370b7804ac3bb377b846d22485cf9223f9dd8dfc25be06e5aaf65755"),
    },
    "C4": {
        "5714_HE_BT_D2.jpg": ("ST-imgs/C/C4/5714_HE_BT_D2.jpg", "f40607eb1d5f0d125decd71c48b0c5d29cf6776ad92297fd185631208c82d6f2"),
        "C4.tsv.gz": ("ST-cnts/C4.tsv.gz", "33201f76d41d7131dc600a0f87d9a70383af3503e81698b4d11e6f2e8d73e9da"),
        "C4_selection.tsv": ("ST-spotfiles/C4_selection.tsv", "47e79f3b9dbfa3a8c18af9e948ba7ba4bf0a75ea1b4c292bc714ced7d0917d4c"),
    },
    "C5": {
        "5714_HE_BT_E1.jpg": ("ST-imgs/C/C5/5714_HE_BT_E1.jpg", "34028ea41e376396b50c42b0a11a7e689c85be4a8022e668d0a09cc128c04c65"),
        "C5.tsv.gz": ("ST-cnts/C5.tsv.gz", "c0f310315ca6110d74dbdf7011e5b42432ba0b8eb5f001824764911988f39338"),
        "C5_selection.tsv": ("ST-spotfiles/C5_selection.tsv", "2114cc3b4da759772112897f1e247d5443c9f8c808e6a9a952eb4fda379a194c"),
    },
}


def bundled_path() -> Path:
    """Folder of the section shipped with the package."""
    return Path(str(files("spatialtranscriptformer.datasets") / "data" / "her2st" / BUNDLED_SECTION))


def _local_dir(section: str, path: str | os.PathLike | None) -> Path | None:
    roots = [Path(path)] if path is not None else []
    if os.environ.get(_ENV_DIR):
        roots.append(Path(os.environ[_ENV_DIR]))
    roots.append(settings.data_dir / "her2st")
    for root in roots:
        for cand in (root / section, root):
            if cand.is_dir() and any(cand.glob(f"{section}*.tsv*")):
                return cand
    return None


def _download(section: str) -> Path:
    import pooch

    if section not in _REMOTE:
        raise FileNotFoundError(f"No download registry for her2st section {section!r}.")
    dest = settings.data_dir / "her2st" / section
    for fname, (remote, sha) in _REMOTE[section].items():
        pooch.retrieve(_BASE_URL + remote, known_hash=f"sha256:{sha}", fname=fname, path=dest)
    return dest


def her2st(
    section: str | Sequence[str] | None = None,
    *,
    path: str | os.PathLike | None = None,
    download: bool = False,
    load_image: bool = True,
    progress: bool | None = None,
) -> SpatialData | list[SpatialData]:
    """Load her2st HER2+ breast cancer sections (legacy ST, full-resolution H&E, raw counts).

    Data: Andersson A. et al., "Spatial deconvolution of HER2-positive breast cancer delineates
    tumor-associated cell type interactions", *Nature Communications* 12, 6012 (2021); released under
    CC BY 4.0 (see ``LICENSE-DATA.md`` next to the bundled files).

    Parameters
    ----------
    section
        ``None`` loads the bundled section (``"C2"``, cropped to the tissue, ships with the package). A
        section name (``"C3"``) or a list of names loads those from a local folder: ``path``, the
        ``STF_HER2ST_DIR`` environment variable, or ``stf.settings.data_dir / "her2st"``.
    path
        Folder holding one sub-folder per section in the her2st layout.
    download
        Download sections that are not found locally (needs internet; checked against sha256 hashes).
    load_image
        Read the H&E images.
    progress
        With a list of sections: one progress bar over them; ``None`` follows ``stf.settings.progress``.

    Returns
    -------
    One :class:`~spatialdata.SpatialData` per section (a list when ``section`` is a list), as returned by
    :func:`spatialtranscriptformer.io.read_her2st`.
    """
    from ..io import read_her2st

    if section is not None and not isinstance(section, str):
        from .._progress import progress_bar

        sections = list(section)
        for s in sections:  # every section found (or downloadable) before any is read
            if _local_dir(s, path) is None and not download:
                her2st(s, path=path, download=False, load_image=False)  # raises the FileNotFoundError
        show = settings.progress if progress is None else progress
        out = []
        with progress_bar(total=len(sections), disable=not show or len(sections) < 2, desc="read her2st",
                          unit="section") as bar:
            for s in sections:
                out.append(her2st(s, path=path, download=download, load_image=load_image))
                bar.update(1)
        return out
    if section is None:
        return read_her2st(bundled_path(), section=BUNDLED_SECTION, load_image=load_image)
    folder = _local_dir(section, path)
    if folder is None:
        if not download:
            raise FileNotFoundError(
                f"her2st section {section!r} not found locally (looked in path={path!r}, ${_ENV_DIR}, "
                f"{settings.data_dir / 'her2st'}). Point `path=` or ${_ENV_DIR} to a folder with "
                f"'{section}/{section}.tsv.gz', '{section}_selection.tsv' and the H&E jpg, or pass download=True."
            )
        folder = _download(section)
    return read_her2st(folder, section=section, load_image=load_image)
