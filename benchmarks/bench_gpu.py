"""Mixed precision and ``torch.compile`` on a GPU: fit, predict and embed, float32 vs bf16 / fp16 / compiled.

    python benchmarks/bench_gpu.py                 # needs CUDA; prints why and exits 0 without one
    python benchmarks/bench_gpu.py --device cpu --quick --compile-backend aot_eager   # CPU smoke test

Runs in under 5 minutes on one GPU (compilation included). Measured, each against float32 in the same
process (alternating repetitions, medians):

- training step of the default STF (768-d embeddings, 50 genes) at S = 4,096 and 16,384 spots:
  AdamW step time and peak CUDA memory, float32 / ``amp="bf16"`` / ``amp="fp16"`` (gradient scaling) /
  compiled; plus one short :func:`stf.tl.fit` run per setting (``amp=``, ``compile=``) on synthetic
  slides, to show the library path works on the device (seconds per epoch);
- windowed prediction (``TrainedModel.predict_arrays``) of an 80,000-bin synthetic Visium HD slide:
  µs per spot, and the largest deviation from float32;
- embedding: ResNet-50 (random weights) forward on 224-px tiles, bare and through ``stf.pp.embed``
  on the bundled her2st section: tiles/s and the largest relative deviation from float32.

Writes ``benchmarks/results/gpu.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import write_result


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def _fp16_ok(device: str) -> bool:
    """float16 matrix products are emulated (very slow) on most CPUs: only measured on GPUs."""
    return device.startswith("cuda")


def _peak_reset(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak_mb(device: str) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else float("nan")


BACKEND = "inductor"


def train_steps(device: str, sizes: list[int], reps: int) -> list[str]:
    import torch

    from spatialtranscriptformer.module._losses import compute_loss
    from spatialtranscriptformer.module._stf import SpatialTranscriptFormer

    rows = []
    settings = [("float32", None, False), ("amp bf16", torch.bfloat16, False), ("amp fp16", torch.float16, False),
                ("compiled", None, True), ("compiled + bf16", torch.bfloat16, True)]
    settings = [x for x in settings if _fp16_ok(device) or x[1] is not torch.float16]
    for S in sizes:
        torch.manual_seed(0)
        side = int(S**0.5) + 1
        grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
        batch = {"x": torch.randn(1, S, 768, device=device), "coords": grid[:S].float().unsqueeze(0).to(device) * 8.0,
                 "mask": torch.ones(1, S, dtype=torch.bool, device=device), "y": torch.randn(1, S, 50, device=device)}
        res = {}
        models = {}
        for name, dtype, comp in settings:
            torch.manual_seed(0)
            model = SpatialTranscriptFormer(768, 50, loss="mse_pcc").to(device).train()
            if comp:
                model.compile(backend=BACKEND, dynamic=False)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)

            def step(model=model, opt=opt, scaler=scaler, dtype=dtype, batch=batch):
                with torch.autocast(device.split(":")[0], dtype=dtype or torch.float32, enabled=dtype is not None):
                    out = model(batch["x"], batch["coords"], batch["mask"])
                    loss, _ = compute_loss(out, batch, loss="mse_pcc")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()

            step()  # warm-up (and compilation)
            models[name] = step
            res[name] = []
        for _ in range(reps):  # alternate the settings
            for name in res:
                _peak_reset(device)
                t = _timed(models[name], device, 1)[0]
                res[name].append((t, _peak_mb(device)))
        base = statistics.median(t for t, _ in res["float32"])
        for name, vals in res.items():
            t = statistics.median(v[0] for v in vals)
            rows.append(f"| train step, S={S:,} | {name} | {t * 1e3:.1f} ms | {base / t:.2f}x | {max(v[1] for v in vals):.0f} MB |")
            print(rows[-1], flush=True)
    return rows


def fit_runs(device: str, quick: bool) -> list[str]:
    import spatialtranscriptformer as stf

    slides = stf.datasets.synthetic(n_spots=400 if quick else 3000, n_slides=3, n_genes=50, seed=0)
    for s in slides:
        t = s.tables["table"]
        t.obsm["X_sim"] = t.obsm["true_pathways"].to_numpy().repeat(8, axis=1).astype("float32")
    rows = []
    accel = "gpu" if device.startswith("cuda") else "cpu"
    base = None
    for name, kw in [("float32", {}), ("amp bf16", {"amp": "bf16"}), ("amp fp16", {"amp": "fp16"}),
                     ("compiled", {"compile": BACKEND})]:
        if kw.get("amp") == "fp16" and not _fp16_ok(device):
            continue
        t0 = time.perf_counter()
        m = stf.tl.fit(slides, embedding_key="X_sim", genes=30, max_epochs=3, validation=None, accelerator=accel,
                       devices=1, progress=False, model_kwargs={"token_dim": 64, "n_layers": 2}, **kw)
        dt = (time.perf_counter() - t0) / 3
        base = base or dt
        rows.append(f"| stf.tl.fit, 3 synthetic slides | {name} | {dt:.2f} s / epoch (incl. compile) | {base / dt:.2f}x | "
                    f"final loss {m.history['train_loss'].iloc[-1]:.3f} |")
        print(rows[-1], flush=True)
    return rows


def predict_runs(device: str, n: int, reps: int) -> list[str]:
    import numpy as np
    import torch

    from bench_predict import GENES, hd_bins
    from spatialtranscriptformer.module._stf import SpatialTranscriptFormer
    from spatialtranscriptformer.tl._model import TrainedModel

    torch.manual_seed(0)
    module = SpatialTranscriptFormer(768, GENES, loss="mse_pcc").eval()
    model = TrainedModel(module, model_name="stf", genes=[f"g{i}" for i in range(GENES)], embedding_key="X",
                         input_dim=768, level="spot", loss="mse_pcc", log_transform=True,
                         fit_params={"standardize": "slide"})
    coords = hd_bins(n)
    x = np.random.default_rng(1).normal(size=(n, 768)).astype(np.float32)
    ref = base = None
    rows = []
    for name, kw in [("float32", {}), ("amp bf16", {"amp": "bf16"}), ("amp fp16", {"amp": "fp16"}),
                     ("compiled", {"compile": BACKEND}), ("compiled + bf16", {"compile": BACKEND, "amp": "bf16"})]:
        if kw.get("amp") == "fp16" and not _fp16_ok(device):
            continue
        out = model.predict_arrays(x, coords, window_spots=8192, device=device, **kw)["expr"]  # warm-up / compile
        ts = _timed(lambda kw=kw: model.predict_arrays(x, coords, window_spots=8192, device=device, **kw), device, reps)
        ref = out if ref is None else ref
        t = statistics.median(ts)
        base = t if name == "float32" else base
        dev = float(np.abs(out - ref).max() / (np.abs(ref).max() + 1e-12))
        rows.append(f"| predict, {n:,} bins, windows of 8,192 | {name} | {1e6 * t / n:.2f} µs/spot | {base / t:.2f}x | "
                    f"max rel. deviation {dev:.1e} |")
        print(rows[-1], flush=True)
    return rows


def embed_runs(device: str, n: int, reps: int, batch: int = 64) -> list[str]:
    import numpy as np
    import spatialdata as sd
    import torch

    import spatialtranscriptformer as stf

    rows = []
    bb = stf.pp.get_backbone("resnet50", weights="random", device=device)
    tiles = np.random.default_rng(0).integers(0, 255, (batch, 224, 224, 3), dtype=np.uint8)
    x = bb.preprocess(tiles)
    ref = None
    base = None
    for name, amp, comp in [("float32", False, False), ("amp bf16", "bf16", False), ("amp fp16", "fp16", False),
                            ("compiled", False, BACKEND), ("compiled + bf16", "bf16", BACKEND)]:
        from spatialtranscriptformer._accel import autocast

        if amp == "fp16" and not _fp16_ok(device):
            continue
        fwd = bb.compiled_forward(comp)

        def run(fwd=fwd, amp=amp):
            with autocast(bb.device, amp):
                return fwd(x)

        out = run().numpy()
        ts = _timed(run, device, reps)
        ref = out if ref is None else ref
        t = statistics.median(ts)
        base = base or t
        dev = float(np.abs(out - ref).max() / (np.abs(ref).max() + 1e-12))
        rows.append(f"| resnet50 forward, batch {batch} | {name} | {batch / t:,.0f} tiles/s | {base / t:.2f}x | max rel. deviation {dev:.1e} |")
        print(rows[-1], flush=True)
    sdata = stf.datasets.her2st()
    table = sdata.tables["table"]
    idx = np.tile(np.arange(table.n_obs), int(np.ceil(n / table.n_obs)))[:n]
    sub = sd.SpatialData(images={"he": sdata.images["he"]}, tables={"table": table[idx].copy()})
    sub.tables["table"].obs_names_make_unique()
    base = None
    for name, kw in [("float32", {}), ("amp bf16", {"amp": "bf16"}), ("compiled + bf16", {"amp": "bf16", "compile": BACKEND})]:
        stf.pp.embed(sub, backbone=bb, batch_size=batch, progress=False, overwrite=True, **kw)  # warm-up
        ts = _timed(lambda kw=kw: stf.pp.embed(sub, backbone=bb, batch_size=batch, progress=False, overwrite=True, **kw),
                    device, reps)
        t = statistics.median(ts)
        base = base or t
        rows.append(f"| stf.pp.embed, {n} her2st tiles | {name} | {n / t:,.0f} tiles/s | {base / t:.2f}x | |")
        print(rows[-1], flush=True)
    del torch
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="small sizes (a CPU smoke test of the code paths)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: no codegen)")
    args = p.parse_args(argv)
    global BACKEND
    BACKEND = args.compile_backend
    import torch

    import spatialtranscriptformer as stf

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("No CUDA device available: nothing measured (run with --device cpu --quick to test the code paths).")
        return
    stf.settings.progress = False
    reps = 2 if args.quick else 5
    sizes = [256] if args.quick else [4096, 16384]
    t0 = time.perf_counter()
    rows = train_steps(args.device, sizes, reps)
    rows += fit_runs(args.device, args.quick)
    rows += predict_runs(args.device, 3000 if args.quick else 80_000, reps)
    rows += embed_runs(args.device, 16 if args.quick else 1024, reps, batch=8 if args.quick else 64)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    head = (f"## AMP and torch.compile, {name}, torch {torch.__version__}, medians of {reps} alternating repetitions "
            f"({time.perf_counter() - t0:.0f} s in all)\n\n| what | setting | time / throughput | speed-up vs float32 | "
            "memory / accuracy |\n|:---|:---|---:|---:|:---|\n")
    write_result("gpu" if args.device.startswith("cuda") else "gpu_smoke_cpu", head + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
