"""Which scverse client calls work, as they are, on the slides our readers return.

Usage (headless)::

    MPLBACKEND=Agg python tools/client_calls.py                 # reader outputs
    MPLBACKEND=Agg python tools/client_calls.py --predictions   # outputs of stf.tl.predict

For each reader output (the bundled her2st section, the tiny Visium sample read with ``read_visium`` and
through ``from_anndata(sc.read_visium(...))``, a HEST-layout sample, a synthetic slide) it tries, with no
workaround keyword (no ``img_key=None``, no ``shape=None``, no ``spot_size``):

- ``sc.pl.spatial(table, color=gene)`` — works when it draws the spots on the H&E (an image in the axes);
- ``sq.pl.spatial_scatter(table, color=gene)`` — idem;
- ``sq.gr.spatial_neighbors`` + ``sq.gr.spatial_autocorr(table, genes=...)`` — works when Moran's I is finite;
- spatialdata-plot ``render_images().pl.render_shapes(color=gene).pl.show()`` in ``"global"`` and in
  ``"micron"`` (a coordinate system in micrometres).

and prints one line per (slide, call): ``works`` or ``fails: <reason>``. Data come from
``stf.datasets`` (bundled; the Visium sample from the package when it ships it, else ``../shared/data``).

With ``--predictions`` it fits a small STF (named Hallmark pathway tokens) on the bundled her2st section and
runs the same clients on the outputs of ``stf.tl.predict``, wherever the installed version writes them (a
prediction table per output, or the former sparse layer ``layers['stf_pred']`` and ``obsm['stf_pathways']``),
for a SpatialData input and an AnnData input:

- ``sc.pl.spatial`` / ``sq.pl.spatial_scatter`` coloured by a predicted gene and by a pathway name, on the H&E;
- ``sq.gr.spatial_autocorr`` over every gene (pathway) of the prediction — works when no row is NaN;
- spatialdata-plot ``render_shapes(color=..., table_name=<prediction table>)``;
- ``stf.pl.spatial(genes=[a gene the model does not predict])`` — works when it is a clear error, fails when
  it draws a map of zeros.
"""

from __future__ import annotations

import json
import os
import tempfile
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import spatialtranscriptformer as stf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _visium_dir() -> Path | None:
    ds = getattr(stf.datasets, "visium_tiny_path", None)
    if ds is not None:
        return Path(ds())
    d = ROOT.parent / "shared" / "data" / "visium_tiny"
    return d if d.is_dir() else None


def _hest_sample(root: Path) -> Path:
    """A HEST-layout folder (st/, wsis/, metadata/) re-packaged from the bundled her2st section."""
    import anndata as ad
    import pandas as pd
    import tifffile

    sd = stf.datasets.her2st()
    tab = sd.tables["table"]
    el = sd.images["he"]
    he = el["scale1"]["image"].values.transpose(1, 2, 0)
    down = el["scale0"]["image"].shape[-1] / he.shape[1]
    for sub in ("st", "wsis", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(root / "wsis" / "SPA_C2.tif") as tif:
        tif.write(he, subifds=1, photometric="rgb", tile=(256, 256))
        tif.write(he[::2, ::2], subfiletype=1, photometric="rgb", tile=(256, 256))
    st = ad.AnnData(X=tab.layers["counts"].copy(), obs=pd.DataFrame(index=tab.obs_names),
                    var=pd.DataFrame(index=tab.var_names))
    st.obsm["spatial"] = tab.obsm["spatial"] / down
    st.write_h5ad(root / "st" / "SPA_C2.h5ad")
    meta = {"id": "SPA_C2", "pixel_size_um_estimated": tab.uns["stf_slide"]["mpp"] * down, "spot_diameter": 100.0,
            "patient": "C", "st_technology": "Spatial Transcriptomics", "organ": "Breast"}
    (root / "metadata" / "SPA_C2.json").write_text(json.dumps(meta))
    return root


def slides(tmp: Path) -> dict:
    """Reader outputs by name."""
    out = {"her2st (datasets.her2st)": stf.datasets.her2st()}
    vis = _visium_dir()
    if vis is not None:
        import scanpy as sc

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out["visium_tiny (io.read_visium)"] = stf.io.read_visium(vis)
            out["visium_tiny (io.from_anndata)"] = stf.io.from_anndata(sc.read_visium(vis))
    out["HEST layout (io.read_hest)"] = stf.io.read_hest(_hest_sample(tmp / "hest"))
    out["synthetic (datasets.synthetic)"] = stf.datasets.synthetic(n_slides=1, n_spots=120, n_genes=30, seed=0)
    return out


def _gene(table) -> str:
    X = table.X
    tot = np.asarray(X.sum(0)).ravel()
    return str(table.var_names[int(np.argmax(tot))])


def _has_image(ax) -> bool:
    return len(ax.get_images()) > 0


def call_sc_spatial(sdata, table, gene):
    """``sc.pl.spatial`` with a gene colour; fails unless it draws the H&E."""
    import scanpy as sc

    ax = sc.pl.spatial(table, color=gene, show=False)
    ax = ax[0] if isinstance(ax, list) else ax
    if not _has_image(ax):
        raise RuntimeError("drew no H&E image")


def call_sq_spatial_scatter(sdata, table, gene):
    """``sq.pl.spatial_scatter`` with a gene colour; fails unless it draws the H&E."""
    import squidpy as sq

    sq.pl.spatial_scatter(table, color=gene)
    ax = plt.gcf().axes[0]
    if not _has_image(ax):
        raise RuntimeError("drew no H&E image")


def call_sq_autocorr(sdata, table, gene):
    """``sq.gr.spatial_neighbors`` then Moran's I of one gene; fails unless it is finite."""
    import squidpy as sq

    t = table.copy()
    knn = getattr(sq.gr, "spatial_neighbors_knn", None)  # squidpy >= 1.8; spatial_neighbors goes in 1.9
    knn(t, n_neighs=6) if knn is not None else sq.gr.spatial_neighbors(t)
    sq.gr.spatial_autocorr(t, mode="moran", genes=[gene], n_perms=None)
    i = float(t.uns["moranI"].loc[gene, "I"])
    if not np.isfinite(i):
        raise RuntimeError(f"Moran's I is {i}")


def _sdata_plot(cs):
    def call(sdata, table, gene):
        import spatialdata_plot  # noqa: F401

        if cs not in sdata.coordinate_systems:
            raise RuntimeError(f"no coordinate system {cs!r} (has {sdata.coordinate_systems})")
        sdata.pl.render_images("he").pl.render_shapes("spots", color=gene, table_name="table").pl.show(
            coordinate_systems=cs
        )

    return call


CALLS = {
    "sc.pl.spatial": call_sc_spatial,
    "sq.pl.spatial_scatter": call_sq_spatial_scatter,
    "sq.gr.spatial_autocorr": call_sq_autocorr,
    "spatialdata-plot (global)": _sdata_plot("global"),
    "spatialdata-plot (micron)": _sdata_plot("micron"),
}


def _try(fn, *args) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fn(*args)
        res = "works" + (f" ({out})" if isinstance(out, str) else "")
    except Exception as err:  # report, do not stop
        last = traceback.extract_tb(err.__traceback__)[-1]
        res = f"fails: {type(err).__name__}: {str(err).splitlines()[0][:140]} ({Path(last.filename).name})"
    finally:
        plt.close("all")
    return res


# --- predictions ------------------------------------------------------------------------------------------
PRED_KEY, PATHWAY_KEY = "stf_pred", "stf_pathways"


def fitted_model(sdata):
    """A small STF with named Hallmark pathway tokens, fitted on the bundled section's 20 most variable genes."""
    stf.pp.embed(sdata, backbone="handcrafted", progress=False)
    return stf.tl.fit(sdata, genes=20, max_epochs=2, model_kwargs={"token_dim": 16, "n_heads": 2}, accelerator="cpu",
                      progress=False)


class Outputs:
    """Where ``stf.tl.predict`` put the predictions: (AnnData, layer) for genes and for pathways."""

    def __init__(self, sdata, genes_ad, genes_layer, pw_ad, pw_layer, genes_table, pw_table):
        self.sdata, self.genes_ad, self.genes_layer, self.pw_ad, self.pw_layer = sdata, genes_ad, genes_layer, pw_ad, pw_layer
        self.genes_table, self.pw_table = genes_table, pw_table  # SpatialData table names (None for an AnnData)


def predict_spatialdata(sdata, model) -> Outputs:
    """Predict a SpatialData in place; locate the outputs."""
    stf.tl.predict(sdata, model, progress=False)
    if PRED_KEY in sdata.tables:  # a table per output
        return Outputs(sdata, sdata.tables[PRED_KEY], None, sdata.tables.get(PATHWAY_KEY), None, PRED_KEY, PATHWAY_KEY)
    t = sdata.tables["table"]  # the former layout: a sparse layer over all genes of the expression table
    return Outputs(sdata, t, PRED_KEY, t, None, "table", "table")


def predict_anndata(adata, model) -> Outputs:
    """Prediction tables of an AnnData (``inplace=False``), or the former in-place layer."""
    try:  # the documented way to get prediction tables from an AnnData
        out = stf.tl.predict(adata, model, inplace=False, progress=False)
        return Outputs(None, out[PRED_KEY], None, out.get(PATHWAY_KEY), None, None, None)
    except TypeError:  # no inplace=: the former layout
        stf.tl.predict(adata, model, progress=False)
        return Outputs(None, adata, PRED_KEY, adata, None, None, None)


def _scanpy(which):
    def call(o, gene, pathway):
        import scanpy as sc

        ad, layer, key = (o.genes_ad, o.genes_layer, gene) if which == "gene" else (o.pw_ad, o.pw_layer, pathway)
        ax = sc.pl.spatial(ad, color=key, layer=layer, show=False)
        ax = ax[0] if isinstance(ax, list) else ax
        if not _has_image(ax):
            raise RuntimeError("drew no H&E image")

    return call


def _squidpy(which):
    def call(o, gene, pathway):
        import squidpy as sq

        ad, layer, key = (o.genes_ad, o.genes_layer, gene) if which == "gene" else (o.pw_ad, o.pw_layer, pathway)
        sq.pl.spatial_scatter(ad, color=key, layer=layer)
        if not _has_image(plt.gcf().axes[0]):
            raise RuntimeError("drew no H&E image")

    return call


def _autocorr(which):
    def call(o, gene, pathway):
        import squidpy as sq

        ad, layer = (o.genes_ad, o.genes_layer) if which == "gene" else (o.pw_ad, o.pw_layer)
        if which == "pathway" and pathway not in ad.var_names:
            raise RuntimeError(f"{pathway} is not a variable of any table (the scores are not a table)")
        t = ad.copy()
        knn = getattr(sq.gr, "spatial_neighbors_knn", None)
        knn(t, n_neighs=6) if knn is not None else sq.gr.spatial_neighbors(t)
        sq.gr.spatial_autocorr(t, mode="moran", layer=layer, n_perms=None)
        i = t.uns["moranI"]["I"]
        if i.isna().any() or len(i) == 0:
            raise RuntimeError(f"{int(i.isna().sum())} of {len(i)} rows are NaN")
        return f"{len(i)} rows, none NaN"

    return call


def _sdata_plot_pred(which):
    def call(o, gene, pathway):
        import spatialdata_plot  # noqa: F401

        table, layer, key = (o.genes_table, o.genes_layer, gene) if which == "gene" else (o.pw_table, o.pw_layer, pathway)
        o.sdata.pl.render_images("he").pl.render_shapes("spots", color=key, table_name=table, table_layer=layer).pl.show(
            coordinate_systems="global"
        )

    return call


def _stf_unpredicted(o, gene, pathway):
    """``stf.pl.spatial`` of a measured gene the model does not predict: a clear error, never a map of zeros."""
    if o.sdata is not None:
        data, t = o.sdata, o.sdata.tables["table"]
    else:  # predictions written into the AnnData (in place)
        data = t = o.source.copy()
        stf.tl.predict(data, o.model, progress=False)
    other = next(g for g in t.var_names if g not in set(o.model.genes))
    try:
        axes = stf.pl.spatial(data, genes=[other], layers=("counts", PRED_KEY), show=False)
    except (KeyError, ValueError) as err:
        if other in str(err):
            return f"clear error: {str(err).splitlines()[0][:90]}"
        raise
    coll = axes[0, 1].collections[0].get_array()
    if np.allclose(np.asarray(coll), 0):
        raise RuntimeError(f"drew an all-zero 'prediction' of {other}")
    raise RuntimeError(f"drew a map of {other}, which the model does not predict")


PRED_CALLS = {
    "sc.pl.spatial (gene)": _scanpy("gene"),
    "sc.pl.spatial (pathway)": _scanpy("pathway"),
    "sq.pl.spatial_scatter (gene)": _squidpy("gene"),
    "sq.pl.spatial_scatter (pathway)": _squidpy("pathway"),
    "sq.gr.spatial_autocorr (genes)": _autocorr("gene"),
    "sq.gr.spatial_autocorr (pathways)": _autocorr("pathway"),
    "spatialdata-plot (gene)": _sdata_plot_pred("gene"),
    "spatialdata-plot (pathway)": _sdata_plot_pred("pathway"),
    "stf.pl.spatial (unpredicted gene)": _stf_unpredicted,
}


def main_predictions() -> None:
    """Print works/fails for every client call on the outputs of ``stf.tl.predict``."""
    stf.settings.progress = False
    sdata = stf.datasets.her2st()
    model = fitted_model(sdata)
    pathway = "HALLMARK_HYPOXIA" if "HALLMARK_HYPOXIA" in model.pathways else model.pathways[0]
    gene = model.genes[0]
    adata = sdata.tables["table"].copy()
    for name, make in [("her2st SpatialData", lambda: predict_spatialdata(sdata, model)),
                       ("her2st AnnData", lambda: predict_anndata(adata, model))]:
        o = make()
        o.model, o.source = model, adata
        for call_name, fn in PRED_CALLS.items():
            if o.sdata is None and call_name.startswith("spatialdata-plot"):
                continue  # an AnnData input has no SpatialData to render
            print(f"{name:20s} {call_name:36s} {_try(fn, o, gene, pathway)}", flush=True)


def main() -> None:
    """Print works/fails for every (slide, call)."""
    import sys

    if "--predictions" in sys.argv[1:]:
        main_predictions()
        return
    stf.settings.progress = False
    with tempfile.TemporaryDirectory() as tmp:
        for name, sdata in slides(Path(tmp)).items():
            table = sdata.tables["table"]
            gene = _gene(table)
            for call_name, fn in CALLS.items():
                print(f"{name:34s} {call_name:28s} {_try(fn, sdata, table, gene)}", flush=True)


if __name__ == "__main__":
    main()
