import numpy as np
import pandas as pd
import pytest
from anndata import AnnData

from spatialtranscriptformer.tl._benchmark import SUMMARY_COLUMNS, benchmark
from spatialtranscriptformer.tl._benchmark_report import CSV_NAME, MD_NAME, PNG_NAME

N_GENES, F = 12, 10


def _slide(sid, pid, n, seed, key="X_test"):
    """A slide whose embeddings linearly encode its (log) expression rates, per spot and per slide."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    xy = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n] * 100.0
    slide_shift = rng.normal(scale=0.8, size=N_GENES)
    latent = rng.normal(size=(n, 3))
    load = np.random.default_rng(99).normal(size=(3, N_GENES))  # same gene programmes in every slide
    log_rate = 2.0 + slide_shift + latent @ load * 0.6
    counts = rng.poisson(np.exp(log_rate)).astype(np.float32)
    emb = rng.normal(scale=0.3, size=(n, F)).astype(np.float32)
    emb[:, :3] += latent
    emb[:, 3:6] += slide_shift[:3]
    a = AnnData(
        X=counts.copy(),
        obs=pd.DataFrame({"slide_id": sid, "patient_id": pid}, index=[f"{sid}_{i}" for i in range(n)]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(N_GENES)]),
    )
    a.layers["counts"] = counts
    a.obsm["spatial"] = xy
    a.obsm[key] = emb
    a.uns["stf_slide"] = {"mpp": 1.0, "slide_id": sid, "patient_id": pid, "spot_diameter_um": 55.0}
    return a


@pytest.fixture(scope="module")
def slides():
    return [_slide(f"s{i}", f"p{i}", 25 + 3 * i, seed=i) for i in range(4)]


FAST = {"max_epochs": 3, "validation": None, "early_stopping_patience": None, "plan_kwargs": {"warmup_epochs": 0}, "lr": 3e-3}
TINY = {"he2rna": {"hidden": [16]}, "attention_mil": {"hidden": 16, "attention_dim": 8}}


@pytest.mark.slow
def test_benchmark_runs_and_writes_report(slides, tmp_path):
    before = [s.copy() for s in slides]
    out = tmp_path / "bench"
    table, long = benchmark(
        slides, models=("ridge", "he2rna", "attention_mil"), genes=8, groups="patient", out=out,
        model_kwargs=TINY, progress=False, return_metrics=True, **FAST,
    )  # fmt: skip
    assert "metrics" not in table.attrs
    str(pd.concat([table, table]))  # printing / concatenating works (no DataFrame in attrs)
    assert list(table.columns) == SUMMARY_COLUMNS
    assert list(table["model"]) == ["ridge", "he2rna", "attention_mil"]
    assert list(table["level"]) == ["spot", "spot", "slide"]
    assert list(table["evaluated_on"]) == ["spot", "spot", "slide mean"]
    assert (table["wall_time_s"] > 0).all()
    assert table.loc[table.model == "ridge", "n_folds"].item() == 4
    # the planted per-spot signal is found by the ridge probe on held-out patients
    assert table.loc[table.model == "ridge", "pcc_mean"].item() > 0.3
    # every model has a slide-mean score over 4 held-out slides
    assert table["slide_mean_pcc"].notna().all()
    assert set(long["fold"]) >= {"p0", "p1", "p2", "p3", "pooled"}
    mil = long[long.model == "attention_mil"]
    assert set(mil["evaluated_on"]) == {"slide mean"} and (mil["n"] >= 3).all()  # genes re-selected per fold
    assert (mil["n"] == 4).any()
    # files
    csv = pd.read_csv(out / CSV_NAME)
    assert len(csv) == len(long) and {"model", "level", "fold", "gene", "pearson"} <= set(csv.columns)
    md = (out / MD_NAME).read_text()
    assert "| attention_mil | slide | slide mean |" in md and "wall time" in md
    png = (out / PNG_NAME).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    # the user's slides are unchanged
    for a, b in zip(slides, before, strict=True):
        assert "stf_pred" not in a.uns and set(a.layers) == set(b.layers)
        np.testing.assert_array_equal(a.layers["counts"], b.layers["counts"])


def test_benchmark_ridge_fold_scores_match_direct_fit(slides):
    """Spot-level rows are the HEST metric of a ridge fitted on the other slides."""
    from spatialtranscriptformer.module._ridge import RidgeProbe

    table, long = benchmark(slides, models=["ridge"], genes=["g0", "g1", "g2"], groups="slide", progress=False,
                            return_metrics=True)
    row = long[(long.fold == "s0") & (long.gene == "g1") & (long.evaluated_on == "spot")]
    train = slides[1:]
    X = np.concatenate([s.obsm["X_test"] for s in train])
    Y = np.log1p(np.concatenate([s.layers["counts"][:, :3] for s in train]))
    pred = RidgeProbe().fit(X, Y).predict(slides[0].obsm["X_test"])
    r = np.corrcoef(pred[:, 1], np.log1p(slides[0].layers["counts"][:, 1]))[0, 1]
    assert row["pearson"].item() == pytest.approx(r, abs=1e-5)
    mean_over_genes = long[(long.evaluated_on == "spot")].groupby("fold")["pearson"].mean()
    assert table["pcc_mean"].item() == pytest.approx(mean_over_genes.mean())
    assert table["pcc_sd"].item() == pytest.approx(np.std(mean_over_genes.to_numpy()))


def test_benchmark_bad_input(slides, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="at least 2"):
        benchmark(slides[:1], models=["ridge"], out=out)
    same_patient = [_slide(f"t{i}", "P", 20, seed=i) for i in range(2)]
    with pytest.raises(ValueError, match="at least 2 patient"):
        benchmark(same_patient, models=["ridge"], groups="patient", out=out)
    other = _slide("s9", "p9", 20, seed=9, key="X_other")
    with pytest.raises(KeyError, match="embedding"):
        benchmark([*slides[:2], other], models=["ridge"], out=out)
    with pytest.raises(KeyError, match="X_test"):
        benchmark([*slides[:2], other], models=["ridge"], embedding_key="X_test", out=out)
    wide = _slide("s8", "p8", 20, seed=8)
    wide.obsm["X_test"] = np.zeros((20, F + 2), dtype=np.float32)
    with pytest.raises(ValueError, match="widths differ"):
        benchmark([*slides[:2], wide], models=["ridge"], embedding_key="X_test", out=out)
    with pytest.raises(ValueError, match="Unknown model"):
        benchmark(slides, models=["ridge", "nope"], out=out)
    with pytest.raises(ValueError, match="empty"):
        benchmark(slides, models=[], out=out)
    with pytest.raises(KeyError, match="not benchmarked"):
        benchmark(slides, models=["ridge"], model_kwargs={"transmil": {}}, out=out)
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        benchmark(slides, models=["ridge"], out=afile)
    assert not out.exists()
    assert all("stf_pred" not in s.uns for s in slides)


def test_benchmark_models_share_genes_chosen_on_training_folds_and_controls(slides):
    from spatialtranscriptformer.pp._genes import select_top_genes

    table, long = benchmark(slides, models=["ridge", "ridge_cv"], genes=3, groups="slide", controls=("mirror",),
                            progress=False, return_metrics=True)
    fold_genes = table.attrs["params"]["fold_genes"]
    for i, s in enumerate(slides):
        sid = s.obs["slide_id"].iloc[0]
        assert fold_genes[sid] == select_top_genes([t for j, t in enumerate(slides) if j != i], 3)
        for model in ("ridge", "ridge_cv"):
            rows = long[(long.model == model) & (long.fold == sid) & (long.control == "none")]
            assert sorted(rows.gene) == sorted(fold_genes[sid])  # every model scored on the same genes
    assert list(table.control) == ["none", "mirror", "none", "mirror"]
    assert table.n_collapsed.eq(0).all() and table.pathway_pcc.isna().all()
    cv = table[table.model == "ridge_cv"].pcc_mean.to_numpy()
    assert cv[0] == pytest.approx(cv[1])  # the probes read no coordinates: the control changes nothing
