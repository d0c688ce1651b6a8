"""The bad-input matrix: every case must end in a clear error (or, where the data may be legitimate, a warning).

Each case builds a small input (tiny synthetic data), runs one public call and classifies the outcome:

- ``clear error``: an exception whose message names the element and the problem (the case's ``names``)
  and the input left unchanged;
- ``warning``: the call ran and warned, naming the element;
- ``silent``: the call ran (or returned) without a word;
- ``unhelpful``: an exception whose message does not name the element / problem (e.g. ``JSONDecodeError``,
  ``range() arg 3 must not be zero``);
- ``mutation``: the call failed after changing the input (partially written user data or files).

Run the module as a script to print the counts (e.g. against another checkout of the sources)::

    PYTHONPATH=<src>:tests python tests/test_bad_input_matrix.py
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import spatialtranscriptformer as stf

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from conftest import _toy_slide  # noqa: E402
from test_io_readers import make_hest, make_visium_hd, texture  # noqa: E402

OUTCOMES = ("clear error", "warning", "silent", "unhelpful", "mutation")
CLEAR_TYPES = (ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, RuntimeError)


# --- snapshots: did the call change its input? ------------------------------------------------------------------


def _h(*parts) -> str:
    m = hashlib.sha1()
    for p in parts:
        m.update(p if isinstance(p, bytes) else repr(p).encode())
    return m.hexdigest()


def _arr_hash(a) -> str:
    if isinstance(a, pd.DataFrame):
        return _h(list(a.columns), list(a.index), pd.util.hash_pandas_object(a, index=True).to_numpy().tobytes())
    if sp.issparse(a):
        a = a.toarray()
    a = np.asarray(a)
    if a.dtype == object:
        return _h(a.tolist())
    return _h(str(a.dtype), a.shape, np.ascontiguousarray(a).tobytes())


def _uns_keys(d, depth=0):
    if not isinstance(d, dict) or depth > 3:
        return type(d).__name__
    return {k: _uns_keys(v, depth + 1) for k, v in d.items()}


def _adata_snapshot(a: ad.AnnData) -> dict:
    return {
        "shape": a.shape, "X": _arr_hash(a.X), "obs": _arr_hash(a.obs), "var": _arr_hash(a.var),
        "layers": {k: _arr_hash(v) for k, v in a.layers.items()},
        "obsm": {k: _arr_hash(v) for k, v in a.obsm.items()},
        "uns": _uns_keys(dict(a.uns)),
    }


def _dir_snapshot(p: Path) -> dict:
    if not p.exists():
        return {}
    if p.is_file():
        return {".": _h(p.read_bytes())}
    return {str(f.relative_to(p)): (_h(f.read_bytes()) if f.is_file() else "dir") for f in sorted(p.rglob("*"))}


def snapshot(obj):
    """A comparable fingerprint of an input (AnnData, SpatialData, folder, list of them)."""
    if obj is None:
        return None
    if isinstance(obj, list | tuple):
        return [snapshot(o) for o in obj]
    if isinstance(obj, Path):
        return _dir_snapshot(obj)
    if isinstance(obj, ad.AnnData):
        return _adata_snapshot(obj)
    if type(obj).__name__ == "SpatialData":
        return {
            "images": sorted(obj.images), "shapes": sorted(obj.shapes), "points": sorted(obj.points),
            "tables": {k: _adata_snapshot(t) for k, t in obj.tables.items()},
        }
    return _h(obj)


# --- the cases ---------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """``make(R, tmp)`` -> input; ``call(inp, R, tmp)`` runs the public call; ``names`` must all be in the message."""

    id: str
    area: str
    make: Callable
    call: Callable
    names: tuple[str, ...]
    allowed: tuple[str, ...] = ("clear error",)


def run_case(case: Case, R, tmp: Path) -> tuple[str, str]:
    """Run one case and classify its outcome: ``(outcome, detail)``."""
    inp = case.make(R, tmp)
    before = snapshot(inp)
    err: BaseException | None = None
    stderr = io.StringIO()
    network: list[str] = []
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(stderr), _no_network(network):
        warnings.simplefilter("always")
        try:
            case.call(inp, R, tmp)
        except SystemExit as e:  # the CLI (argparse): the message went to stderr (or is the exit's text)
            if e.code not in (0, None):
                err = e
        except Exception as e:  # noqa: BLE001
            err = e
    changed = snapshot(inp) != before
    if network:  # loading / reading must never reach the network
        return "unhelpful", f"tried to reach the network ({network[0]}); " + (f"{type(err).__name__}: {err}"[:200] if err else "")

    def named(msg: str) -> bool:
        return all(n.lower() in msg.lower() for n in case.names)

    if err is not None:
        msg = (stderr.getvalue() or str(err.code)) if isinstance(err, SystemExit) else f"{type(err).__name__}: {err}"
        if changed:
            return "mutation", msg[:300]
        clear = isinstance(err, (SystemExit, *CLEAR_TYPES)) and named(msg)
        return ("clear error" if clear else "unhelpful"), msg[:300]
    ours = [str(w.message) for w in caught if issubclass(w.category, UserWarning) and named(str(w.message))]
    if ours:
        return "warning", ours[0][:300]
    return "silent", "no error, no warning naming " + ", ".join(case.names)


@contextlib.contextmanager
def _no_network(record: list):
    """Refuse (and record) every attempt to open a network connection."""
    import socket

    orig = socket.socket.connect, socket.create_connection, socket.getaddrinfo

    def refuse(*args, **kwargs):
        record.append(repr(args[1:2] or args[:1]))
        raise OSError("network access blocked by the bad-input matrix")

    socket.socket.connect, socket.create_connection, socket.getaddrinfo = refuse, refuse, refuse
    try:
        yield
    finally:
        socket.socket.connect, socket.create_connection, socket.getaddrinfo = orig


class Resources:
    """Small inputs shared by the cases (built once, lazily; cases copy what they change)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # readers -------------------------------------------------------------------------------------------
    @cached_property
    def her2st(self) -> Path:
        """The bundled C2 section with 40 genes, counts gzipped."""
        from spatialtranscriptformer.datasets._her2st import bundled_path

        src = bundled_path()
        d = self.root / "her2st" / "C2"
        d.mkdir(parents=True)
        counts = pd.read_csv(src / "C2.tsv.gz", sep="\t", index_col=0).iloc[:, :40]
        counts.to_csv(d / "C2.tsv.gz", sep="\t", compression="gzip")
        shutil.copy(src / "C2_selection.tsv", d / "C2_selection.tsv")
        shutil.copy(next(src.glob("*.jpg")), d / "HE.jpg")
        return d

    def her2st_copy(self, tmp: Path, *, image: bool = False) -> Path:
        d = tmp / "C2"
        d.mkdir()
        for f in ("C2.tsv.gz", "C2_selection.tsv"):
            shutil.copy(self.her2st / f, d / f)
        if image:
            shutil.copy(self.her2st / "HE.jpg", d / "HE.jpg")
        return d

    @cached_property
    def hd(self) -> Path:
        return make_visium_hd(self.root / "hd", bins=(16,))

    def hd_copy(self, tmp: Path) -> Path:
        shutil.copytree(self.hd.parent, tmp / "hd")
        return tmp / "hd" / "outs"

    def hest_copy(self, tmp: Path) -> Path:
        return make_hest(tmp / "hest")

    # pp / tl -------------------------------------------------------------------------------------------
    @cached_property
    def synthetic(self):
        return stf.datasets.synthetic(n_spots=30, n_genes=20, seed=0)

    def slide(self):
        from spatialdata import deepcopy

        return deepcopy(self.synthetic)

    @cached_property
    def small_slide(self):
        """A synthetic slide of 200 x 200 µm (few super-resolution patches)."""
        return stf.datasets.synthetic(n_genes=3, n_pathways=2, size_um=200, seed=1)

    def table(self) -> ad.AnnData:
        return self.synthetic.tables["table"].copy()

    def gene_sets(self) -> dict:
        return dict(self.synthetic.tables["table"].uns["synthetic"]["gene_sets"])

    @staticmethod
    def toy(sid="A", pid="P1", seed=0, **kw) -> ad.AnnData:
        return _toy_slide(sid, pid, seed=seed, **kw)

    @cached_property
    def fit_kw(self) -> dict:
        return {"model": "stf", "embedding_key": "X_toy", "genes": [f"G{i}" for i in range(8)], "max_epochs": 1,
                "validation": None, "progress": False,
                "model_kwargs": {"token_dim": 16, "n_layers": 1, "n_heads": 2, "interactions": "all"},
                "data_kwargs": {"gene_sets": None}, "seed": 0, "lr": 1e-3}

    @cached_property
    def toy_pair(self) -> list:
        return [self.toy("A", "P1", seed=0), self.toy("B", "P2", seed=1)]

    @cached_property
    def checkpoint(self) -> Path:
        d = self.root / "ckpt"
        stf.tl.fit([a.copy() for a in self.toy_pair], checkpoint_dir=d, **self.fit_kw)
        return d / "last.ckpt"

    @cached_property
    def model(self):
        return stf.tl.fit([a.copy() for a in self.toy_pair], **self.fit_kw)

    @cached_property
    def saved_ridge(self) -> Path:
        m = stf.tl.fit([a.copy() for a in self.toy_pair], model="ridge", embedding_key="X_toy",
                       genes=[f"G{i}" for i in range(8)], progress=False)
        p = self.root / "ridge_model"
        m.save(p)
        return p

    @cached_property
    def saved_stf(self) -> Path:
        p = self.root / "stf_model"
        self.model.save(p)
        return p

    def model_copy(self, tmp: Path, which: str = "stf") -> Path:
        src = self.saved_stf if which == "stf" else self.saved_ridge
        shutil.copytree(src, tmp / "m")
        return tmp / "m"

    @cached_property
    def sr_model(self):
        from test_superres_save import manual_model, rebuildable_backbone

        return manual_model(rebuildable_backbone())

    @cached_property
    def saved_sr(self) -> Path:
        p = self.root / "sr_model"
        self.sr_model.save(p)
        return p

    def sr_copy(self, tmp: Path, **changes) -> Path:
        shutil.copytree(self.saved_sr, tmp / "sr")
        cfg_path = tmp / "sr" / "config.json"
        cfg = json.loads(cfg_path.read_text())
        for k, v in changes.items():
            *head, last = k.split("__")
            d = cfg
            for h in head:
                d = d[h]
            d[last] = v
        cfg_path.write_text(json.dumps(cfg))
        return tmp / "sr"


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _edit_counts(d: Path, fn) -> None:
    c = pd.read_csv(d / "C2.tsv.gz", sep="\t", index_col=0)
    fn(c).to_csv(d / "C2.tsv.gz", sep="\t", compression="gzip")


def _edit_sel(d: Path, fn) -> None:
    s = pd.read_csv(d / "C2_selection.tsv", sep="\t")
    fn(s).to_csv(d / "C2_selection.tsv", sep="\t", index=False)


def _her2st(tmp, R, edit=None, sel=None, image=False):
    d = R.her2st_copy(tmp, image=image)
    if edit is not None:
        _edit_counts(d, edit)
    if sel is not None:
        _edit_sel(d, sel)
    return d


def _dup_gene(c):
    c = c.copy()
    cols = list(c.columns)
    cols[5] = cols[3]
    c.columns = cols
    return c


def _lognorm(x):
    """log1p(CP10k) of a counts array."""
    x = np.asarray(x, dtype=float)
    tot = x.sum(1, keepdims=True)
    return np.log1p(np.divide(x * 1e4, tot, out=np.zeros_like(x), where=tot > 0))


def _grid_anndata(n=6, *, X=None, genes=None):
    g = np.arange(n) * 100.0 + 50  # 100 µm pitch at 1 µm/px
    xy = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    genes = genes or [f"G{i}" for i in range(4)]
    X = np.random.default_rng(0).poisson(3, size=(len(xy), len(genes))).astype(np.float32) if X is None else X
    a = ad.AnnData(X=X, obs=pd.DataFrame(index=[f"s{i}" for i in range(len(X))]), var=pd.DataFrame(index=genes))
    a.obsm["spatial"] = xy[: len(X)]
    return a


def _from_anndata(a):
    return stf.io.from_anndata(a, image=texture(700, 700), mpp=1.0, spot_diameter_um=55)


def _set_layer(s, fn, layer="counts"):
    t = s.tables["table"] if type(s).__name__ == "SpatialData" else s
    x = t.layers[layer]
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    t.layers[layer] = fn(x)
    return s


def _set_X(s, fn):
    t = s.tables["table"] if type(s).__name__ == "SpatialData" else s
    x = t.X.toarray() if sp.issparse(t.X) else np.asarray(t.X)
    t.X = fn(x)
    return s


def _dup_var(s):
    t = s.tables["table"] if type(s).__name__ == "SpatialData" else s
    names = list(t.var_names)
    names[1] = names[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.var_names = names
    return s


def _tiny_backbone(fail_on_call: int | None = None, nan: bool = False):
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if fail_on_call is not None and self.calls >= fail_on_call:
                raise RuntimeError("tiny backbone: simulated failure")
            out = x.mean(dim=(2, 3))
            return out * float("nan") if nan else out

    return Tiny()


def _embed_kw(**kw):
    return {"tile_size": 16, "mpp": 1.0, "key_added": "X_tiny", "progress": False, **kw}


def _fit(data, R, **kw):
    return stf.tl.fit(data, **{**R.fit_kw, **kw})


def _nan_model(R):
    import torch

    m = copy.deepcopy(R.model)
    with torch.no_grad():
        next(m.module.parameters()).fill_(float("nan"))
    return m


def _no_mpp_slide(R):
    from spatialdata import deepcopy

    s = deepcopy(R.small_slide)
    s.tables["table"].uns["stf_slide"].pop("mpp")
    return s


def _cli(*args):
    from spatialtranscriptformer.cli import main

    return main(list(args))


def _L(*xs):
    return list(xs)


CASES: list[Case] = [
    # --- readers: her2st layout ------------------------------------------------------------------------------
    Case("her2st truncated gz", "readers", lambda R, t: _then(_her2st(t, R), lambda d: _truncate(d / "C2.tsv.gz")),
         lambda d, R, t: stf.io.read_her2st(d, load_image=False), ("C2.tsv.gz",)),
    Case("her2st truncated JPEG", "readers", lambda R, t: _then(_her2st(t, R, image=True), lambda d: _truncate(d / "HE.jpg", 0.3)),
         lambda d, R, t: stf.io.read_her2st(d), ("HE.jpg",)),
    Case("her2st zero spots", "readers", lambda R, t: _her2st(t, R, edit=lambda c: c.iloc[:0]),
         lambda d, R, t: stf.io.read_her2st(d, load_image=False), ("C2", "no spots")),
    Case("her2st duplicate gene names", "readers", lambda R, t: _her2st(t, R, edit=_dup_gene),
         lambda d, R, t: stf.io.read_her2st(d, load_image=False), ("duplicate gene",), ("clear error", "warning")),
    Case("her2st log-normalised counts", "readers",
         lambda R, t: _her2st(t, R, edit=lambda c: pd.DataFrame(_lognorm(c), index=c.index, columns=c.columns)),
         lambda d, R, t: stf.io.read_her2st(d, load_image=False), ("log-normalised",)),
    Case("her2st non-integer counts", "readers", lambda R, t: _her2st(t, R, edit=lambda c: c * 1.37),
         lambda d, R, t: stf.io.read_her2st(d, load_image=False), ("non-integer",), ("clear error", "warning")),
    Case("her2st pixel coordinates / 10", "readers",
         lambda R, t: _her2st(t, R, image=True, sel=lambda s: s.assign(pixel_x=s.pixel_x / 10, pixel_y=s.pixel_y / 10)),
         lambda d, R, t: stf.io.read_her2st(d), ("image",), ("clear error", "warning")),
    Case("her2st pixel coordinates x 1000", "readers",
         lambda R, t: _her2st(t, R, sel=lambda s: s.assign(pixel_x=s.pixel_x * 1000, pixel_y=s.pixel_y * 1000)),
         lambda d, R, t: stf.io.read_her2st(d, load_image=False), ("µm/px", "plausible")),
    Case("her2st pixel and array positions mismatched", "readers",
         lambda R, t: _her2st(t, R, sel=lambda s: s.assign(pixel_x=s.pixel_x.sample(frac=1, random_state=0).to_numpy())),
         lambda d, R, t: stf.io.read_her2st(d, load_image=False), ("grid",)),
    Case("her2st negative counts", "readers", lambda R, t: _her2st(t, R, edit=lambda c: _set_cell(c, 3, 1, -2)),
         lambda d, R, t: stf.io.read_her2st(d, load_image=False), ("negative",)),
    Case("her2st NaN counts", "readers", lambda R, t: _her2st(t, R, edit=lambda c: _set_cell(c.astype(float), 2, 2, np.nan)),
         lambda d, R, t: stf.io.read_her2st(d, load_image=False), ("NaN",)),
    Case("her2st duplicate spot ids", "readers", lambda R, t: _her2st(t, R, edit=lambda c: pd.concat([c, c.iloc[[4]]])),
         lambda d, R, t: stf.io.read_her2st(d, load_image=False), ("duplicate spot",)),
    Case("her2st selection lacks pixel columns", "readers", lambda R, t: _her2st(t, R, sel=lambda s: s.drop(columns=["pixel_x"])),
         lambda d, R, t: stf.io.read_her2st(d, load_image=False), ("pixel_x",)),
    Case("her2st mpp=0", "readers", lambda R, t: _her2st(t, R),
         lambda d, R, t: stf.io.read_her2st(d, mpp=0.0, load_image=False), ("microns per pixel",)),
    # --- readers: Visium HD, HEST, AnnData -------------------------------------------------------------------
    Case("visium_hd truncated parquet", "readers",
         lambda R, t: _then(R.hd_copy(t), lambda d: _truncate(d / "binned_outputs/square_016um/spatial/tissue_positions.parquet")),
         lambda d, R, t: stf.io.read_visium_hd(d, bin_size=16), ("tissue_positions.parquet",)),
    Case("visium_hd truncated h5", "readers",
         lambda R, t: _then(R.hd_copy(t), lambda d: _truncate(d / "binned_outputs/square_016um/filtered_feature_bc_matrix.h5")),
         lambda d, R, t: stf.io.read_visium_hd(d, bin_size=16), ("filtered_feature_bc_matrix.h5",)),
    Case("visium_hd corrupt scalefactors", "readers",
         lambda R, t: _then(R.hd_copy(t), lambda d: (d / "binned_outputs/square_016um/spatial/scalefactors_json.json").write_text("{oops")),
         lambda d, R, t: stf.io.read_visium_hd(d, bin_size=16), ("scalefactors_json.json",)),
    Case("hest truncated TIFF", "readers", lambda R, t: _then(R.hest_copy(t), lambda d: _truncate(d / "wsis/TENX00.tif", 0.6)),
         lambda d, R, t: stf.io.read_hest(d), ("TENX00.tif",)),
    Case("hest truncated h5ad", "readers", lambda R, t: _then(R.hest_copy(t), lambda d: _truncate(d / "st/TENX00.h5ad")),
         lambda d, R, t: stf.io.read_hest(d, load_image=False), ("TENX00.h5ad",)),
    Case("hest corrupt metadata json", "readers", lambda R, t: _then(R.hest_copy(t), lambda d: (d / "metadata/TENX00.json").write_text("{")),
         lambda d, R, t: stf.io.read_hest(d, load_image=False), ("TENX00.json",)),
    Case("hest log-normalised X", "readers",
         lambda R, t: _then(R.hest_copy(t), lambda d: _rewrite_h5ad(d / "st/TENX00.h5ad", lambda a: setattr(a, "X", sp.csr_matrix(_lognorm(a.X.toarray()))))),
         lambda d, R, t: stf.io.read_hest(d, load_image=False), ("log-normalised",)),
    Case("hest zero spots", "readers", lambda R, t: _then(R.hest_copy(t), lambda d: _rewrite_h5ad(d / "st/TENX00.h5ad", None, rows=0)),
         lambda d, R, t: stf.io.read_hest(d, load_image=False), ("no spots",)),
    Case("from_anndata log-normalised X", "readers", lambda R, t: _set_X(_grid_anndata(), _lognorm),
         lambda a, R, t: _from_anndata(a), ("log-normalised",)),
    Case("from_anndata duplicate gene names", "readers", lambda R, t: _dup_var(_grid_anndata()),
         lambda a, R, t: _from_anndata(a), ("duplicate gene",), ("clear error", "warning")),
    Case("from_anndata non-integer counts", "readers", lambda R, t: _set_X(_grid_anndata(), lambda x: x * 1.37 + 25),
         lambda a, R, t: _from_anndata(a), ("non-integer",), ("clear error", "warning")),
    Case("from_anndata zero spots", "readers", lambda R, t: _grid_anndata()[:0].copy(),
         lambda a, R, t: _from_anndata(a), ("spots",)),
    Case("from_anndata negative mpp", "readers", lambda R, t: _grid_anndata(),
         lambda a, R, t: stf.io.from_anndata(a, image=texture(700, 700), mpp=-1.0, spot_diameter_um=55), ("mpp",)),
    # --- pp --------------------------------------------------------------------------------------------------
    Case("normalize target_sum=0", "pp", lambda R, t: R.table(),
         lambda a, R, t: stf.pp.normalize(a, target_sum=0), ("target_sum",)),
    Case("normalize target_sum<0", "pp", lambda R, t: R.table(),
         lambda a, R, t: stf.pp.normalize(a, target_sum=-5.0), ("target_sum",)),
    Case("normalize log-normalised X", "pp", lambda R, t: _set_X(R.table(), _lognorm),
         lambda a, R, t: stf.pp.normalize(a, layer=None), ("log-normalised", "X")),
    Case("normalize twice", "pp", lambda R, t: _then(R.table(), lambda a: stf.pp.normalize(a, layer=None)),
         lambda a, R, t: stf.pp.normalize(a, layer=None), ("log-normalised",)),
    Case("normalize missing layer", "pp", lambda R, t: R.table(),
         lambda a, R, t: stf.pp.normalize(a, layer="raw"), ("raw",)),
    Case("hvg log-normalised layer", "pp", lambda R, t: _set_layer(R.table(), _lognorm),
         lambda a, R, t: stf.pp.highly_variable_genes(a, n_top=5), ("log-normalised", "counts")),
    Case("hvg non-integer counts", "pp", lambda R, t: _set_layer(R.table(), lambda x: x * 1.37 + 25),
         lambda a, R, t: stf.pp.highly_variable_genes(a, n_top=5), ("non-integer",), ("clear error", "warning")),
    Case("hvg duplicate gene names", "pp", lambda R, t: _dup_var(R.table()),
         lambda a, R, t: stf.pp.highly_variable_genes(a, n_top=5), ("duplicate gene", "GENE0000")),
    Case("hvg n_top=0", "pp", lambda R, t: R.table(),
         lambda a, R, t: stf.pp.highly_variable_genes(a, n_top=0), ("n_top",)),
    Case("hvg over a list, one slide log-normalised", "pp", lambda R, t: [R.table(), _set_layer(R.table(), _lognorm)],
         lambda a, R, t: stf.pp.highly_variable_genes(a, n_top=5), ("slide 1", "log-normalised")),
    Case("pathway_activity log-normalised layer", "pp", lambda R, t: _set_layer(R.table(), _lognorm),
         lambda a, R, t: stf.pp.pathway_activity(a, gene_sets=R.gene_sets(), min_genes=1), ("log-normalised",)),
    Case("pathway_activity target_sum=0", "pp", lambda R, t: R.table(),
         lambda a, R, t: stf.pp.pathway_activity(a, gene_sets=R.gene_sets(), min_genes=1, target_sum=0), ("target_sum",)),
    Case("pathway_activity duplicate gene names", "pp", lambda R, t: _dup_var(R.table()),
         lambda a, R, t: stf.pp.pathway_activity(a, gene_sets=R.gene_sets(), min_genes=1), ("duplicate gene",)),
    Case("pathway_activity zero spots", "pp", lambda R, t: R.table()[:0].copy(),
         lambda a, R, t: stf.pp.pathway_activity(a, gene_sets=R.gene_sets(), min_genes=1), ("no spots",)),
    Case("embed tile_size=0", "pp", lambda R, t: R.slide(),
         lambda s, R, t: stf.pp.embed(s, backbone=_tiny_backbone(), **_embed_kw(tile_size=0)), ("tile_size",)),
    Case("embed batch_size=0", "pp", lambda R, t: R.slide(),
         lambda s, R, t: stf.pp.embed(s, backbone=_tiny_backbone(), batch_size=0, **_embed_kw()), ("batch_size",)),
    Case("embed mpp<0", "pp", lambda R, t: R.slide(),
         lambda s, R, t: stf.pp.embed(s, backbone=_tiny_backbone(), **_embed_kw(mpp=-1.0)), ("mpp",)),
    Case("embed NaN embeddings", "pp", lambda R, t: R.slide(),
         lambda s, R, t: stf.pp.embed(s, backbone=_tiny_backbone(nan=True), **_embed_kw()), ("NaN",)),
    Case("embed list, second slide fails", "pp", lambda R, t: [R.slide(), R.slide()],
         lambda s, R, t: stf.pp.embed(s, backbone=_tiny_backbone(fail_on_call=2), batch_size=64, **_embed_kw()),
         ("simulated failure",)),
    Case("embed an AnnData", "pp", lambda R, t: R.table(),
         lambda a, R, t: stf.pp.embed(a, backbone=_tiny_backbone(), **_embed_kw()), ("SpatialData",)),
    # --- tl ----------------------------------------------------------------------------------------------------
    Case("fit log-normalised targets", "tl", lambda R, t: [_set_layer(R.toy("A"), _lognorm), R.toy("B", "P2", 1)],
         lambda d, R, t: _fit(d, R), ("log-normalised", "'A'")),
    Case("fit poisson on non-integer counts", "tl", lambda R, t: [_set_layer(R.toy("A"), lambda x: x * 1.37 + 25)],
         lambda d, R, t: _fit(d, R, loss="poisson"), ("integer",)),
    Case("fit Gaussian on non-integer counts", "tl", lambda R, t: [_set_layer(R.toy("A"), lambda x: x * 1.37 + 25)],
         lambda d, R, t: _fit(d, R), ("non-integer",), ("clear error", "warning")),
    Case("fit duplicate gene names", "tl", lambda R, t: [_dup_var(R.toy("A"))],
         lambda d, R, t: _fit(d, R, genes=3), ("duplicate gene",)),
    Case("fit max_epochs=0", "tl", lambda R, t: [R.toy("A")], lambda d, R, t: _fit(d, R, max_epochs=0), ("max_epochs",)),
    Case("fit lr=0", "tl", lambda R, t: [R.toy("A")], lambda d, R, t: _fit(d, R, lr=0.0), ("lr",)),
    Case("fit zero spots", "tl", lambda R, t: [R.toy("A")[:0].copy()], lambda d, R, t: _fit(d, R), ("no spots",)),
    Case("fit resume with another seed", "tl", lambda R, t: [a.copy() for a in R.toy_pair],
         lambda d, R, t: _fit(d, R, resume_from=R.checkpoint, seed=1, max_epochs=2), ("seed",)),
    Case("fit resume with another lr", "tl", lambda R, t: [a.copy() for a in R.toy_pair],
         lambda d, R, t: _fit(d, R, resume_from=R.checkpoint, lr=5e-3, max_epochs=2), ("lr",)),
    Case("fit resume with another dropout", "tl", lambda R, t: [a.copy() for a in R.toy_pair],
         lambda d, R, t: _fit(d, R, resume_from=R.checkpoint, max_epochs=2,
                              model_kwargs={**R.fit_kw["model_kwargs"], "dropout": 0.3}), ("dropout",)),
    Case("predict with NaN weights", "tl", lambda R, t: R.toy("C", "P3", 2),
         lambda a, R, t: stf.tl.predict(a, _nan_model(R)), ("NaN",)),
    Case("predict list, second lacks embedding", "tl", lambda R, t: [R.toy("C", "P3", 2), _drop_obsm(R.toy("D", "P4", 3))],
         lambda d, R, t: stf.tl.predict(d, R.model), ("X_toy", "Slide 1")),
    Case("predict duplicate gene names", "tl", lambda R, t: _dup_var(R.toy("C", "P3", 2)),
         lambda a, R, t: stf.tl.predict(a, R.model), ("duplicate gene",)),
    Case("predict key_added is the expression table", "tl", lambda R, t: _toy_sd(R),
         lambda d, R, t: stf.tl.predict(d, R.model, key_added="table"), ("'table'", "expression table")),
    Case("predict over a table it did not write", "tl", lambda R, t: _toy_sd(R, mine=True),
         lambda d, R, t: stf.tl.predict(d, R.model, pathway_key_added="mine"), ("'mine'", "not written")),
    Case("predict key_added == pathway_key_added", "tl", lambda R, t: R.toy("C", "P3", 2),
         lambda a, R, t: stf.tl.predict(a, R.model, key_added="p", pathway_key_added="p"), ("'p'", "pathway_key_added")),
    Case("evaluate spots column not boolean", "tl", lambda R, t: _predicted(R),
         lambda a, R, t: stf.tl.evaluate(a, spots="slide_id"), ("spots", "slide_id", "boolean")),
    Case("evaluate the table of a SpatialData alone", "tl", lambda R, t: _predicted(R, sdata=True).tables["table"],
         lambda a, R, t: stf.tl.evaluate(a), ("stf_pred", "pass the SpatialData")),
    Case("pl.spatial a gene the model does not predict", "pl", lambda R, t: _predicted(R, extra_gene=True),
         lambda a, R, t: stf.pl.spatial(a, genes="G8", show=False), ("G8", "no prediction", "stf_pred")),
    Case("predict super-resolution list, second slide lacks mpp", "tl", lambda R, t: [_copy_sd(R.small_slide), _no_mpp_slide(R)],
         lambda d, R, t: stf.tl.predict(d, R.sr_model, progress=False), ("mpp",)),
    # --- save / load -------------------------------------------------------------------------------------------
    Case("TrainedModel.load config not JSON", "save/load",
         lambda R, t: _then(R.model_copy(t), lambda p: (p / "config.json").write_text("{not json")),
         lambda p, R, t: stf.tl.TrainedModel.load(p), ("config.json",)),
    Case("TrainedModel.load config is a list", "save/load",
         lambda R, t: _then(R.model_copy(t), lambda p: (p / "config.json").write_text("[1, 2]")),
         lambda p, R, t: stf.tl.TrainedModel.load(p), ("config.json",)),
    Case("TrainedModel.load genes not a list", "save/load",
         lambda R, t: _then(R.model_copy(t), lambda p: _edit_json(p / "config.json", genes=7)),
         lambda p, R, t: stf.tl.TrainedModel.load(p), ("config.json", "genes")),
    Case("TrainedModel.load truncated weights", "save/load",
         lambda R, t: _then(R.model_copy(t), lambda p: _truncate(p / "weights.pt")),
         lambda p, R, t: stf.tl.TrainedModel.load(p), ("weights.pt",)),
    Case("TrainedModel.load truncated ridge arrays", "save/load",
         lambda R, t: _then(R.model_copy(t, "ridge"), lambda p: _truncate(p / "ridge.npz")),
         lambda p, R, t: stf.tl.TrainedModel.load(p), ("ridge.npz",)),
    Case("TrainedModel.save over a folder of other files", "save/load", lambda R, t: _user_folder(t),
         lambda p, R, t: R.model.save(p, overwrite=True), ("not", str(Path("user")))),
    Case("TrainedModel.save existing, overwrite=False", "save/load", lambda R, t: R.model_copy(t, "ridge"),
         lambda p, R, t: R.model.save(p), ("overwrite",)),
    Case("SuperResModel.load hf-hub architecture", "save/load",
         lambda R, t: R.sr_copy(t, backbone__arch="hf-hub:nobody/nothing"),
         lambda p, R, t: stf.tl.SuperResModel.load(p), ("hf-hub",)),
    Case("SuperResModel.load state_file outside the folder", "save/load",
         lambda R, t: _outside_state(R, t), lambda p, R, t: stf.tl.SuperResModel.load(p), ("state_file",)),
    Case("SuperResModel.load timm checkpoint_path", "save/load",
         lambda R, t: R.sr_copy(t, backbone__timm_kwargs={"img_size": 64, "depth": 1, "checkpoint_path": "/nonexistent.pth"}),
         lambda p, R, t: stf.tl.SuperResModel.load(p), ("checkpoint_path",)),
    Case("SuperResModel.load truncated weights", "save/load", lambda R, t: _then(R.sr_copy(t), lambda p: _truncate(p / "weights.pt")),
         lambda p, R, t: stf.tl.SuperResModel.load(p), ("weights.pt",)),
    Case("SuperResModel.load config is a list", "save/load",
         lambda R, t: _then(R.sr_copy(t), lambda p: (p / "config.json").write_text("[]")),
         lambda p, R, t: stf.tl.SuperResModel.load(p), ("config.json",)),
    Case("predict_superres store exists", "save/load", lambda R, t: [_copy_sd(R.small_slide), _store(t)],
         lambda d, R, t: stf.tl.predict_superres(d[0], R.sr_model, store=d[1], progress=False), ("overwrite",)),
    # --- CLI -----------------------------------------------------------------------------------------------------
    Case("stf demo --epochs 0", "cli", lambda R, t: None,
         lambda _, R, t: _cli("demo", "--epochs", "0", "--quiet", "--out", str(t / "o")), ("epochs",)),
    Case("stf demo --genes 0", "cli", lambda R, t: None,
         lambda _, R, t: _cli("demo", "--genes", "0", "--quiet", "--out", str(t / "o")), ("genes",)),
    Case("stf demo --out is a file", "cli", lambda R, t: _a_file(t),
         lambda p, R, t: _cli("demo", "--quiet", "--epochs", "1", "--out", str(p)), ("out",)),
    Case("stf benchmark unknown dataset", "cli", lambda R, t: None,
         lambda _, R, t: _cli("benchmark", "--dataset", "nope", "--out", str(t / "o")), ("nope",)),
    Case("stf benchmark unknown model", "cli", lambda R, t: None,
         lambda _, R, t: _cli("benchmark", "--dataset", "synthetic", "--models", "nope", "--out", str(t / "o")),
         ("nope",)),
    Case("stf benchmark --epochs -1", "cli", lambda R, t: None,
         lambda _, R, t: _cli("benchmark", "--dataset", "synthetic", "--epochs", "-1", "--out", str(t / "o")),
         ("epochs",)),
]


def _then(x, fn):
    fn(x)
    return x


def _set_cell(c, i, j, value):
    c.iloc[i, j] = value
    return c


def _rewrite_h5ad(path: Path, fn, rows=None):
    a = ad.read_h5ad(path)
    if rows is not None:
        a = a[:rows].copy()
    if fn is not None:
        fn(a)
    a.write_h5ad(path)


def _drop_obsm(a):
    del a.obsm["X_toy"]
    return a


def _copy_sd(s):
    from spatialdata import deepcopy

    return deepcopy(s)


def _toy_sd(R, *, mine: bool = False, table=None):
    """A toy slide as a SpatialData whose table annotates shapes 'spots' (optionally beside a user table 'mine')."""
    from spatialdata import SpatialData
    from spatialdata.models import TableModel

    a = R.toy("C", "P3", 2) if table is None else table
    a.obs["region"] = pd.Categorical(["spots"] * a.n_obs)
    a.obs["spot_id"] = np.arange(a.n_obs)
    tables = {"table": TableModel.parse(a, region="spots", region_key="region", instance_key="spot_id")}
    if mine:
        tables["mine"] = ad.AnnData(np.zeros((2, 2), np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # annotates 'spots', not in this SpatialData
        return SpatialData(tables=tables)


def _predicted(R, *, sdata: bool = False, extra_gene: bool = False):
    """A toy slide after `stf.tl.predict` (an AnnData, or a SpatialData); ``extra_gene``: a measured gene G8 the
    model does not predict."""
    a = R.toy("C", "P3", 2, genes=[f"G{i}" for i in range(9)] if extra_gene else None)
    d = _toy_sd(R, table=a) if sdata else a
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        stf.tl.predict(d, R.model, progress=False)
    return d


def _edit_json(path: Path, **changes):
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _user_folder(tmp: Path) -> Path:
    p = tmp / "user"
    p.mkdir()
    (p / "notes.txt").write_text("my notes")
    return p


def _outside_state(R, tmp: Path) -> Path:
    p = R.sr_copy(tmp, backbone__state_file="../outside.pt")
    shutil.copy(p / "backbone.pt", tmp / "outside.pt")
    return p


def _store(tmp: Path) -> Path:
    p = tmp / "existing.zarr"
    p.mkdir()
    (p / "zarr.json").write_text("{}")
    return p


def _a_file(tmp: Path) -> Path:
    p = tmp / "a_file"
    p.write_text("x")
    return p


# --- tests ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resources(tmp_path_factory):
    return Resources(tmp_path_factory.mktemp("matrix"))


def test_matrix_size():
    assert len(CASES) >= 60
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.area for c in CASES} == {"readers", "pp", "tl", "pl", "save/load", "cli"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, resources, tmp_path, monkeypatch):
    monkeypatch.setattr(stf.settings, "_cache_dir", tmp_path / "cache")
    outcome, detail = run_case(case, resources, tmp_path)
    assert outcome in case.allowed, f"{case.id}: {outcome}: {detail}"


def main() -> None:
    """Print every case's outcome and the counts per outcome."""
    import time

    import torch

    torch.set_num_threads(1)
    counts = dict.fromkeys(OUTCOMES, 0)
    with tempfile.TemporaryDirectory() as root:
        R = Resources(Path(root) / "res")
        for i, case in enumerate(CASES):
            tmp = Path(root) / f"case{i}"
            tmp.mkdir()
            stf.settings.cache_dir = tmp / "cache"
            t0 = time.perf_counter()
            try:
                outcome, detail = run_case(case, R, tmp)
            except Exception as err:  # noqa: BLE001  (a broken case set-up: report it, go on)
                outcome, detail = "unhelpful", f"case set-up failed: {type(err).__name__}: {err}"
            counts[outcome] += 1
            flag = "" if outcome in case.allowed else "  <-- not allowed"
            print(f"{case.area:9s} | {case.id:55s} | {outcome:11s} | {time.perf_counter() - t0:5.1f}s | {detail[:140]!r}{flag}")
    print(f"\n{len(CASES)} cases: " + ", ".join(f"{k}: {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
