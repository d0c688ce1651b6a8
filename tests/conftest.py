import os
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny test models run faster (and steadier on a shared machine) on one intra-op thread."""
    import torch

    import spatialtranscriptformer as stf

    torch.set_num_threads(1)
    stf.settings.n_threads = 1  # fit / predict / embed set torch's threads from the settings
    yield


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ../shared/data (skips when absent)."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED} (needs ../shared/data beside the project)")
    return SHARED


@pytest.fixture(scope="session")
def her2st_dir(shared_data) -> Path:
    d = shared_data / "her2st"
    if not (d / "C3").is_dir():
        pytest.skip(f"her2st sections not found under {d}")
    return d


@pytest.fixture(scope="session")
def bundled_sdata():
    """The bundled her2st section (read once per session; do not modify — copy first)."""
    import spatialtranscriptformer as stf

    return stf.datasets.her2st()


def _toy_slide(sid, pid, *, n=36, genes=None, f=8, seed=0, W=None):
    """A slide whose counts depend on its embeddings (``obsm['X_toy']``) through a weight matrix shared across slides."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    genes = genes or [f"G{i}" for i in range(8)]
    rng = np.random.default_rng(seed)
    W = np.random.default_rng(99).normal(size=(f, len(genes))) if W is None else W
    xy = np.stack(np.meshgrid(np.arange(6), np.arange(int(np.ceil(n / 6)))), -1).reshape(-1, 2)[:n] * 200.0
    emb = rng.normal(size=(n, f)).astype(np.float32)
    counts = rng.poisson(np.exp(0.5 * emb @ W / np.sqrt(f) + 1.5)).astype(np.float32)
    obs = pd.DataFrame({"slide_id": sid, "patient_id": pid}, index=[f"{sid}_{i}" for i in range(n)])
    a = ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=genes))
    a.layers["counts"] = counts.copy()
    a.obsm["spatial"] = xy
    a.obsm["X_toy"] = emb
    a.uns["stf_slide"] = {"mpp": 0.5, "slide_id": sid}
    return a


@pytest.fixture(scope="session")
def make_toy_slide():
    """Builder of small AnnData slides with toy embeddings: ``make_toy_slide(sid, pid, *, n, genes, f, seed, W)``."""
    return _toy_slide
