"""The scverse clients (scanpy, squidpy, spatialdata-plot) on reader outputs, as they are, headless."""

from __future__ import annotations

import os
import warnings

import matplotlib
import numpy as np
import pandas as pd
import pytest

import spatialtranscriptformer as stf
from spatialtranscriptformer import _constants as K

os.environ.setdefault("MPLBACKEND", "Agg")
matplotlib.use("Agg")


@pytest.fixture(scope="module")
def slides(bundled_sdata, tmp_path_factory):
    """Reader outputs by name: bundled her2st, tiny Visium (reader and AnnData bridge), HEST layout, synthetic."""
    import scanpy as sc

    from test_io_readers import make_hest

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scanpy points to squidpy.read.visium
        adata = sc.read_visium(stf.datasets.visium_tiny_path())
    with pytest.warns(UserWarning, match="blank"):  # the sample's hires PNG is blank
        bridged = stf.io.from_anndata(adata)
    return {
        "her2st": bundled_sdata,
        "visium": stf.datasets.visium_tiny(),
        "from_anndata": bridged,
        "hest": stf.io.read_hest(make_hest(tmp_path_factory.mktemp("hest") / "hest")),
        "synthetic": stf.datasets.synthetic(n_slides=1, n_spots=60, n_genes=12, seed=0),
    }


NAMES = ["her2st", "visium", "from_anndata", "hest", "synthetic"]


def _gene(table) -> str:
    return str(table.var_names[int(np.argmax(np.asarray(table.X.sum(0)).ravel()))])


@pytest.mark.parametrize("name", NAMES)
def test_uns_spatial_matches_the_image(slides, name):
    """scanpy's image store: hires/lowres images whose scalefactors put obsm['spatial'] on the same tissue as 'he'."""
    sdata = slides[name]
    t = sdata.tables[K.TABLE_KEY]
    meta = t.uns[K.SLIDE_META_KEY]
    lib = t.uns[K.UNS_SPATIAL_KEY][meta["library_id"]]
    sf = lib["scalefactors"]
    assert sf["spot_diameter_fullres"] == pytest.approx(meta["spot_diameter_um"] / meta["mpp"], rel=1e-3)
    from spatialtranscriptformer.pp._image import image_levels

    level = image_levels(sdata, K.IMAGE_KEY)[0]
    he = np.moveaxis(np.asarray(level.array), 0, -1).astype(float).mean(-1)
    xy = t.obsm[K.SPATIAL_KEY]
    half = 0.5 * sf["spot_diameter_fullres"]  # a box of one spot diameter, in coordinate units

    def box_means(img, px_per_unit):
        out = []
        for x, y in xy * px_per_unit:
            r = max(1, int(round(half * px_per_unit)))
            x0, y0 = max(0, int(round(x)) - r), max(0, int(round(y)) - r)
            out.append(img[y0 : int(round(y)) + r + 1, x0 : int(round(x)) + r + 1].mean())
        return np.asarray(out)

    b = box_means(he, 1 / level.downscale)
    for key in ("hires", "lowres"):
        img = np.asarray(lib["images"][key], dtype=float)
        assert img.ndim == 3 and img.shape[-1] in (3, 4)
        img = img[..., :3] * (255 if img.max() <= 1 else 1)  # a user's float image (from_anndata keeps it)
        if img.std() == 0:  # a blank image the user brought (visium_tiny's hires): nothing to compare
            continue
        # mean intensity under each spot in the scanpy image and in the slide image 'he'
        a = box_means(img.mean(-1), sf[f"tissue_{key}_scalef"])
        if np.std(b) > 2:  # a textured image: the two must agree spot by spot
            assert np.corrcoef(a, b)[0, 1] > 0.8, (name, key)
        assert np.median(np.abs(a - b)) < 10, (name, key)


@pytest.mark.parametrize("name", NAMES)
def test_scanpy_spatial_draws_on_the_he(slides, name):
    import matplotlib.pyplot as plt
    import scanpy as sc

    t = slides[name].tables[K.TABLE_KEY]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scanpy points to squidpy.pl.spatial_scatter
        ax = sc.pl.spatial(t, color=_gene(t), show=False)
    ax = ax[0] if isinstance(ax, list) else ax
    assert len(ax.get_images()) == 1  # the H&E, without img_key / spot_size workarounds
    plt.close("all")


@pytest.mark.parametrize("name", NAMES)
def test_squidpy_spatial_scatter_and_autocorr(slides, name):
    import matplotlib.pyplot as plt
    import squidpy as sq

    t = slides[name].tables[K.TABLE_KEY].copy()
    gene = _gene(t)
    sq.pl.spatial_scatter(t, color=gene)
    assert len(plt.gcf().axes[0].get_images()) == 1
    plt.close("all")
    knn = getattr(sq.gr, "spatial_neighbors_knn", None)  # squidpy >= 1.8; spatial_neighbors goes in 1.9
    knn(t, n_neighs=6) if knn is not None else sq.gr.spatial_neighbors(t)
    sq.gr.spatial_autocorr(t, mode="moran", genes=[gene], n_perms=None)
    assert np.isfinite(t.uns["moranI"].loc[gene, "I"])


@pytest.mark.parametrize("name", ["her2st", "visium", "hest"])
@pytest.mark.parametrize("cs", [K.COORDINATE_SYSTEM, K.MICRON_COORDINATE_SYSTEM])
def test_spatialdata_plot(slides, name, cs):
    import matplotlib.pyplot as plt
    import spatialdata_plot  # noqa: F401

    sdata = slides[name]
    gene = _gene(sdata.tables[K.TABLE_KEY])
    sdata.pl.render_images(K.IMAGE_KEY).pl.render_shapes(K.SHAPES_KEY, color=gene, table_name=K.TABLE_KEY).pl.show(
        coordinate_systems=cs
    )
    ax = plt.gcf().axes[0]
    assert len(ax.get_images()) == 1 and len(ax.collections) >= 1
    plt.close("all")


@pytest.mark.parametrize("name", NAMES)
def test_micron_coordinate_system(slides, name):
    """Shapes and image in 'micron' are 'global' times µm per unit: spot centres and image extent agree."""
    from spatialdata import transform

    sdata = slides[name]
    t = sdata.tables[K.TABLE_KEY]
    mpp = t.uns[K.SLIDE_META_KEY]["mpp"]
    assert set(sdata.coordinate_systems) >= {K.COORDINATE_SYSTEM, K.MICRON_COORDINATE_SYSTEM}
    shapes_um = transform(sdata.shapes[K.SHAPES_KEY], to_coordinate_system=K.MICRON_COORDINATE_SYSTEM)
    c = shapes_um.geometry.centroid
    um = np.c_[c.x.to_numpy(), c.y.to_numpy()]
    np.testing.assert_allclose(um, t.obsm[K.SPATIAL_KEY] * mpp, rtol=1e-6, atol=1e-6)
    if "radius" in shapes_um:
        np.testing.assert_allclose(shapes_um["radius"], t.uns[K.SLIDE_META_KEY]["spot_diameter_um"] / 2, rtol=1e-6)
    from spatialdata.transformations import get_transformation

    img = sdata.images[K.IMAGE_KEY]
    from spatialtranscriptformer.io._spatial_uns import element_levels

    h, w = element_levels(img)[0].shape[-2:]
    m = get_transformation(img, K.MICRON_COORDINATE_SYSTEM).to_affine_matrix(("x", "y"), ("x", "y"))
    # the image's far corner in µm = its extent in coordinate units times mpp
    units = get_transformation(img, K.COORDINATE_SYSTEM).to_affine_matrix(("x", "y"), ("x", "y"))
    np.testing.assert_allclose(m[:2, :2] @ [w, h], units[:2, :2] @ [w, h] * mpp, rtol=1e-9)


# --- predictions: the tables written by stf.tl.predict, read by the clients as they are --------------------
PATHWAY = "HALLMARK_HYPOXIA"


@pytest.fixture(scope="module")
def predicted(bundled_sdata):
    """The bundled section with the prediction tables of a small STF (named Hallmark tokens), and that model."""
    from spatialdata import deepcopy

    sdata = deepcopy(bundled_sdata)
    t = sdata.tables[K.TABLE_KEY]
    t.obsm["X_toy"] = np.random.default_rng(0).normal(size=(t.n_obs, 8)).astype(np.float32)
    model = stf.tl.fit(sdata, embedding_key="X_toy", genes=12, max_epochs=1, accelerator="cpu", progress=False,
                       model_kwargs={"token_dim": 16, "n_heads": 2})
    assert PATHWAY in model.pathways
    stf.tl.predict(sdata, model, progress=False)
    return sdata, model


def _values(sdata, key, name):
    return np.asarray(sdata.tables[key][:, name].X, dtype=float).ravel()


def _drawn_values(ax):
    """Colour values of the spot collection(s) drawn in ``ax`` (scanpy / squidpy draw them sorted by value)."""
    arrays = [np.asarray(c.get_array(), dtype=float) for c in ax.collections if c.get_array() is not None]
    return np.sort(np.concatenate(arrays)) if arrays else np.array([])


def test_prediction_tables_are_linked_to_the_spots(predicted):
    sdata, model = predicted
    t = sdata.tables[K.TABLE_KEY]
    for key, names in ((K.PRED_KEY, model.genes), (K.PRED_PATHWAY_KEY, model.pathways)):
        p = sdata.tables[key]
        assert list(p.var_names) == list(names) and p.obs_names.equals(t.obs_names)
        assert p.uns["spatialdata_attrs"] == t.uns["spatialdata_attrs"]
        np.testing.assert_array_equal(p.obs[K.INSTANCE_KEY], t.obs[K.INSTANCE_KEY])
        np.testing.assert_array_equal(p.obsm[K.SPATIAL_KEY], t.obsm[K.SPATIAL_KEY])
        assert p.uns[K.UNS_SPATIAL_KEY].keys() == t.uns[K.UNS_SPATIAL_KEY].keys()
    assert len(model.genes) == 12 and t.n_vars > 15_000  # the model's genes only, not ~15k columns of zeros


@pytest.mark.parametrize(("key", "which"), [(K.PRED_KEY, "gene"), (K.PRED_PATHWAY_KEY, "pathway")])
def test_scanpy_and_squidpy_draw_predictions_on_the_he(predicted, key, which):
    import matplotlib.pyplot as plt
    import scanpy as sc
    import squidpy as sq

    sdata, model = predicted
    name = model.genes[0] if which == "gene" else PATHWAY
    vals = np.sort(_values(sdata, key, name))
    assert vals.std() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scanpy points to squidpy.pl.spatial_scatter
        ax = sc.pl.spatial(sdata.tables[key], color=name, show=False)
    ax = ax[0] if isinstance(ax, list) else ax
    assert len(ax.get_images()) == 1
    np.testing.assert_allclose(_drawn_values(ax), vals, rtol=1e-6)
    plt.close("all")
    sq.pl.spatial_scatter(sdata.tables[key], color=name)
    ax = plt.gcf().axes[0]
    assert len(ax.get_images()) == 1
    np.testing.assert_allclose(_drawn_values(ax), vals, rtol=1e-6)
    plt.close("all")


@pytest.mark.parametrize("key", [K.PRED_KEY, K.PRED_PATHWAY_KEY])
def test_squidpy_autocorr_scores_every_predicted_feature(predicted, key):
    import squidpy as sq

    from spatialtranscriptformer._stats import morans_i

    sdata, _ = predicted
    t = sdata.tables[key].copy()
    knn = getattr(sq.gr, "spatial_neighbors_knn", None)
    knn(t, n_neighs=6) if knn is not None else sq.gr.spatial_neighbors(t, n_neighs=6, coord_type="generic")
    sq.gr.spatial_autocorr(t, mode="moran", n_perms=None)
    moran = t.uns["moranI"]
    assert len(moran) == t.n_vars and moran["I"].notna().all()  # no NaN rows: every column is a prediction
    ours = pd.Series(morans_i(np.asarray(t.X, dtype=float), t.obsm[K.SPATIAL_KEY]), index=t.var_names)
    np.testing.assert_allclose(moran["I"].loc[t.var_names], ours, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cs", [K.COORDINATE_SYSTEM, K.MICRON_COORDINATE_SYSTEM])
def test_spatialdata_plot_renders_prediction_tables(predicted, cs):
    import matplotlib.pyplot as plt
    import spatialdata_plot  # noqa: F401

    sdata, model = predicted
    for key, name in ((K.PRED_KEY, model.genes[0]), (K.PRED_PATHWAY_KEY, PATHWAY)):
        sdata.pl.render_images(K.IMAGE_KEY).pl.render_shapes(K.SHAPES_KEY, color=name, table_name=key).pl.show(
            coordinate_systems=cs
        )
        fig = plt.gcf()
        ax = fig.axes[0]
        assert len(ax.get_images()) == 1 and len(ax.collections) >= 1
        faces = ax.collections[0].get_facecolors()
        assert len(faces) == sdata.tables[key].n_obs and len(np.unique(faces.round(3), axis=0)) > 10  # a real map
        (bar,) = [c for a in fig.axes[1:] for c in a.collections if c.get_array() is not None]  # the colourbar
        vals = _values(sdata, key, name)
        np.testing.assert_allclose([bar.norm.vmin, bar.norm.vmax], [vals.min(), vals.max()], rtol=1e-5)
        plt.close("all")


def test_anndata_predictions_as_tables_clients_read(predicted):
    import matplotlib.pyplot as plt
    import scanpy as sc

    sdata, model = predicted
    adata = sdata.tables[K.TABLE_KEY].copy()
    for k in list(adata.uns):
        if k == "spatialdata_attrs":
            del adata.uns[k]
    out = stf.tl.predict(adata, model, inplace=False, progress=False)
    assert K.PRED_KEY not in adata.obsm  # nothing written
    stf.tl.predict(adata, model, progress=False)
    for key in (K.PRED_KEY, K.PRED_PATHWAY_KEY):
        from_obsm = stf.tl.prediction_table(adata, key=key)
        np.testing.assert_allclose(from_obsm.X, out[key].X)
        np.testing.assert_allclose(out[key].X, sdata.tables[key].X, rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ax = sc.pl.spatial(out[K.PRED_PATHWAY_KEY], color=PATHWAY, show=False)[0]
    assert len(ax.get_images()) == 1
    plt.close("all")


def test_prediction_tables_survive_zarr(predicted, tmp_path):
    import spatialdata as sd

    from spatialtranscriptformer._atomic import write_spatialdata

    sdata, _ = predicted
    small = sdata.subset([K.SHAPES_KEY, K.TABLE_KEY, K.PRED_KEY, K.PRED_PATHWAY_KEY])
    write_spatialdata(small, tmp_path / "p.zarr")
    back = sd.read_zarr(tmp_path / "p.zarr")
    for key in (K.PRED_KEY, K.PRED_PATHWAY_KEY):
        a, b = sdata.tables[key], back.tables[key]
        np.testing.assert_allclose(b.X, a.X)
        assert b.uns[key]["kind"] == a.uns[key]["kind"] and b.uns[key]["stored_in"] == "X"
        assert b.uns["spatialdata_attrs"] == a.uns["spatialdata_attrs"]
        assert "hires" in b.uns[K.UNS_SPATIAL_KEY][a.uns[K.SLIDE_META_KEY]["library_id"]]["images"]
    assert stf.tl.evaluate(back).gene.tolist() == stf.tl.evaluate(sdata).gene.tolist()
