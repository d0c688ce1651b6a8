"""Readable figures: dpi >= 100, long Hallmark titles clear of the colourbars, signed maps not white at 0."""

from __future__ import annotations

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest

import spatialtranscriptformer as stf
from spatialtranscriptformer.io._build import build_slide

matplotlib.use("Agg")

LONG = ["HALLMARK_EPITHELIAL_MESENCHYMAL_TRANSITION", "HALLMARK_OXIDATIVE_PHOSPHORYLATION", "HALLMARK_HYPOXIA"]


@pytest.fixture(scope="module")
def slide():
    rng = np.random.default_rng(0)
    xy = np.stack(np.meshgrid(np.arange(6), np.arange(6)), -1).reshape(-1, 2) * 40.0 + 30.0
    a = ad.AnnData(np.ones((36, 2), np.float32), obs=pd.DataFrame(index=[f"s{i}" for i in range(36)]))
    img = rng.integers(150, 256, size=(280, 280, 3), dtype=np.uint8)
    s = build_slide(img, a, coords=xy, mpp=1.0, spot_diameter_um=20.0, slide_id="s")
    t = s.tables["table"]
    scores = rng.normal(size=(36, len(LONG)))
    scores[:, 0] = np.linspace(-1, 1, 36)  # straddles 0, with spots at ~0
    t.obsm["pathway_activity"] = pd.DataFrame(scores, index=t.obs_names, columns=LONG)
    t.obsm["stf_pathways"] = pd.DataFrame(scores * 0.5, index=t.obs_names, columns=LONG)
    return s


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _check_titles_clear(fig, axes):
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    panels = [a for a in np.ravel(axes) if a.get_visible()]
    colorbars = [a for a in fig.axes if a not in panels]
    assert colorbars
    for a in panels:
        title = a.title.get_window_extent(r)
        assert "HALLMARK_" not in a.get_title()
        for cb in colorbars:
            assert not _overlaps(title, cb.get_window_extent(r)), a.get_title()


@pytest.mark.parametrize("panel", [(3.2, 3.2), (2.5, 2.5)])
def test_pathway_titles_do_not_overlap_colourbars(slide, panel):
    fig = stf.pl.pathways(slide, pathways=LONG, key="pathway_activity", panel_size=panel, ncols=3, return_fig=True)
    assert fig.dpi >= 100
    _check_titles_clear(fig, fig.axes[:3])
    fig = stf.pl.pathways(
        slide, pathways=LONG[:2], key=("pathway_activity", "stf_pathways"), panel_size=panel, return_fig=True
    )
    panels = [a for a in fig.axes if a.get_title()]
    _check_titles_clear(fig, panels)
    assert "Pearson r" in panels[1].get_title()


def test_attention_titles_do_not_overlap_colourbars(slide):
    t = slide.tables["table"]
    w = pd.DataFrame(np.random.default_rng(1).random((t.n_obs, 3)), index=t.obs_names, columns=LONG)
    fig = stf.pl.attention(None, slide, weights=w, panel_size=(3.0, 3.0), return_fig=True)
    assert fig.dpi >= 100
    _check_titles_clear(fig, [a for a in fig.axes if a.get_title()])


def test_signed_scores_are_grey_not_white_at_zero(slide):
    from matplotlib.colors import to_rgb

    axes = stf.pl.pathways(slide, pathways=LONG[0], key="pathway_activity", show=False)
    coll = axes.ravel()[0].collections[0]
    r, g, b = coll.cmap(coll.norm(0.0))[:3]
    assert max(r, g, b) - min(r, g, b) < 0.05 and 0.4 < (r + g + b) / 3 < 0.75  # a neutral mid grey
    lo, hi = coll.cmap(0.0)[:3], coll.cmap(1.0)[:3]
    assert lo[2] > lo[0] and hi[0] > hi[2]  # blue below, red above
    assert to_rgb("white") not in {tuple(coll.cmap(x)[:3]) for x in np.linspace(0, 1, 11)}
    # all-positive scores: a sequential map (min-max), not the diverging one
    t = slide.tables["table"]
    t.obsm["positive"] = t.obsm["pathway_activity"].abs() + 1
    axes = stf.pl.pathways(slide, pathways=LONG[0], key="positive", show=False)
    assert axes.ravel()[0].collections[0].cmap.name == "viridis"


def test_figures_have_at_least_100_dpi(slide):
    import matplotlib.pyplot as plt

    with plt.rc_context({"figure.dpi": 60}):
        fig = stf.pl.pathways(slide, pathways=LONG[:1], key="pathway_activity", return_fig=True)
    assert fig.dpi == 100
    with plt.rc_context({"figure.dpi": 150}):
        fig = stf.pl.pathways(slide, pathways=LONG[:1], key="pathway_activity", return_fig=True)
    assert fig.dpi == 150
    plt.close("all")
