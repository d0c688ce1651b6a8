"""Which scverse client calls work, as they are, on the slides our readers return.

Usage (headless)::

    MPLBACKEND=Agg python tools/client_calls.py

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


def main() -> None:
    """Print works/fails for every (slide, call)."""
    stf.settings.progress = False
    with tempfile.TemporaryDirectory() as tmp:
        for name, sdata in slides(Path(tmp)).items():
            table = sdata.tables["table"]
            gene = _gene(table)
            for call_name, fn in CALLS.items():
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        fn(sdata, table, gene)
                    res = "works"
                except Exception as err:  # report, do not stop
                    last = traceback.extract_tb(err.__traceback__)[-1]
                    res = f"fails: {type(err).__name__}: {str(err).splitlines()[0][:140]} ({Path(last.filename).name})"
                finally:
                    plt.close("all")
                print(f"{name:34s} {call_name:28s} {res}", flush=True)


if __name__ == "__main__":
    main()
