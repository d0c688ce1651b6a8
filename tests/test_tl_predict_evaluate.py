"""stf.tl.predict / evaluate / cross_validate and TrainedModel save/load."""

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import spatialtranscriptformer as stf
from spatialtranscriptformer.tl._model import spatial_windows

TINY = {"token_dim": 16, "n_heads": 2, "num_pathways": 3}


@pytest.fixture(scope="module")
def slides(make_toy_slide):
    return [make_toy_slide(f"s{i}", f"p{i}", seed=i) for i in range(3)]


@pytest.fixture(scope="module")
def model(slides):
    return stf.tl.fit(slides, genes=["G0", "G1", "G2", "G3"], max_epochs=2, gene_sets=None, model_kwargs=TINY,
                      accelerator="cpu", progress=False)


def test_predict_writes_layer_pathways_and_params(slides, model):
    s = slides[0].copy()
    assert stf.tl.predict(s, model, progress=False) is None
    lay = s.layers["stf_pred"]
    assert sp.issparse(lay) and lay.shape == s.shape
    info = s.uns["stf_pred"]
    assert info["genes"] == model.genes and info["params"]["model"] == "stf" and info["target_space"] == "log1p"
    ref = model.predict_arrays(s.obsm["X_toy"], s.obsm["spatial"] * 0.5)["expr"]
    np.testing.assert_allclose(lay[:, [0, 1, 2, 3]].toarray(), ref, rtol=1e-5, atol=1e-6)
    assert lay[:, 4:].nnz == 0  # genes the model does not predict stay empty
    pw = s.obsm["stf_pathways"]
    assert isinstance(pw, pd.DataFrame) and list(pw.columns) == model.pathways and pw.shape == (36, 3)


def test_predict_genes_absent_from_var_and_slides_without_expression(slides, model):
    part = slides[1][:, ["G0", "G5"]].copy()
    stf.tl.predict(part, model, progress=False)
    assert part.uns["stf_pred"]["genes"] == ["G0"]
    assert list(part.obsm["stf_pred"].columns) == ["G1", "G2", "G3"]
    empty = slides[1][:, []].copy()  # no expression at all: AnnData -> obsm with all genes
    stf.tl.predict(empty, model, progress=False)
    assert list(empty.obsm["stf_pred"].columns) == model.genes
    np.testing.assert_allclose(empty.obsm["stf_pred"]["G1"], part.obsm["stf_pred"]["G1"], rtol=1e-6)


def test_predict_spatialdata_without_expression_gets_a_new_table(slides, model):
    from spatialdata import SpatialData
    from spatialdata.models import TableModel

    t = slides[2][:, []].copy()
    t.obs["region"] = pd.Categorical(["spots"] * t.n_obs)
    t.obs["spot_id"] = np.arange(t.n_obs)
    sdata = SpatialData(tables={"table": TableModel.parse(t, region="spots", region_key="region", instance_key="spot_id")})
    stf.tl.predict(sdata, model, progress=False)
    new = sdata.tables["stf_pred"]
    assert list(new.var_names) == model.genes and new.n_obs == 36
    assert new.uns["spatialdata_attrs"]["region"] == "spots"
    assert "stf_pathways" in sdata.tables["table"].obsm


@pytest.mark.parametrize(
    ("mutate", "err", "match"),
    [
        (lambda a: a.obsm.__setitem__("X_toy", a.obsm["X_toy"][:, :5]), ValueError, r"8-d"),
        (lambda a: a.obsm.__setitem__("X_uni", a.obsm.pop("X_toy")), KeyError, r"X_toy.*X_uni"),
        (lambda a: setattr(a, "var_names", [f"H{i}" for i in range(8)]), ValueError, "none of the model's"),
    ],
)
def test_predict_validates_against_the_model_before_writing(slides, model, mutate, err, match):
    good, bad = slides[0].copy(), slides[1].copy()
    mutate(bad)
    with pytest.raises(err, match=match):
        stf.tl.predict([good, bad], model, progress=False)
    assert "stf_pred" not in good.layers and "stf_pred" not in bad.uns and "stf_pathways" not in good.obsm


def test_windowed_prediction_equals_prediction_of_each_window(slides, model):
    import torch

    x, c = slides[0].obsm["X_toy"], slides[0].obsm["spatial"] * 0.5
    full = model.predict_arrays(x, c)["expr"]
    np.testing.assert_allclose(model.predict_arrays(x, c, window_spots=36)["expr"], full)
    win = model.predict_arrays(x, c, window_spots=10)["expr"]
    # the inputs (standardisation, neighbourhood context) are built over the whole slide first; each window
    # then sees only its own spots; the output smoothing is applied to the assembled slide
    xs = model.prepare_inputs(x, c)
    raw = np.zeros_like(full)
    with torch.no_grad():
        for idx, n_core in spatial_windows(c, 10):
            out = model.module(torch.from_numpy(xs[idx])[None], torch.from_numpy(c[idx]).float()[None],
                               torch.ones(1, len(idx), dtype=torch.bool))
            raw[idx[:n_core]] = out["expr"][0, :n_core].numpy()
    ref = model._smooth({"expr": raw}, c)["expr"]
    np.testing.assert_allclose(win, ref, rtol=1e-5, atol=1e-5)


def test_per_slide_standardisation_removes_slide_offsets(slides, model):
    assert model.standardize == "slide"
    x, c = slides[0].obsm["X_toy"], slides[0].obsm["spatial"] * 0.5
    shifted = x * 3.0 + 7.0  # e.g. a stain / scanner offset of the whole slide
    np.testing.assert_allclose(model.predict_arrays(shifted, c)["expr"], model.predict_arrays(x, c)["expr"],
                               rtol=1e-4, atol=1e-4)


def test_save_load_roundtrip_and_validation(slides, model, tmp_path):
    model.save(tmp_path / "m")
    back = stf.tl.TrainedModel.load(tmp_path / "m")
    assert back.genes == model.genes and back.pathways == model.pathways and back.embedding_key == "X_toy"
    pd.testing.assert_frame_equal(back.history, model.history, check_dtype=False)
    x, c = slides[0].obsm["X_toy"], slides[0].obsm["spatial"]
    np.testing.assert_allclose(back.predict_arrays(x, c)["expr"], model.predict_arrays(x, c)["expr"], rtol=1e-6)
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["genes"] = cfg["genes"] + ["EXTRA"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match"):
        stf.tl.TrainedModel.load(tmp_path / "m")
    with pytest.raises(FileNotFoundError):
        stf.tl.TrainedModel.load(tmp_path / "nothing")


def _planted(slides, noise):
    out = []
    for i, s in enumerate(slides):
        s = s.copy()
        truth = np.log1p(s.layers["counts"][:, :2])
        s.layers["stf_pred"] = sp.csr_matrix(np.c_[truth + noise * np.random.default_rng(i).normal(size=truth.shape),
                                                   np.zeros((s.n_obs, 6))])
        s.uns["stf_pred"] = {"genes": ["G0", "G1"], "obsm_genes": [], "target_space": "log1p", "level": "spot"}
        out.append(s)
    return out


def test_evaluate_against_planted_predictions(slides):
    data = _planted(slides, 0.0)
    data[0].layers["counts"][0] = 0  # a QC-failed spot is left out
    res = stf.tl.evaluate(data)
    assert list(res.columns) == ["gene", "slide", "level", "pearson", "spearman", "mse", "n_spots", "collapsed",
                                 "moran_true", "moran_pred"]
    spot = res[res.level == "spot"]
    assert len(spot) == 6 and np.allclose(spot[["pearson", "spearman"]], 1.0) and np.allclose(spot.mse, 0)
    assert spot[spot.slide == "s0"].n_spots.eq(35).all() and spot[spot.slide == "s1"].n_spots.eq(36).all()
    assert not spot.collapsed.any() and np.allclose(spot.moran_pred, spot.moran_true)
    assert np.isnan(res.attrs["summary"]["s1"]["moran_rank_agreement"])  # needs at least 3 genes
    bulk = res[res.level == "slide"]
    assert len(bulk) == 2 and (bulk.slide == "all").all() and np.allclose(bulk.pearson, 1.0)
    noisy = stf.tl.evaluate(_planted(slides, 1.0))
    ns = noisy[noisy.level == "spot"]
    assert (ns.pearson < 0.99).all() and np.allclose(ns.mse, 1.0, atol=0.5)
    with pytest.raises(KeyError, match="stf.tl.predict"):
        stf.tl.evaluate(slides[0])


def test_a_collapsed_prediction_scores_zero_not_nan(slides):
    data = _planted(slides[:1], 0.0)
    s = data[0]
    good = s.layers["stf_pred"].toarray()
    s.layers["stf_pred"] = sp.csr_matrix(np.c_[good[:, :1], np.full((s.n_obs, 1), 2.5), good[:, 2:]])  # G1 constant
    res = stf.tl.evaluate(s)
    g1 = res[res.gene == "G1"].iloc[0]
    assert g1.pearson == 0.0 and g1.spearman == 0.0 and g1.collapsed and g1.moran_pred == 0.0
    summ = res.attrs["summary"]["s0"]
    assert summ["n_collapsed"] == 1 and summ["mean_pearson"] == pytest.approx(0.5)  # (1 + 0) / 2, not 1
    # a gene constant in the *measurement* is undefined (NaN), reported apart from the model's failures
    s.layers["counts"][:, 0] = 3
    res = stf.tl.evaluate(s)
    g0 = res[res.gene == "G0"].iloc[0]
    assert np.isnan(g0.pearson) and not g0.collapsed and res.attrs["summary"]["s0"]["n_undefined"] == 1


def test_evaluate_pathways_apart_from_genes_and_qc_masked(slides, model):
    s = slides[0].copy()
    s.layers["counts"][0] = 0  # QC-failed spot
    stf.tl.predict(s, model, progress=False)
    names = list(s.obsm["stf_pathways"].columns[:2])
    truth = s.obsm["stf_pathways"][names] * 3 + 1  # perfectly correlated targets ...
    truth.iloc[0] = [1e6, -1e6]  # ... except at the QC-failed spot, which must not count
    s.obsm["pathway_activity"] = truth
    genes = stf.tl.evaluate(s)
    assert "pathway" not in genes.columns and set(genes.gene) == set(model.genes)
    pw = stf.tl.evaluate(s, features="pathways")
    assert list(pw.columns) == ["pathway", "slide", "pearson", "spearman", "n_spots", "collapsed"]
    assert pw.pathway.tolist() == names and np.allclose(pw.pearson, 1.0) and pw.n_spots.eq(35).all()
    summ = pw.attrs["summary"]["s0"]
    assert summ["n_pathways"] == 2 and 0 <= summ["collapse_index"] <= 1 and summ["collapse_index"] == pytest.approx(
        summ["target_collapse_index"])
    s.obsm["pathway_activity"] = truth.rename(columns=lambda c: "OTHER_" + c)
    with pytest.raises(ValueError, match="share no name"):
        stf.tl.evaluate(s, features="pathways")
    with pytest.raises(ValueError, match="features"):
        stf.tl.evaluate(s, features="pathway")


def test_cross_validate_leave_one_slide_out_leaves_data_unchanged(slides):
    before = [s.copy() for s in slides]
    res = stf.tl.cross_validate(slides, model="ridge", groups="slide", genes=4, progress=False)
    assert sorted(res.fold.unique()) == ["s0", "s1", "s2"]
    spot = res[res.level == "spot"]
    assert (spot.fold == spot.slide).all()  # each fold scores only its held-out slide
    assert spot.groupby("fold").size().eq(4).all() and spot.pearson.mean() > 0.2
    assert set(res.attrs["genes"]) == {"s0", "s1", "s2"}
    for a, b in zip(slides, before, strict=True):
        assert a.layers.keys() == b.layers.keys() and a.uns.keys() == b.uns.keys() and a.obsm.keys() == b.obsm.keys()
    with pytest.raises(ValueError, match="at least 2"):
        stf.tl.cross_validate(slides[0], model="ridge", groups="slide")


def test_cross_validate_controls_and_slide_level_models(slides):
    res = stf.tl.cross_validate(slides, model="ridge", groups="slide", genes=4, controls=("mirror", "rot90"),
                                progress=False)
    assert set(res.control) == {"none", "mirror", "rot90"}
    by = res.groupby("control").pearson.mean()
    assert by["none"] == pytest.approx(by["mirror"]) == pytest.approx(by["rot90"])  # reads no coordinates
    # a model with an absolute positional encoding sees another layout once the held-out slide is rotated
    pe = stf.tl.cross_validate(slides, groups="slide", genes=4, controls=("rot90",), max_epochs=2, gene_sets=None,
                               model_kwargs={**TINY, "positional_encoding": "sinusoidal"}, context_radius=None,
                               accelerator="cpu", progress=False)
    a, b = (pe[pe.control == c].sort_values(["fold", "gene"]).pearson.to_numpy() for c in ("none", "rot90"))
    assert not np.allclose(a, b)
    with pytest.raises(ValueError, match="Unknown controls"):
        stf.tl.cross_validate(slides, model="ridge", groups="slide", controls=("flip",))
    # slide-level models are scored across held-out slides (pooled over folds), never silently empty
    mil = stf.tl.cross_validate(slides, model="attention_mil", groups="slide", genes=["G0", "G1", "G2", "G3"],
                                max_epochs=1,
                                model_kwargs={"hidden": 8, "attention_dim": 4}, progress=False, accelerator="cpu")
    assert len(mil) == 4 and list(mil.columns[:2]) == ["gene", "pearson"] and mil.n.eq(3).all()
    with pytest.raises(ValueError, match="at least 3"):
        stf.tl.cross_validate(slides[:2], model="attention_mil", groups="slide", genes=4, max_epochs=1, loss="mse",
                              model_kwargs={"hidden": 8, "attention_dim": 4}, progress=False, accelerator="cpu")


@pytest.mark.slow
def test_cross_validate_stf_validation_stays_inside_training_folds(slides):
    res = stf.tl.cross_validate(slides, groups="patient", genes=3, max_epochs=1, gene_sets=None, model_kwargs=TINY,
                                accelerator="cpu", validation="slide", val_fraction=0.5)
    assert len(res.attrs["histories"]) == 3
    for fold, h in res.attrs["histories"].items():
        assert len(h) == 1 and np.isfinite(h.val_pcc).all()
        val = res.attrs["val_slides"][fold]
        assert len(val) == 1 and val[0] != f"s{fold[1:]}"  # pitfall 10: never the held-out fold
    assert np.isfinite(res[res.level == "spot"].pearson).all()
