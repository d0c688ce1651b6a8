"""Bad input to the ``stf.io`` readers raises a clear error naming the problem and changes nothing."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import spatialtranscriptformer as stf
from spatialtranscriptformer.datasets._her2st import bundled_path
from test_io_readers import make_hest, make_visium_hd, texture

# --- her2st layout: small copies of the bundled section ----------------------------------------------


@pytest.fixture(scope="module")
def her2st_small(tmp_path_factory) -> Path:
    """The bundled C2 section with 50 genes (the full-resolution jpg kept)."""
    src = bundled_path()
    d = tmp_path_factory.mktemp("her2st") / "C2"
    d.mkdir()
    counts = pd.read_csv(src / "C2.tsv.gz", sep="\t", index_col=0)
    counts.iloc[:, :50].to_csv(d / "C2.tsv", sep="\t")
    shutil.copy(src / "C2_selection.tsv", d / "C2_selection.tsv")
    shutil.copy(next(src.glob("*.jpg")), d / "HE.jpg")
    return d


@pytest.fixture
def her2st_copy(her2st_small, tmp_path) -> Path:
    d = tmp_path / "C2"
    shutil.copytree(her2st_small, d)
    return d


def _edit_counts(d: Path, fn) -> None:
    counts = pd.read_csv(d / "C2.tsv", sep="\t", index_col=0)
    fn(counts).to_csv(d / "C2.tsv", sep="\t")


def test_her2st_small_copy_reads(her2st_copy):
    s = stf.io.read_her2st(her2st_copy, load_image=False)
    assert s.tables["table"].n_obs == 187


@pytest.mark.parametrize(
    ("remove", "match"),
    [("HE.jpg", "H&E image"), ("C2.tsv", "counts file"), ("C2_selection.tsv", "selection file")],
)
def test_her2st_missing_file(her2st_copy, remove, match):
    (her2st_copy / remove).unlink()
    with pytest.raises(FileNotFoundError, match=match):
        stf.io.read_her2st(her2st_copy)


def _nan(c):
    c = c.astype(float)
    c.iloc[3, 2] = np.nan
    return c


def _neg(c):
    c.iloc[5, 1] = -4
    return c


def _text(c):
    c = c.astype(object)
    c.iloc[0, 4] = "many"
    return c


def _dup(c):
    return pd.concat([c, c.iloc[[7]]])


@pytest.mark.parametrize(
    ("edit", "match"),
    [(_nan, "NaN"), (_neg, "negative"), (_text, "non-numeric"), (_dup, "[Dd]uplicate spot ids")],
)
def test_her2st_bad_counts(her2st_copy, edit, match):
    _edit_counts(her2st_copy, edit)
    before = (her2st_copy / "C2.tsv").read_bytes()
    with pytest.raises(ValueError, match=match):
        stf.io.read_her2st(her2st_copy, load_image=False)
    assert (her2st_copy / "C2.tsv").read_bytes() == before


def test_her2st_spots_outside_image(her2st_copy):
    sel = pd.read_csv(her2st_copy / "C2_selection.tsv", sep="\t")
    sel["pixel_x"] += 50_000
    sel.to_csv(her2st_copy / "C2_selection.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match="outside the image"):
        stf.io.read_her2st(her2st_copy)


def test_her2st_wrong_units(her2st_copy):
    sel = pd.read_csv(her2st_copy / "C2_selection.tsv", sep="\t")
    sel[["pixel_x", "pixel_y"]] *= 0.045  # low-resolution pixels, but the µm/px of the full-res scan
    sel.to_csv(her2st_copy / "C2_selection.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match="wrong units"):
        stf.io.read_her2st(her2st_copy, mpp=0.69, load_image=False)


@pytest.mark.parametrize("mpp", [0.0, -0.7, float("nan")])
def test_her2st_invalid_mpp(her2st_copy, mpp):
    with pytest.raises(ValueError, match="[Mm]icrons per pixel"):
        stf.io.read_her2st(her2st_copy, mpp=mpp, load_image=False)


# --- Visium (copies of visium_tiny) -------------------------------------------------------------------


@pytest.fixture
def visium_copy(shared_data, tmp_path) -> Path:
    src = shared_data / "visium_tiny"
    if not src.is_dir():
        pytest.skip(f"visium_tiny not found under {shared_data}")
    d = tmp_path / "visium"
    shutil.copytree(src, d)
    for p in d.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return d


@pytest.mark.parametrize(
    ("remove", "match"),
    [
        ("filtered_feature_bc_matrix.h5", "counts file not found.*filtered_feature_bc_matrix.h5"),
        ("spatial/tissue_positions_list.csv", "positions not found.*tissue_positions_list.csv"),
        ("spatial/scalefactors_json.json", "scalefactors file not found.*scalefactors_json.json"),
    ],
)
def test_visium_missing_file(visium_copy, remove, match):
    (visium_copy / remove).unlink()
    with pytest.raises(FileNotFoundError, match=match):
        stf.io.read_visium(visium_copy)


def test_visium_missing_images(visium_copy):
    for name in ("hires", "lowres"):
        (visium_copy / "spatial" / f"tissue_{name}_image.png").unlink()
    with pytest.raises(FileNotFoundError, match="no H&E image found.*tissue_lowres_image.png"):
        stf.io.read_visium(visium_copy)
    with pytest.raises(FileNotFoundError, match="Full-resolution image not found.*missing.tif"):
        stf.io.read_visium(visium_copy, fullres_image_file="missing.tif")


def test_visium_unknown_mpp(visium_copy):
    sf_path = visium_copy / "spatial" / "scalefactors_json.json"
    sf = json.loads(sf_path.read_text())
    del sf["spot_diameter_fullres"]
    sf_path.write_text(json.dumps(sf))
    with pytest.raises(ValueError, match="spot_diameter_fullres"):
        stf.io.read_visium(visium_copy)
    with pytest.raises(ValueError, match="mpp=-1"):
        stf.io.read_visium(visium_copy, mpp=-1)


# --- Visium HD ------------------------------------------------------------------------------------------


@pytest.fixture
def hd_copy(tmp_path) -> Path:
    return make_visium_hd(tmp_path, bins=(8, 16))


def test_visium_hd_missing_bin_size_lists_present(hd_copy):
    with pytest.raises(ValueError, match=r"bin size 2 .*present: \[8, 16\]"):
        stf.io.read_visium_hd(hd_copy, bin_size=2)


@pytest.mark.parametrize(
    ("remove", "match"),
    [
        ("spatial/tissue_positions.parquet", "bin positions not found.*tissue_positions.parquet"),
        ("filtered_feature_bc_matrix.h5", "counts file not found.*filtered_feature_bc_matrix.h5"),
    ],
)
def test_visium_hd_missing_file(hd_copy, remove, match):
    (hd_copy / "binned_outputs" / "square_008um" / remove).unlink()
    with pytest.raises(FileNotFoundError, match=match):
        stf.io.read_visium_hd(hd_copy, bin_size=8)


def test_visium_hd_unknown_mpp_and_no_bins(hd_copy, tmp_path):
    sf_path = hd_copy / "binned_outputs" / "square_016um" / "spatial" / "scalefactors_json.json"
    sf = json.loads(sf_path.read_text())
    del sf["microns_per_pixel"], sf["spot_diameter_fullres"]
    sf_path.write_text(json.dumps(sf))
    with pytest.raises(ValueError, match="unknown µm/px.*mpp="):
        stf.io.read_visium_hd(hd_copy, bin_size=16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="square_<NNN>um"):
        stf.io.read_visium_hd(tmp_path / "empty")


# --- HEST ------------------------------------------------------------------------------------------------


def test_hest_missing_files_and_mpp(tmp_path):
    root = make_hest(tmp_path / "hest")
    (root / "metadata" / "TENX00.json").unlink()
    with pytest.raises(ValueError, match="Unknown microns per pixel.*mpp="):
        stf.io.read_hest(root, load_image=False)
    (root / "wsis" / "TENX00.tif").unlink()
    with pytest.raises(FileNotFoundError, match="whole-slide image not found.*TENX00.tif"):
        stf.io.read_hest(root, mpp=2.0)
    with pytest.raises(FileNotFoundError, match="expression file not found.*NOPE.h5ad"):
        stf.io.read_hest(root, sample_id="NOPE", mpp=2.0)
    make_hest(root, sample_id="TENX01")
    with pytest.raises(ValueError, match="2 samples.*sample_id="):
        stf.io.read_hest(root)


def _edit_h5ad(path: Path, fn) -> None:
    a = ad.read_h5ad(path)
    fn(a)
    a.write_h5ad(path)


def _shift(a):
    a.obsm["spatial"] = a.obsm["spatial"] + 1000


def _nan_counts(a):
    x = a.X.toarray()
    x[0, 0] = np.nan
    a.X = sp.csr_matrix(x)


@pytest.mark.parametrize(("edit", "match"), [(_shift, "outside the image"), (_nan_counts, "NaN")])
def test_hest_bad_h5ad(tmp_path, edit, match):
    root = make_hest(tmp_path / "hest")
    _edit_h5ad(root / "st" / "TENX00.h5ad", edit)
    with pytest.raises(ValueError, match=match):
        stf.io.read_hest(root)


# --- from_anndata: errors leave the user's AnnData unchanged -------------------------------------------


@pytest.fixture
def visium_adata(shared_data) -> ad.AnnData:
    import scanpy as sc

    if not (shared_data / "visium_tiny").is_dir():
        pytest.skip(f"visium_tiny not found under {shared_data}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        a = sc.read_visium(shared_data / "visium_tiny")
    del a.uns["spatial"]["custom"]["images"]["hires"]  # blank; keep the test light
    a.X = a.X.toarray()
    return a


def _assert_same(a: ad.AnnData, b: ad.AnnData) -> None:
    assert a.X.dtype == b.X.dtype
    np.testing.assert_array_equal(a.X, b.X)  # NaN positions must match too
    assert list(a.obs_names) == list(b.obs_names) and list(a.var_names) == list(b.var_names)
    pd.testing.assert_frame_equal(a.obs, b.obs)
    assert set(a.obsm) == set(b.obsm) and set(a.layers) == set(b.layers) and set(a.uns) == set(b.uns)
    for k in a.obsm:
        np.testing.assert_array_equal(a.obsm[k], b.obsm[k])
    if "spatial" in a.uns:
        for lib, d in a.uns["spatial"].items():
            assert set(d.get("images", {})) == set(b.uns["spatial"][lib].get("images", {}))
            assert d["scalefactors"] == b.uns["spatial"][lib]["scalefactors"]


def _set_x(a, value, where=(2, 3)):
    x = a.X.astype(object) if isinstance(value, str) else a.X.astype(float)
    x[where] = value
    a.X = x


CASES = {
    "nan counts": (lambda a: _set_x(a, np.nan), {}, ValueError, "NaN"),
    "negative counts": (lambda a: _set_x(a, -3.0), {}, ValueError, "negative"),
    "non-numeric counts": (lambda a: _set_x(a, "x"), {}, ValueError, "numeric"),
    "duplicate spot ids": (
        lambda a: setattr(a, "obs_names", [a.obs_names[0], *a.obs_names[:-1]]),
        {},
        ValueError,
        "Duplicate spot ids",
    ),
    "spots outside image": (
        lambda a: a.obsm.__setitem__("spatial", a.obsm["spatial"] + 20_000),
        {},
        ValueError,
        "outside the image",
    ),
    "lowres coordinates with full-res units": (
        lambda a: a.obsm.__setitem__("spatial", a.obsm["spatial"] * 0.045),
        {},
        ValueError,
        "wrong units",
    ),
    "invalid mpp": (None, {"mpp": float("nan")}, ValueError, "mpp=nan"),
    "missing requested image": (None, {"img_key": "hires"}, KeyError, "'hires' not found.*available: \\['lowres'\\]"),
    "several libraries": (
        lambda a: a.uns["spatial"].__setitem__("other", a.uns["spatial"]["custom"]),
        {},
        KeyError,
        "several libraries",
    ),
    "no images": (lambda a: a.uns["spatial"]["custom"].pop("images"), {}, ValueError, "No H&E image"),
    "no coordinates": (lambda a: a.obsm.pop("spatial"), {}, KeyError, "spatial"),
    "unknown mpp": (
        lambda a: a.uns.pop("spatial"),
        {"image": np.zeros((10, 10, 3), np.uint8)},
        ValueError,
        "Unknown microns per pixel.*mpp=",
    ),
    "unknown spot diameter": (
        lambda a: a.uns.pop("spatial"),
        {"image": np.zeros((10, 10, 3), np.uint8), "mpp": 1.0},
        ValueError,
        "spot_diameter_um=",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_from_anndata_bad_input_leaves_adata_unchanged(visium_adata, case):
    edit, kwargs, err, match = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anndata's "obs names not unique"
        if edit is not None:
            edit(visium_adata)
        before = visium_adata.copy()
    with pytest.raises(err, match=match):
        stf.io.from_anndata(visium_adata, **kwargs)
    _assert_same(visium_adata, before)


def test_from_anndata_explicit_image_wrong_units():
    """Coordinates in low-resolution pixels with a full-resolution image and its µm/px."""
    g = np.arange(6) * 100.0 + 50  # 100 µm pitch at 1 µm/px
    xy = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    a = ad.AnnData(X=np.ones((len(xy), 3), np.float32), obs=pd.DataFrame(index=[f"s{i}" for i in range(len(xy))]))
    a.obsm["spatial"] = xy * 0.1
    before = a.copy()
    with pytest.raises(ValueError, match="wrong units"):
        stf.io.from_anndata(a, image=texture(700, 700), mpp=1.0, spot_diameter_um=55)
    _assert_same(a, before)
    a.obsm["spatial"] = xy
    s = stf.io.from_anndata(a, image=texture(700, 700), mpp=1.0, spot_diameter_um=55)
    assert s.tables["table"].uns["stf_slide"]["mpp"] == 1.0
