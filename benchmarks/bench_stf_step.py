"""One training step of the default SpatialTranscriptFormer on CPU: time and peak memory increase.

Default model (token_dim 256, 4 heads, 50 pathways, 2 layers, 768-d input, dense level, mse_pcc loss,
50 genes), one slide of S spots on a 100 µm grid, forward + backward + AdamW. Each configuration runs in
a fresh subprocess; memory is the increase of the process's peak RSS (``ru_maxrss``) over the steps,
measured after a 64-spot step has created the optimiser state and gradients (the increase including
that one-time initialisation is reported too). Time is the median of ``--steps`` steps after
``--warmup`` warm-up steps, as wall clock and as process CPU time (on a shared machine the CPU time of a
1-thread run is the better estimate of the uncontended wall time).

Variants: ``full`` (all four flows), ``h2h-off`` (pathway bottleneck) and ``naive`` (the same model run
through the explicit dense-mask path, a (P+S)^2 mask and score matrix per layer, as in the published
implementation).

Usage::

    python benchmarks/bench_stf_step.py              # the table of the issue
    python benchmarks/bench_stf_step.py --sizes 1024 --variants full --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {"full": ("p2p", "p2h", "h2p", "h2h"), "h2h-off": ("p2p", "p2h", "h2p"), "naive": None}


def _rss_peak_mb() -> float:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def worker(S: int, variant: str, *, threads: int, warmup: int, steps: int, genes: int) -> dict:
    import torch

    from spatialtranscriptformer.module._losses import compute_loss
    from spatialtranscriptformer.module._stf import SpatialTranscriptFormer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    interactions = VARIANTS[variant] or VARIANTS["full"]
    explicit = variant == "naive"
    model = SpatialTranscriptFormer(
        768, genes, interactions=interactions, loss="mse_pcc", level="spot"
    ).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    side = int(S**0.5) + 1
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(
        -1, 2
    )
    batch = {
        "x": torch.randn(1, S, 768),
        "coords": grid[:S].float().unsqueeze(0) * 100.0,
        "mask": torch.ones(1, S, dtype=torch.bool),
        "y": torch.randn(1, S, genes),
    }

    small = {k: v[:, :64] for k, v in batch.items()}

    cpu: list[float] = []

    def step(b: dict) -> float:
        c0, t0 = time.process_time(), time.perf_counter()
        out = model(b["x"], b["coords"], b["mask"], return_attention=explicit)
        loss, _ = compute_loss(out, b, loss="mse_pcc")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        cpu.append(time.process_time() - c0)
        return time.perf_counter() - t0

    base_cold = _rss_peak_mb()
    step(small)  # one-time costs: AdamW state, gradients, thread pools and kernel scratch
    base_warm = _rss_peak_mb()
    times = [step(batch) for _ in range(warmup + steps)][warmup:]
    peak = _rss_peak_mb()
    return {
        "S": S,
        "variant": variant,
        "threads": threads,
        "genes": genes,
        "time_s": statistics.median(times),
        "cpu_s": statistics.median(cpu[1 + warmup :]),
        "mem_increase_mb": peak - base_warm,
        "mem_increase_cold_mb": peak - base_cold,
        "steps": steps,
        "loadavg": os.getloadavg()[0],
    }


def run_config(S: int, variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--sizes", str(S), "--variants", variant]
    cmd += ["--threads", str(args.threads), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    cmd += ["--genes", str(args.genes)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"S={S} {variant} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = [
        "| S | variant | wall time / step (s) | CPU time / step (s) | peak memory increase (MB) "
        "| incl. one-time init (MB) |",
        "|---:|:---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['S']:,} | {r['variant']} | {r['time_s']:.2f} | {r['cpu_s']:.2f} | {r['mem_increase_mb']:.0f} | {r['mem_increase_cold_mb']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1024,4096,16384")
    p.add_argument("--variants", default="full,h2h-off")
    p.add_argument("--naive-sizes", default="4096", help="sizes for the dense-mask reference ('' for none)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--genes", type=int, default=50)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {list(VARIANTS)}")
    if args.worker:
        r = worker(
            sizes[0],
            variants[0],
            threads=args.threads,
            warmup=args.warmup,
            steps=args.steps,
            genes=args.genes,
        )
        print(json.dumps(r))
        return
    configs = [(S, v) for S in sizes for v in variants]
    configs += [(int(S), "naive") for S in args.naive_sizes.split(",") if S]
    rows = []
    for S, v in configs:
        rows.append(run_config(S, v, args))
        print(
            f"S={S:>6} {v:8s} {rows[-1]['time_s']:.2f} s  +{rows[-1]['mem_increase_mb']:.0f} MB", flush=True
        )
    header = (
        f"STF training step (D=256, 4 heads, P=50, 2 layers, 768-d input, dense, mse_pcc, {args.genes} genes, "
        f"AdamW), CPU, {args.threads} thread(s), median of {args.steps} steps after {args.warmup} warm-up; "
        f"memory = peak RSS increase in a fresh process over the "
        "steps, after a 64-spot step that creates the AdamW state (last column: from before that step). "
        f"Host: {os.cpu_count()} CPUs, load average {max(r['loadavg'] for r in rows):.1f} at most during the runs."
    )
    md = header + "\n\n" + table(rows) + "\n"
    print("\n" + md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "stf_step.md").write_text(md)
    (RESULTS / "stf_step.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
