"""Save / load of the 2 µm super-resolution model: identical predictions, backbones, bad input."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

import spatialtranscriptformer as stf

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")


def small_vit(**kw):
    """A one-block ViT-tiny at 64 px (fast to build)."""
    return timm.create_model("vit_tiny_patch16_224", img_size=64, depth=1, pretrained=False, num_classes=0, **kw)


def rebuildable_backbone(timm_kwargs=None):
    """A one-block variant of test_superres's tiny ViT; its spec records the timm arguments rebuilding it."""
    from spatialtranscriptformer.pp._backbones import Backbone
    from spatialtranscriptformer.pp._registry import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec

    torch.manual_seed(0)
    spec = BackboneSpec(name="tiny_vit64", dim=192, input_size=64, mpp=4.0, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                        license="test", citation="test", arch="vit_tiny_patch16_224",
                        timm_kwargs={"img_size": 64, "depth": 1} if timm_kwargs is None else timm_kwargs,
                        needs_weights=False)
    return Backbone(spec, small_vit().eval())


def manual_model(bb, *, loss="poisson", arch="hist2st", params=None):
    """An untrained model (random decoder, random z-score statistics): save/load needs no fit."""
    from spatialtranscriptformer.module._superres import SuperResDecoder
    from spatialtranscriptformer.tl._superres import SuperResModel
    from spatialtranscriptformer.train._superres_plan import SuperResPlan

    torch.manual_seed(1)
    dec = SuperResDecoder(192, 3, grid=4, arch=arch, hidden=16, out_size=32, n_layers=1)
    zstats = None
    if loss == "mse":
        rng = np.random.default_rng(0)
        zstats = np.stack([rng.normal(size=(4, 3)), rng.uniform(0.5, 2, size=(4, 3))], -1).astype(np.float32)
    plan = SuperResPlan(dec, loss=loss, zstats=zstats, gradnorm=False)
    return SuperResModel(plan.eval(), bb, genes=["A", "B", "C"], patch_um=64, params=params or {"seed": 0})


def fixed_tokens():
    return np.random.default_rng(3).normal(size=(3, 4, 4, 192)).astype(np.float32)


def fixed_images():
    return np.random.default_rng(4).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)


def same_tokens(a, b):
    return torch.equal(a.forward_tokens(a.preprocess(fixed_images())), b.forward_tokens(b.preprocess(fixed_images())))


@pytest.mark.slow
def test_fit_save_load_identical(tmp_path):
    from spatialtranscriptformer.tl import SuperResModel, fit_superres
    from spatialtranscriptformer.tl._superres_evaluate import evaluate_superres

    slides = stf.datasets.synthetic(
        technology="visium_hd", bin_size_um=2, size_um=128, n_genes=10, n_pathways=2, n_slides=2, n_patients=2
    )
    model = fit_superres(
        slides, genes=4, max_epochs=1, batch_size=8, lr=1e-3, progress=False, accumulate_grad_batches=1,
        model_kwargs={"backbone": rebuildable_backbone(), "patch_um": 64, "hidden": 16, "n_layers": 1},
        data_kwargs={"cache_dir": tmp_path / "cache"},
    )
    path = tmp_path / "sr"
    model.save(path)
    assert sorted(p.name for p in path.iterdir()) == ["backbone.pt", "config.json", "history.csv", "weights.pt"]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["backbone"]["timm_kwargs"] == {"img_size": 64, "depth": 1} and not cfg["backbone"]["registered"]
    loaded = SuperResModel.load(path)
    assert loaded.genes == model.genes and loaded.patch_um == 64 and loaded.params == model.params
    assert loaded.best_epoch == model.best_epoch and loaded.backbone.spec.input_size == 64
    pd.testing.assert_frame_equal(loaded.history, model.history, check_dtype=False)
    assert loaded.backbone.model is not model.backbone.model and same_tokens(loaded.backbone, model.backbone)
    np.testing.assert_array_equal(loaded.predict_tokens(fixed_tokens()), model.predict_tokens(fixed_tokens()))
    with pytest.warns(UserWarning, match="not held-out"):  # P1 validated the model; the check needs no test set
        a = evaluate_superres(slides[1], model, aggregate=True, progress=False)
    with pytest.warns(UserWarning, match="not held-out"):  # the loaded model knows its patients too
        b = evaluate_superres(slides[1], loaded, aggregate=True, progress=False)
    pd.testing.assert_frame_equal(a, b)
    # an existing model is not replaced silently
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        loaded.save(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    loaded.save(path, overwrite=True)
    expected = model.predict_tokens(fixed_tokens())
    assert np.isfinite(expected).all() and expected.shape == (3, 4, 32, 32)
    np.testing.assert_array_equal(SuperResModel.load(path).predict_tokens(fixed_tokens()), expected)


def test_mse_unet_roundtrip_and_user_backbone(tmp_path):
    from spatialtranscriptformer.tl import SuperResModel

    model = manual_model(rebuildable_backbone(timm_kwargs={"img_size": 64}), loss="mse", arch="unet")
    model.save(tmp_path / "m")
    assert (tmp_path / "m" / "arrays.npz").is_file() and not (tmp_path / "m" / "history.csv").exists()
    # the spec lacks depth=1 (as test_superres's lacks img_size=64): the rebuilt architecture differs
    with pytest.raises(ValueError, match="backbone="):
        SuperResModel.load(tmp_path / "m")
    # the user passes the architecture; the saved weights replace its own
    arch = small_vit()
    with torch.no_grad():
        for p in arch.parameters():
            p.add_(1.0)
    loaded = SuperResModel.load(tmp_path / "m", backbone=arch)
    assert same_tokens(loaded.backbone, model.backbone)
    torch.testing.assert_close(loaded.plan.zstats, model.plan.zstats, rtol=0, atol=0)
    out = loaded.predict_tokens(fixed_tokens())
    np.testing.assert_array_equal(out, model.predict_tokens(fixed_tokens()))
    assert out.shape == (3, 3, 32, 32) and (out >= 0).all()
    # an architecture of another width does not fit
    small = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, pretrained=False, num_classes=0)
    with pytest.raises(ValueError, match="do not match"):
        SuperResModel.load(tmp_path / "m", backbone=small)


def test_registered_backbone_by_reference(tmp_path, monkeypatch):
    from spatialtranscriptformer.pp import _registry
    from spatialtranscriptformer.pp._backbones import get_backbone
    from spatialtranscriptformer.pp._registry import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec
    from spatialtranscriptformer.tl import SuperResModel

    def build(spec):
        return small_vit()

    spec = BackboneSpec(name="tiny_reg", dim=192, input_size=64, mpp=4.0, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                        license="test", citation="test", arch="vit_tiny_patch16_224", build=build)
    monkeypatch.setitem(_registry._BACKBONES, "tiny_reg", spec)
    torch.manual_seed(5)
    wfile = tmp_path / "w" / "tiny.pt"
    wfile.parent.mkdir()
    torch.save(build(spec).state_dict(), wfile)
    keep = tmp_path / "tiny_copy.pt"
    shutil.copy(wfile, keep)
    bb = get_backbone("tiny_reg", weights=wfile)
    model = manual_model(bb, params={"backbone_weights": str(wfile)})
    model.save(tmp_path / "m")
    assert not (tmp_path / "m" / "backbone.pt").exists()  # stored by reference
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["backbone"]["registered"] and cfg["backbone"]["weights"] == str(wfile)
    loaded = SuperResModel.load(tmp_path / "m")
    assert same_tokens(loaded.backbone, bb)
    np.testing.assert_array_equal(loaded.predict_tokens(fixed_tokens()), model.predict_tokens(fixed_tokens()))
    # other weights at the recorded path: caught by the checksum; the original weights can be passed
    torch.manual_seed(6)
    torch.save(build(spec).state_dict(), wfile)
    with pytest.raises(ValueError, match="backbone_weights="):
        SuperResModel.load(tmp_path / "m")
    assert same_tokens(SuperResModel.load(tmp_path / "m", backbone_weights=keep).backbone, bb)
    wfile.unlink()
    with pytest.raises(FileNotFoundError, match="tiny_reg"):
        SuperResModel.load(tmp_path / "m")
    # weights="random" is never re-drawn: the state dict is saved
    rnd = manual_model(get_backbone("tiny_reg", weights="random"), params={"backbone_weights": "random"})
    rnd.save(tmp_path / "r")
    assert (tmp_path / "r" / "backbone.pt").is_file()
    assert same_tokens(SuperResModel.load(tmp_path / "r").backbone, rnd.backbone)


def test_bad_input(tmp_path):
    from spatialtranscriptformer.tl import SuperResModel, TrainedModel

    with pytest.raises(FileNotFoundError, match="folder not found"):
        SuperResModel.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        SuperResModel.load(tmp_path / "empty")
    model = manual_model(rebuildable_backbone())
    good = tmp_path / "good"
    model.save(good)
    cfg = json.loads((good / "config.json").read_text())

    def tampered(name, **changes):
        p = tmp_path / name
        shutil.copytree(good, p)
        c = json.loads(json.dumps(cfg))
        for k, v in changes.items():
            *head, last = k.split("__")
            d = c
            for h in head:
                d = d[h]
            d[last] = v
        (p / "config.json").write_text(json.dumps(c))
        return p

    with pytest.raises(ValueError, match="2 genes but a decoder for 3"):
        SuperResModel.load(tampered("g", genes=["A", "B"]))
    with pytest.raises(ValueError, match="does not match the decoder"):
        SuperResModel.load(tampered("g2", genes=["A", "B"], decoder__n_genes=2))
    with pytest.raises(ValueError, match="does not match the decoder"):
        SuperResModel.load(tampered("h", decoder__hidden=32))
    with pytest.raises(ValueError, match="duplicates"):
        SuperResModel.load(tampered("d", genes=["A", "A", "B"]))
    with pytest.raises(ValueError, match="format version 99"):
        SuperResModel.load(tampered("v", version=99))
    with pytest.raises(ValueError, match="not a saved SuperResModel"):
        SuperResModel.load(tampered("f", kind="spot"))
    with pytest.raises(ValueError, match="not a saved spatialtranscriptformer model"):
        SuperResModel.load(tampered("f2", format="other.tool"))
    with pytest.raises(ValueError, match="patch_um"):
        SuperResModel.load(tampered("p", patch_um=128))
    with pytest.raises(ValueError, match="arch"):
        SuperResModel.load(tampered("a", decoder__arch="resnet"))
    with pytest.raises(ValueError, match="format"):  # the spot-model loader refuses it too
        TrainedModel.load(good)
    p = tampered("w")
    (p / "weights.pt").unlink()
    with pytest.raises(FileNotFoundError, match="weights.pt"):
        SuperResModel.load(p)
    p = tampered("b")
    (p / "backbone.pt").unlink()
    with pytest.raises(FileNotFoundError, match="backbone.pt"):
        SuperResModel.load(p)
    p = tampered("x")
    (p / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SuperResModel.load(p)
    # a file in the way: nothing written
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        model.save(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"
