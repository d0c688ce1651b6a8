"""Slide datasets, padding, crops, augmentation, targets, splits, metrics and the model registry."""

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from spatialtranscriptformer.module._registry import build_model, get_model_entry, register_model
from spatialtranscriptformer.tl._model import spatial_windows
from spatialtranscriptformer.train._data import (
    SlideArrays,
    SlideDataset,
    build_slide_arrays,
    check_embeddings,
    check_genes,
    collate_slides,
    collect_slides,
    dihedral,
)
from spatialtranscriptformer.train._plan import WarmupCosine, spot_pcc
from spatialtranscriptformer.train._splits import leave_one_group_out, split_validation


def make_slide(sid="s0", pid="p0", n=30, g=6, f=8, seed=0):
    rng = np.random.default_rng(seed)
    xy = np.stack(np.meshgrid(np.arange(6), np.arange(int(np.ceil(n / 6)))), -1).reshape(-1, 2)[:n] * 100.0
    emb = rng.normal(size=(n, f)).astype(np.float32)
    counts = rng.poisson(5, size=(n, g)).astype(np.float32)
    obs = pd.DataFrame({"slide_id": sid, "patient_id": pid}, index=[f"{sid}_{i}" for i in range(n)])
    a = ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(g)]))
    a.layers["counts"] = counts.copy()
    a.obsm["spatial"] = xy
    a.obsm["X_toy"] = emb
    a.uns["stf_slide"] = {"mpp": 0.5, "slide_id": sid}
    return a


def test_collect_slides_splits_tables_by_slide_id():
    a, b = make_slide("a", "p1"), make_slide("b", "p2", n=12)
    both = ad.concat([a, b], merge="first", uns_merge="first")
    refs = collect_slides(both)
    assert [r.slide_id for r in refs] == ["a", "b"]
    assert [r.patient_id for r in refs] == ["p1", "p2"]
    assert [len(r.rows) for r in refs] == [30, 12]
    with pytest.raises(ValueError, match="unique"):
        collect_slides([a, a.copy()])


def test_targets_qc_mask_log1p_and_coordinates_in_um():
    a = make_slide()
    a.layers["counts"][3] = 0  # a spot failing QC
    ref = collect_slides(a)[0]
    s = build_slide_arrays(ref, embedding_key="X_toy", genes=["G1", "G0"], layer="counts", loss="mse", log_transform=True)
    assert s.n_spots == 29 and 3 not in s.rows  # the mask comes from the data used: no zero-target spot
    np.testing.assert_allclose(s.y, np.log1p(a.layers["counts"][s.rows][:, [1, 0]]), rtol=1e-6)
    np.testing.assert_allclose(s.coords, a.obsm["spatial"][s.rows] * 0.5)
    raw = build_slide_arrays(ref, embedding_key="X_toy", genes=["G1"], layer="counts", loss="poisson", log_transform=True)
    np.testing.assert_array_equal(raw.y[:, 0], a.layers["counts"][raw.rows, 1])


def test_pathway_targets_come_from_all_measured_genes_and_skip_qc_failed_spots():
    a = make_slide()
    a.layers["counts"][3] = 0  # a QC-failed spot: left out of the z-scores and of the targets
    ref = collect_slides(a)[0]
    sets = {"A": ["G0", "G4"], "B": ["G4", "G5", "NOT_MEASURED"]}
    # the model predicts G0..G2 only; the targets still use G4 and G5, which it does not predict
    s = build_slide_arrays(ref, embedding_key="X_toy", genes=["G0", "G1", "G2"], layer="counts", loss="mse",
                           log_transform=True, pathway_sets=sets)
    keep = np.arange(30) != 3
    c = a.layers["counts"][keep]
    e = np.log1p(c * 1e4 / c.sum(1, keepdims=True))
    z = (e - e.mean(0)) / e.std(0)
    assert s.pathway_targets.shape == (29, 2) and s.n_spots == 29
    np.testing.assert_allclose(s.pathway_targets[:, 0], z[:, [0, 4]].mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.pathway_targets[:, 1], z[:, [4, 5]].mean(1), rtol=1e-5, atol=1e-6)
    slide = build_slide_arrays(ref, embedding_key="X_toy", genes=["G0"], layer="counts", loss="mse",
                               log_transform=True, pathway_sets=sets, pathway_zscore=False)
    np.testing.assert_allclose(slide.pathway_targets[:, 0], e[:, [0, 4]].mean(1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="None of the 1 genes of the gene sets"):
        build_slide_arrays(ref, embedding_key="X_toy", genes=["G0"], layer="counts", loss="mse", log_transform=True,
                           pathway_sets={"C": ["NOPE"]})


@pytest.mark.parametrize(
    ("mutate", "kwargs", "err", "match"),
    [
        (lambda a: a.layers.__setitem__("counts", a.layers["counts"] + 0.5), {"loss": "zinb"}, ValueError, "integer"),
        (lambda a: a.layers["counts"].__setitem__((0, 0), np.nan), {}, ValueError, "NaN"),
        (lambda a: a.obsm["X_toy"].__setitem__((2, 1), np.inf), {}, ValueError, "NaN/inf"),
        (lambda a: a.layers["counts"].__setitem__(slice(1, None), 0), {}, ValueError, "at least 2"),
        (lambda a: a.uns.pop("stf_slide"), {}, ValueError, "stf_slide"),
    ],
)
def test_bad_slides_raise_before_anything(mutate, kwargs, err, match):
    a = make_slide()
    mutate(a)
    before = a.copy()
    with pytest.raises(err, match=match):
        build_slide_arrays(collect_slides(a)[0], embedding_key="X_toy", genes=["G0", "G1"], layer="counts",
                           loss=kwargs.get("loss", "mse"), log_transform=True)
    np.testing.assert_array_equal(np.nan_to_num(a.layers["counts"]), np.nan_to_num(before.layers["counts"]))


def test_embedding_and_gene_checks_name_the_problem():
    a, b = make_slide("a"), make_slide("b", f=5)
    with pytest.raises(KeyError, match=r"X_toy"):
        check_embeddings(collect_slides(a), "X_uni")
    with pytest.raises(ValueError, match=r"differ.*'a': 8.*'b': 5"):
        check_embeddings(collect_slides([a, b]), "X_toy")
    assert check_embeddings(collect_slides(a), "X_toy") == 8
    with pytest.raises(KeyError, match=r"GAPDH"):
        check_genes(collect_slides(a), ["G0", "GAPDH"])


def _slide(n, g=3, seed=0):
    rng = np.random.default_rng(seed)
    return SlideArrays("s", "p", rng.normal(size=(n, 4)).astype(np.float32),
                       (rng.uniform(size=(n, 2)) * 1000).astype(np.float32), np.arange(n),
                       y=rng.normal(size=(n, g)).astype(np.float32))


def test_collate_pads_with_zeros_and_mask():
    b = collate_slides([SlideDataset([_slide(5)], train=False)[0], SlideDataset([_slide(3, seed=1)], train=False)[0]])
    assert b["x"].shape == (2, 5, 4) and b["y"].shape == (2, 5, 3)
    assert b["mask"].tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    assert (b["x"][1, 3:] == 0).all() and (b["y"][1, 3:] == 0).all() and (b["coords"][1, 3:] == 0).all()


def test_dihedral_transforms_are_distinct_isometries():
    c = np.random.default_rng(0).normal(size=(20, 2))
    d0 = np.linalg.norm(c[:, None] - c[None], axis=-1)
    outs = [dihedral(c, k) for k in range(8)]
    np.testing.assert_allclose(outs[0], c, atol=1e-12)
    for o in outs:
        np.testing.assert_allclose(np.linalg.norm(o[:, None] - o[None], axis=-1), d0, atol=1e-9)
    assert len({tuple(np.round(o[0], 6)) for o in outs}) == 8


def test_spatial_crop_is_reproducible_contiguous_and_varies_by_epoch():
    s = _slide(200)
    ds = SlideDataset([s], max_spots=50, crop="spatial", augment=False, seed=3)
    a = ds[0]
    assert len(a["x"]) == 50
    np.testing.assert_array_equal(a["x"], ds[0]["x"])
    # a spatial crop is the 50 nearest spots of some centre: its radius is the 50th-neighbour distance
    idx = [int(np.flatnonzero((s.x == row).all(1))[0]) for row in a["x"]]
    centre = s.coords[idx].mean(0)
    assert np.linalg.norm(s.coords[idx] - centre, axis=1).max() < np.linalg.norm(s.coords - centre, axis=1).max()
    ds.set_epoch(1)
    assert not np.array_equal(a["x"], ds[0]["x"])
    whole = SlideDataset([s], train=False, max_spots=50)[0]
    assert len(whole["x"]) == 200 and np.array_equal(whole["coords"], s.coords)


def test_spot_pcc_matches_numpy_ignores_padding_and_constant_genes():
    rng = np.random.default_rng(0)
    p, y = rng.normal(size=(10, 3)), rng.normal(size=(10, 3))
    y[:, 2] = 1.0  # constant truth: excluded
    ref = np.mean([np.corrcoef(p[:, j], y[:, j])[0, 1] for j in range(2)])
    P = torch.zeros(1, 14, 3)
    Y = torch.zeros(1, 14, 3)
    P[0, :10], Y[0, :10] = torch.tensor(p), torch.tensor(y)
    P[0, 10:] = 50.0  # padding garbage
    mask = torch.arange(14).unsqueeze(0) < 10
    assert float(spot_pcc(P, Y, mask)) == pytest.approx(ref, abs=1e-5)
    const = spot_pcc(torch.ones(1, 14, 3), Y, mask)
    assert torch.isfinite(const).all() and float(const) == 0.0


def test_warmup_cosine_schedule():
    f = WarmupCosine(4, 20)
    vals = [f(i) for i in range(21)]
    assert vals[0] < vals[3] < 1.0 and vals[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(vals[4:], vals[5:], strict=False)) and vals[20] == pytest.approx(0.0)


def test_split_validation_patient_slide_fallback_and_single(caplog):
    tr, va = split_validation(["a", "b", "c", "d"], ["p", "p", "q", "q"], validation="patient", val_fraction=0.4)
    assert len(va) == 2 and {"a", "b"} in ({*va}, {*tr})  # whole patients held out
    with caplog.at_level(logging.WARNING, logger="spatialtranscriptformer"):
        tr, va = split_validation(["a", "b", "c"], ["p"] * 3, validation="patient")
    assert len(va) == 1 and len(tr) == 2 and "one patient" in caplog.text
    with caplog.at_level(logging.WARNING, logger="spatialtranscriptformer"):
        assert split_validation(["a"], ["p"]) == (["a"], [])
    assert "without validation" in caplog.text
    assert split_validation(["a", "b"], ["p", "q"], validation=["b"]) == (["a"], ["b"])
    with pytest.raises(KeyError, match="zz"):
        split_validation(["a", "b"], ["p", "q"], validation=["zz"])


def test_leave_one_group_out():
    folds = leave_one_group_out(["a", "b", "c"], ["p", "p", "q"], groups="patient")
    assert folds == [("p", ["c"], ["a", "b"]), ("q", ["a", "b"], ["c"])]
    assert len(leave_one_group_out(["a", "b", "c"], ["p", "p", "q"], groups="slide")) == 3
    with pytest.raises(ValueError, match="groups='slide'"):
        leave_one_group_out(["a", "b"], ["p", "p"], groups="patient")


def test_spatial_windows_cover_every_spot_once():
    c = np.random.default_rng(1).uniform(size=(333, 2))
    wins = spatial_windows(c, 64)
    cores = np.concatenate([w[: n] for w, n in wins])
    assert sorted(cores.tolist()) == list(range(333))
    assert all(len(w) <= 64 and len(set(w.tolist())) == len(w) for w, _ in wins)
    assert spatial_windows(c, None)[0][1] == 333


def test_registry_unknown_name_and_levels():
    with pytest.raises(ValueError, match=r"Unknown model 'nope'.*stf"):
        get_model_entry("nope")
    assert "slide" in get_model_entry("stf").levels

    @register_model("_tiny_test_model", levels=("spot",), description="test")
    def build(input_dim, num_genes, *, level, loss, **hp):
        m = torch.nn.Linear(input_dim, num_genes)
        m.level = level
        return m

    assert build_model("_tiny_test_model", 3, 2, loss="mse").level == "spot"
    with pytest.raises(ValueError, match="supports level"):
        build_model("_tiny_test_model", 3, 2, level="slide", loss="mse")
    with pytest.raises(ValueError, match="levels"):
        register_model("_bad", levels=("pixel",))
