"""Data loading behind ``stf benchmark`` (the comparison itself is :func:`spatialtranscriptformer.tl.benchmark`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from . import _constants as K
from ._logging import logger


def _her2st_sections(data_dir: str | os.PathLike | None) -> list[Path]:
    from ._settings import settings

    roots = [Path(data_dir)] if data_dir else []
    if os.environ.get("STF_HER2ST_DIR"):
        roots.append(Path(os.environ["STF_HER2ST_DIR"]))
    roots.append(settings.data_dir / "her2st")
    for root in roots:
        found = sorted(p for p in root.glob("*") if p.is_dir() and any(p.glob(f"{p.name}*.tsv*")))
        if found:
            return found
    return []


def spatial_blocks(adata, n_blocks: int = 3) -> list:
    """Split one slide's table into ``n_blocks`` vertical bands, each relabelled as its own slide."""
    x = adata.obsm[K.SPATIAL_KEY][:, 0]
    edges = np.quantile(x, np.linspace(0, 1, n_blocks + 1))
    band = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, n_blocks - 1)
    sid = adata.uns[K.SLIDE_META_KEY]["slide_id"]
    blocks = []
    for b in range(n_blocks):
        sub = adata[band == b].copy()
        name = f"{sid}_block{b + 1}"
        sub.obs[K.SLIDE_KEY] = pd.Categorical([name] * sub.n_obs)
        sub.obs[K.PATIENT_KEY] = pd.Categorical([name] * sub.n_obs)
        sub.uns[K.SLIDE_META_KEY] = {**sub.uns[K.SLIDE_META_KEY], "slide_id": name, "patient_id": name}
        blocks.append(sub)
    return blocks


def load_slides(dataset: str, *, data_dir: str | os.PathLike | None = None, seed: int = 0) -> tuple[list, str]:
    """Slides for the benchmark and a note on where they came from."""
    from . import datasets

    if dataset == "her2st":
        folders = _her2st_sections(data_dir)
        if len(folders) >= 2:
            from .io import read_her2st

            return [read_her2st(f) for f in folders], f"her2st sections {[f.name for f in folders]}"
        return [datasets.her2st()], "bundled her2st section C2 only"
    if dataset == "synthetic":
        return datasets.synthetic(n_slides=4, n_patients=4, seed=seed), "synthetic: 4 slides, 4 patients"
    raise ValueError(f"Unknown dataset {dataset!r}; use 'her2st' or 'synthetic'.")


def run_benchmark(
    *,
    dataset: str = "her2st",
    backbone: str = "handcrafted",
    weights: str | None = None,
    models: list[str] | tuple[str, ...] = ("stf", "ridge", "he2rna", "attention_mil", "transmil"),
    genes: int = 50,
    groups: str = "slide",
    out: str | os.PathLike = "stf_benchmark_out",
    data_dir: str | os.PathLike | None = None,
    max_epochs: int = 60,
    seed: int = 0,
) -> pd.DataFrame:
    """Load ``dataset``, embed it with ``backbone`` and run :func:`spatialtranscriptformer.tl.benchmark`.

    With a single her2st section (only the bundled one is available), the section is split into three
    vertical bands used as cross-validation groups, and the output says so.
    """
    from . import pp, tl

    slides, note = load_slides(dataset, data_dir=data_dir, seed=seed)
    key = f"{K.EMBEDDING_PREFIX}{backbone}"
    pp.embed(slides, backbone=backbone, weights=weights, key_added=key, progress=False)
    data: list = slides
    if len(slides) == 1:
        data = spatial_blocks(slides[0].tables[K.TABLE_KEY])
        groups = "slide"
        note += " — split into 3 spatial bands used as held-out groups (leave-one-band-out)"
    logger.warning("stf benchmark on %s", note)
    print(f"Data: {note}; backbone {backbone}; top-{genes} genes; leave-one-{groups}-out.")
    return tl.benchmark(data, models=tuple(models), embedding_key=key, genes=genes, groups=groups, out=out,
                        max_epochs=max_epochs, seed=seed)
