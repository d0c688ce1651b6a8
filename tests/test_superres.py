"""2 µm Poisson super-resolution: targets, decoder, GradNorm, training, prediction, metrics, bad input."""

import warnings

import numpy as np
import pytest

import spatialtranscriptformer as stf
from spatialtranscriptformer import _constants as K

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")


def tiny_backbone():
    """A tiny randomly initialised ViT (explicit opt-in: tests only)."""
    from spatialtranscriptformer.pp._backbones import Backbone
    from spatialtranscriptformer.pp._registry import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec

    torch.manual_seed(0)
    spec = BackboneSpec(
        name="tiny_vit",
        dim=192,
        input_size=64,
        mpp=4.0,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        license="test",
        citation="test",
        arch="vit_tiny_patch16_224",
        needs_weights=False,
    )
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, pretrained=False, num_classes=0).eval()
    return Backbone(spec, model)


@pytest.fixture(scope="module")
def hd_slides():
    """Three patients: P0 trains, P1 validates (early stopping, best epoch), P2 is the held-out test."""
    return stf.datasets.synthetic(
        technology="visium_hd", bin_size_um=2, size_um=192, n_genes=16, n_pathways=4, n_slides=3, n_patients=3
    )


@pytest.fixture(scope="module")
def model(hd_slides, tmp_path_factory):
    from spatialtranscriptformer.tl._superres import fit_superres

    return fit_superres(
        hd_slides[:2],
        genes=6,
        max_epochs=2,
        batch_size=8,
        lr=1e-3,
        progress=False,
        model_kwargs={"backbone": tiny_backbone(), "patch_um": 64, "hidden": 16},
        data_kwargs={"cache_dir": tmp_path_factory.mktemp("cache")},
        accumulate_grad_batches=1,
    )


def test_targets_rasters_and_pooling(hd_slides):
    from spatialtranscriptformer.train._superres_data import superres_targets

    p = superres_targets(hd_slides, genes=5, patch_um=64)
    assert p.values.shape[1:] == (5, 32, 32) and p.mask.shape[1:] == (32, 32)
    assert set(p.patient_ids) == {"P0", "P1", "P2"}
    # rasters hold exactly the table's counts of the chosen genes in the kept patches
    a = hd_slides[0].tables[K.TABLE_KEY]
    gi = a.var_names.get_indexer(p.genes)
    sel = p.slide_index == 0
    assert p.values[sel].sum() <= a.X[:, gi].sum() and p.values[sel].sum() > 0.9 * a.X[:, gi].sum()
    assert np.all(p.values[~p.mask[:, None].repeat(5, 1)] == 0)
    # count-conserving pooling at 4/8/16 µm
    for s, e in ((4, 16), (8, 8), (16, 4)):
        pooled = p.pooled(s)
        assert pooled.shape[-1] == e
        np.testing.assert_allclose(pooled.sum((2, 3)), p.values.sum((2, 3)), rtol=1e-5)
    # top genes by variance, or an explicit list
    X = a.X.toarray()
    assert p.genes[0] in list(a.var_names[np.argsort(-X.var(0))[:3]])
    q = superres_targets(hd_slides[0], genes=["GENE0003", "GENE0001"], patch_um=64)
    assert q.genes == ["GENE0003", "GENE0001"]
    # patch centres map onto the H&E: 15.5 bins (of 2 µm) right of and below the first bin's centre
    xy = a.obsm[K.SPATIAL_KEY]
    r, c = a.obs["array_row"].to_numpy(), a.obs["array_col"].to_numpy()
    mpp = a.uns[K.SLIDE_META_KEY]["mpp"]
    for k in range(len(q)):
        first = np.flatnonzero((r == q.origin_rc[k, 0]) & (c == q.origin_rc[k, 1]))
        if len(first):
            np.testing.assert_allclose(q.centers_px[k], xy[first[0]] + 15.5 * 2 / mpp, atol=1e-6)
            assert q.patch_px[k] == pytest.approx(64 / mpp)
            break
    else:
        raise AssertionError("no patch with its first bin on tissue")


@pytest.mark.parametrize("arch", ["hist2st", "unet"])
def test_decoder_shapes(arch):
    from spatialtranscriptformer.module._superres import SuperResDecoder, grid_adjacency

    adj = grid_adjacency(3, 3)
    assert (adj > 0).sum(1).view(3, 3).tolist() == [[3, 5, 3], [5, 8, 5], [3, 5, 3]]
    np.testing.assert_allclose(adj.sum(1).numpy(), 1.0)
    d = SuperResDecoder(24, 5, grid=4, arch=arch, hidden=16, out_size=32)
    out = d(torch.randn(2, 4, 4, 24))
    assert out.shape == (2, 5, 32, 32) and torch.isfinite(out).all()
    # a patch's output does not depend on its batch-mates
    x = torch.randn(3, 4, 4, 24)
    d.eval()
    torch.testing.assert_close(d(x)[:1], d(x[:1]), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="arch"):
        SuperResDecoder(24, 5, arch="resnet")


def test_poisson_loss_pools_sums():
    from spatialtranscriptformer.module._superres import SuperResDecoder
    from spatialtranscriptformer.train._superres_plan import SuperResPlan

    plan = SuperResPlan(SuperResDecoder(8, 2, grid=2, hidden=16, out_size=16), gradnorm=False)
    y = torch.poisson(torch.full((1, 2, 16, 16), 0.3))
    m = torch.ones(1, 16, 16)
    good = torch.log(torch.full((1, 2, 16, 16), 0.3))
    bad = torch.log(torch.full((1, 2, 16, 16), 3.0))
    lg, lb = plan.scale_losses(good, y, m), plan.scale_losses(bad, y, m)
    assert len(lg) == 4 and all(a < b for a, b in zip(lg, lb, strict=True))
    # masked bins do not count
    m0 = m.clone()
    m0[:, :8] = 0
    y2 = y.clone()
    y2[:, :, :8] = 1000
    l1 = plan.scale_losses(good, y2, m0)
    l2 = plan.scale_losses(good, y * m0[:, None], m0)
    torch.testing.assert_close(torch.stack(l1), torch.stack(l2))


@pytest.mark.slow
def test_fit_evaluate_predict(hd_slides, model, tmp_path):
    from spatialtranscriptformer.tl._superres_evaluate import evaluate_superres
    from spatialtranscriptformer.tl._superres_predict import predict_superres

    assert model.params["train_patients"] == ["P0"] and model.params["val_patients"] == ["P1"]
    assert len(model.history) == 2
    hist = model.history
    assert {"train_loss", "val_loss", "w_2um", "r_16um"} <= set(hist.columns)
    w = hist[[f"w_{s}um" for s in (2, 4, 8, 16)]].to_numpy()
    assert np.isfinite(w).all() and (w > 0).all() and (hist["train_loss_16um"] > 0).all()
    np.testing.assert_allclose(w.sum(1), 4.0, rtol=1e-4)  # epoch means of weights renormalised to 4
    test = hd_slides[2]  # patient P2: neither trained nor validated on
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a held-out patient: no "not held-out" warning
        res = evaluate_superres(test, model, truth="true_rates", progress=False)
    assert set(res["scale_um"]) == {2, 4, 8, 16} and len(res) == 4 * len(model.genes)
    assert res["pcc"].notna().all() and res["ssim"].notna().all() and (res["n_bins"] > 0).all()
    agg = evaluate_superres(test, model, aggregate=True, progress=False)
    assert list(agg.index) == [2, 4, 8, 16] and agg["mean_frac_nonzero"].between(0, 1).all()
    # scoring the validation (or training) patient is flagged: it selected the model
    with pytest.warns(UserWarning, match=r"\['P1'\].*not held-out"):
        evaluate_superres(hd_slides[1], model, aggregate=True, progress=False)

    sd = test
    table = sd.tables[K.TABLE_KEY]
    before = set(sd.images)
    store = tmp_path / "pred.zarr"
    predict_superres(sd, model, store=store, progress=False)
    el = sd.images[K.SUPERRES_KEY]
    levels = [np.asarray(el[f"scale{i}"]["image"].values) for i in range(4)]
    assert [lv.shape[1] for lv in levels] == [levels[0].shape[1] // f for f in (1, 2, 4, 8)]
    np.testing.assert_allclose([lv.sum() for lv in levels], levels[0].sum(), rtol=1e-4)
    assert list(el["scale0"]["image"].coords["c"].values) == model.genes
    assert table.uns[K.SUPERRES_KEY]["params"]["store"] == str(store) and store.is_dir()
    from spatialdata.transformations import get_transformation

    tf = get_transformation(el, K.COORDINATE_SYSTEM)
    mpp = table.uns[K.SLIDE_META_KEY]["mpp"]
    np.testing.assert_allclose(tf.to_affine_matrix(("x", "y"), ("x", "y"))[0, 0], 2 / mpp)
    # plots: H&E | 8/4/2 µm | truth per gene, and the whole-slide mosaic
    import matplotlib.pyplot as plt

    fig = stf.pl.superres(sd, genes=model.genes[:2], truth="true_rates", region_um=(0, 0, 128, 128), return_fig=True)
    assert len(fig.axes) == 2 * 5 and fig.axes[1].get_images()[0].get_array().shape == (16, 16)
    assert fig.axes[3].get_images()[0].get_array().shape == (64, 64)
    assert fig.axes[4].get_images()[0].get_array().shape == (64, 64)
    axs = stf.pl.superres_mosaic(sd, genes=model.genes[0], truth="counts", min_counts=1, n_patches=4, show=False)
    assert axs.shape == (1, 2) and "PCC" in axs[0, 1].get_title()
    plt.close("all")
    with pytest.raises(KeyError, match="not in the prediction"):
        stf.pl.superres(sd, genes=["NOPE"])
    # existing element: clear error, nothing changes
    with pytest.raises(ValueError, match="already exists"):
        predict_superres(sd, model, store=tmp_path / "other.zarr")
    assert not (tmp_path / "other.zarr").exists() and set(sd.images) == before | {K.SUPERRES_KEY}


@pytest.mark.slow
def test_failed_prediction_leaves_nothing(hd_slides, model, tmp_path, monkeypatch):
    from spatialtranscriptformer.tl import _superres
    from spatialtranscriptformer.tl._superres_predict import predict_superres

    sd = hd_slides[0]
    before = set(sd.images)
    calls = {"n": 0}
    orig = _superres.SuperResModel.predict_tokens

    def boom(self, tokens, **kw):
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("disk full")
        return orig(self, tokens, **kw)

    monkeypatch.setattr(_superres.SuperResModel, "predict_tokens", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        predict_superres(
            sd, model, key_added="sr_fail", store=tmp_path / "fail.zarr", batch_size=2, progress=False
        )
    assert set(sd.images) == before and "sr_fail" not in sd.tables[K.TABLE_KEY].uns
    assert list(tmp_path.iterdir()) == []


def test_bad_input(hd_slides):
    from spatialtranscriptformer.train._superres_data import superres_targets

    s8 = stf.datasets.synthetic(technology="visium_hd", bin_size_um=8, size_um=64, n_genes=6, n_pathways=2)
    with pytest.raises(ValueError, match="8 µm bins"):
        superres_targets(s8, genes=3)
    visium = stf.datasets.synthetic(n_spots=20, n_genes=6, n_pathways=2)
    with pytest.raises(ValueError, match="not Visium HD"):
        superres_targets(visium, genes=3)
    with pytest.raises(ValueError, match="multiple of 16"):
        superres_targets(hd_slides[0], genes=3, patch_um=100)
    with pytest.raises(KeyError, match="missing"):
        superres_targets(hd_slides[0], genes=["GENE0001", "NOPE"])
    with pytest.raises(ValueError, match="empty"):
        superres_targets(hd_slides[0], genes=3, patch_um=64, min_tissue=1.01)
    a = hd_slides[0].tables[K.TABLE_KEY]
    norm = a.copy()
    norm.layers[K.COUNTS_LAYER] = norm.layers[K.COUNTS_LAYER] * 0.5
    before = norm.layers[K.COUNTS_LAYER].copy()
    with pytest.raises(ValueError, match="integer"):
        superres_targets(norm, genes=3)
    assert (norm.layers[K.COUNTS_LAYER] != before).nnz == 0
