"""Command-line interface: ``stf demo``, ``stf benchmark`` (thin wrappers over library functions)."""

from __future__ import annotations

import argparse
import logging
import sys


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    metrics = run_demo(args.out, backbone=args.backbone, weights=args.weights, model=args.model,
                       n_genes=args.genes, max_epochs=args.epochs, seed=args.seed, progress=not args.quiet)
    summary = metrics.groupby("model")["pearson"].agg(["mean", "median", "count"])
    print(f"Held-out region, per-gene Pearson r (top-{args.genes} variable genes):")
    print(summary.round(3).to_string())
    print(f"Outputs written to {args.out}")
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    from ._benchmark_cli import run_benchmark

    table = run_benchmark(dataset=args.dataset, backbone=args.backbone, weights=args.weights, models=args.models,
                          genes=args.genes, groups=args.groups, out=args.out, data_dir=args.data_dir,
                          max_epochs=args.epochs, seed=args.seed)
    print(table.to_string())
    print(f"Results written to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``stf`` argument parser."""
    p = argparse.ArgumentParser(prog="stf", description="spatialtranscriptformer: expression from H&E histology.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="tile, embed, fit and map the bundled her2st section")
    d.add_argument("--out", default="stf_demo_out", help="output folder (default: stf_demo_out)")
    d.add_argument("--backbone", default="handcrafted", help="backbone name (default: handcrafted, no weights)")
    d.add_argument("--weights", default=None, help="backbone weight file (for backbones that need weights)")
    d.add_argument("--model", default="stf", help="model to fit (default: stf)")
    d.add_argument("--genes", type=int, default=50, help="number of most variable genes (default: 50)")
    d.add_argument("--epochs", type=int, default=60, help="training epochs (default: 60)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=_demo)

    b = sub.add_parser("benchmark", help="cross-validate STF and the baselines on the same folds")
    b.add_argument("--dataset", default="her2st", help="her2st (bundled + local sections) or synthetic")
    b.add_argument("--data-dir", default=None, help="folder with her2st sections (default: settings.data_dir)")
    b.add_argument("--backbone", default="handcrafted")
    b.add_argument("--weights", default=None)
    b.add_argument("--models", nargs="+", default=["stf", "ridge", "he2rna", "attention_mil", "transmil"])
    b.add_argument("--genes", type=int, default=50)
    b.add_argument("--groups", default="slide", choices=["patient", "slide"])
    b.add_argument("--epochs", type=int, default=60)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", default="stf_benchmark_out")
    b.set_defaults(func=_benchmark)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``stf`` console script."""
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("spatialtranscriptformer").setLevel(logging.INFO)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
