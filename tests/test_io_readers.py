"""The HEST, Visium, Visium HD and AnnData readers of ``stf.io`` on real (visium_tiny) and fake folders."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import spatialtranscriptformer as stf
from spatialtranscriptformer import _constants as K

# --- writers of tiny fake data sets (also used by test_io_bad_input.py) ---------------------------


def texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A non-blank RGB uint8 image."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def write_10x_h5(path: Path, counts: np.ndarray, barcodes: list[str], genes: list[str]) -> None:
    """Write a Cell Ranger v3 ``filtered_feature_bc_matrix.h5`` (spots x genes counts)."""
    import h5py

    m = sp.csc_matrix(np.asarray(counts).T)  # genes x barcodes
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["barcodes"] = np.array(barcodes, dtype="S")
        g["data"] = m.data.astype(np.int32)
        g["indices"] = m.indices.astype(np.int64)
        g["indptr"] = m.indptr.astype(np.int64)
        g["shape"] = np.array(m.shape, dtype=np.int32)
        fg = g.create_group("features")
        fg["id"] = np.array([f"ENSG{i:011d}" for i in range(len(genes))], dtype="S")
        fg["name"] = np.array(genes, dtype="S")
        fg["feature_type"] = np.array(["Gene Expression"] * len(genes), dtype="S")
        fg["genome"] = np.array(["GRCh38"] * len(genes), dtype="S")
        fg["_all_tag_keys"] = np.array([b"genome"])


HD_MPP = 0.5
"""µm per full-resolution pixel of the fake Visium HD slide."""
HD_HIRES, HD_LOWRES = 0.25, 0.1


def make_visium_hd(root: Path, *, bins=(8, 16), extent_px: int = 400) -> Path:
    """A Space Ranger 3 Visium HD ``outs`` folder: binned_outputs/square_<NNN>um + outs/spatial images."""
    outs = root / "outs"
    (outs / "spatial").mkdir(parents=True)
    from PIL import Image

    for name, s in (("hires", HD_HIRES), ("lowres", HD_LOWRES)):
        Image.fromarray(texture(int(extent_px * s), int(extent_px * s), seed=1)).save(outs / "spatial" / f"tissue_{name}_image.png")
    rng = np.random.default_rng(0)
    for b in bins:
        d = outs / "binned_outputs" / f"square_{b:03d}um"
        (d / "spatial").mkdir(parents=True)
        edge = b / HD_MPP
        n = int(extent_px // edge) - 1
        rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        rows, cols = rows.ravel(), cols.ravel()
        bc = [f"s_{b:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols, strict=True)]
        pos = pd.DataFrame(
            {
                "barcode": bc,
                "in_tissue": 1,
                "array_row": rows,
                "array_col": cols,
                "pxl_row_in_fullres": (rows + 1) * edge + 0.3,
                "pxl_col_in_fullres": (cols + 1) * edge - 0.2,
            }
        )
        pos.to_parquet(d / "spatial" / "tissue_positions.parquet")
        keep = np.sort(rng.choice(len(bc), size=int(0.7 * len(bc)), replace=False))
        counts = rng.poisson(1.0, size=(len(keep), 12))
        write_10x_h5(d / "filtered_feature_bc_matrix.h5", counts, [bc[i] for i in keep], [f"G{i}" for i in range(12)])
        sf = {
            "spot_diameter_fullres": edge,
            "bin_size_um": float(b),
            "microns_per_pixel": HD_MPP,
            "tissue_hires_scalef": HD_HIRES,
            "tissue_lowres_scalef": HD_LOWRES,
            "fiducial_diameter_fullres": 10 * edge,
        }
        (d / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf))
    return outs


HEST_MPP = 2.0


def make_hest(root: Path, *, sample_id: str = "TENX00", with_json: bool = True) -> Path:
    """A HEST-1k-like folder: st/<id>.h5ad, wsis/<id>.tif (2-level pyramid), metadata/<id>.json."""
    import tifffile

    for sub in ("st", "wsis", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    img = texture(400, 400, seed=2)
    with tifffile.TiffWriter(root / "wsis" / f"{sample_id}.tif") as tw:
        tw.write(img, subifds=1, photometric="rgb", tile=(64, 64))
        tw.write(img[::2, ::2], subfiletype=1, photometric="rgb", tile=(64, 64))
    pitch_px = 100.0 / HEST_MPP  # 100 µm Visium pitch
    g = np.arange(7)
    yy, xx = np.meshgrid(g, g, indexing="ij")
    xy = np.c_[xx.ravel(), yy.ravel()] * pitch_px + 40.0
    rng = np.random.default_rng(3)
    a = ad.AnnData(
        X=sp.csr_matrix(rng.poisson(2.0, size=(len(xy), 15)).astype(np.float32)),
        obs=pd.DataFrame(index=[f"{i}x{j}" for i, j in zip(xx.ravel(), yy.ravel(), strict=True)]),
        var=pd.DataFrame(index=[f"GENE{i}" for i in range(15)]),
    )
    a.obsm["spatial"] = xy
    a.write_h5ad(root / "st" / f"{sample_id}.h5ad")
    meta = {
        "id": sample_id,
        "pixel_size_um_estimated": HEST_MPP,
        "pixel_size_um_embedded": 2.1,
        "spot_diameter": 55.0,
        "inter_spot_dist": 100.0,
        "patient": "P7",
        "st_technology": "Visium",
        "organ": "Breast",
    }
    if with_json:
        (root / "metadata" / f"{sample_id}.json").write_text(json.dumps(meta))
    else:
        pd.DataFrame([meta]).to_csv(root / "HEST_v1_1_0.csv", index=False)
    return root


def check_linked(sdata, *, n: int) -> None:
    """Table linked to the shapes by region/instance keys, slide ids and metadata present."""
    t = sdata.tables[K.TABLE_KEY]
    attrs = t.uns["spatialdata_attrs"]
    assert attrs["region"] == K.SHAPES_KEY
    assert attrs["region_key"] == K.REGION_KEY and attrs["instance_key"] == K.INSTANCE_KEY
    assert t.n_obs == n == len(sdata.shapes[K.SHAPES_KEY])
    assert list(t.obs[K.INSTANCE_KEY]) == list(sdata.shapes[K.SHAPES_KEY].index)
    assert set(t.obs[K.REGION_KEY]) == {K.SHAPES_KEY}
    assert {K.SLIDE_KEY, K.PATIENT_KEY} <= set(t.obs.columns)
    assert t.obsm[K.SPATIAL_KEY].shape == (n, 2)
    np.testing.assert_array_equal(
        t.layers[K.COUNTS_LAYER].toarray() if sp.issparse(t.X) else t.layers[K.COUNTS_LAYER],
        t.X.toarray() if sp.issparse(t.X) else t.X,
    )


def image_units_per_px(sdata) -> float:
    """Coordinate units ("global") per pixel of the finest level of the slide image."""
    from spatialtranscriptformer.pp._image import units_per_pixel

    return units_per_pixel(sdata.images[K.IMAGE_KEY])


def image_shape(sdata) -> tuple[int, ...]:
    from spatialdata import get_pyramid_levels
    from xarray import DataArray

    img = sdata.images[K.IMAGE_KEY]
    return tuple((img if isinstance(img, DataArray) else get_pyramid_levels(img, n=0)).shape)


# --- Visium (real Space Ranger folder) -------------------------------------------------------------


@pytest.fixture(scope="module")
def visium_dir(shared_data) -> Path:
    d = shared_data / "visium_tiny"
    if not (d / "filtered_feature_bc_matrix.h5").is_file():
        pytest.skip(f"visium_tiny not found under {shared_data}")
    return d


@pytest.fixture(scope="module")
def visium_sdata(visium_dir):
    with pytest.warns(UserWarning, match="blank"):
        return stf.io.read_visium(visium_dir)


def test_read_visium_uses_lowres_when_hires_blank(visium_dir, visium_sdata):
    sf = json.loads((visium_dir / "spatial" / "scalefactors_json.json").read_text())
    t = visium_sdata.tables[K.TABLE_KEY]
    check_linked(visium_sdata, n=100)
    meta = t.uns[K.SLIDE_META_KEY]
    assert meta["image_source"] == "lowres"
    assert image_shape(visium_sdata) == (3, 600, 600)
    mpp_full = 55.0 / sf["spot_diameter_fullres"]
    assert meta["mpp_fullres"] == pytest.approx(mpp_full) and meta["mpp"] == pytest.approx(mpp_full)
    assert meta["image_scalef"] == pytest.approx(sf["tissue_lowres_scalef"])
    assert meta["image_mpp"] == pytest.approx(mpp_full / sf["tissue_lowres_scalef"])
    assert meta["slide_id"] == "visium_tiny" and set(t.obs[K.SLIDE_KEY]) == {"visium_tiny"}
    # coordinates: the full-res positions of the positions file, as in Space Ranger and scanpy
    pos = pd.read_csv(visium_dir / "spatial" / "tissue_positions_list.csv", header=None, index_col=0)
    full = pos.loc[t.obs_names, [5, 4]].to_numpy(float)
    np.testing.assert_allclose(t.obsm[K.SPATIAL_KEY], full)
    radius = visium_sdata.shapes[K.SHAPES_KEY]["radius"].to_numpy()
    np.testing.assert_allclose(radius, 27.5 / meta["mpp"])
    # the lowres image is placed on the full-res coordinates by a scale
    assert image_units_per_px(visium_sdata) == pytest.approx(1 / sf["tissue_lowres_scalef"])
    # scanpy's image store: Space Ranger's scalefactors; the blank hires PNG is replaced by the lowres one
    lib = t.uns["spatial"][meta["library_id"]]
    assert lib["scalefactors"]["spot_diameter_fullres"] == pytest.approx(sf["spot_diameter_fullres"])
    assert lib["scalefactors"]["tissue_lowres_scalef"] == pytest.approx(sf["tissue_lowres_scalef"])
    assert lib["images"]["lowres"].shape == (600, 600, 3) and lib["images"]["lowres"].dtype == np.uint8
    assert lib["scalefactors"]["tissue_hires_scalef"] == pytest.approx(sf["tissue_lowres_scalef"])
    assert t.var_names[0].startswith("ENSG") or "gene_ids" in t.var


def test_read_visium_explicit_hires_and_no_image(visium_dir):
    with pytest.warns(UserWarning, match="blank"):
        s = stf.io.read_visium(visium_dir, img_key="hires", slide_id="s1", patient_id="p1")
    meta = s.tables[K.TABLE_KEY].uns[K.SLIDE_META_KEY]
    assert meta["image_source"] == "hires" and image_shape(s) == (3, 2000, 2000)
    assert meta["patient_id"] == "p1" and set(s.tables[K.TABLE_KEY].obs[K.PATIENT_KEY]) == {"p1"}
    s2 = stf.io.read_visium(visium_dir, img_key=None)
    assert len(s2.images) == 0
    assert s2.tables[K.TABLE_KEY].uns[K.SLIDE_META_KEY]["mpp"] == pytest.approx(meta["mpp_fullres"])
    np.testing.assert_allclose(s2.tables[K.TABLE_KEY].obsm[K.SPATIAL_KEY], s.tables[K.TABLE_KEY].obsm[K.SPATIAL_KEY])


# --- Visium HD (fake Space Ranger 3 folder) --------------------------------------------------------


@pytest.fixture(scope="module")
def hd_outs(tmp_path_factory) -> Path:
    return make_visium_hd(tmp_path_factory.mktemp("hd"))


def test_read_visium_hd_bins(hd_outs):
    s = stf.io.read_visium_hd(hd_outs, bin_size=8)
    t = s.tables[K.TABLE_KEY]
    n = len(pd.read_parquet(hd_outs / "binned_outputs/square_008um/spatial/tissue_positions.parquet"))
    check_linked(s, n=int(0.7 * n))
    meta = t.uns[K.SLIDE_META_KEY]
    assert meta["image_source"] == "hires" and meta["shape"] == "square"
    assert meta["mpp"] == pytest.approx(HD_MPP) and meta["mpp_fullres"] == pytest.approx(HD_MPP)
    assert meta["image_mpp"] == pytest.approx(HD_MPP / HD_HIRES)
    assert image_shape(s) == (3, 100, 100) and image_units_per_px(s) == pytest.approx(1 / HD_HIRES)
    bounds = s.shapes[K.SHAPES_KEY].geometry.bounds
    np.testing.assert_allclose(bounds["maxx"] - bounds["minx"], 8.0 / meta["mpp"])
    pos = pd.read_parquet(hd_outs / "binned_outputs/square_008um/spatial/tissue_positions.parquet").set_index("barcode")
    full = pos.loc[t.obs_names, ["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    np.testing.assert_allclose(t.obsm[K.SPATIAL_KEY], full)
    assert meta["slide_id"] == hd_outs.parent.name
    lib = t.uns["spatial"][meta["library_id"]]
    assert set(lib["images"]) == {"hires", "lowres"} and lib["scalefactors"]["tissue_hires_scalef"] == HD_HIRES
    s16 = stf.io.read_visium_hd(hd_outs / "binned_outputs", bin_size=16, img_key="lowres")
    m16 = s16.tables[K.TABLE_KEY].uns[K.SLIDE_META_KEY]
    assert m16["bin_size_um"] == 16 and m16["image_mpp"] == pytest.approx(HD_MPP / HD_LOWRES)


def test_read_visium_hd_fullres_image(hd_outs, tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "he.tif", texture(400, 400, seed=5), photometric="rgb")
    s = stf.io.read_visium_hd(hd_outs, bin_size=16, fullres_image_file=tmp_path / "he.tif")
    meta = s.tables[K.TABLE_KEY].uns[K.SLIDE_META_KEY]
    assert meta["image_source"] == "fullres" and meta["mpp"] == pytest.approx(HD_MPP)
    assert image_shape(s) == (3, 400, 400)


# --- HEST-1k (fake sample) --------------------------------------------------------------------------


def test_read_hest_levels_and_metadata(tmp_path):
    root = make_hest(tmp_path / "hest")
    s = stf.io.read_hest(root)
    t = s.tables[K.TABLE_KEY]
    check_linked(s, n=49)
    meta = t.uns[K.SLIDE_META_KEY]
    assert meta["mpp"] == pytest.approx(HEST_MPP)  # pixel_size_um_estimated preferred over embedded
    assert meta["patient_id"] == "P7" and set(t.obs[K.PATIENT_KEY]) == {"P7"}
    assert meta["slide_id"] == "TENX00" and meta["spot_diameter_um"] == 55.0
    assert image_shape(s) == (3, 400, 400)
    xy0 = t.obsm[K.SPATIAL_KEY]
    s1 = stf.io.read_hest(root, sample_id="TENX00", level=1)
    m1 = s1.tables[K.TABLE_KEY].uns[K.SLIDE_META_KEY]
    assert image_shape(s1) == (3, 200, 200) and m1["mpp"] == pytest.approx(2 * HEST_MPP)
    assert m1["image_downsample"] == 2.0
    np.testing.assert_allclose(s1.tables[K.TABLE_KEY].obsm[K.SPATIAL_KEY], xy0 / 2)


def test_read_hest_metadata_csv_and_overrides(tmp_path):
    root = make_hest(tmp_path / "hest", sample_id="MEND1", with_json=False)
    s = stf.io.read_hest(root, load_image=False)
    meta = s.tables[K.TABLE_KEY].uns[K.SLIDE_META_KEY]
    assert meta["mpp"] == pytest.approx(HEST_MPP) and meta["metadata_source"].endswith(".csv")
    assert len(s.images) == 0
    s2 = stf.io.read_hest(root, load_image=False, mpp=1.5, patient_id="X", spot_diameter_um=60)
    m2 = s2.tables[K.TABLE_KEY].uns[K.SLIDE_META_KEY]
    assert (m2["mpp"], m2["patient_id"], m2["spot_diameter_um"]) == (1.5, "X", 60.0)


# --- AnnData bridge ----------------------------------------------------------------------------------


@pytest.fixture
def scanpy_visium(visium_dir):
    import scanpy as sc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return sc.read_visium(visium_dir)


def test_from_anndata_scanpy_visium_matches_reader(scanpy_visium, visium_sdata):
    before = scanpy_visium.copy()
    s = stf.io.from_anndata(scanpy_visium, img_key="lowres")
    t, ref = s.tables[K.TABLE_KEY], visium_sdata.tables[K.TABLE_KEY]
    check_linked(s, n=100)
    meta = t.uns[K.SLIDE_META_KEY]
    assert meta["image_source"] == "lowres" and meta["slide_id"] == "custom"
    assert meta["mpp"] == pytest.approx(ref.uns[K.SLIDE_META_KEY]["mpp"])
    assert meta["image_mpp"] == pytest.approx(ref.uns[K.SLIDE_META_KEY]["image_mpp"])
    np.testing.assert_allclose(t.obsm[K.SPATIAL_KEY], ref[t.obs_names].obsm[K.SPATIAL_KEY])
    np.testing.assert_allclose(t.obsm[K.SPATIAL_KEY], scanpy_visium.obsm["spatial"])  # the user's coordinates
    assert image_shape(s) == (3, 600, 600)
    # the user's uns['spatial'] library is kept (a copy), consistent with the unchanged coordinates
    lib, user = t.uns["spatial"]["custom"], scanpy_visium.uns["spatial"]["custom"]
    assert lib["scalefactors"] == user["scalefactors"]
    assert set(lib["images"]) == set(user["images"])
    np.testing.assert_array_equal(lib["images"]["lowres"], user["images"]["lowres"])
    assert lib["images"]["lowres"] is not user["images"]["lowres"]
    # the user's AnnData is untouched
    np.testing.assert_array_equal(scanpy_visium.obsm["spatial"], before.obsm["spatial"])
    assert list(scanpy_visium.obs.columns) == list(before.obs.columns)
    assert set(scanpy_visium.uns["spatial"]["custom"]["images"]) == {"hires", "lowres"}
    # auto skips the blank hires image
    with pytest.warns(UserWarning, match="blank"):
        s_auto = stf.io.from_anndata(scanpy_visium)
    assert s_auto.tables[K.TABLE_KEY].uns[K.SLIDE_META_KEY]["image_source"] == "lowres"


def test_from_anndata_with_image_array(bundled_sdata):
    t = bundled_sdata.tables[K.TABLE_KEY]
    meta = t.uns[K.SLIDE_META_KEY]
    small = ad.AnnData(X=t.X[:, :50].copy(), obs=pd.DataFrame(index=t.obs_names), var=t.var.iloc[:50].copy())
    small.obsm["spatial"] = t.obsm[K.SPATIAL_KEY].copy()
    img = texture(*image_shape(bundled_sdata)[1:], seed=4)[::4, ::4]
    s = stf.io.from_anndata(
        small, image=img, image_scalef=0.25, mpp=meta["mpp"], spot_diameter_um=100, slide_id="C2", patient_id="C"
    )
    out = s.tables[K.TABLE_KEY]
    check_linked(s, n=t.n_obs)
    assert out.uns[K.SLIDE_META_KEY]["mpp"] == pytest.approx(meta["mpp"])
    assert out.uns[K.SLIDE_META_KEY]["image_mpp"] == pytest.approx(4 * meta["mpp"])
    np.testing.assert_allclose(out.obsm[K.SPATIAL_KEY], t.obsm[K.SPATIAL_KEY])
    assert image_shape(s) == (3, *img.shape[:2]) and image_units_per_px(s) == pytest.approx(4.0)
    assert "region" not in small.obs and K.SLIDE_META_KEY not in small.uns  # input untouched
