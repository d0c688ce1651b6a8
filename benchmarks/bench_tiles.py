"""Tile extraction throughput from a zarr-backed SpatialData image (target >= 2,000 tiles/s at 224 px).

    python benchmarks/bench_tiles.py [--n 5000]

Writes the her2st section C3 (full resolution, 9270 x 9936 px) to zarr, reads it back lazily, and cuts
224-px tiles on a dense grid of pseudo-spots (a) at the slide's native µm/px (pure slicing) and (b)
resampled to 0.5 µm/px (the HEST default). Also times the per-spot ``bounding_box_query`` approach on a
few tiles for comparison.
"""

import argparse
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import spatialdata as sd

import spatialtranscriptformer as stf
from _common import her2st_section, write_result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=5000)
    args = p.parse_args()
    src = her2st_section("C3")
    meta = dict(src.tables["table"].uns["stf_slide"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "slide.zarr"
        sd.SpatialData(images={"he": src.images["he"]}).write(path)
        lazy = sd.read_zarr(path)
        h, w = lazy.images["he"]["scale0"]["image"].shape[-2:]
        rng = np.random.default_rng(0)
        xy = np.c_[rng.uniform(0, w, args.n), rng.uniform(0, h, args.n)]
        xy = xy[np.lexsort((xy[:, 0], np.floor(xy[:, 1] / 500)))]
        table = ad.AnnData(obs=pd.DataFrame(index=[f"s{i}" for i in range(args.n)]))
        table.obsm["spatial"] = xy
        table.uns["stf_slide"] = meta
        lazy.tables["table"] = table
        rows = []
        for label, mpp in [("native µm/px (slicing)", meta["mpp"]), ("resampled to 0.5 µm/px", 0.5)]:
            stf.pp.tiles(lazy, tile_size=224, mpp=mpp, spots=np.arange(50))  # warm-up
            t0 = time.perf_counter()
            n = sum(len(i) for i, _ in stf.pp.iter_tiles(lazy, tile_size=224, mpp=mpp, batch_size=64))
            dt = time.perf_counter() - t0
            rows.append((f"`iter_tiles`, {label} (streamed batches, as `embed` reads)", n, dt, n / dt))
            t0 = time.perf_counter()
            tiles = stf.pp.tiles(lazy, tile_size=224, mpp=mpp)
            dt = time.perf_counter() - t0
            rows.append((f"`tiles`, {label} (one in-memory array)", len(tiles), dt, len(tiles) / dt))
        # reference: one spatialdata bounding_box_query per tile
        n_q = 20
        half = 112 * 0.5 / meta["mpp"]
        t0 = time.perf_counter()
        for x, y in xy[:n_q]:
            q = sd.bounding_box_query(lazy.images["he"], axes=("x", "y"), min_coordinate=[x - half, y - half],
                                      max_coordinate=[x + half, y + half], target_coordinate_system="global")
            np.asarray(q["scale0"]["image"].data)
        dt = time.perf_counter() - t0
        rows.append(("bounding_box_query per tile (reference)", n_q, dt, n_q / dt))
    text = "| method | tiles | seconds | tiles/s |\n|---|---:|---:|---:|\n"
    text += "".join(f"| {a} | {b} | {c:.2f} | {d:,.0f} |\n" for a, b, c, d in rows)
    write_result("tiles", f"## Tile extraction, 224 px, zarr-backed her2st C3 ({w} x {h} px)\n\n{text}")


if __name__ == "__main__":
    main()
