"""Lazy (out-of-core) whole-slide images: pyramidal TIFFs stay on disk, tiles match in-memory reads."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import anndata as ad
import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import spatialtranscriptformer as stf
from spatialtranscriptformer import _constants as K
from spatialtranscriptformer.io import _tiff
from spatialtranscriptformer.io._build import build_slide
from spatialtranscriptformer.pp._image import image_levels
from test_io_readers import make_visium_hd

H, W, MPP = 2048, 1536, 0.5


def wsi_pixels(seed: int = 0) -> np.ndarray:
    """A smooth-plus-noise RGB image (compresses a little, is never blank)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    base = np.stack([(xx // 7) % 256, (yy // 5) % 256, ((xx + yy) // 11) % 256], axis=-1)
    return (base + rng.integers(0, 30, size=(H, W, 3))).clip(0, 255).astype(np.uint8)


def write_pyramid(path: Path, img: np.ndarray, *, compression: str | None = "zlib") -> None:
    """A 3-level pyramidal TIFF (sub-IFDs), tiled 256 px, as HEST-1k WSIs are stored."""
    import tifffile

    with tifffile.TiffWriter(path) as tw:
        kw = {"photometric": "rgb", "tile": (256, 256), "compression": compression}
        tw.write(img, subifds=2, **kw)
        tw.write(img[::2, ::2], subfiletype=1, **kw)
        tw.write(img[::4, ::4], subfiletype=1, **kw)


def make_hest_wsi(root: Path, img: np.ndarray, *, compression: str | None = "zlib") -> Path:
    """A HEST-1k-like sample with a 2048 x 1536 pyramidal WSI and a 100 µm spot grid."""
    for sub in ("st", "wsis", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    write_pyramid(root / "wsis" / "S1.tif", img, compression=compression)
    pitch = 100.0 / MPP
    yy, xx = np.meshgrid(np.arange(H // pitch), np.arange(W // pitch), indexing="ij")
    xy = np.c_[xx.ravel(), yy.ravel()] * pitch + 37.3  # includes spots near the edges (padding)
    a = ad.AnnData(
        X=sp.csr_matrix(np.random.default_rng(1).poisson(2.0, size=(len(xy), 5)).astype(np.float32)),
        obs=pd.DataFrame(index=[f"s{i}" for i in range(len(xy))]),
        var=pd.DataFrame(index=[f"G{i}" for i in range(5)]),
    )
    a.obsm["spatial"] = xy
    a.write_h5ad(root / "st" / "S1.h5ad")
    meta = {"id": "S1", "pixel_size_um_estimated": MPP, "spot_diameter": 55.0, "st_technology": "Visium"}
    (root / "metadata" / "S1.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def img() -> np.ndarray:
    return wsi_pixels()


@pytest.fixture(scope="module")
def hest_root(tmp_path_factory, img) -> Path:
    return make_hest_wsi(tmp_path_factory.mktemp("hest_lazy"), img)


@pytest.fixture
def reads(monkeypatch) -> list:
    """Every region read from a TIFF level: its number of pixels (counting wrapper around the reader)."""
    seen: list[int] = []
    orig = _tiff.TiffLevel.__getitem__

    def counting(self, key):
        out = orig(self, key)
        seen.append(int(np.prod(out.shape[:2])))
        return out

    monkeypatch.setattr(_tiff.TiffLevel, "__getitem__", counting)
    return seen


def level_arrays(sdata) -> list:
    return [lv.array for lv in image_levels(sdata, K.IMAGE_KEY)]


@pytest.mark.parametrize("compression", ["zlib", None])  # decoded tile by tile / memory-mapped
def test_read_hest_is_lazy(tmp_path, img, reads, compression):
    root = make_hest_wsi(tmp_path / "hest", img, compression=compression)
    s = stf.io.read_hest(root)
    arrays = level_arrays(s)
    assert [a.shape for a in arrays] == [(3, H, W), (3, H // 2, W // 2), (3, H // 4, W // 4)]  # the file's levels
    assert all(dask.is_dask_collection(a) for a in arrays)
    # reading the slide read no pixels but the file's coarsest level (the image of scanpy's uns['spatial'])
    assert sum(reads) <= (H // 4) * (W // 4)
    assert s.tables[K.TABLE_KEY].uns["spatial"]["S1"]["images"]["hires"].shape == (H // 4, W // 4, 3)
    reads.clear()
    region = arrays[0][:, 1000:1010, 700:720].compute()
    np.testing.assert_array_equal(np.moveaxis(region, 0, -1), img[1000:1010, 700:720])
    assert 0 < sum(reads) <= 1024 * 1024 < H * W // 2  # one chunk, not the whole level
    reads.clear()
    np.testing.assert_array_equal(np.moveaxis(arrays[2][:, :5, :5].compute(), 0, -1), img[::4, ::4][:5, :5])
    assert 0 < sum(reads) <= (H // 4) * (W // 4)  # the coarse level is read from the file's own level
    meta = s.tables[K.TABLE_KEY].uns[K.SLIDE_META_KEY]
    assert meta["mpp"] == pytest.approx(MPP) and meta["image_downsample"] == 1.0


def test_lazy_tiles_equal_in_memory(hest_root, img):
    lazy = stf.io.read_hest(hest_root)
    t = lazy.tables[K.TABLE_KEY]
    mem = build_slide(img, t, coords=t.obsm[K.SPATIAL_KEY], mpp=MPP, spot_diameter_um=55.0, slide_id="S1")
    assert not dask.is_dask_collection(np.asarray(img))  # the reference really is in memory
    for mpp in (MPP, 0.8):  # slices of level 0; bilinear resampling of level 0
        a = stf.pp.tiles(lazy, tile_size=64, mpp=mpp)
        b = stf.pp.tiles(mem, tile_size=64, mpp=mpp)
        assert a.shape == (t.n_obs, 64, 64, 3)
        np.testing.assert_array_equal(a, b)
    # at 2x the µm/px the lazy slide cuts tiles from the file's level 1, as an in-memory read of that level
    lvl1 = build_slide(img[::2, ::2], t, coords=t.obsm[K.SPATIAL_KEY] / 2, mpp=2 * MPP, spot_diameter_um=55.0,
                       slide_id="S1")
    np.testing.assert_array_equal(stf.pp.tiles(lazy, tile_size=32, mpp=2 * MPP),
                                  stf.pp.tiles(lvl1, tile_size=32, mpp=2 * MPP))


def test_read_hest_level_lazy(hest_root, img):
    s = stf.io.read_hest(hest_root, level=1)
    arrays = level_arrays(s)
    assert [a.shape[1:] for a in arrays] == [(H // 2, W // 2), (H // 4, W // 4)]
    assert all(dask.is_dask_collection(a) for a in arrays)
    np.testing.assert_array_equal(np.moveaxis(arrays[0][:, -3:, -4:].compute(), 0, -1), img[::2, ::2][-3:, -4:])
    assert s.tables[K.TABLE_KEY].uns[K.SLIDE_META_KEY]["image_downsample"] == 2.0
    with pytest.raises(ValueError, match="pyramid level 3 requested.*levels 0..2"):
        stf.io.read_hest(hest_root, level=3)


def test_lazy_image_pickles_and_writes_to_zarr(hest_root, img, tmp_path):
    from spatialdata import read_zarr

    s = stf.io.read_hest(hest_root)
    arr = level_arrays(s)[0]
    back = pickle.loads(pickle.dumps(arr))  # no file handle inside: worker processes reopen the file
    np.testing.assert_array_equal(np.moveaxis(back[:, 5:9, 3:8].compute(), 0, -1), img[5:9, 3:8])
    s.write(tmp_path / "s.zarr")
    r = read_zarr(tmp_path / "s.zarr")
    ra = level_arrays(r)
    assert [a.shape for a in ra] == [a.shape for a in level_arrays(s)]
    np.testing.assert_array_equal(np.moveaxis(np.asarray(ra[1][:, 100:110, 50:60]), 0, -1), img[::2, ::2][100:110, 50:60])


class _Counting:
    """An array-like that counts the pixels read from it (to prove a dask image is never computed)."""

    def __init__(self, a: np.ndarray):
        self.a, self.shape, self.dtype, self.ndim, self.read = a, a.shape, a.dtype, a.ndim, 0

    def __getitem__(self, key):
        out = self.a[key]
        self.read += out.size
        return out


def test_build_slide_dask_single_level_coarsened_lazily():
    rng = np.random.default_rng(0)
    h, w = 2100, 260  # smallest side < 2048 -> no pyramid; transposed below to force one
    base = rng.integers(0, 256, size=(3, w, h), dtype=np.uint8)  # (c, y, x)
    src = _Counting(base)
    arr = da.from_array(src, chunks=(3, 256, 512))
    a = ad.AnnData(X=np.ones((3, 2), np.float32), obs=pd.DataFrame(index=["a", "b", "c"]))
    xy = np.array([[100.0, 100.0], [300.0, 120.0], [500.0, 200.0]])
    s = build_slide(arr, a, coords=xy, mpp=1.0, spot_diameter_um=55.0, slide_id="x", scale_factors=[2, 2])
    arrays = level_arrays(s)
    assert [x.shape for x in arrays] == [(3, w, h), (3, w // 2, h // 2), (3, w // 4, h // 4)]
    assert all(dask.is_dask_collection(x) for x in arrays) and src.read == 0  # not computed, not persisted
    np.testing.assert_array_equal(arrays[0][:, :4, :4].compute(), base[:, :4, :4])
    assert 0 < src.read <= 3 * w * 1024  # the chunks under the region (1024 px chunks of the element)
    before = src.read
    with pytest.raises(ValueError, match="spots lie outside the image"):
        build_slide(arr, a, coords=xy + [0.0, 300.0], mpp=1.0, spot_diameter_um=55.0, slide_id="x")
    assert src.read == before  # shape-only validation read nothing


def test_build_slide_bad_levels():
    a = ad.AnnData(X=np.ones((1, 2), np.float32), obs=pd.DataFrame(index=["a"]))
    big, small = np.zeros((64, 64, 3), np.uint8), np.zeros((32, 32, 3), np.uint8)
    kw = {"coords": np.array([[10.0, 10.0]]), "mpp": 1.0, "spot_diameter_um": 5.0, "slide_id": "x"}
    with pytest.raises(ValueError, match="level 1 .* is larger than level 0"):
        build_slide([small, big], a, **kw)
    with pytest.raises(ValueError, match="either pyramid levels .* or scale_factors"):
        build_slide([big, small], a, scale_factors=[2], **kw)
    with pytest.raises(ValueError, match=r"Image level 1 must be \(y, x, 3\)"):
        build_slide([big, np.zeros((8, 8, 5), np.uint8)], a, **kw)
    s = build_slide([big, da.from_array(small)], a, **kw)
    assert [x.shape for x in level_arrays(s)] == [(3, 64, 64), (3, 32, 32)]


def test_read_visium_hd_fullres_tiff_lazy(tmp_path, reads):
    outs = make_visium_hd(tmp_path / "hd", bins=(16,))
    rng = np.random.default_rng(5)
    he = rng.integers(0, 256, size=(400, 400, 3), dtype=np.uint8)
    write_pyramid(tmp_path / "he.tif", np.pad(he, ((0, 112), (0, 112), (0, 0))))
    s = stf.io.read_visium_hd(outs, bin_size=16, fullres_image_file=tmp_path / "he.tif")
    arrays = level_arrays(s)
    assert len(arrays) == 3 and all(dask.is_dask_collection(x) for x in arrays)
    assert sum(reads) <= (512 // 4) ** 2  # only the blank check, on the coarsest level
    np.testing.assert_array_equal(np.moveaxis(arrays[0][:, 10:20, 30:40].compute(), 0, -1), he[10:20, 30:40])
