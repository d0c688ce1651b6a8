"""Benchmark of the 2 µm Poisson super-resolution on simulated Visium HD slides (CPU, tiny backbone).

1. Accuracy table: masked PCC and SSIM at 2/4/8/16 µm against the known rates of a held-out test patient,
   Poisson vs MSE-on-z-scores, with and without GradNorm, mean ± sd over seeds. Leak-free: per seed four
   simulated patients; P0 and P1 train (and choose the genes), P2 validates (best epoch), P3 is tested and
   never seen before. Plus GradNorm's weight trajectories (with the relative inverse training rates).
2. Peak RSS increase of whole-slide prediction at 1x and 4x the slide area (should stay flat).
3. Patches/s of training (cached token grids) and of prediction (backbone + decoder + zarr writes).

Run: ``python benchmarks/bench_superres.py [--quick] [--part accuracy|memory] [--seeds 3]``; the accuracy
table is also written to ``benchmarks/results/superres_accuracy.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _common import write_result


def tiny_backbone(input_size: int = 64):
    import timm
    import torch

    from spatialtranscriptformer.pp._backbones import Backbone
    from spatialtranscriptformer.pp._registry import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec

    torch.manual_seed(0)
    spec = BackboneSpec(
        name="tiny_vit",
        dim=192,
        input_size=input_size,
        mpp=2.0,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        license="test",
        citation="test",
        arch="vit_tiny_patch16_224",
        needs_weights=False,
    )
    model = timm.create_model("vit_tiny_patch16_224", img_size=input_size, pretrained=False, num_classes=0)
    return Backbone(spec, model.eval())


CONFIGS = (("poisson", True), ("poisson", False), ("mse", True), ("mse", False))
SCALES = (2, 4, 8, 16)


def _fit_eval(args, seed: int, cache: str) -> tuple[list[dict], list[dict], list[dict]]:
    """One seed: simulate four patients; train on P0+P1, validate on P2 (early stopping, best epoch), test P3.

    Genes are chosen on the training patches only (inside ``fit_superres``); the test patient is never
    passed to ``fit_superres``. Returns the accuracy rows, speed rows and GradNorm weight rows.
    """
    import spatialtranscriptformer as stf
    from spatialtranscriptformer.tl._superres import fit_superres
    from spatialtranscriptformer.tl._superres_evaluate import evaluate_superres

    slides = stf.datasets.synthetic(
        technology="visium_hd", bin_size_um=2, size_um=args.size_um, n_genes=30, n_pathways=6,
        n_slides=4, n_patients=4, seed=seed,
    )
    fit_slides, test = slides[:3], slides[3]
    bb = tiny_backbone()
    acc, speeds, weights = [], [], []
    for loss, gradnorm in CONFIGS:
        t0 = time.perf_counter()
        m = fit_superres(
            fit_slides, genes=args.genes, loss=loss, validation=["P2"], max_epochs=args.epochs, batch_size=8,
            lr=args.lr, early_stopping_patience=args.patience, seed=seed, progress=False,
            model_kwargs={"backbone": bb, "patch_um": args.patch_um, "hidden": 32},
            plan_kwargs={"gradnorm": gradnorm}, data_kwargs={"cache_dir": cache}, accumulate_grad_batches=1,
        )
        dt = time.perf_counter() - t0
        assert m.params["train_patients"] == ["P0", "P1"] and m.params["val_patients"] == ["P2"]
        speeds.append({"loss": loss, "gradnorm": gradnorm, "seed": seed, "fit_s": dt,
                       "train_patches_per_s": m.params["train_patches"] * len(m.history) / dt})
        res = evaluate_superres(test, m, truth=args.truth, progress=False)
        agg = res.groupby("scale_um")[["pcc", "ssim"]].mean()
        for scale, row in agg.iterrows():
            acc.append({"loss": loss, "gradnorm": gradnorm, "seed": seed, "scale_um": int(scale),
                        "pcc": row.pcc, "ssim": row.ssim, "best_epoch": m.best_epoch})
        if gradnorm:
            for _, h in m.history.iterrows():
                weights.append({"loss": loss, "seed": seed, "epoch": int(h["epoch"]),
                                **{f"w_{s}um": h[f"w_{s}um"] for s in SCALES},
                                **{f"r_{s}um": h[f"r_{s}um"] for s in SCALES},
                                **{f"L_{s}um": h[f"train_loss_{s}um"] for s in SCALES}})
    return acc, speeds, weights


def accuracy(args) -> None:
    import numpy as np
    import pandas as pd

    acc, speeds, weights = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench_sr_") as cache:  # token grids, removed at the end
        for seed in range(args.seed, args.seed + args.seeds):
            a, s, w = _fit_eval(args, seed, cache)
            acc += a
            speeds += s
            weights += w
            print(f"seed {seed} done", flush=True)
    acc = pd.DataFrame(acc)
    lines = [
        f"== masked PCC / SSIM vs {args.truth!r} of the held-out test patient P3 (trained on P0+P1, validated "
        f"on P2; mean over {args.genes} genes; mean ± sd over {args.seeds} seeds; {args.epochs} epochs, "
        f"patience {args.patience}) ==",
    ]
    header = "| loss | GradNorm | " + " | ".join(f"PCC {s} µm" for s in SCALES) + " | "
    header += " | ".join(f"SSIM {s} µm" for s in SCALES) + " | best epoch |"
    lines += [header, "|" + "---|" * (3 + 2 * len(SCALES))]
    for loss, gradnorm in CONFIGS:
        sub = acc[(acc["loss"] == loss) & (acc["gradnorm"] == gradnorm)]
        cells = []
        for metric in ("pcc", "ssim"):
            for s in SCALES:
                v = sub.loc[sub["scale_um"] == s, metric]
                cells.append(f"{v.mean():.3f} ± {v.std(ddof=1):.3f}")
        be = sub.drop_duplicates("seed")["best_epoch"]
        lines.append(f"| {loss} | {'yes' if gradnorm else 'no'} | " + " | ".join(cells)
                     + f" | {be.mean():.1f} ({', '.join(str(int(b)) for b in be)}) |")
    w = pd.DataFrame(weights)
    n_ep = int(w["epoch"].max()) + 1
    marks = sorted({0, n_ep // 4, n_ep // 2, 3 * n_ep // 4, n_ep - 1})
    lines += ["", "== GradNorm weights w_s (epoch means; sum 4), relative inverse training rates r_s and "
              "L_s / L_s(epoch 0): mean over seeds (min-max) =="]
    for loss in ("poisson", "mse"):
        sub = w[w["loss"] == loss]
        lines.append(f"-- {loss} --")
        lines.append("| epoch | " + " | ".join(f"w {s} µm" for s in SCALES) + " | "
                     + " | ".join(f"r {s} µm" for s in SCALES) + " | "
                     + " | ".join(f"L/L0 {s} µm" for s in SCALES) + " |")
        lines.append("|" + "---|" * (1 + 3 * len(SCALES)))
        first = sub[sub["epoch"] == 0].set_index("seed")
        for e in marks:
            row = sub[sub["epoch"] == e].set_index("seed")
            cells = []
            for s in SCALES:
                v = row[f"w_{s}um"]
                cells.append(f"{v.mean():.2f} ({v.min():.2f}-{v.max():.2f})")
            cells += [f"{row[f'r_{s}um'].mean():.3f}" for s in SCALES]
            cells += [f"{(row[f'L_{s}um'] / first[f'L_{s}um']).mean():.3f}" for s in SCALES]
            lines.append(f"| {e} | " + " | ".join(cells) + " |")
        wf = sub[sub["epoch"] == n_ep - 1][[f"w_{s}um" for s in SCALES]].to_numpy()
        assert np.isfinite(wf).all(), "non-finite GradNorm weights"
    sp = pd.DataFrame(speeds).groupby(["loss", "gradnorm"])[["fit_s", "train_patches_per_s"]].mean()
    lines += ["", "== training speed (includes Lightning start-up, and for the first configuration of each seed "
              "(Poisson + GradNorm) the token grids; mean over seeds) ==",
              sp.round(2).to_string()]
    text = "\n".join(lines) + "\n"
    write_result("superres_accuracy", text)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20


def predict_child(size_um: float, patch_um: int) -> None:
    """Child process: simulate an H&E-only-sized slide, train nothing heavy, measure predict's RSS."""
    import spatialtranscriptformer as stf
    from spatialtranscriptformer.tl._superres import fit_superres
    from spatialtranscriptformer.tl._superres_predict import predict_superres

    small = stf.datasets.synthetic(
        technology="visium_hd", bin_size_um=2, size_um=128, n_genes=60, n_pathways=6
    )
    m = fit_superres(
        small,
        genes=50,
        max_epochs=1,
        validation=None,
        progress=False,
        model_kwargs={"backbone": tiny_backbone(), "patch_um": patch_um, "hidden": 32},
        data_kwargs={"cache_dir": tempfile.mkdtemp()},
    )
    slide = stf.datasets.synthetic(
        n_spots=None, size_um=size_um, technology="visium", n_genes=10, n_pathways=2
    )
    base, peak, stop = _rss_mb(), [0.0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.005)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        predict_superres(slide, m, store=Path(d) / "p.zarr", progress=False, skip_background=False)
        dt = time.perf_counter() - t0
        n = slide.tables["table"].uns["stf_superres"]["n_patches"]
    stop.set()
    th.join()
    img = slide.images["he"]
    shape = (img["scale0"]["image"] if "scale0" in getattr(img, "children", {}) else img).shape
    print(
        json.dumps(
            {
                "size_um": size_um,
                "image_px": list(shape[1:]),
                "patches": n,
                "predict_s": dt,
                "patches_per_s": n / dt,
                "rss_before_mb": base,
                "peak_increase_mb": peak[0] - base,
            }
        )
    )


def memory(args) -> None:
    print("\n== whole-slide prediction: peak RSS increase (50 genes) and speed ==")
    for f in (1, 2):  # side x1 and x2 = area x1 and x4
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(args.pred_size_um * f), str(args.patch_um)],
            capture_output=True,
            text=True,
            check=True,
        )
        print(f"area x{f * f}:", out.stdout.strip().splitlines()[-1])


def main() -> None:
    import torch

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="smaller slides and fewer epochs")
    p.add_argument("--part", choices=["all", "accuracy", "memory"], default="all")
    p.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="first seed (simulation and training)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds of the accuracy table")
    p.add_argument("--epochs", type=int, default=None, help="default 30 (--quick: 8)")
    p.add_argument("--patience", type=int, default=None, help="early-stopping patience (default: none)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--truth", default="true_rates", help="'true_rates' (simulated rates) or 'counts'")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        predict_child(float(args.child[0]), int(args.child[1]))
        return
    args.size_um, args.patch_um, args.genes = 384, 64, 10
    args.pred_size_um = 1024
    epochs = 30
    if args.quick:
        args.size_um, epochs, args.pred_size_um = 256, 8, 512
    args.epochs = epochs if args.epochs is None else args.epochs
    if args.part in ("all", "memory"):
        memory(args)
    if args.part in ("all", "accuracy"):
        accuracy(args)


if __name__ == "__main__":
    main()
