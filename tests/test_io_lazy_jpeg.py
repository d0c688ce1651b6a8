"""Lazy JPEG / in-memory pyramids and the fast counts parser of the her2st reader."""

from __future__ import annotations

import pickle

import anndata as ad
import dask
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import spatialtranscriptformer as stf
from spatialtranscriptformer.datasets._her2st import bundled_path
from spatialtranscriptformer.io._build import build_slide
from spatialtranscriptformer.io._her2st import _read_counts
from spatialtranscriptformer.io._lazy import LazyLevel, box_downsample, decode_jpeg, jpeg_levels, lazy_pyramid


@pytest.fixture(scope="module")
def jpeg(tmp_path_factory):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1300, 0:1100]
    img = np.stack([(xx // 3) % 256, (yy // 2) % 256, (xx + yy) % 256], -1) + rng.integers(0, 20, (1300, 1100, 3))
    path = tmp_path_factory.mktemp("jpg") / "he.jpg"
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def _levels_of(el):
    names = sorted(el.children, key=lambda s: int(s.replace("scale", "")))
    return [el[n]["image"].data for n in names]


def test_jpeg_levels_decode_nothing_until_read_and_equal_pillow(jpeg):
    levels = jpeg_levels(jpeg, min_side=256)
    assert [lv.shape[:2] for lv in levels] == [(1300, 1100), (650, 550), (325, 275), (163, 138)]
    lazy = [v for lv in levels for v in dask.utils.ensure_dict(lv.dask).values() if isinstance(v, LazyLevel)]
    assert lazy and not any(v.loaded for v in lazy)
    with Image.open(jpeg) as im:
        full = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(levels[0][100:300, 200:400].compute(), full[100:300, 200:400])
    for lv, s in zip(levels[1:], (2, 4, 8), strict=True):  # libjpeg's scaled IDCT, as Pillow's draft mode
        with Image.open(jpeg) as im:
            im.draft("RGB", (im.width // s, im.height // s))
            np.testing.assert_array_equal(lv.compute(), np.asarray(im.convert("RGB")))
        ref = box_downsample(full, s, channel_axis=-1).astype(float)  # and close to the mean of the pixels
        assert np.abs(lv.compute()[: ref.shape[0], : ref.shape[1]].astype(float) - ref).mean() < 6


def test_lazy_level_caches_pickles_and_checks_shape(jpeg):
    lv = LazyLevel((1300, 1100, 3), lambda: decode_jpeg(jpeg))
    assert not lv.loaded
    a = lv[10:20, 5:9]
    assert a.shape == (10, 4, 3) and lv.loaded
    back = pickle.loads(pickle.dumps(LazyLevel((163, 138, 3), __import__("functools").partial(decode_jpeg, str(jpeg), 8))))
    assert not back.loaded and back[:].shape == (163, 138, 3)
    bad = LazyLevel((5, 5, 3), lambda: np.zeros((4, 5, 3), np.uint8))
    with pytest.raises(RuntimeError, match="expected"):
        bad[0]


def test_box_downsample_and_lazy_pyramid_match_numpy():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (3, 1030, 777), dtype=np.uint8)
    for f in (2, 4):
        ref = img[:, : 1030 // f * f, : 777 // f * f].reshape(3, 1030 // f, f, 777 // f, f).mean((2, 4))
        np.testing.assert_array_equal(box_downsample(img, f, band=100), np.floor(ref + 0.5).astype(np.uint8))
        hwc = np.moveaxis(img, 0, -1)
        np.testing.assert_array_equal(box_downsample(hwc, f, channel_axis=-1), np.moveaxis(box_downsample(img, f), 0, -1))
    levels = lazy_pyramid(img, [2, 2])
    assert [lv.shape for lv in levels] == [(3, 1030, 777), (3, 515, 388), (3, 257, 194)]
    np.testing.assert_array_equal(levels[2].compute(), box_downsample(box_downsample(img, 2), 2))


def test_build_slide_keeps_the_pyramid_of_an_in_memory_image_lazy():
    img = np.random.default_rng(2).integers(0, 256, (2600, 2300, 3), dtype=np.uint8)
    a = ad.AnnData(X=np.ones((4, 2), np.float32), obs=pd.DataFrame(index=list("abcd")))
    xy = np.array([[500.0, 500], [900, 500], [500, 900], [900, 900]])
    s = build_slide(img, a, coords=xy, mpp=0.5, spot_diameter_um=55.0, slide_id="x", scale_factors=[2, 2])
    levels = _levels_of(s.images["he"])
    lazy = [v for lv in levels[1:] for v in dask.utils.ensure_dict(lv.dask).values() if isinstance(v, LazyLevel)]
    assert lazy and not any(v.loaded for v in lazy)  # not computed (no persist)
    np.testing.assert_array_equal(levels[0].compute(), np.moveaxis(img, -1, 0))
    np.testing.assert_array_equal(levels[2].compute(), box_downsample(box_downsample(np.moveaxis(img, -1, 0), 2), 2))


def test_read_her2st_is_lazy_and_tiles_equal_the_decoded_jpeg():
    folder = bundled_path()
    s = stf.io.read_her2st(folder)
    levels = _levels_of(s.images["he"])
    lazy = [[v for v in dask.utils.ensure_dict(lv.dask).values() if isinstance(v, LazyLevel)] for lv in levels]
    assert len(levels) > 2 and all(len(v) == 1 for v in lazy)
    # only the coarsest level (decoded directly at its scale) is read, for uns['spatial']'s hires image
    assert [v[0].loaded for v in lazy] == [False] * (len(levels) - 1) + [True]
    assert s.tables["table"].uns["spatial"]
    with Image.open(next(folder.glob("*.jpg"))) as im:
        full = np.moveaxis(np.asarray(im.convert("RGB")), -1, 0)
    assert levels[0].shape == full.shape
    t = s.tables["table"]
    x, y = np.round(t.obsm["spatial"][0]).astype(int)
    tile = stf.pp.tiles(s, tile_size=64, mpp=t.uns["stf_slide"]["mpp"], spots=[0])[0]
    np.testing.assert_array_equal(tile, np.moveaxis(full[:, y - 32 : y + 32, x - 32 : x + 32], 0, -1))


def test_read_counts_fast_path_equals_pandas(tmp_path):
    src = bundled_path() / "C2.tsv.gz"
    fast = _read_counts(src)
    ref = pd.read_csv(src, sep="\t", index_col=0)
    pd.testing.assert_frame_equal(fast, ref)
    odd = {
        "decimals": ref.iloc[:5, :4].astype(float) + 0.5,
        "quoted": ref.iloc[:5, :4],
        "missing": ref.iloc[:5, :4].astype(float).mask(np.eye(5, 4, dtype=bool)),
    }
    for name, df in odd.items():
        p = tmp_path / f"{name}.tsv"
        df.to_csv(p, sep="\t", quoting=1 if name == "quoted" else 0)
        pd.testing.assert_frame_equal(_read_counts(p), pd.read_csv(p, sep="\t", index_col=0))
    (tmp_path / "crlf.tsv").write_bytes(b"\tA\tB\r\ns1\t1\t2\r\ns2\t3\t4\r\n")
    got = _read_counts(tmp_path / "crlf.tsv")
    assert got.index.tolist() == ["s1", "s2"] and got.columns.tolist() == ["A", "B"] and got.to_numpy().sum() == 10
