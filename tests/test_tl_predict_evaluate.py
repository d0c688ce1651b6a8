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
    return stf.tl.fit(slides, genes=["G0", "G1", "G2", "G3"], max_epochs=2, data_kwargs={"gene_sets": None}, model_kwargs=TINY,
                      accelerator="cpu", progress=False)


def test_predict_anndata_writes_obsm_frames_and_records(slides, model):
    s = slides[0].copy()
    assert stf.tl.predict(s, model, progress=False) is None
    pred = s.obsm["stf_pred"]
    assert isinstance(pred, pd.DataFrame) and list(pred.columns) == model.genes  # the model's genes only
    assert pred.index.equals(s.obs_names) and "stf_pred" not in s.layers
    info = s.uns["stf_pred"]
    assert info["params"]["model"] == "stf" and info["target_space"] == "log1p"
    assert info["kind"] == "expression" and info["stored_in"] == "obsm"
    ref = model.predict_arrays(s.obsm["X_toy"], s.obsm["spatial"] * 0.5)["expr"]
    np.testing.assert_allclose(pred.to_numpy(), ref, rtol=1e-5, atol=1e-6)
    pw = s.obsm["stf_pathways"]
    assert isinstance(pw, pd.DataFrame) and list(pw.columns) == model.pathways and pw.shape == (36, 3)
    assert s.uns["stf_pathways"]["kind"] == "pathways" and "params" in s.uns["stf_pathways"]


def test_predict_inplace_false_returns_tables_and_writes_nothing(slides, model):
    s = slides[0].copy()
    s.uns["spatial"] = {"lib": {"images": {"hires": np.zeros((4, 4, 3), np.uint8)},
                                "scalefactors": {"tissue_hires_scalef": 0.01, "spot_diameter_fullres": 100.0}}}
    before = s.copy()
    out = stf.tl.predict(s, model, inplace=False, progress=False)
    assert set(out) == {"stf_pred", "stf_pathways"}
    assert set(s.obsm) == set(before.obsm) and set(s.uns) == set(before.uns) and set(s.layers) == set(before.layers)
    g, pw = out["stf_pred"], out["stf_pathways"]
    assert list(g.var_names) == model.genes and list(pw.var_names) == model.pathways
    assert g.obs_names.equals(s.obs_names) and pw.obs_names.equals(s.obs_names)
    ref = model.predict_arrays(s.obsm["X_toy"], s.obsm["spatial"] * 0.5)
    np.testing.assert_allclose(g.X, ref["expr"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pw.X, ref["pathway_scores"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(g.obsm["spatial"], s.obsm["spatial"])
    assert g.uns["spatial"]["lib"]["images"]["hires"] is s.uns["spatial"]["lib"]["images"]["hires"]  # shared
    assert g.uns["stf_pred"]["stored_in"] == "X" and g.uns["stf_slide"] == s.uns["stf_slide"]
    assert g.var["measured"].all()
    # the same tables from the in-place outputs
    stf.tl.predict(s, model, progress=False)
    t = stf.tl.prediction_table(s, key="stf_pathways")
    np.testing.assert_allclose(t.X, pw.X)
    assert list(t.var_names) == model.pathways and "spatial" in t.uns
    lst = stf.tl.predict([slides[0], slides[1]], model, inplace=False, progress=False)
    assert isinstance(lst, list) and len(lst) == 2 and lst[1]["stf_pred"].n_obs == slides[1].n_obs
    with pytest.raises(ValueError, match="choose one"):
        stf.tl.predict(s, model, inplace=False, copy=True)


def test_predict_genes_absent_from_var_and_slides_without_expression(slides, model):
    part = slides[1][:, ["G0", "G5"]].copy()
    stf.tl.predict(part, model, progress=False)
    assert list(part.obsm["stf_pred"].columns) == model.genes  # all of them, measured or not
    assert stf.tl.prediction_table(part).var["measured"].tolist() == [True, False, False, False]
    empty = slides[1][:, []].copy()  # no expression at all
    stf.tl.predict(empty, model, progress=False)
    assert list(empty.obsm["stf_pred"].columns) == model.genes
    np.testing.assert_allclose(empty.obsm["stf_pred"]["G1"], part.obsm["stf_pred"]["G1"], rtol=1e-6)


def _sdata(t):
    from spatialdata import SpatialData
    from spatialdata.models import TableModel

    t = t.copy()
    t.obs["region"] = pd.Categorical(["spots"] * t.n_obs)
    t.obs["spot_id"] = np.arange(t.n_obs)
    return SpatialData(tables={"table": TableModel.parse(t, region="spots", region_key="region", instance_key="spot_id")})


def test_predict_spatialdata_writes_linked_prediction_tables(slides, model):
    sdata = _sdata(slides[2])
    expr_before = sdata.tables["table"].copy()
    stf.tl.predict(sdata, model, progress=False)
    t = sdata.tables["table"]
    assert set(t.obsm) == set(expr_before.obsm) and set(t.uns) == set(expr_before.uns)  # expression table unchanged
    g, pw = sdata.tables["stf_pred"], sdata.tables["stf_pathways"]
    assert list(g.var_names) == model.genes and list(pw.var_names) == model.pathways
    for new in (g, pw):
        assert new.obs_names.equals(t.obs_names)
        assert new.uns["spatialdata_attrs"] == t.uns["spatialdata_attrs"]
        assert (new.obs["spot_id"] == t.obs["spot_id"]).all() and (new.obs["region"] == "spots").all()
    ref = model.predict_arrays(t.obsm["X_toy"], t.obsm["spatial"] * 0.5)
    np.testing.assert_allclose(g.X, ref["expr"], rtol=1e-5, atol=1e-6)
    assert g.uns["stf_pred"]["source_table"] == "table" and pw.uns["stf_pathways"]["kind"] == "pathways"
    assert stf.tl.prediction_table(sdata, key="stf_pred") is g
    # the expression table stays the default table; a second prediction replaces the first
    assert stf.tl.evaluate(sdata).gene.tolist() == model.genes
    stf.tl.predict(sdata, model, progress=False)
    assert sorted(sdata.tables) == ["stf_pathways", "stf_pred", "table"]
    # the input table under another name is still found next to the prediction tables
    sdata.tables["expr"] = sdata.tables.pop("table")
    stf.tl.predict(sdata, model, key_added="again", pathway_key_added="again_pw", progress=False)
    assert sdata.tables["again"].uns["again"]["source_table"] == "expr"


def test_predict_spatialdata_without_expression_gets_a_table(slides, model):
    sdata = _sdata(slides[2][:, []])
    stf.tl.predict(sdata, model, progress=False)
    new = sdata.tables["stf_pred"]
    assert list(new.var_names) == model.genes and new.n_obs == 36 and not new.var["measured"].any()
    assert new.uns["spatialdata_attrs"]["region"] == "spots"


def test_predict_refuses_output_keys_that_would_overwrite_other_tables(slides, model):
    import anndata as ad

    sdata = _sdata(slides[2])
    sdata.tables["mine"] = ad.AnnData(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="expression table"):
        stf.tl.predict(sdata, model, key_added="table", progress=False)
    with pytest.raises(ValueError, match="not written by"):
        stf.tl.predict(sdata, model, pathway_key_added="mine", progress=False)
    with pytest.raises(ValueError, match="different names"):
        stf.tl.predict(sdata, model, key_added="x", pathway_key_added="x", progress=False)
    assert sorted(sdata.tables) == ["mine", "table"]
    a = slides[0].copy()
    with pytest.raises(ValueError, match=r"`obsm\['X_toy'\]` exists and was not written"):  # the embedding
        stf.tl.predict(a, model, pathway_key_added="X_toy", progress=False)
    assert a.obsm["X_toy"].shape == (36, 8) and "stf_pred" not in a.obsm


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
    assert "stf_pred" not in good.obsm and "stf_pred" not in bad.uns and "stf_pathways" not in good.obsm


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
        truth = truth.toarray() if sp.issparse(truth) else np.asarray(truth)
        s.obsm["stf_pred"] = pd.DataFrame(truth + noise * np.random.default_rng(i).normal(size=truth.shape),
                                          index=s.obs_names, columns=["G0", "G1"])
        s.uns["stf_pred"] = {"kind": "expression", "stored_in": "obsm", "target_space": "log1p", "level": "spot"}
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
    s.obsm["stf_pred"]["G1"] = 2.5  # G1 constant
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


def test_evaluate_spots_scores_a_subset_like_the_subset_itself(slides, model):
    s = slides[0].copy()
    held = np.asarray(s.obsm["spatial"])[:, 0] > 500
    s.obs["held"] = held
    stf.tl.predict(s, model, progress=False)
    sub = stf.tl.evaluate(s[held].copy())  # an AnnData keeps its obsm predictions when subset
    res = stf.tl.evaluate(s, spots="held")
    pd.testing.assert_frame_equal(res, sub)
    assert res.n_spots.eq(int(held.sum())).all()
    assert not np.allclose(stf.tl.evaluate(s).pearson, res.pearson)
    sdata = _sdata(s)  # the same through the prediction tables of a SpatialData
    del sdata.tables["table"].obsm["stf_pred"], sdata.tables["table"].uns["stf_pred"]
    stf.tl.predict(sdata, model, progress=False)
    pd.testing.assert_frame_equal(stf.tl.evaluate(sdata, spots="held"), sub)
    with pytest.raises(KeyError, match="pass the SpatialData"):  # its table alone has no predictions
        stf.tl.evaluate(sdata.tables["table"][held].copy())
    with pytest.raises(ValueError, match="boolean"):
        stf.tl.evaluate(s, spots="slide_id")
    with pytest.raises(KeyError, match="no obs column"):
        stf.tl.evaluate(s, spots="nope")


def test_slide_level_predictions(slides, model):
    mil = stf.tl.fit(slides, model="attention_mil", genes=["G0", "G1", "G2", "G3"], max_epochs=1,
                     model_kwargs={"hidden": 8, "attention_dim": 4}, progress=False, accelerator="cpu")
    data = [s.copy() for s in slides]
    stf.tl.predict(data, model, progress=False)  # spot-level predictions first: replaced, never left stale
    stf.tl.predict(data, mil, progress=False)
    rec = data[0].uns["stf_pred"]
    assert rec["stored_in"] == "uns" and rec["level"] == "slide" and list(rec["slide_expr"].columns) == mil.genes
    assert "stf_pred" not in data[0].obsm and "stf_pathways" in data[0].obsm  # MIL has no pathway output
    res = stf.tl.evaluate(data)
    assert (res.level == "slide").all() and len(res) == 4
    out = stf.tl.predict(slides[0], mil, inplace=False, progress=False)["stf_pred"]
    assert out.shape == (1, 4) and list(out.obs_names) == ["s0"]
    np.testing.assert_allclose(out.X[0], rec["slide_expr"].loc["s0"], rtol=1e-6)
    with pytest.raises(ValueError, match="slide-level"):
        stf.pl.spatial(data[0], genes="G0", layers=("counts", "stf_pred"), show=False)


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
    pe = stf.tl.cross_validate(slides, groups="slide", genes=4, controls=("rot90",), max_epochs=2,
                               data_kwargs={"gene_sets": None, "context_radius": None},
                               model_kwargs={**TINY, "positional_encoding": "sinusoidal"},
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
    res = stf.tl.cross_validate(slides, groups="patient", genes=3, max_epochs=1, model_kwargs=TINY,
                                data_kwargs={"gene_sets": None, "val_fraction": 0.5}, accelerator="cpu",
                                validation="slide")
    assert len(res.attrs["histories"]) == 3
    for fold, h in res.attrs["histories"].items():
        assert len(h) == 1 and np.isfinite(h.val_pcc).all()
        val = res.attrs["val_slides"][fold]
        assert len(val) == 1 and val[0] != f"s{fold[1:]}"  # pitfall 10: never the held-out fold
    assert np.isfinite(res[res.level == "spot"].pearson).all()
