"""``stf.pp.embed`` end-to-end throughput vs the bare backbone forward (target ratio >= 0.9).

    python benchmarks/bench_embed.py [--backbone resnet50] [--n 128] [--batch-size 32]

Bare forward: the same backbone on pre-made, pre-normalised tensors at the same batch size. End to end:
``stf.pp.embed`` on a zarr-backed her2st section (tile reading, resampling and normalisation included,
overlapped with compute by the prefetch thread). Random weights (``weights="random"``), which cost the
same compute as pretrained ones.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import spatialdata as sd
import torch

import spatialtranscriptformer as stf
from _common import her2st_section, write_result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    bb = stf.pp.get_backbone(args.backbone, weights="random")
    src = her2st_section("C3")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "slide.zarr"
        src.write(path)
        lazy = sd.read_zarr(path)
        table = lazy.tables["table"]
        reps = int(np.ceil(args.n / table.n_obs))
        sub = sd.SpatialData(images={"he": lazy.images["he"]}, tables={"table": table[np.tile(np.arange(table.n_obs), reps)[: args.n]].copy()})
        sub.tables["table"].obs_names_make_unique()
        s = bb.spec.input_size
        # pre-made inputs exactly as `embed` feeds them: normalised tensors (same preprocessing, dtype and
        # memory layout) for torch backbones, uint8 tiles for numpy feature extractors (`handcrafted`)
        rng = np.random.default_rng(0)
        tiles = rng.integers(0, 255, (args.batch_size, s, s, 3), dtype=np.uint8)
        x = bb.preprocess(tiles) if bb.spec.is_torch else tiles
        bb.forward(x)  # warm-up
        rounds = []
        for _ in range(args.rounds):  # alternate the two paths so machine load hits both alike
            t0 = time.perf_counter()
            done = 0
            while done < args.n:
                bb.forward(x[: min(args.batch_size, args.n - done)])
                done += args.batch_size
            bare = args.n / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            stf.pp.embed(sub, backbone=args.backbone, weights="random", batch_size=args.batch_size, progress=False,
                         overwrite=True)
            e2e = args.n / (time.perf_counter() - t0)
            rounds.append((bare, e2e))
    bare, e2e = np.median([r[0] for r in rounds]), np.median([r[1] for r in rounds])
    ratios = [e / b for b, e in rounds]
    text = (f"## embed throughput, {args.backbone}, batch {args.batch_size}, {args.n} tiles, "
            f"{torch.get_num_threads()} torch threads\n\n| path | tiles/s |\n|---|---:|\n"
            f"| bare forward on pre-made tensors (median) | {bare:.2f} |\n| `stf.pp.embed` end to end (zarr-backed) | {e2e:.2f} |\n"
            f"| **ratio (median over {len(rounds)} alternating rounds)** | **{np.median(ratios):.3f}** |\n"
            f"\nPer-round ratios: {', '.join(f'{r:.3f}' for r in ratios)}\n")
    write_result(f"embed_{args.backbone}", text)


if __name__ == "__main__":
    main()
