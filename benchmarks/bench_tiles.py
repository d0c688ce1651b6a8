"""Tile extraction throughput from a zarr-backed SpatialData image, against in-memory numpy slicing.

    python benchmarks/bench_tiles.py [--n 5000] [--rounds 3] [--baseline-src /path/to/old/src]

Writes the her2st section C3 (full resolution, 9270 x 9936 px, 0.69 µm/px) to zarr once and reads it
back lazily. Spots: ``dense`` = ``--n`` uniformly random pseudo-spots (224-px tiles cover the slide ~2.7
times) and ``sparse`` = the section's 180 real spots. For each, 224-px tiles are cut with
``stf.pp.tiles`` at the slide's native µm/px (pure slicing) and resampled to 0.5 µm/px (the HEST
default), and the same tiles are sliced from the full-resolution image held in memory as a numpy
``(y, x, 3)`` array into a fresh output array (the reference: no reading, no resampling). Rounds
alternate the methods; ratios are taken within a round (targets: native >= 0.5x numpy slicing,
resampled >= 2,000 tiles/s). With ``--baseline-src`` each round also runs in a process with another
checkout's code (alternating), on the same zarr store.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import her2st_section, run_worker, versions, write_result


def measure(zarr_path: str, n: int, rounds: int) -> list[dict]:
    import anndata as ad
    import numpy as np
    import pandas as pd
    import spatialdata as sd

    import spatialtranscriptformer as stf

    sdata = sd.read_zarr(zarr_path)
    real = sdata.tables["table"]
    meta = dict(real.uns["stf_slide"])
    img = sdata.images["he"]["scale0"]["image"]
    h, w = img.shape[-2:]
    rng = np.random.default_rng(0)
    xy = np.c_[rng.uniform(0, w, n), rng.uniform(0, h, n)]
    dense = ad.AnnData(obs=pd.DataFrame(index=[f"s{i}" for i in range(n)]))
    dense.obsm["spatial"] = xy
    dense.uns["stf_slide"] = meta
    layouts = {"dense": sd.SpatialData(images={"he": sdata.images["he"]}, tables={"table": dense}),
               "sparse": sd.SpatialData(images={"he": sdata.images["he"]}, tables={"table": real})}
    hwc = np.ascontiguousarray(np.moveaxis(np.asarray(img.data), 0, -1))  # the in-memory reference image

    def numpy_slicing(coords):
        out = np.empty((len(coords), 224, 224, 3), np.uint8)
        x0 = np.clip(np.round(coords[:, 0] - 112).astype(int), 0, w - 224)
        y0 = np.clip(np.round(coords[:, 1] - 112).astype(int), 0, h - 224)
        for i in range(len(coords)):
            out[i] = hwc[y0[i] : y0[i] + 224, x0[i] : x0[i] + 224]
        return out

    for s in layouts.values():  # warm-up: compiled kernels, dask, page cache
        stf.pp.tiles(s, tile_size=224, mpp=meta["mpp"], spots=np.arange(20))
        stf.pp.tiles(s, tile_size=224, mpp=0.5, spots=np.arange(20))
    rows = []
    for r in range(rounds):
        for layout, s in layouts.items():
            coords = np.asarray(s.tables["table"].obsm["spatial"], dtype=float)
            for method, fn in [("numpy slicing (in memory)", lambda c=coords: numpy_slicing(c)),
                               ("stf native µm/px", lambda s=s: stf.pp.tiles(s, tile_size=224, mpp=meta["mpp"])),
                               ("stf resampled to 0.5 µm/px", lambda s=s: stf.pp.tiles(s, tile_size=224, mpp=0.5))]:
                c0, t0 = time.process_time(), time.perf_counter()
                t = fn()
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                rows.append({"round": r, "layout": layout, "method": method, "tiles": len(t), "wall_s": wall,
                             "cpu_s": cpu, "tiles_per_s": len(t) / wall, "loadavg": os.getloadavg()[0]})
                del t
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline-src", default=None)
    p.add_argument("--zarr", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.zarr, args.n, args.rounds)))
        return
    import spatialdata as sd

    src = her2st_section("C3")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "slide.zarr"
        sd.SpatialData(images={"he": src.images["he"]}, tables={"table": src.tables["table"]}).write(path)
        for r in range(args.rounds):
            for label, code in versions("after", args.baseline_src):
                res = run_worker(__file__, ["--zarr", str(path), "--n", str(args.n), "--rounds", "1"], src=code)
                for row in res:
                    row.update(version=label, round=r)
                rows += res
                print(f"round {r} {label}: " + ", ".join(f"{x['layout']}/{x['method']}: {x['tiles_per_s']:,.0f}/s"
                                                          for x in res), flush=True)
    lines = ["| spots | method | version | tiles | tiles/s (median) | CPU s (median) | ratio to numpy slicing (median of rounds) |",
             "|:---|:---|:---|---:|---:|---:|---:|"]
    for layout in ("dense", "sparse"):
        for method in ("numpy slicing (in memory)", "stf native µm/px", "stf resampled to 0.5 µm/px"):
            for label, _ in versions("after", args.baseline_src):
                rs = [x for x in rows if x["layout"] == layout and x["method"] == method and x["version"] == label]
                ref = {x["round"]: x["tiles_per_s"] for x in rows if x["layout"] == layout and x["version"] == label
                       and x["method"].startswith("numpy")}
                ratio = statistics.median(x["tiles_per_s"] / ref[x["round"]] for x in rs)
                lines.append(f"| {layout} | {method} | {label} | {rs[0]['tiles']} | "
                             f"{statistics.median(x['tiles_per_s'] for x in rs):,.0f} | "
                             f"{statistics.median(x['cpu_s'] for x in rs):.2f} | {ratio:.2f} |")
    head = (f"## Tile extraction, 224 px, zarr-backed her2st C3, {args.rounds} alternating rounds, "
            f"{os.cpu_count()} CPUs, load average up to {max(x['loadavg'] for x in rows):.1f}\n\n")
    write_result("tiles", head + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
