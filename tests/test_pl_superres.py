"""Plots of 2 µm super-resolution maps: ``pl.superres`` (a window) and ``pl.superres_mosaic`` (whole slide).

The prediction elements are built directly from known rasters (no model needed): one equal to the truth,
one of noise, so the mosaic's metrics and layout can be checked exactly.
"""

import numpy as np
import pytest

import spatialtranscriptformer as stf
from spatialtranscriptformer import _constants as K

pytest.importorskip("spatialdata")
PATCH_UM = 32


def _add_prediction(sd, key, rasters_2um):
    """Write ``rasters_2um`` (G, H, W) as a super-resolution element ``key`` (as predict_superres does)."""
    import dask.array as da
    import zarr

    from spatialtranscriptformer.tl._superres_predict import SCALES_UM, _multiscale_element
    from spatialtranscriptformer.train._superres_data import sum_pool

    table = sd.tables[K.TABLE_KEY]
    genes = list(table.var_names[: rasters_2um.shape[0]])
    store = sd.path_for_test / f"{key}.zarr"
    root = zarr.open_group(str(store), mode="w")
    S = PATCH_UM // 2
    for s in SCALES_UM:
        f = s // 2
        arr = sum_pool(rasters_2um.astype(np.float32), f)
        root.create_array(f"{s}um", shape=arr.shape, dtype="float32", chunks=(len(genes), S // f, S // f))[:] = arr
    mpp = table.uns[K.SLIDE_META_KEY]["mpp"]
    sd.images[key] = _multiscale_element(store, genes, mpp, da)
    table.uns[key] = {"params": {"patch_um": PATCH_UM, "store": str(store)}, "genes": genes}
    return genes


@pytest.fixture()
def slide(tmp_path):
    from spatialtranscriptformer.pl._superres import _truth_raster

    sd = stf.datasets.synthetic(
        technology="visium_hd", bin_size_um=2, size_um=128, n_genes=4, n_pathways=2, seed=2, background_fraction=0.25
    )
    sd.path_for_test = tmp_path
    table = sd.tables[K.TABLE_KEY]
    mpp = table.uns[K.SLIDE_META_KEY]["mpp"]
    h, w = sd.images["he"].shape[1:] if hasattr(sd.images["he"], "shape") else sd.images["he"]["scale0"]["image"].shape[1:]
    S = PATCH_UM // 2
    n_rows, n_cols = int(np.ceil(h * mpp / PATCH_UM)), int(np.ceil(w * mpp / PATCH_UM))
    bounds = (0, n_rows * S, 0, n_cols * S)
    truth = np.stack([np.nan_to_num(_truth_raster(table, g, "true_rates", bounds, 2 / mpp)) for g in table.var_names[:2]])
    _add_prediction(sd, "sr_exact", truth)
    rng = np.random.default_rng(0)
    _add_prediction(sd, "sr_noise", rng.gamma(1.0, truth.mean(), size=truth.shape))
    sd.truth_2um = truth
    return sd


def test_mosaic_shows_high_signal_patches_in_place(slide, tmp_path):
    import matplotlib.pyplot as plt

    from spatialtranscriptformer.pl._superres import OFF_TISSUE

    table = slide.tables[K.TABLE_KEY]
    gene = str(table.var_names[0])
    S = PATCH_UM // 2
    t = slide.truth_2um[0]
    tot = t.reshape(t.shape[0] // S, S, t.shape[1] // S, S).sum((1, 3))
    thr = float(np.quantile(tot, 0.5))
    out = tmp_path / "mosaic.png"
    fig = stf.pl.superres_mosaic(
        slide, genes=gene, key=["sr_exact", "sr_noise"], truth="true_rates", min_counts=thr, n_patches=5,
        save=out, return_fig=True,
    )
    assert out.is_file() and out.stat().st_size > 0
    axes = fig.axes
    assert len(axes) == 3 and axes[0].get_title().startswith("truth (true_rates)\n5 patches")
    assert axes[1].get_title() == "sr_exact\nPCC 1.00 · SSIM 1.00"  # the prediction equals the truth
    pcc_noise = float(axes[2].get_title().split("PCC ")[1].split(" ")[0])
    assert abs(pcc_noise) < 0.3
    # the five patches of highest total are shown (values), the rest of the tissue is not (masked)
    shown = ~np.ma.getmaskarray(axes[0].get_images()[1].get_array())
    bg = axes[0].get_images()[0].get_array()
    assert bg.shape[:2] == shown.shape
    off = np.all(np.isclose(bg, OFF_TISSUE), axis=-1)
    assert off.any() and not (shown & off).any()  # grey outside tissue, never a value there
    # exactly the tissue bins of the five patches of highest total, with their values
    from spatialtranscriptformer.pl._superres_mosaic import _tissue_mask_2um

    mpp = table.uns[K.SLIDE_META_KEY]["mpp"]
    mask2 = _tissue_mask_2um(slide, table, t.shape, mpp, None)
    tot = (t * mask2).reshape(t.shape[0] // S, S, t.shape[1] // S, S).sum((1, 3))
    top = np.argsort(-tot, axis=None, kind="stable")[:5]
    expected = np.zeros(t.shape, dtype=bool)
    for r, c in zip(*np.unravel_index(top, tot.shape), strict=True):
        expected[r * S : (r + 1) * S, c * S : (c + 1) * S] = True
    expected &= mask2
    assert shown.sum() == expected.sum() > 0
    shown_vals = np.sort(axes[0].get_images()[1].get_array().compressed())
    np.testing.assert_allclose(shown_vals, np.sort(t[expected]), rtol=1e-5)
    assert (tot.ravel()[top] >= thr).all()
    plt.close("all")


def test_mosaic_and_superres_plot_options(slide, tmp_path):
    import matplotlib.pyplot as plt

    gene = str(slide.tables[K.TABLE_KEY].var_names[1])
    # user axes: one per panel, returned when not shown
    fig, axs = plt.subplots(1, 2)
    ret = stf.pl.superres_mosaic(slide, genes=gene, key="sr_exact", truth="true_rates", min_counts=0, ax=axs,
                                 show=False)
    assert ret.shape == (1, 2) and ret[0, 0] is axs[0]
    # no truth: ranked by the prediction, at 8 µm, no metrics
    fig = stf.pl.superres_mosaic(slide, genes=[gene], key="sr_exact", truth=None, scale_um=8, min_counts=0,
                                 n_patches=None, return_fig=True, panel_size=(2.0, 2.0))
    assert len(fig.axes) == 1 and fig.axes[0].get_title() == "sr_exact"
    assert tuple(fig.get_size_inches()) == (2.0, 2.0)
    # pl.superres: the same options
    fig = stf.pl.superres(slide, genes=[gene], key="sr_exact", truth="true_rates", region_um=(0, 0, 64, 64),
                          panel_size=(2.0, 2.0), return_fig=True)
    assert len(fig.axes) == 5 and tuple(fig.get_size_inches()) == (10.0, 2.0)
    fig, axs = plt.subplots(1, 5)
    ret = stf.pl.superres(slide, genes=gene, key="sr_exact", truth="true_rates", ax=axs, show=False)
    assert ret.shape == (1, 5) and ret[0, 4] is axs[4]
    out = tmp_path / "sr.pdf"
    assert stf.pl.superres(slide, genes=gene, key="sr_exact", truth=None, save=out, show=False).shape == (1, 4)
    assert out.is_file()
    with pytest.raises(ValueError, match="4 panels"):
        stf.pl.superres(slide, genes=gene, key="sr_exact", truth=None, ax=axs, show=False)
    plt.close("all")


def test_mosaic_bad_input(slide, tmp_path):
    gene = str(slide.tables[K.TABLE_KEY].var_names[0])
    with pytest.raises(KeyError, match="Run `stf.tl.predict_superres`"):
        stf.pl.superres_mosaic(slide, genes=gene, key="nope", show=False)
    with pytest.raises(KeyError, match="not in the prediction"):
        stf.pl.superres_mosaic(slide, genes="NOPE", key="sr_exact", show=False)
    with pytest.raises(ValueError, match="largest patch total"):
        stf.pl.superres_mosaic(slide, genes=gene, key="sr_exact", min_counts=1e9, show=False)
    with pytest.raises(ValueError, match="scale_um"):
        stf.pl.superres_mosaic(slide, genes=gene, key="sr_exact", scale_um=3, show=False)
    with pytest.raises(ValueError, match="n_patches"):
        stf.pl.superres_mosaic(slide, genes=gene, key="sr_exact", n_patches=0, show=False)
    with pytest.raises(KeyError, match="truth"):
        stf.pl.superres_mosaic(slide, genes=gene, key="sr_exact", truth="nope", show=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        stf.pl.superres_mosaic(slide, genes=gene, key="sr_exact", save=tmp_path / "no" / "f.png", show=False)
