"""Command-line interface: ``stf demo``, ``stf benchmark`` (thin wrappers over library functions)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _positive_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 1 (the error names the flag)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _out_folder(text: str) -> str:
    """An ``argparse`` type: an output folder (absent, or an existing folder; not a file)."""
    p = Path(text)
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
    return text


def _model_names(models: list[str]) -> list[str]:
    from .module._registry import available_models

    known = ["ridge", *available_models()]
    bad = [m for m in models if m not in known]
    if bad:
        raise SystemExit(f"stf benchmark: error: argument --models: unknown model(s) {bad}; choose from {known}")
    return models


def _demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    metrics = run_demo(args.out, backbone=args.backbone, weights=args.weights, model=args.model,
                       n_genes=args.genes, max_epochs=args.epochs, seed=args.seed, progress=not args.quiet)
    info = metrics.attrs["summary"]
    print(f"Held-out region ({info['held_out_spots']} spots), per-gene Pearson r of the top-{args.genes} variable "
          "genes of the training spots:")
    for name, m in info["models"].items():
        line = f"  {name:10s} mean r {m['mean_pearson_held_out']:.3f}"
        if "pathway_pearson_held_out" in m:
            line += (f"; {m['n_pathways']} named pathway maps, mean r {m['pathway_pearson_held_out']:.3f}, "
                     f"collapse index {m['pathway_collapse_index']:.2f} (measured {m['measured_pathway_collapse_index']:.2f})")
        print(line)
    print(info["verdict"])
    print(f"Outputs written to {args.out}")
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    from ._benchmark_cli import run_benchmark

    _model_names(args.models)
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
    d.add_argument("--out", default="stf_demo_out", type=_out_folder, help="output folder (default: stf_demo_out)")
    d.add_argument("--backbone", default="handcrafted", help="backbone name (default: handcrafted, no weights)")
    d.add_argument("--weights", default=None, help="backbone weight file (for backbones that need weights)")
    d.add_argument("--model", default="stf", help="model to fit (default: stf)")
    d.add_argument("--genes", type=_positive_int, default=50, help="number of most variable genes (default: 50)")
    d.add_argument("--epochs", type=_positive_int, default=None,
                   help="training epochs (default: the library's, 30)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=_demo)

    b = sub.add_parser("benchmark", help="cross-validate STF and the baselines on the same folds")
    b.add_argument("--dataset", default="her2st", choices=["her2st", "synthetic"],
                   help="her2st (bundled + local sections) or synthetic")
    b.add_argument("--data-dir", default=None, help="folder with her2st sections (default: settings.data_dir)")
    b.add_argument("--backbone", default="handcrafted")
    b.add_argument("--weights", default=None)
    b.add_argument("--models", nargs="+", default=["stf", "ridge", "he2rna", "attention_mil", "transmil"])
    b.add_argument("--genes", type=_positive_int, default=50)
    b.add_argument("--groups", default="slide", choices=["patient", "slide"])
    b.add_argument("--epochs", type=_positive_int, default=60)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", default="stf_benchmark_out", type=_out_folder)
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
