"""Reading cost of a her2st section: process CPU time and peak memory of ``stf.io.read_her2st``.

    python benchmarks/bench_read.py [--section C3] [--rounds 3] [--baseline-src /path/to/old/src]

Each measurement runs in a fresh process after the heavy imports (anndata, spatialdata, dask, Pillow,
imagecodecs: paid once per session, reported separately). Three costs: the read itself; the read and
the first use of the full-resolution pixels (decoding the whole H&E, as tiling does); and the read and a
plot-sized look at the coarsest pyramid level. Peak memory is the process's peak RSS, total and above
the state after the imports. With ``--baseline-src`` the same measurements run on another checkout's
code, alternating with this one round by round (target: read <= 2 s CPU and <= 0.5 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from _common import SHARED, peak_rss_mb, run_worker, versions, write_result

MODES = ("read", "read+full-res pixels", "read+coarsest level")


def worker(section: str, mode: str) -> dict:
    c0 = time.process_time()
    import anndata  # noqa: F401
    import dask.array  # noqa: F401
    import geopandas  # noqa: F401
    import imagecodecs  # noqa: F401
    import numpy as np
    import PIL.Image  # noqa: F401
    import scipy.spatial  # noqa: F401
    import spatialdata  # noqa: F401
    from spatialdata import SpatialData  # noqa: F401  (spatialdata imports most of itself lazily)
    from spatialdata.models import Image2DModel, ShapesModel, TableModel  # noqa: F401

    import spatialtranscriptformer as stf

    import_cpu = time.process_time() - c0
    base = peak_rss_mb()
    c0, t0 = time.process_time(), time.perf_counter()
    sdata = stf.io.read_her2st(SHARED / "her2st" / section)
    el = sdata.images["he"]
    names = sorted(el.children, key=lambda s: int(s.replace("scale", "")))
    if mode == MODES[1]:
        np.asarray(el[names[0]]["image"].data[:, 4000:4224, 4000:4224])  # one tile: decodes the level once
    elif mode == MODES[2]:
        np.asarray(el[names[-1]]["image"].data)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    return {"mode": mode, "cpu_s": cpu, "wall_s": wall, "import_cpu_s": import_cpu, "rss_peak_mb": peak_rss_mb(),
            "rss_increase_mb": peak_rss_mb() - base, "n_spots": sdata.tables["table"].n_obs,
            "loadavg": os.getloadavg()[0]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--section", default="C3")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline-src", default=None)
    p.add_argument("--mode", default=MODES[0], help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.section, args.mode)))
        return
    if not (SHARED / "her2st" / args.section).is_dir():
        raise SystemExit(f"her2st section {args.section} not found under {SHARED / 'her2st'}; nothing to measure.")
    rows = []
    for _ in range(args.rounds):
        for mode in MODES:
            for label, src in versions("after", args.baseline_src):
                r = run_worker(__file__, ["--section", args.section, "--mode", mode], src=src)
                r["version"] = label
                rows.append(r)
                print(json.dumps(r), flush=True)
    lines = ["| what | version | CPU s (median) | wall s (median) | peak RSS MB (total) | peak RSS MB (above imports) |",
             "|:---|:---|---:|---:|---:|---:|"]
    for mode in MODES:
        for label, _ in versions("after", args.baseline_src):
            rs = [r for r in rows if r["mode"] == mode and r["version"] == label]
            med = {k: statistics.median(r[k] for r in rs) for k in ("cpu_s", "wall_s", "rss_peak_mb", "rss_increase_mb")}
            lines.append(f"| {mode} | {label} | {med['cpu_s']:.2f} | {med['wall_s']:.2f} | {med['rss_peak_mb']:.0f} | "
                         f"{med['rss_increase_mb']:.0f} |")
    imp = statistics.median(r["import_cpu_s"] for r in rows)
    head = (f"## read_her2st, section {args.section} ({rows[0]['n_spots']} spots), {args.rounds} alternating rounds, "
            f"load average up to {max(r['loadavg'] for r in rows):.1f}; imports beforehand: {imp:.2f} s CPU\n\n")
    write_result("read_her2st", head + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
