"""The scverse clients (scanpy, squidpy, spatialdata-plot) on reader outputs, as they are, headless."""

from __future__ import annotations

import os
import warnings

import matplotlib
import numpy as np
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
