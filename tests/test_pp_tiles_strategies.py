"""Tile cutting: per-tile and block strategies agree, tiles sit on a slide-wide grid, filter semantics."""

import numpy as np
import pytest

import spatialtranscriptformer as stf
from spatialtranscriptformer.pp import _tiles as tiles_mod
from spatialtranscriptformer.pp._resample import axis_taps
from spatialtranscriptformer.pp._tiles import extract_tiles, tile_origins


def _image(h=700, w=900, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([(xx * 0.7) % 256, (yy * 0.9) % 256, ((xx + yy) * 0.3) % 256], -1)
    return (smooth + rng.integers(0, 40, (h, w, 3))).clip(0, 255).astype(np.uint8)


def _tiles(img, centers, *, size, scale, strategy="auto", block_px=4096):
    out = np.empty((len(centers), size, size, 3), np.uint8)
    for _ in extract_tiles(img, centers, size=size, scale=scale, out=out, strategy=strategy, block_px=block_px):
        pass
    return out


def _reference(img, centers, *, size, scale):
    """Float64 separable tent filter on the slide-wide output grid (reflect padding), rounded."""
    first = tile_origins(centers, size=size, scale=scale)
    pad = 64
    src = np.pad(img.astype(np.float64), ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    out = []
    for fx, fy in first:
        xi, xw = axis_taps(np.array([fx]), size, scale)
        yi, yw = axis_taps(np.array([fy]), size, scale)
        xi, xw, yi, yw = xi[0] + pad, xw[0].astype(np.float64), yi[0] + pad, yw[0].astype(np.float64)
        h = sum(xw[None, :, t, None] * src[:, xi + t] for t in range(xw.shape[1]))
        v = sum(yw[:, t, None, None] * h[yi + t] for t in range(yw.shape[1]))
        out.append(np.clip(np.floor(v + 0.5), 0, 255).astype(np.uint8))
    return np.stack(out)


@pytest.mark.parametrize("scale", [1.0, 0.69 / 0.5 / 2, 0.725, 1.6, 2.0])
def test_tile_and_block_strategies_give_identical_tiles(scale):
    img = _image()
    rng = np.random.default_rng(1)
    centers = np.c_[rng.uniform(-10, 910, 60), rng.uniform(-10, 710, 60)]  # some cross the edges
    per_tile = _tiles(img, centers, size=48, scale=scale, strategy="tile")
    block = _tiles(img, centers, size=48, scale=scale, strategy="block")
    np.testing.assert_array_equal(per_tile, block)
    small_blocks = _tiles(img, centers, size=48, scale=scale, strategy="block", block_px=200)
    np.testing.assert_array_equal(small_blocks, block)  # a tile does not depend on its block-mates


@pytest.mark.parametrize("scale", [0.725, 1.0, 1.45])
def test_resampled_tiles_match_a_float64_reference(scale):
    img = _image()
    centers = np.array([[450.3, 350.8], [100.0, 120.5], [800.7, 600.2]])
    got = _tiles(img, centers, size=40, scale=scale)
    ref = _reference(img, centers, size=40, scale=scale)
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1


def test_enlarging_is_bilinear_like_pillow():
    from PIL import Image

    img = _image(300, 300)
    scale = 0.725
    centre = np.array([[150.0, 150.0]])
    tile = _tiles(img, centre, size=64, scale=scale)[0]
    fx, fy = tile_origins(centre, size=64, scale=scale)[0]
    box = (fx * scale, fy * scale, (fx + 64) * scale, (fy + 64) * scale)
    ref = np.asarray(Image.fromarray(img).resize((64, 64), Image.Resampling.BILINEAR, box=box, reducing_gap=None))
    assert np.abs(tile.astype(int) - ref.astype(int)).max() <= 1


def test_auto_strategy_follows_spot_density(monkeypatch):
    calls = []
    orig = tiles_mod._cut_block

    def spy(region, ry0, rx0, first, *, size, scale, out, rows, strategy="auto", buffers=None):
        from spatialtranscriptformer.pp._resample import kernels

        k = kernels()
        names = []
        monkeypatch.setattr(k, "resample_tiles", _record(k.resample_tiles, names, "tile"))
        monkeypatch.setattr(k, "resample", _record(k.resample, names, "block"))
        orig(region, ry0, rx0, first, size=size, scale=scale, out=out, rows=rows, strategy=strategy, buffers=buffers)
        calls.append(names[0])

    monkeypatch.setattr(tiles_mod, "_cut_block", spy)
    img = _image()
    sparse = np.array([[100.0, 100.0], [600.0, 500.0], [300.0, 600.0]])
    _tiles(img, sparse, size=32, scale=0.725)
    dense = np.stack(np.meshgrid(np.arange(50, 850, 12.0), np.arange(50, 650, 12.0)), -1).reshape(-1, 2)
    _tiles(img, dense, size=32, scale=0.725)
    assert calls == ["tile", "block"]


def _record(fn, names, label):
    def wrapper(*a):
        names.append(label)
        return fn(*a)

    return wrapper


def test_tiles_of_a_subset_equal_tiles_of_all(bundled_sdata):
    all_tiles = stf.pp.tiles(bundled_sdata, tile_size=48, mpp=1.3)
    sub = stf.pp.tiles(bundled_sdata, tile_size=48, mpp=1.3, spots=[5, 0, 17])
    np.testing.assert_array_equal(sub, all_tiles[[5, 0, 17]])
    batches = dict(
        (int(i), t) for idx, ts in stf.pp.iter_tiles(bundled_sdata, tile_size=48, mpp=1.3, batch_size=7)
        for i, t in zip(idx, ts, strict=True)
    )
    np.testing.assert_array_equal(np.stack([batches[i] for i in range(len(all_tiles))]), all_tiles)


def test_strategy_validated():
    with pytest.raises(ValueError, match="strategy"):
        next(extract_tiles(_image(), np.array([[10.0, 10.0]]), size=8, scale=1.0, strategy="fast"))
