"""One training step of the default SpatialTranscriptFormer on CPU: time and peak memory increase.

Default model (token_dim 256, 4 heads, 50 pathways, 2 layers, 768-d input, dense level, mse_pcc loss,
50 genes), one slide of S spots on a 100 µm grid, forward + backward + AdamW. Each configuration runs in
a fresh subprocess; memory is the increase of the process's peak RSS (``ru_maxrss``) over the steps,
measured after a 64-spot step has created the optimiser state and gradients (the increase including
that one-time initialisation is reported too). Time is the median of ``--steps`` steps after
``--warmup`` warm-up steps, as wall clock and as process CPU time (on a shared machine the CPU time of a
1-thread run is the better estimate of the uncontended wall time).

Variants: ``full`` (all four flows), ``h2h-off`` (pathway bottleneck), ``full-ckpt`` (``full`` with
activation checkpointing), ``full-no-dropout`` and ``naive`` (the same model run through the explicit
dense-mask path, a (P+S)^2 mask and score matrix per layer, as in the published implementation).

With ``--reference PATH`` (a local checkout of the published implementation,
``BenjaminIsaac0111/SpatialTranscriptFormer``; skipped when absent) its model is timed the same way with
the same tokens, layers and width: 50 pathway tokens, token_dim 256, 4 heads, 2 layers, dropout 0.1,
dense output, MSE on the 50 pathway scores, AdamW; its image projection takes the same 768-d
embeddings and its (unused) image backbone is removed. ``ref`` runs it as published (attention-probability
dropout 0.1, which forces the dense math attention kernel on CPU), ``ref-no-attn-dropout`` the fair
reference (attention dropout 0; residual and feed-forward dropout kept). Its ``nystrom_attention``
import (TransMIL only) is stubbed. Configurations alternate size by size and round by round
(``--rounds``); medians are reported, and ratios to ``ref-no-attn-dropout``.

Usage::

    python benchmarks/bench_stf_step.py              # the table of the issue
    python benchmarks/bench_stf_step.py --reference /tmp/ref --variants full,full-ckpt,h2h-off --rounds 3
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
ALL = ("p2p", "p2h", "h2p", "h2h")
VARIANTS = {"full": ALL, "h2h-off": ("p2p", "p2h", "h2p"), "full-ckpt": ALL, "full-no-dropout": ALL, "naive": ALL,
            "ref": None, "ref-no-attn-dropout": None}
REF_VARIANTS = ("ref", "ref-no-attn-dropout")
BEFORE = " (before)"


def _rss_peak_mb() -> float:
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def reference_model(path: str, genes: int):
    """The published model with our input width and without its image backbone (see the module doc)."""
    import types

    import torch

    sys.modules.setdefault("nystrom_attention", types.SimpleNamespace(NystromAttention=None))  # TransMIL only
    sys.path.insert(0, str(Path(path) / "src"))
    from spatial_transcript_former.models import interaction

    interaction.get_backbone = lambda name, pretrained=True: (torch.nn.Identity(), 768)  # embeddings in, no CNN
    return interaction.SpatialTranscriptFormer(num_pathways=genes, backbone_name="none", pretrained=False,
                                               token_dim=256, n_heads=4, n_layers=2, dropout=0.1, use_spatial_pe=True)


def _rss_now_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return _rss_peak_mb()


def _reset_peak() -> float:
    """Return freed heap memory to the OS and restart the peak RSS (Linux); the current RSS in MB."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _rss_now_mb()


def _peak_since_reset_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return _rss_peak_mb()


def worker(S: int, variant: str, *, threads: int, warmup: int, steps: int, genes: int,
           reference: str | None = None) -> dict:
    import torch

    from spatialtranscriptformer.module._losses import compute_loss
    from spatialtranscriptformer.module._stf import SpatialTranscriptFormer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    explicit = variant == "naive"
    if variant in REF_VARIANTS:
        model = reference_model(reference, genes).train()
        if variant == "ref-no-attn-dropout":
            for layer in model.fusion_engine.layers:
                layer.self_attn.dropout = 0.0
    else:
        kw = {"dropout": 0.0} if variant == "full-no-dropout" else {}
        if variant == "full-ckpt":
            kw["activation_checkpointing"] = True
        model = SpatialTranscriptFormer(768, genes, interactions=VARIANTS[variant], loss="mse_pcc", level="spot",
                                        **kw).train()
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
        if variant in REF_VARIANTS:
            pred = model(b["x"], b["coords"], None, return_dense=True)
            loss = torch.nn.functional.mse_loss(pred, b["y"])
        else:
            out = model(b["x"], b["coords"], b["mask"], return_attention=explicit)
            loss, _ = compute_loss(out, b, loss="mse_pcc")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        cpu.append(time.process_time() - c0)
        return time.perf_counter() - t0

    base_cold = _reset_peak()
    step(small)  # one-time costs: AdamW state, gradients, thread pools and kernel scratch
    cold_peak = _peak_since_reset_mb()
    base_warm = _reset_peak()
    times = [step(batch) for _ in range(warmup + steps)][warmup:]
    peak = _peak_since_reset_mb()
    return {
        "S": S,
        "variant": variant,
        "threads": threads,
        "genes": genes,
        "time_s": statistics.median(times),
        "cpu_s": statistics.median(cpu[1 + warmup :]),
        "mem_increase_mb": peak - base_warm,
        "mem_increase_cold_mb": max(peak, cold_peak) - base_cold,
        "steps": steps,
        "loadavg": os.getloadavg()[0],
    }


def run_config(S: int, variant: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    if args.malloc == "live":  # every large block mmapped and unmapped when freed: RSS = live memory
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    if variant.endswith(BEFORE):  # another checkout's code (e.g. before a change): its src first on the path
        env["PYTHONPATH"] = os.pathsep.join([args.baseline_src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        variant = variant[: -len(BEFORE)]
    cmd = [sys.executable, __file__, "--worker", "--sizes", str(S), "--variants", variant]
    cmd += ["--threads", str(args.threads), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    cmd += ["--genes", str(args.genes)]
    if args.reference:
        cmd += ["--reference", args.reference]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"S={S} {variant} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    """Medians over rounds per (S, variant), with ratios to the fair reference of the same S when present."""
    lines = [
        "| S | variant | wall time / step (s) | CPU time / step (s) | peak memory increase (MB) "
        "| incl. one-time init (MB) | CPU time / fair ref | memory / fair ref |",
        "|---:|:---|---:|---:|---:|---:|---:|---:|",
    ]
    keys = list(dict.fromkeys((r["S"], r["variant"]) for r in rows))
    med = {}
    for k in keys:
        rs = [r for r in rows if (r["S"], r["variant"]) == k]
        med[k] = {f: statistics.median(r[f] for r in rs) for f in ("time_s", "cpu_s", "mem_increase_mb", "mem_increase_cold_mb")}
    for S, v in keys:
        m = med[(S, v)]
        ref = med.get((S, "ref-no-attn-dropout"))
        ratio = (f"{m['cpu_s'] / ref['cpu_s']:.2f} | {m['mem_increase_mb'] / max(ref['mem_increase_mb'], 1e-9):.2f}"
                 if ref else "– | –")
        lines.append(f"| {S:,} | {v} | {m['time_s']:.2f} | {m['cpu_s']:.2f} | {m['mem_increase_mb']:.0f} | "
                     f"{m['mem_increase_cold_mb']:.0f} | {ratio} |")
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
    p.add_argument("--rounds", type=int, default=1, help="alternating repetitions of every configuration")
    p.add_argument("--reference", default=None,
                   help="local checkout of BenjaminIsaac0111/SpatialTranscriptFormer (skipped when absent)")
    p.add_argument("--ref-sizes", default=None, help="sizes for 'ref' with attention dropout (default: --sizes)")
    p.add_argument("--malloc", choices=("live", "default"), default="live",
                   help="'live': fixed glibc mmap threshold so RSS follows live memory (default); 'default': as is")
    p.add_argument("--baseline-src", default=None,
                   help="src folder of another checkout: its 'full' variant runs too, labelled '(before)'")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v.removesuffix(BEFORE) not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {list(VARIANTS)}")
    if args.worker:
        r = worker(sizes[0], variants[0], threads=args.threads, warmup=args.warmup, steps=args.steps,
                   genes=args.genes, reference=args.reference)
        print(json.dumps(r))
        return
    if args.reference and not (Path(args.reference) / "src" / "spatial_transcript_former").is_dir():
        print(f"--reference {args.reference}: no checkout of the published implementation there; skipped.")
        args.reference = None
    configs = [(S, v) for S in sizes for v in variants]
    if args.baseline_src:
        configs = [c for S in sizes for c in [(S, "full" + BEFORE)] + [(S_, v) for S_, v in configs if S_ == S]]
    configs += [(int(S), "naive") for S in args.naive_sizes.split(",") if S]
    if args.reference:
        ref_sizes = sizes if args.ref_sizes is None else [int(S) for S in args.ref_sizes.split(",") if S]
        for S in sizes:  # interleave the reference with ours, size by size
            at = max(i for i, (s_, _) in enumerate(configs) if s_ == S) + 1 if any(s_ == S for s_, _ in configs) else len(configs)
            refs = [(S, "ref-no-attn-dropout")] + ([(S, "ref")] if S in ref_sizes else [])
            configs[at:at] = refs
    rows = []
    for _ in range(args.rounds):
        for S, v in configs:
            rows.append(run_config(S, v, args))
            rows[-1]["variant"] = v
            print(f"S={S:>6} {v:20s} {rows[-1]['time_s']:.2f} s (CPU {rows[-1]['cpu_s']:.2f} s)  "
                  f"+{rows[-1]['mem_increase_mb']:.0f} MB", flush=True)
    header = (
        f"STF training step (D=256, 4 heads, P=50, 2 layers, 768-d input, dense, mse_pcc, {args.genes} genes, "
        f"AdamW), CPU, {args.threads} thread(s), median of {args.steps} steps after {args.warmup} warm-up, "
        f"{args.rounds} alternating round(s); "
        f"memory = peak RSS increase in a fresh process over the steps (Linux VmHWM, reset after "
        "malloc_trim), after a 64-spot step that creates the AdamW state (next column: from before that step); "
        f"glibc malloc: {args.malloc} ('live': MALLOC_MMAP_THRESHOLD_=65536, so freed blocks leave RSS and it follows "
        "live memory; with the default dynamic threshold, RSS also holds freed heap blocks). "
        f"Host: {os.cpu_count()} CPUs, load average {max(r['loadavg'] for r in rows):.1f} at most during the runs."
    )
    md = header + "\n\n" + table(rows) + "\n"
    print("\n" + md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "stf_step.md").write_text(md)
    (RESULTS / "stf_step.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
