"""Quiet, self-contained notebooks: narrow silencing of third-party notices, one progress bar, clean tutorials."""

from __future__ import annotations

import ast
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

import spatialtranscriptformer as stf
from spatialtranscriptformer import _constants as K

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = sorted((ROOT / "tutorials").glob("*.ipynb"))


def test_lightning_leafspec_notice_is_silenced_narrowly():
    from spatialtranscriptformer._notices import silence_third_party_notices

    msg = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()`"
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        silence_third_party_notices()
        warnings.warn_explicit(msg, FutureWarning, "_pytree.py", 21, module="lightning.pytorch.utilities._pytree")
        assert rec == []
        # the same text from anywhere else, or another FutureWarning from Lightning, is still shown
        warnings.warn_explicit(msg, FutureWarning, "mine.py", 1, module="my_package.module")
        warnings.warn_explicit("something else", FutureWarning, "_pytree.py", 22, module="lightning.pytorch.utilities._pytree")
        assert len(rec) == 2


def test_tqdm_auto_is_imported_once_quietly():
    import sys

    from spatialtranscriptformer._progress import import_tqdm_auto, progress_bar

    assert "tqdm.auto" in sys.modules  # imported with the package, before any dependency imports it
    assert import_tqdm_auto() is sys.modules["tqdm.auto"]
    with progress_bar(total=3, disable=True) as bar:
        bar.update(3)


def test_embed_shows_one_progress_bar_over_all_slides(monkeypatch):
    from spatialtranscriptformer import _progress

    slides = stf.datasets.synthetic(n_slides=3, n_patients=3, n_spots=40, n_genes=8, n_pathways=2, seed=0)
    bars = []

    class Bar:
        def __init__(self, **kw):
            self.kw, self.n, self.closed = kw, 0, False

        def update(self, k):
            self.n += k

        def close(self):
            self.closed = True

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

    def recording(**kw):
        bar = Bar(**kw)
        bars.append((kw, bar))
        return bar

    monkeypatch.setattr(_progress, "progress_bar", recording)
    stf.pp.embed(slides, backbone="handcrafted", tile_size=32, mpp=2.0, progress=True)
    assert len(bars) == 1
    kw, bar = bars[0]
    total = sum(s.tables[K.TABLE_KEY].n_obs for s in slides)
    assert kw["total"] == total and bar.n == total and bar.closed and "3 slides" in kw["desc"]
    for s in slides:
        assert s.tables[K.TABLE_KEY].obsm["X_handcrafted"].shape[0] == s.tables[K.TABLE_KEY].n_obs


def test_embed_refuses_an_anndata_with_a_clear_error():
    a = stf.datasets.synthetic(n_slides=1, n_spots=20, n_genes=4, n_pathways=2, seed=0).tables[K.TABLE_KEY]
    with pytest.raises(TypeError, match="needs the H&E image.*stf.io.from_anndata"):
        stf.pp.embed(a, backbone="handcrafted")
    assert re.search(r"AnnData\W* has no image element", " ".join(stf.pp.embed.__doc__.split()))


def _code_cells(path: Path) -> list[str]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.name)
def test_tutorials_carry_no_warning_filters_and_no_local_paths(path):
    code = "\n".join(_code_cells(path))
    assert not re.search(r"warnings\.(filterwarnings|simplefilter|formatwarning|catch_warnings)", code)
    assert "shared" not in code and "../" not in code  # data come from stf.datasets
    dpi = re.findall(r"figure\.dpi\"?\]?\s*=\s*(\d+)", code)
    assert all(int(d) >= 100 for d in dpi)


def test_readme_notebook_snippet_defines_every_name():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    code = re.search(r"## In a notebook\n\n```python\n(.*?)```", text, re.S).group(1)
    tree = ast.parse(code)
    defined = set(dir(__builtins__)) if isinstance(__builtins__, dict) else set(dir(__builtins__))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            defined |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    assert used <= defined, f"undefined in the README snippet: {sorted(used - defined)}"


def test_bundled_visium_sample_ships_with_its_licences():
    d = stf.datasets.visium_tiny_path()
    for name in ("filtered_feature_bc_matrix.h5", "spatial/scalefactors_json.json", "spatial/tissue_lowres_image.png",
                 "SCANPY_LICENSE.txt", "LICENSE-DATA.md"):
        assert (d / name).is_file(), name
    text = (d / "LICENSE-DATA.md").read_text()
    assert "CC BY 4.0" in text and "BSD 3-Clause" in text
    s = stf.datasets.visium_tiny()
    t = s.tables[K.TABLE_KEY]
    assert t.n_obs == 100 and np.asarray(t.X.sum()) > 0
