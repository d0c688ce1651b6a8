"""Benchmark of the 2 µm Poisson super-resolution on simulated Visium HD slides (CPU, tiny backbone).

1. Accuracy table: masked PCC and SSIM at 2/4/8/16 µm against the known rates of the held-out patient,
   Poisson vs MSE-on-z-scores, with and without GradNorm.
2. Peak RSS increase of whole-slide prediction at 1x and 4x the slide area (should stay flat).
3. Patches/s of training (cached token grids) and of prediction (backbone + decoder + zarr writes).

Run: ``python benchmarks/bench_superres.py [--quick]``.
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


def accuracy(args) -> None:
    import pandas as pd

    import spatialtranscriptformer as stf
    from spatialtranscriptformer.tl._superres import fit_superres
    from spatialtranscriptformer.tl._superres_evaluate import evaluate_superres

    slides = stf.datasets.synthetic(
        technology="visium_hd",
        bin_size_um=2,
        size_um=args.size_um,
        n_genes=30,
        n_pathways=6,
        n_slides=3,
        n_patients=3,
        seed=args.seed,
    )
    bb = tiny_backbone()
    tables, speeds = [], []
    cache = tempfile.mkdtemp(prefix="bench_sr_")
    for loss in ("poisson", "mse"):
        for gradnorm in (True, False):
            t0 = time.perf_counter()
            m = fit_superres(
                slides,
                backbone=bb,
                genes=args.genes,
                patch_um=args.patch_um,
                loss=loss,
                gradnorm=gradnorm,
                max_epochs=args.epochs,
                batch_size=8,
                accumulate_grad_batches=1,
                lr=args.lr,
                hidden=32,
                patience=None,
                progress=False,
                cache_dir=cache,
                seed=args.seed,
            )
            dt = time.perf_counter() - t0
            n_train = m.params["train_patches"] * args.epochs
            speeds.append(
                {"loss": loss, "gradnorm": gradnorm, "fit_s": dt, "train_patches_per_s": n_train / dt}
            )
            held = m.params["val_patients"][0]
            res = evaluate_superres(slides, m, truth="true_rates", patient=held, progress=False)
            agg = res.groupby("scale_um")[["pcc", "ssim"]].mean()
            for scale, row in agg.iterrows():
                tables.append(
                    {"loss": loss, "gradnorm": gradnorm, "scale_um": scale, "pcc": row.pcc, "ssim": row.ssim}
                )
    tab = pd.DataFrame(tables).pivot_table(
        index=["loss", "gradnorm"], columns="scale_um", values=["pcc", "ssim"]
    )
    print("\n== accuracy vs known rates, held-out patient (mean over genes) ==")
    print(tab.round(3).to_string())
    print("\n== training speed (token grids cached; includes Lightning start-up) ==")
    print(pd.DataFrame(speeds).round(2).to_string(index=False))


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
        backbone=tiny_backbone(),
        genes=50,
        patch_um=patch_um,
        max_epochs=1,
        hidden=32,
        val_patient=False,
        progress=False,
        cache_dir=tempfile.mkdtemp(),
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
    p.add_argument("--quick", action="store_true")
    p.add_argument("--child", nargs=2, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        predict_child(float(args.child[0]), int(args.child[1]))
        return
    args.size_um, args.patch_um, args.genes, args.epochs, args.lr = 384, 64, 10, 30, 3e-3
    args.pred_size_um = 1024
    if args.quick:
        args.size_um, args.epochs, args.pred_size_um = 256, 8, 512
    memory(args)
    accuracy(args)


if __name__ == "__main__":
    main()
