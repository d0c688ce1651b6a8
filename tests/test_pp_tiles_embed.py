import numpy as np
import pytest

import spatialtranscriptformer as stf
from spatialtranscriptformer.pp._tiles import cut_tiles, extract_tiles


def _checker(h=300, w=400):
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = (xx % 256).astype(np.uint8)
    img[..., 1] = (yy % 256).astype(np.uint8)
    img[..., 2] = 77
    return img


def test_cut_tiles_exact_slice_when_scale_one():
    img = _checker()
    t = cut_tiles(img, np.array([[100.0, 50.0]]), size=20, scale=1.0)
    np.testing.assert_array_equal(t[0], img[40:60, 90:110])


def test_extract_tiles_resamples_and_pads():
    img = _checker()
    centers = np.array([[100.0, 100.0], [2.0, 2.0], [399.0, 299.0]])
    got = {}
    for idx, t in extract_tiles(img, centers, size=10, scale=2.0, pad_mode="constant", cval=255):
        for i, tile in zip(idx, t, strict=True):
            got[int(i)] = tile
    assert set(got) == {0, 1, 2}
    # scale 2: a 10 px tile spans 20 source px; the red channel (x coordinate) increases by ~2 per px
    red = got[0][5, :, 0].astype(float)
    assert np.allclose(np.diff(red), 2.0, atol=0.6)
    assert abs(red.mean() - 100) < 2
    # the corner tile crosses the image edge: constant padding fills with 255 in the blue channel
    assert (got[1][0, 0] == 255).all() and got[1][-1, -1, 2] == 77
    # reflect padding mirrors image content instead
    idx, t = next(extract_tiles(img, centers[1:2], size=10, scale=2.0, pad_mode="reflect"))
    assert (t[0][..., 2] == 77).all()


def test_tiles_physical_scale_on_bundled(bundled_sdata):
    t = stf.pp.tiles(bundled_sdata, tile_size=32, mpp=4.0)
    assert t.shape == (bundled_sdata.tables["table"].n_obs, 32, 32, 3) and t.dtype == np.uint8
    # same spot at a finer scale covers a smaller area: its mean colour still agrees roughly
    t2 = stf.pp.tiles(bundled_sdata, tile_size=64, mpp=2.0, spots=[0, 1])
    assert np.abs(t2.reshape(2, -1, 3).mean(1) - t[:2].reshape(2, -1, 3).mean(1)).max() < 25
    # tile batches come in block order but cover every spot once
    seen = np.concatenate([i for i, _ in stf.pp.iter_tiles(bundled_sdata, tile_size=16, mpp=8.0, batch_size=50)])
    assert np.array_equal(np.sort(seen), np.arange(len(t)))


def test_tiles_bad_input(bundled_sdata):
    with pytest.raises(ValueError, match="mpp"):
        stf.pp.tiles(bundled_sdata, mpp=0)
    with pytest.raises(ValueError, match="pad_mode"):
        next(stf.pp.iter_tiles(bundled_sdata, pad_mode="wrap"))
    with pytest.raises(KeyError, match="Unknown spot"):
        stf.pp.tiles(bundled_sdata, spots=["nope"])


def test_embed_handcrafted_writes_obsm_and_skips(bundled_sdata):
    import spatialdata as sd

    sdata = sd.deepcopy(bundled_sdata)
    stf.pp.embed(sdata, backbone="handcrafted", mpp=2.0, tile_size=56, progress=False)
    t = sdata.tables["table"]
    x = t.obsm["X_handcrafted"].copy()
    assert x.shape[0] == t.n_obs and x.shape[1] == t.uns["X_handcrafted"]["params"]["dim"]
    assert np.isfinite(x).all() and x.std(0).max() > 0
    t.obsm["X_handcrafted"][:] = 0
    stf.pp.embed(sdata, backbone="handcrafted", mpp=2.0, tile_size=56, progress=False)  # skipped
    assert (t.obsm["X_handcrafted"] == 0).all()
    stf.pp.embed(sdata, backbone="handcrafted", mpp=2.0, tile_size=56, progress=False, overwrite=True)
    np.testing.assert_allclose(t.obsm["X_handcrafted"], x, rtol=1e-5)
    # the bundled object itself was not touched
    assert "X_handcrafted" not in bundled_sdata.tables["table"].obsm


def test_embed_tiny_timm_and_custom_module(bundled_sdata):
    import spatialdata as sd
    import timm
    import torch

    sdata = sd.deepcopy(bundled_sdata)
    net = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    stf.pp.embed(sdata, backbone=net, key_added="X_tiny", tile_size=32, mpp=4.0, progress=False, batch_size=64)
    emb = sdata.tables["table"].obsm["X_tiny"]
    assert emb.shape == (sdata.tables["table"].n_obs, net.num_features)
    # identical to a direct forward pass on the same tiles (I/O overlap does not reorder rows)
    tiles = stf.pp.tiles(sdata, tile_size=32, mpp=4.0, spots=[3, 4])
    bb = stf.pp.get_backbone(net)
    with torch.inference_mode():
        ref = net(bb.preprocess(tiles)).numpy()
    np.testing.assert_allclose(emb[[3, 4]], ref, rtol=1e-3, atol=1e-3)


def test_handcrafted_registry_dim_and_backbone_passthrough(bundled_sdata):
    import spatialdata as sd

    bb = stf.pp.get_backbone("handcrafted")
    assert stf.pp.get_backbone(bb) is bb
    x = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    assert bb(x).shape == (2, stf.pp.list_backbones().loc["handcrafted", "dim"])
    s = sd.deepcopy(bundled_sdata)
    stf.pp.embed(s, backbone=bb, tile_size=32, mpp=4.0, progress=False)  # a Backbone object works too
    assert s.tables["table"].obsm["X_handcrafted"].shape[1] == bb.dim


@pytest.mark.slow
def test_embed_registered_random_weights_and_token_grid():
    bb = stf.pp.get_backbone("ctranspath", weights="random")
    x = np.random.default_rng(0).integers(0, 255, (2, 224, 224, 3), dtype=np.uint8)
    assert bb(x).shape == (2, 768)
    assert tuple(bb.forward_tokens(bb.preprocess(x)).shape) == (2, 7, 7, 768)


def test_backbone_registry_and_weight_errors(tmp_path):
    import torch

    df = stf.pp.list_backbones()
    for name in ["resnet50", "ctranspath", "phikon", "uni", "virchow2", "gigapath", "hibou_b", "h_optimus_0", "handcrafted"]:
        assert name in df.index
    assert {"dim", "input_size", "mpp", "license", "mean", "std"} <= set(df.columns)
    with pytest.raises(ValueError, match="Unknown backbone 'nope'.*registered"):
        stf.pp.get_backbone("nope")
    with pytest.raises(FileNotFoundError, match="MahmoodLab/UNI"):
        stf.pp.get_backbone("uni")
    with pytest.raises(FileNotFoundError, match="ctranspath"):
        stf.pp.get_backbone("ctranspath")
    with pytest.raises(FileNotFoundError, match="not found"):
        stf.pp.get_backbone("resnet50", weights=tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(ValueError, match="do not match backbone 'resnet50'.*missing keys"):
        stf.pp.get_backbone("resnet50", weights=bad)


def test_registered_weights_roundtrip(tmp_path):
    import timm
    import torch

    from spatialtranscriptformer.pp._registry import _BACKBONES, IMAGENET_MEAN, IMAGENET_STD

    @stf.pp.register_backbone("tiny_test_vit", arch="vit_tiny_patch16_224", dim=192, input_size=32, mpp=1.0,
                              mean=IMAGENET_MEAN, std=IMAGENET_STD, license="test", citation="test",
                              timm_kwargs={"img_size": 32}, pooling="cls+mean")
    def _build(spec):
        return timm.create_model(spec.arch, pretrained=False, num_classes=0, **spec.timm_kwargs)

    try:
        src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
        path = tmp_path / "w.pth"
        torch.save(src.state_dict(), path)
        bb = stf.pp.get_backbone("tiny_test_vit", weights=path)
        x = np.random.default_rng(1).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
        emb = bb(x)
        assert emb.shape == (3, 384)  # class token + mean patch token
        with torch.inference_mode():
            f = src.forward_features(bb.preprocess(x))
        np.testing.assert_allclose(emb[:, :192], f[:, 0].numpy(), rtol=1e-4, atol=1e-5)
    finally:
        _BACKBONES.pop("tiny_test_vit", None)
