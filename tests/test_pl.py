"""Plots (stf.pl), headless: figures, titles/labels, saving, and the user's data left untouched."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import spatialtranscriptformer as stf

PATHWAYS = ["HALLMARK_HYPOXIA", "HALLMARK_EPITHELIAL_MESENCHYMAL_TRANSITION", "HALLMARK_G2M_CHECKPOINT"]


def short(name: str) -> str:
    """A pathway as panel titles show it: no HALLMARK_ prefix, spaces for underscores."""
    return name.removeprefix("HALLMARK_").replace("_", " ")


def flat(title: str) -> str:
    """A title with its wrapping undone."""
    return " ".join(title.split())


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def slide(bundled_sdata):
    """The bundled section with 12 genes and fake prediction tables, as `stf.tl.predict` writes them: predicted
    expression of the first 10 genes (`tables['stf_pred']`) and pathway scores (`tables['stf_pathways']`)."""
    from spatialdata import SpatialData

    from spatialtranscriptformer.tl._prediction_table import build_table

    src = bundled_sdata.tables["table"]
    counts = src.layers["counts"]
    total = np.asarray(counts.sum(0)).ravel()
    genes = list(src.var_names[np.argsort(-total)[:12]])
    table = src[:, genes].copy()
    rng = np.random.default_rng(0)
    dense = (
        table.layers["counts"].toarray() if sp.issparse(table.layers["counts"]) else table.layers["counts"]
    )
    pred = np.log1p(dense) * 0.5 + rng.normal(0, 0.4, dense.shape)
    scores = pd.DataFrame(rng.normal(size=(table.n_obs, 3)), index=table.obs_names, columns=PATHWAYS)
    table.obsm["pathway_activity"] = scores + rng.normal(0, 1, scores.shape)
    rec = {"params": {}, "target_space": "log1p", "level": "spot"}
    sdata = SpatialData(
        images={"he": bundled_sdata.images["he"]},
        shapes={"spots": bundled_sdata.shapes["spots"]},
        tables={"table": table},
    )
    sdata.tables["stf_pred"] = build_table(table, pred[:, :10], genes[:10], key="stf_pred",
                                           record={**rec, "kind": "expression"})
    sdata.tables["stf_pathways"] = build_table(table, scores.to_numpy(), PATHWAYS, key="stf_pathways",
                                               record={**rec, "kind": "pathways"})
    return sdata


def predicted(slide, name, key="stf_pred"):
    """The predicted map of a gene (or pathway) from its prediction table."""
    return np.asarray(slide.tables[key][:, name].X, dtype=float).ravel()


def snapshot(adata):
    return adata.copy()


def assert_unchanged(before, after):
    assert before.shape == after.shape
    assert list(before.obs_names) == list(after.obs_names)
    pd.testing.assert_frame_equal(before.obs, after.obs)
    pd.testing.assert_frame_equal(before.var, after.var)
    assert set(before.layers.keys()) == set(after.layers.keys())
    for k in before.layers.keys():
        a, b = before.layers[k], after.layers[k]
        a = a.toarray() if sp.issparse(a) else np.asarray(a)
        b = b.toarray() if sp.issparse(b) else np.asarray(b)
        np.testing.assert_array_equal(a, b)
    assert set(before.obsm.keys()) == set(after.obsm.keys())
    for k in before.obsm.keys():
        np.testing.assert_array_equal(np.asarray(before.obsm[k]), np.asarray(after.obsm[k]))
    assert set(before.uns.keys()) == set(after.uns.keys())


def collections_of(ax):
    from matplotlib.collections import EllipseCollection, PolyCollection

    return [c for c in ax.collections if isinstance(c, EllipseCollection | PolyCollection)]


# --- spatial --------------------------------------------------------------------------------------
def test_spatial_panels_titles_shared_scale_and_pearson(slide, tmp_path):
    table = slide.tables["table"]
    before = snapshot(table)
    genes = list(table.var_names[:2])
    out = tmp_path / "spatial.png"
    fig = stf.pl.spatial(slide, genes=genes, max_side=400, return_fig=True, save=out)
    assert out.is_file() and out.stat().st_size > 1000
    axes = [a for a in fig.axes if a.get_title()]
    assert len(axes) == 4
    for i, g in enumerate(genes):
        obs_ax, pred_ax = axes[2 * i], axes[2 * i + 1]
        assert obs_ax.get_title() == f"{g} · counts"
        assert pred_ax.get_title().startswith(f"{g} · stf_pred\nPearson r = ")
        obs = np.log1p(np.asarray(table[:, g].layers["counts"].todense()).ravel())
        pred = predicted(slide, g)
        r = np.corrcoef(obs, pred)[0, 1]
        assert pred_ax.get_title().endswith(f"{r:.2f}")
        # one colour scale per gene, spanning both layers; counts shown on the log1p scale
        (c_obs,), (c_pred,) = collections_of(obs_ax), collections_of(pred_ax)
        assert c_obs.norm.vmin == c_pred.norm.vmin and c_obs.norm.vmax == c_pred.norm.vmax
        assert np.isclose(c_obs.norm.vmax, max(obs.max(), pred.max()))
        np.testing.assert_allclose(np.asarray(c_obs.get_array()), obs)
        # the H&E is drawn under the spots
        assert len(obs_ax.images) == 1
    assert_unchanged(before, table)


def test_spatial_spot_size_is_physical_and_user_axes(slide):
    table = slide.tables["table"]
    meta = table.uns["stf_slide"]
    fig, axs = plt.subplots(1, 2)
    ret = stf.pl.spatial(slide, genes=table.var_names[0], ax=axs, show_image=False, show=False)
    assert ret.shape == (1, 2) and ret[0, 0] is axs[0]
    (coll,) = collections_of(axs[0])
    expected = meta["spot_diameter_um"] / meta["mpp"]  # diameter in full-resolution pixels
    np.testing.assert_allclose(coll._widths * 2, expected)  # matplotlib stores half-widths
    assert len(coll.get_offsets()) == table.n_obs
    assert len(axs[0].images) == 0


def test_spatial_image_level_and_extent(slide):
    from spatialtranscriptformer.pl._utils import slide_view

    table = slide.tables["table"]
    v_small = slide_view(slide, table, max_side=500)
    v_full = slide_view(slide, table, level=0)
    assert v_full.scale == 1.0 and v_small.scale < 1.0
    assert max(v_small.image.shape[:2]) < max(v_full.image.shape[:2])
    xy = table.obsm["spatial"]
    for v in (v_small, v_full):
        x0, x1, y1, y0 = v.extent
        assert x0 <= xy[:, 0].min() and xy[:, 0].max() <= x1 and y0 <= xy[:, 1].min() and xy[:, 1].max() <= y1
    with pytest.raises(ValueError, match="pyramid levels"):
        slide_view(slide, table, level=7)


def test_spatial_log1p_control(slide):
    table = slide.tables["table"]
    g = table.var_names[0]
    axs = stf.pl.spatial(table, genes=g, layers=["counts"], log1p=False, show_image=False, show=False)
    raw = np.asarray(table[:, g].layers["counts"].todense()).ravel()
    np.testing.assert_allclose(np.asarray(collections_of(axs[0, 0])[0].get_array()), raw)
    axs = stf.pl.spatial(
        slide, genes=g, layers=["counts", "stf_pred"], log1p=["counts"], show_image=False, show=False
    )
    np.testing.assert_allclose(np.asarray(collections_of(axs[0, 0])[0].get_array()), np.log1p(raw))
    pred = predicted(slide, g)
    np.testing.assert_allclose(np.asarray(collections_of(axs[0, 1])[0].get_array()), pred, rtol=1e-6)
    with pytest.raises(ValueError, match="negative values"):
        stf.pl.spatial(slide, genes=g, layers=["stf_pred"], log1p=["stf_pred"], show=False)
    with pytest.raises(ValueError, match="not plotted"):
        stf.pl.spatial(slide, genes=g, layers=["counts"], log1p=["stf_pred"], show=False)


def test_spatial_gene_the_model_does_not_predict_is_an_error_not_a_zero_map(slide):
    table = slide.tables["table"]
    unpredicted = table.var_names[11]  # measured, not among the model's genes
    n_figs = len(plt.get_fignums())
    with pytest.raises(KeyError, match=f"no prediction for \\['{unpredicted}'\\].*predicts 10 genes"):
        stf.pl.spatial(slide, genes=[table.var_names[0], unpredicted], show=False)
    assert len(plt.get_fignums()) == n_figs  # nothing drawn
    axs = stf.pl.spatial(slide, genes=unpredicted, layers=["counts"], show_image=False, show=False)
    assert axs.shape == (1, 1)  # its measured map is still available
    # predictions on an AnnData (obsm) and an old-style layer of the table are both read
    ad = table.copy()
    ad.obsm["stf_pred"] = slide.tables["stf_pred"].to_df()
    axs = stf.pl.spatial(ad, genes=table.var_names[0], show_image=False, show=False)
    np.testing.assert_allclose(np.asarray(collections_of(axs[0, 1])[0].get_array()), predicted(slide, table.var_names[0]),
                               rtol=1e-6)
    with pytest.raises(KeyError, match="no prediction for"):
        stf.pl.spatial(ad, genes=unpredicted, show=False)


def test_spatial_bad_input(slide, tmp_path):
    table = slide.tables["table"]
    before = snapshot(table)
    n_figs = len(plt.get_fignums())
    with pytest.raises(KeyError, match="NOT_A_GENE"):
        stf.pl.spatial(slide, genes=["NOT_A_GENE"], show=False)
    with pytest.raises(KeyError, match="neither a layer of the table"):
        stf.pl.spatial(slide, genes=table.var_names[0], layers=["counts", "nope"], show=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        stf.pl.spatial(slide, genes=table.var_names[0], save=tmp_path / "missing" / "f.png", show=False)
    with pytest.raises(ValueError, match="extension"):
        stf.pl.spatial(slide, genes=table.var_names[0], save=tmp_path / "noext", show=False)
    with pytest.raises(KeyError, match="Image 'nope' not found"):
        stf.pl.spatial(slide, genes=table.var_names[0], image_key="nope", show=False)
    assert len(plt.get_fignums()) == n_figs  # nothing drawn
    two = table.copy()
    two.obs["slide_id"] = pd.Categorical(["a", "b"] * (two.n_obs // 2) + ["a"] * (two.n_obs % 2))
    with pytest.raises(ValueError, match="2 slides"):
        stf.pl.spatial(two, genes=table.var_names[0], show=False)
    assert_unchanged(before, table)


def test_show_none_returns_none(slide):
    assert (
        stf.pl.spatial(slide, genes=slide.tables["table"].var_names[0], show_image=False)
        is None
    )


# --- pathways -------------------------------------------------------------------------------------
def test_pathways_grid_and_names(slide, tmp_path):
    table = slide.tables["table"]
    before = snapshot(table)
    out = tmp_path / "pw.pdf"
    axs = stf.pl.pathways(
        slide, pathways=["hypoxia", "HALLMARK_G2M_CHECKPOINT", 1], ncols=2, max_side=400, save=out, show=False
    )
    assert out.is_file()
    assert axs.shape == (2, 2)
    # titles: without the HALLMARK_ prefix, underscores as spaces (wrapped to the panel)
    assert [flat(a.get_title()) for a in axs.ravel()[:3]] == [short(PATHWAYS[i]) for i in (0, 2, 1)]
    assert not axs[1, 1].get_visible()
    vals = np.asarray(collections_of(axs[0, 0])[0].get_array())
    np.testing.assert_allclose(vals, predicted(slide, PATHWAYS[0], "stf_pathways"), rtol=1e-6)
    norm = collections_of(axs[0, 0])[0].norm
    assert np.isclose(-norm.vmin, norm.vmax)  # centred on 0 for scores of both signs
    assert_unchanged(before, table)


def test_pathways_targets_vs_predictions(slide):
    table = slide.tables["table"]
    axs = stf.pl.pathways(slide, pathways="hypoxia", key=["pathway_activity", "stf_pathways"], show=False)
    assert axs.shape == (1, 2)
    r = np.corrcoef(table.obsm["pathway_activity"][PATHWAYS[0]], predicted(slide, PATHWAYS[0], "stf_pathways"))[0, 1]
    assert flat(axs[0, 0].get_title()) == f"{short(PATHWAYS[0])} · pathway_activity"
    assert flat(axs[0, 1].get_title()) == f"{short(PATHWAYS[0])} · stf_pathways Pearson r = {r:.2f}"


def test_pathways_bad_input(slide):
    table = slide.tables["table"].copy()
    with pytest.raises(KeyError, match="not found"):
        stf.pl.pathways(slide, pathways=["NOT_A_PATHWAY"], show=False)
    with pytest.raises(KeyError, match="No pathway scores 'stf_pathways'"):
        stf.pl.pathways(table, pathways=["hypoxia"], show=False)  # the table alone: the scores are another table
    with pytest.raises(KeyError, match="obsm\\['missing'\\]"):
        stf.pl.pathways(table, pathways=["hypoxia"], key="missing", show=False)
    table.obsm["arr"] = np.zeros((table.n_obs, 2))
    with pytest.raises(ValueError, match="DataFrame"):
        stf.pl.pathways(table, pathways=[0], key="arr", show=False)


# --- metrics --------------------------------------------------------------------------------------
@pytest.fixture
def metrics_table():
    rng = np.random.default_rng(1)
    rows = []
    for model, shift in (("stf", 0.1), ("ridge", 0.0)):
        for fold in range(2):
            for g in range(30):
                rows.append(
                    {
                        "gene": f"G{g}",
                        "pearson": 0.2 + shift + rng.normal(0, 0.1),
                        "spearman": 0.1,
                        "mse": 1.0,
                        "slide": f"s{fold}",
                        "fold": fold,
                        "model": model,
                        "level": "spot",
                    }
                )
    return pd.DataFrame(rows)


@pytest.mark.parametrize("kind", ["box", "violin"])
def test_metrics_distribution(metrics_table, kind, tmp_path):
    before = metrics_table.copy()
    out = tmp_path / "m.png"
    ax = stf.pl.metrics(metrics_table, kind=kind, save=out, show=False)
    assert out.is_file()
    assert ax.get_ylabel() == "per-gene pearson"
    labels = [t.get_text() for t in ax.get_xticklabels()]
    means = metrics_table.groupby(["model", "gene"])["pearson"].mean().groupby("model").mean()
    assert labels == [f"stf\n(mean {means['stf']:.3f})", f"ridge\n(mean {means['ridge']:.3f})"]
    pd.testing.assert_frame_equal(before, metrics_table)


def test_metrics_scatter(metrics_table):
    fig = stf.pl.metrics(metrics_table, kind="scatter", x="ridge", y="stf", return_fig=True)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "ridge (per-gene pearson)" and ax.get_ylabel() == "stf (per-gene pearson)"
    wide = metrics_table.groupby(["model", "gene"])["pearson"].mean().unstack(0)
    better = int((wide["stf"] > wide["ridge"]).sum())
    assert ax.get_title() == f"stf vs ridge: stf better on {better}/30 genes"
    (diag,) = ax.lines
    np.testing.assert_allclose(diag.get_xdata(), diag.get_ydata())
    assert len(ax.collections[0].get_offsets()) == 30


def test_metrics_bad_input(metrics_table):
    with pytest.raises(KeyError, match="Models not in the table"):
        stf.pl.metrics(metrics_table, models=["nope"], show=False)
    with pytest.raises(ValueError, match="kind"):
        stf.pl.metrics(metrics_table, kind="pie", show=False)
    with pytest.raises(KeyError, match="no column 'r2'"):
        stf.pl.metrics(metrics_table, metric="r2", show=False)
    with pytest.raises(ValueError, match="two different models"):
        stf.pl.metrics(metrics_table[metrics_table.model == "stf"], kind="scatter", show=False)
    with pytest.raises(KeyError, match="level"):
        stf.pl.metrics(metrics_table, level="slide", show=False)


# --- history --------------------------------------------------------------------------------------
def test_history_from_model_and_frame(tmp_path):
    hist = pd.DataFrame(
        {
            "epoch": range(6),
            "train_loss": np.linspace(1, 0.4, 6),
            "val_loss": np.linspace(1.2, 0.7, 6),
            "val_pcc": [0.1, 0.2, 0.35, 0.3, 0.32, 0.31],
        }
    )

    class Fitted:  # stands in for the model wrapper: only `.history` is used
        history = hist

    before = hist.copy()
    out = tmp_path / "h.svg"
    axs = stf.pl.history(Fitted(), save=out, show=False)
    assert out.is_file()
    assert [a.get_title() for a in axs] == ["Loss", "Validation Pearson r (best 0.350 @ epoch 2)"]
    assert [ln.get_label() for ln in axs[0].lines] == ["train", "validation"]
    assert axs[1].get_ylabel() == "mean Pearson r"
    pd.testing.assert_frame_equal(before, hist)
    axs = stf.pl.history(hist[["epoch", "train_loss"]], show=False)
    assert len(axs) == 1 and axs[0].get_title() == "Loss"


def test_history_bad_input():
    with pytest.raises(TypeError, match="history"):
        stf.pl.history(object(), show=False)
    with pytest.raises(ValueError, match="empty"):
        stf.pl.history(pd.DataFrame({"epoch": [], "train_loss": []}), show=False)
    with pytest.raises(ValueError, match="no finite values"):
        stf.pl.history(pd.DataFrame({"epoch": [0], "train_loss": [np.nan]}), show=False)


# --- attention ------------------------------------------------------------------------------------
def test_attention_from_module_maps(slide):
    table = slide.tables["table"]
    before = snapshot(table)
    n, n_path, heads = table.n_obs, 3, 2
    rng = np.random.default_rng(2)
    maps = [rng.random((1, heads, n_path + n, n_path + n)) for _ in range(2)]

    class Fitted:  # only `pathways` is read when weights are given
        pathways = PATHWAYS

    axs = stf.pl.attention(Fitted(), slide, weights=maps, layer=0, pathway="hypoxia", show=False)
    assert axs.shape == (1, 1)
    assert flat(axs[0, 0].get_title()) == f"{short(PATHWAYS[0])} attention, layer 0"
    expected = maps[0][0].mean(0)[0, n_path:]
    np.testing.assert_allclose(np.asarray(collections_of(axs[0, 0])[0].get_array()), expected)
    assert_unchanged(before, table)


def test_attention_arrays_and_model_method(slide, tmp_path):
    table = slide.tables["table"]
    w = np.random.default_rng(3).random((3, table.n_obs))
    axs = stf.pl.attention(None, table, weights=w, show_image=False, show=False)
    assert [flat(a.get_title()) for a in axs.ravel()] == [f"token {i} attention, last layer" for i in range(3)]

    class Fitted:
        def attention(self, data, *, layer, table_key):
            return pd.DataFrame(w.T, index=table.obs_names, columns=PATHWAYS)

    out = tmp_path / "att.png"
    axs = stf.pl.attention(Fitted(), slide, pathway=[2], max_side=400, save=out, show=False)
    assert out.is_file() and flat(axs[0, 0].get_title()).startswith(short(PATHWAYS[2]))
    with pytest.raises(TypeError, match="weights="):
        stf.pl.attention(object(), slide, show=False)
    with pytest.raises(ValueError, match="S = "):
        stf.pl.attention(None, slide, weights=np.zeros((2, 5)), show=False)


@pytest.mark.slow
def test_attention_runs_the_fitted_module(slide):
    """A fitted STF module is run on the slide: the maps are its head-averaged P->H attention."""
    import types

    import torch

    from spatialtranscriptformer.module._stf import SpatialTranscriptFormer

    table = slide.tables["table"].copy()
    rng = np.random.default_rng(4)
    table.obsm["X_test"] = rng.normal(size=(table.n_obs, 8)).astype(np.float32)
    torch.manual_seed(0)
    module = SpatialTranscriptFormer(8, table.n_vars, token_dim=16, n_heads=2, n_layers=2, num_pathways=3)
    fitted = types.SimpleNamespace(module=module, embedding_key="X_test", pathways=PATHWAYS)
    before = snapshot(table)
    axs = stf.pl.attention(fitted, table, layer=1, show_image=False, device="cpu", show=False)
    assert [flat(a.get_title()) for a in axs.ravel()] == [f"{short(p)} attention, layer 1" for p in PATHWAYS]
    xy = torch.from_numpy((table.obsm["spatial"] * table.uns["stf_slide"]["mpp"]).astype(np.float32))[None]
    with torch.inference_mode():
        out = module.eval()(
            torch.from_numpy(table.obsm["X_test"])[None],
            xy,
            torch.ones(1, table.n_obs, dtype=torch.bool),
            return_attention=True,
        )
    expected = out["attention"][1][0].mean(0)[:3, 3:].numpy()
    for i in range(3):
        got = np.asarray(collections_of(axs.ravel()[i])[0].get_array())
        np.testing.assert_allclose(got, expected[i], rtol=1e-5, atol=1e-7)
    assert_unchanged(before, table)
    with pytest.raises(TypeError, match="pathway tokens"):
        stf.pl.attention(
            types.SimpleNamespace(module=module, embedding_key="X_test", pathways=None), table, show=False
        )
