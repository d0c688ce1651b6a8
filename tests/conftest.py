import os
from pathlib import Path

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny test models run faster (and steadier on a shared machine) on one intra-op thread."""
    import torch

    torch.set_num_threads(1)
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
