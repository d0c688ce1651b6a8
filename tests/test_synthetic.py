import time

import numpy as np
import pytest
import scipy.sparse as sp

import spatialtranscriptformer as stf
from spatialtranscriptformer import _constants as K


def _image(sdata) -> np.ndarray:
    img = sdata.images[K.IMAGE_KEY]
    arr = img["scale0"]["image"] if "scale0" in getattr(img, "children", {}) else img
    return np.moveaxis(np.asarray(arr.values), 0, -1)


@pytest.fixture(scope="module")
def visium():
    return stf.datasets.synthetic(n_spots=200, n_genes=40, n_pathways=8, seed=1)


@pytest.fixture(scope="module")
def hd2():
    return stf.datasets.synthetic(
        technology="visium_hd", bin_size_um=2, size_um=160, n_genes=30, n_pathways=6
    )


def test_visium_conventions(visium):
    a = visium.tables[K.TABLE_KEY]
    assert a.n_obs == 200 and a.n_vars == 40
    assert set(visium.shapes[K.SHAPES_KEY].index) == set(a.obs_names)
    meta = a.uns[K.SLIDE_META_KEY]
    assert meta["mpp"] == 1.0 and meta["spot_diameter_um"] == 55.0 and meta["technology"] == "visium"
    radius = visium.shapes[K.SHAPES_KEY]["radius"].to_numpy()
    np.testing.assert_allclose(radius, 27.5)
    X = a.X.toarray() if sp.issparse(a.X) else a.X
    L = a.layers[K.COUNTS_LAYER]
    np.testing.assert_array_equal(X, L.toarray() if sp.issparse(L) else L)
    assert np.all(X == np.round(X)) and X.min() >= 0 and X.sum() > 0
    assert a.obs[K.SLIDE_KEY].iloc[0] == "synthetic_0" and a.obs[K.PATIENT_KEY].iloc[0] == "P0"
    # hexagonal Visium geometry: nearest neighbours at 100 µm
    from scipy.spatial import cKDTree

    xy = a.obsm[K.SPATIAL_KEY]
    d, _ = cKDTree(xy).query(xy, k=2)
    np.testing.assert_allclose(np.median(d[:, 1]) * meta["mpp"], 100.0, rtol=1e-6)
    img = _image(visium)
    assert img.dtype == np.uint8 and img.shape[2] == 3
    assert (xy[:, 0] < img.shape[1]).all() and (xy[:, 1] < img.shape[0]).all()
    # ground truth
    assert a.obsm["true_rates"].shape == (200, 40)
    assert list(a.obsm["true_pathways"].columns) == list(a.uns["synthetic"]["gene_sets"])
    assert set(a.obs["compartment"].cat.categories) == set(a.uns["synthetic"]["compartments"])
    np.testing.assert_allclose(a.obsm["compartment_fractions"].to_numpy().sum(1), 1.0, rtol=1e-5)


def test_st_geometry():
    s = stf.datasets.synthetic(technology="st", n_spots=30, n_genes=10, n_pathways=2, mpp=2.0)
    a = s.tables[K.TABLE_KEY]
    from scipy.spatial import cKDTree

    d, _ = cKDTree(a.obsm[K.SPATIAL_KEY]).query(a.obsm[K.SPATIAL_KEY], k=2)
    assert np.median(d[:, 1]) * 2.0 == pytest.approx(200.0)
    assert a.uns[K.SLIDE_META_KEY]["spot_diameter_um"] == 100.0


def test_fast():
    stf.datasets.synthetic(n_spots=10)  # warm imports
    t0 = time.perf_counter()
    stf.datasets.synthetic(n_spots=500)
    assert time.perf_counter() - t0 < 4.0  # generous: ~0.6 s CPU on 2 shared cores


def test_deterministic():
    a = stf.datasets.synthetic(n_spots=40, n_genes=12, n_pathways=3, seed=5)
    b = stf.datasets.synthetic(n_spots=40, n_genes=12, n_pathways=3, seed=5)
    c = stf.datasets.synthetic(n_spots=40, n_genes=12, n_pathways=3, seed=6)
    ta, tb, tc = (s.tables[K.TABLE_KEY] for s in (a, b, c))
    np.testing.assert_array_equal(ta.X.toarray(), tb.X.toarray())
    np.testing.assert_array_equal(_image(a), _image(b))
    assert not np.array_equal(ta.X.toarray(), tc.X.toarray())


def test_hd_2um_sparse_and_cell_structure(hd2):
    a = hd2.tables[K.TABLE_KEY]
    X = a.X
    assert sp.issparse(X)
    zeros = 1 - X.nnz / (X.shape[0] * X.shape[1])
    assert 0.90 <= zeros <= 0.97
    meta = a.uns[K.SLIDE_META_KEY]
    assert meta["bin_size_um"] == 2 and meta["shape"] == "square"
    assert {"array_row", "array_col"} <= set(a.obs.columns)
    # truth raster: genes x 2 µm grid; table rows are its tissue pixels
    truth = hd2.images["true_rates"]
    assert truth.shape[0] == a.n_vars and truth.shape[1] == truth.shape[2] == 80
    r, c = a.obs["array_row"].to_numpy(), a.obs["array_col"].to_numpy()
    np.testing.assert_allclose(np.asarray(truth.values)[:, r, c].T, a.obsm["true_rates"], rtol=1e-5)
    # cell-level structure: rates vary at the scale of cells (neighbouring bins correlated, not flat)
    tot = np.asarray(truth.values).sum(0)
    assert tot.std() / tot.mean() > 0.5
    assert np.corrcoef(tot[:, :-1].ravel(), tot[:, 1:].ravel())[0, 1] > 0.3
    # the raster maps onto the H&E pixels: bin (r, c) centre == obsm['spatial']
    from spatialdata.transformations import get_transformation

    tf = get_transformation(truth, K.COORDINATE_SYSTEM)
    m = tf.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    pts = np.c_[c + 0.5, r + 0.5, np.ones(len(r))] @ m.T
    np.testing.assert_allclose(pts[:, :2], a.obsm[K.SPATIAL_KEY], atol=1e-6)


def test_hd_bins_conserve_counts():
    s8 = stf.datasets.synthetic(technology="visium_hd", bin_size_um=8, size_um=64, n_genes=10, n_pathways=2)
    a = s8.tables[K.TABLE_KEY]
    truth = np.asarray(s8.images["true_rates"].values)
    assert truth.shape[1:] == (32, 32) and a.uns[K.SLIDE_META_KEY]["spot_diameter_um"] == 8.0
    pooled = truth.reshape(truth.shape[0], 8, 4, 8, 4).sum((2, 4))
    r, c = a.obs["array_row"].to_numpy(), a.obs["array_col"].to_numpy()
    np.testing.assert_allclose(pooled[:, r, c].T, a.obsm["true_rates"], rtol=1e-4)


def test_morphology_expression_link(visium):
    a = visium.tables[K.TABLE_KEY]
    syn = a.uns["synthetic"]
    rates = a.obsm["true_rates"]
    counts = a.X.toarray()
    genes = list(a.var_names)
    comp = a.obs["compartment"].to_numpy()
    for name in ("tumor", "immune"):
        markers = [genes.index(g) for p in syn["compartment_pathways"][name] for g in syn["gene_sets"][p]]
        inside = comp == name
        assert inside.sum() > 5
        lib = counts.sum(1, keepdims=True)
        frac = counts[:, markers].sum(1) / lib.ravel()
        assert frac[inside].mean() > 1.2 * frac[~inside].mean()
        assert rates[inside][:, markers].sum(1).mean() > rates[~inside][:, markers].sum(1).mean()
        pw = a.obsm["true_pathways"][syn["compartment_pathways"][name][0]].to_numpy()
        assert pw[inside].mean() > pw[~inside].mean() + 0.5
    # image intensity differs by compartment: immune spots (dense dark nuclei) darker than stroma
    img = _image(visium).astype(float).mean(-1)
    xy = np.rint(a.obsm[K.SPATIAL_KEY]).astype(int)
    inten = np.array([img[y - 10 : y + 10, x - 10 : x + 10].mean() for x, y in xy])
    assert inten[comp == "immune"].mean() < inten[comp == "stroma"].mean() - 10


def test_pathway_activity_on_synthetic(visium):
    s = visium
    a = s.tables[K.TABLE_KEY]
    gs = a.uns["synthetic"]["gene_sets"]
    res = stf.pp.pathway_activity(a, gene_sets=gs, min_genes=2, copy=True)
    got = res.obsm[K.PATHWAY_KEY]
    assert list(got.columns) == list(gs)
    for p in gs:
        r = np.corrcoef(np.asarray(got[p]), a.obsm["true_pathways"][p].to_numpy())[0, 1]
        assert r > 0.5


def test_multi_slide_patients():
    slides = stf.datasets.synthetic(n_spots=20, n_genes=10, n_pathways=2, n_slides=3, n_patients=2)
    assert isinstance(slides, list) and len(slides) == 3
    pids = [s.tables[K.TABLE_KEY].obs[K.PATIENT_KEY].iloc[0] for s in slides]
    sids = [s.tables[K.TABLE_KEY].obs[K.SLIDE_KEY].iloc[0] for s in slides]
    assert pids == ["P0", "P1", "P0"] and len(set(sids)) == 3


def test_gene_sets_argument():
    gs = {"A": ["X1", "X2", "X3"], "B": ["X3", "Y1"]}
    s = stf.datasets.synthetic(n_spots=20, gene_sets=gs, n_genes=6)
    a = s.tables[K.TABLE_KEY]
    assert list(a.var_names[:4]) == ["X1", "X2", "X3", "Y1"] and a.n_vars == 6
    assert a.uns["synthetic"]["gene_sets"] == gs


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"technology": "slideseq"}, "technology"),
        ({"technology": "visium_hd", "bin_size_um": 4}, "bin_size_um"),
        ({"n_spots": 10, "size_um": 100}, "either"),
        ({"n_compartments": 7}, "n_compartments"),
        ({"mpp": 0}, "mpp"),
        ({"counts": "zip"}, "counts"),
        ({"n_slides": 2, "n_patients": 3}, "n_patients"),
        ({"gene_sets": {"A": []}}, "gene_sets"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        stf.datasets.synthetic(**kwargs)
