"""HEST-1k cohorts: select samples by their metadata, download what is missing, read them as slides."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._logging import logger
from .._settings import settings
from ._hest_metadata import HEST_REPO, hest_root, hub_error, read_metadata, select

if TYPE_CHECKING:
    import pandas as pd
    from spatialdata import SpatialData

_WSI_EXTS = (".tif", ".tiff", ".ome.tif", ".btf")


def _missing(root: Path, sample_id: str, *, load_image: bool) -> list[str]:
    """Files of a sample that are not in the local HEST folder."""
    out = []
    if not (root / "st" / f"{sample_id}.h5ad").is_file():
        out.append(f"st/{sample_id}.h5ad")
    if load_image and not any((root / "wsis" / f"{sample_id}{e}").is_file() for e in _WSI_EXTS):
        out.append(f"wsis/{sample_id}.tif")
    return out


def _download(root: Path, ids: list[str], *, load_image: bool) -> None:
    """Download the expression, metadata (and WSI) files of ``ids`` into ``root`` (HEST layout)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:  # pragma: no cover - a dependency of timm
        raise ImportError("Downloading HEST-1k needs huggingface_hub: `pip install huggingface_hub`.") from err
    patterns = []
    for i in ids:
        patterns += [f"st/{i}.h5ad", f"metadata/{i}.json"]
        if load_image:
            patterns.append(f"wsis/{i}.tif")
    logger.info("HEST: downloading %d sample(s) from %s into %s", len(ids), HEST_REPO, root)
    try:
        snapshot_download(HEST_REPO, repo_type="dataset", local_dir=root, allow_patterns=patterns)
    except Exception as err:
        raise hub_error(err, what=f"{len(ids)} HEST-1k sample(s) {ids[:5]}") from err


def hest(
    ids: str | Sequence[str] | None = None,
    *,
    path: str | os.PathLike | None = None,
    metadata: str | os.PathLike | pd.DataFrame | None = None,
    download: bool = False,
    load_image: bool = True,
    level: int = 0,
    progress: bool | None = None,
    **filters: Any,
) -> list[SpatialData]:
    """Load a HEST-1k cohort: the samples selected by fields of the metadata table, as slides.

    HEST-1k (Jaume et al. 2024, *NeurIPS Datasets and Benchmarks*; CC BY-NC-SA 4.0, each sample also
    under its study's licence, column ``license``) pairs spatial transcriptomics with whole-slide images.
    Samples are selected in the release csv (see :func:`hest_metadata` for the fields and the filter
    syntax), looked up in a local folder in the HEST layout (``st/<id>.h5ad``, ``wsis/<id>.tif``,
    ``metadata/<id>.json``, ``HEST_v*.csv``) and read with :func:`spatialtranscriptformer.io.read_hest`
    (whole-slide images stay on disk and are read lazily). With ``download=True``, samples that are
    missing are first downloaded from the Hugging Face Hub (``huggingface_hub``, only the files read
    here). The dataset is gated: accept its terms on https://huggingface.co/datasets/MahmoodLab/hest once,
    then log in with ``huggingface-cli login`` (or set the ``HF_TOKEN`` environment variable). Every
    selected sample is found (or downloaded) before any is read.

    Parameters
    ----------
    ids
        Sample id(s) to load (e.g. ``["TENX95", "NCBI783"]``), combined with ``filters``.
    path
        The local HEST folder; ``None``: ``$STF_HEST_DIR``, else ``stf.settings.data_dir / "hest"``.
    metadata
        The metadata csv (or a DataFrame); ``None``: the newest ``HEST_v*.csv`` in ``path`` (downloaded
        with ``download=True`` when absent).
    download
        Download missing samples (and the metadata csv) from the Hub; ``False`` raises a
        :class:`FileNotFoundError` that lists them.
    load_image
        Read the whole-slide images (``False``: expression only; the WSIs are then not downloaded).
    level
        Pyramid level of the WSIs (see :func:`~spatialtranscriptformer.io.read_hest`).
    progress
        Show one progress bar over the samples; ``None`` follows ``stf.settings.progress``.
    **filters
        Fields of the metadata table: ``organ="Bowel"``, ``species="Homo sapiens"``,
        ``oncotree_code=["COAD", "READ"]``, ``st_technology="Visium"``, ``disease_state="Cancer"``, ... (strings
        compared case-insensitively; a list means any of them; a callable gets the column).

    Returns
    -------
    One :class:`~spatialdata.SpatialData` per selected sample, in metadata-table order (slide id = HEST id,
    patient id from ``patient``), as :func:`spatialtranscriptformer.io.read_hest` returns them.

    Examples
    --------
    The bowel cancer Visium samples of human patients::

        slides = stf.datasets.hest(organ="Bowel", species="Homo sapiens", st_technology="Visium",
                                   oncotree_code=["COAD", "READ"], download=True)
    """
    from .._progress import progress_bar
    from ..io import read_hest

    root = hest_root(path)
    df, src = read_metadata(root, metadata, download=download)
    chosen = select(df, ids, filters)
    if chosen.empty:
        raise ValueError("No HEST sample selected (pass `ids=` or field filters such as organ=...).")
    sample_ids = chosen["id"].tolist()
    missing = {i: m for i in sample_ids if (m := _missing(root, i, load_image=load_image))}
    if missing:
        if not download:
            ex = "; ".join(f"{i}: {', '.join(m)}" for i, m in list(missing.items())[:5])
            raise FileNotFoundError(
                f"{len(missing)} of the {len(sample_ids)} selected HEST samples are not in {root} ({ex}"
                f"{' ...' if len(missing) > 5 else ''}). Pass download=True to fetch them from "
                f"https://huggingface.co/datasets/{HEST_REPO} (gated: accept its terms, then `huggingface-cli "
                "login` or set HF_TOKEN), or point `path=` (or $STF_HEST_DIR) to your HEST folder."
            )
        _download(root, list(missing), load_image=load_image)
        still = [i for i in missing if _missing(root, i, load_image=load_image)]
        if still:
            raise FileNotFoundError(f"HEST samples {still[:10]} are still incomplete in {root} after the download.")
    show = settings.progress if progress is None else progress
    out = []
    with tempfile.TemporaryDirectory() as tmp, progress_bar(
        total=len(sample_ids), disable=not show, desc="read HEST", unit="sample"
    ) as bar:
        if src is None:  # a DataFrame: read_hest reads the selected rows from a csv
            src = Path(tmp) / "hest_metadata.csv"
            chosen.to_csv(src, index=False)
        for i in sample_ids:
            per_sample = root / "metadata" / f"{i}.json"  # HEST's own per-sample metadata, else the table
            meta = None if per_sample.is_file() else src
            out.append(read_hest(root, sample_id=i, metadata=meta, load_image=load_image, level=level))
            bar.update(1)
    return out
