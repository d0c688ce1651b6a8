"""Whole-slide prediction cost on synthetic Visium HD (8 µm bins): µs per spot and peak memory.

    python benchmarks/bench_predict.py [--sizes 5000,20000,80000,320000] [--baseline-src /path/to/old/src]

Each (size, version) runs in a fresh process with one torch thread: a default STF (the defaults of
``stf.tl.fit``: 50 genes, 768-d embeddings, per-slide standardisation, neighbourhood context input and
output smoothing where the checkout has them) with random weights predicts
every bin of a synthetic capture area (8 µm bins on a square grid, ~15 % of it glass, as the simulator's
Visium HD slides) with ``window_spots=8192``. Reported: process CPU time per spot (on a shared machine the
CPU time of a 1-thread run is the better estimate of the uncontended wall time), wall time, tokens the
network ran on per spot, and the peak RSS increase during prediction over the inputs (embeddings and
coordinates already in memory) with the output's own size for reference. With ``--baseline-src`` the
same measurement runs on another checkout's code, alternating with this one size by size.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from _common import peak_rss_mb, run_worker, versions, write_result

DIM, GENES, WINDOW = 768, 50, 8192


def hd_bins(n: int, seed: int = 0):
    """``n`` centres (µm) of 8 µm bins under tissue: a square capture area with smooth glass patches."""
    import numpy as np
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n / 0.85))) + 2
    noise = gaussian_filter(rng.normal(size=(side, side)), sigma=max(2.0, side / 12))
    keep = noise.ravel() >= np.quantile(noise, 1 - n / side**2)  # exactly ~n bins, glass where noise is low
    rr, cc = np.divmod(np.flatnonzero(keep)[:n], side)
    return np.stack([(cc + 0.5) * 8.0, (rr + 0.5) * 8.0], 1)


def worker(n: int) -> dict:
    import numpy as np
    import torch

    import spatialtranscriptformer as stf
    from spatialtranscriptformer.module._stf import SpatialTranscriptFormer
    from spatialtranscriptformer.tl._model import TrainedModel

    torch.set_num_threads(1)
    if hasattr(stf.settings, "n_threads"):
        stf.settings.n_threads = 1
    torch.manual_seed(0)
    fit_params, width = {"standardize": "slide"}, DIM
    try:  # the defaults of stf.tl.fit: neighbourhood context input (twice the width) and output smoothing
        from spatialtranscriptformer.module._stf import DEFAULT_CONTEXT_RADIUS, DEFAULT_OUTPUT_SMOOTHING

        fit_params.update(context_radius=DEFAULT_CONTEXT_RADIUS, output_smoothing=DEFAULT_OUTPUT_SMOOTHING)
        width = 2 * DIM
    except ImportError:  # an older checkout
        pass
    module = SpatialTranscriptFormer(width, GENES, loss="mse_pcc", level="spot").eval()
    model = TrainedModel(module, model_name="stf", genes=[f"g{i}" for i in range(GENES)], embedding_key="X_bench",
                         input_dim=DIM, level="spot", loss="mse_pcc", log_transform=True, fit_params=fit_params)
    coords = hd_bins(n)
    x = np.random.default_rng(1).normal(size=(n, DIM)).astype(np.float32)
    model.predict_arrays(x[:256], coords[:256], window_spots=WINDOW)  # warm-up: kernels, thread pool
    from spatialtranscriptformer.tl._model import spatial_windows

    tokens = sum(len(w) for w, _ in spatial_windows(coords, WINDOW)) / n
    base = peak_rss_mb()
    c0, t0 = time.process_time(), time.perf_counter()
    out = model.predict_arrays(x, coords, window_spots=WINDOW)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    assert out["expr"].shape == (n, GENES) and np.isfinite(out["expr"]).all()
    return {"n": n, "cpu_us_per_spot": 1e6 * cpu / n, "wall_us_per_spot": 1e6 * wall / n, "tokens_per_spot": tokens,
            "rss_increase_mb": peak_rss_mb() - base, "rss_peak_mb": peak_rss_mb(),
            "output_mb": (out["expr"].nbytes + (0 if out["pathway_scores"] is None else out["pathway_scores"].nbytes)) / 2**20,
            "loadavg": os.getloadavg()[0]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="5000,20000,80000,320000")
    p.add_argument("--baseline-src", default=None, help="src folder of a checkout to compare with (before)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.worker:
        print(json.dumps(worker(sizes[0])))
        return
    rows = []
    for n in sizes:
        for label, src in versions("after", args.baseline_src):  # alternate the versions size by size
            r = run_worker(__file__, ["--sizes", str(n)], src=src)
            r["version"] = label
            rows.append(r)
            print(json.dumps(r), flush=True)
    lines = ["| bins | version | CPU µs / spot | wall µs / spot | tokens / spot | peak RSS increase (MB) | of which output (MB) | peak RSS (MB) |",
             "|---:|:---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['version']} | {r['cpu_us_per_spot']:.0f} | {r['wall_us_per_spot']:.0f} | "
                     f"{r['tokens_per_spot']:.2f} | {r['rss_increase_mb']:.0f} | {r['output_mb']:.0f} | {r['rss_peak_mb']:.0f} |")
    if args.baseline_src:
        lines += ["", "| bins | CPU time after / before |", "|---:|---:|"]
        for n in sizes:
            a = next(r for r in rows if r["n"] == n and r["version"] == "after")
            b = next(r for r in rows if r["n"] == n and r["version"] == "before")
            lines.append(f"| {n:,} | {a['cpu_us_per_spot'] / b['cpu_us_per_spot']:.2f} |")
    head = (f"## Windowed prediction, synthetic Visium HD 8 µm bins, window_spots={WINDOW}, default STF, {DIM}-d, "
            f"1 torch thread, {os.cpu_count()} CPUs, load average up to {max(r['loadavg'] for r in rows):.1f}\n\n")
    write_result("predict", head + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
