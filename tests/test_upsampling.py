"""The right image or a loud refusal: tiles that need upsampling warn (> 2x) or are refused (> 4x)."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import spatialtranscriptformer as stf
from spatialtranscriptformer import _constants as K
from spatialtranscriptformer.io._build import build_slide


def _image(h=240, w=320, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 3) % 256, (yy * 5) % 256, (xx + yy) % 256], -1)
    return (img + rng.integers(0, 20, size=(h, w, 3))).clip(0, 255).astype(np.uint8)


def _slide(mpp: float, *, image_scalef: float = 1.0, sid: str = "s", source: str | None = None, seed=0):
    """A 3 x 3 spot grid (pitch 100 µm) on an image of ``mpp / image_scalef`` µm/px."""
    pitch = 100.0 / mpp  # coordinate units
    xy = np.stack(np.meshgrid(np.arange(3), np.arange(3)), -1).reshape(-1, 2) * pitch + pitch
    a = ad.AnnData(np.ones((9, 2), np.float32), obs=pd.DataFrame(index=[f"{sid}{i}" for i in range(9)]))
    side = int(np.ceil(4 * pitch * image_scalef)) + 1
    return build_slide(
        _image(side, side, seed), a, coords=xy, mpp=mpp, spot_diameter_um=55.0, slide_id=sid,
        image_scalef=image_scalef, extra_meta={"image_source": source},
    )


def test_no_warning_up_to_2x():
    s = _slide(1.0)  # 1 µm/px image, 0.5 µm/px tiles: 2x
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = stf.pp.tiles(s, tile_size=16, mpp=0.5)
    assert t.shape == (9, 16, 16, 3)


def test_warns_above_2x_and_names_the_image():
    s = _slide(1.5, source="hires")
    with pytest.warns(UserWarning, match=r"need 3\.0x upsampling of the 'hires' image \(1\.5 µm/px\)") as rec:
        stf.pp.tiles(s, tile_size=16, mpp=0.5)
    assert rec[0].filename == __file__  # attributed to the caller, not to the library


def test_refuses_above_4x_unless_allowed():
    s = _slide(13.7, source="lowres")  # a Space Ranger lowres PNG
    with pytest.raises(ValueError, match=r"27\.4x upsampling.*'lowres'.*4x limit.*fullres_image_file.*allow_upsampling"):
        stf.pp.tiles(s, tile_size=16, mpp=0.5)
    with pytest.raises(ValueError, match="4x limit"):
        next(stf.pp.iter_tiles(s, tile_size=16, mpp=0.5))
    with pytest.warns(UserWarning, match="27.4x upsampling"):
        t = stf.pp.tiles(s, tile_size=16, mpp=0.5, allow_upsampling=True)
    assert t.shape == (9, 16, 16, 3)


def test_embed_checks_every_slide_before_any_is_embedded():
    good, coarse = _slide(0.5, sid="good"), _slide(10.0, sid="coarse", seed=1)
    with pytest.raises(ValueError, match="Slide 'coarse'.*4x limit"):
        stf.pp.embed([good, coarse], backbone="handcrafted", tile_size=16, mpp=0.5)
    assert "X_handcrafted" not in good.tables[K.TABLE_KEY].obsm  # nothing written
    with pytest.warns(UserWarning, match="Slide 'coarse'"):
        stf.pp.embed([good, coarse], backbone="handcrafted", tile_size=16, mpp=0.5, allow_upsampling=True)
    assert all("X_handcrafted" in s.tables[K.TABLE_KEY].obsm for s in (good, coarse))


def test_image_scale_transformation_gives_the_same_tiles():
    """A slide whose image is a 1/4 downsample placed by Scale(4) == one with coordinates rescaled by 1/4."""
    pitch = 100.0
    xy = np.stack(np.meshgrid(np.arange(3), np.arange(3)), -1).reshape(-1, 2) * pitch + pitch
    a = ad.AnnData(np.ones((9, 2), np.float32), obs=pd.DataFrame(index=[f"s{i}" for i in range(9)]))
    img = _image(110, 110)
    scaled = build_slide(img, a, coords=xy, mpp=0.5, spot_diameter_um=55.0, slide_id="s", image_scalef=0.25)
    rescaled = build_slide(img, a, coords=xy * 0.25, mpp=2.0, spot_diameter_um=55.0, slide_id="s")
    kw = {"tile_size": 12, "mpp": 2.0}
    np.testing.assert_array_equal(stf.pp.tiles(scaled, **kw), stf.pp.tiles(rescaled, **kw))
    np.testing.assert_array_equal(scaled.tables[K.TABLE_KEY].obsm[K.SPATIAL_KEY], xy)  # coordinates kept
    meta = scaled.tables[K.TABLE_KEY].uns[K.SLIDE_META_KEY]
    assert meta["image_scalef"] == 0.25 and meta["image_mpp"] == pytest.approx(2.0)


def test_plots_place_a_scaled_image_like_a_rescaled_one():
    """stf.pl draws the image under the spots the same way with a scale transformation or rescaled coordinates."""
    from spatialtranscriptformer.pl._utils import slide_view

    pitch = 100.0
    xy = np.stack(np.meshgrid(np.arange(3), np.arange(3)), -1).reshape(-1, 2) * pitch + pitch
    a = ad.AnnData(np.ones((9, 2), np.float32), obs=pd.DataFrame(index=[f"s{i}" for i in range(9)]))
    img = _image(110, 110)
    scaled = build_slide(img, a, coords=xy, mpp=0.5, spot_diameter_um=55.0, slide_id="s", image_scalef=0.25)
    rescaled = build_slide(img, a, coords=xy * 0.25, mpp=2.0, spot_diameter_um=55.0, slide_id="s")
    v1 = slide_view(scaled, scaled.tables[K.TABLE_KEY])
    v2 = slide_view(rescaled, rescaled.tables[K.TABLE_KEY])
    np.testing.assert_array_equal(v1.image, v2.image)
    np.testing.assert_allclose(np.asarray(v1.extent), np.asarray(v2.extent) * 4)
    np.testing.assert_allclose(v1.radius, v2.radius * 4)


def test_visium_tiny_lowres_is_refused():
    s = stf.datasets.visium_tiny()
    meta = s.tables[K.TABLE_KEY].uns[K.SLIDE_META_KEY]
    assert meta["image_source"] == "lowres" and meta["image_mpp"] > 13
    with pytest.raises(ValueError, match="'lowres' image.*fullres_image_file"):
        stf.pp.embed(s, backbone="handcrafted")
