"""Command-line interface: ``stf fit``, ``stf predict``, ``stf evaluate``, ``stf demo``, ``stf benchmark``.

Thin wrappers over library functions (:func:`~spatialtranscriptformer.tl.fit`,
:func:`~spatialtranscriptformer.tl.predict`, :func:`~spatialtranscriptformer.tl.evaluate`, the demo and
:func:`~spatialtranscriptformer.tl.benchmark`) that read and write SpatialData zarr stores and saved model
folders. A mistake in the command line is one line on stderr and exit status 2, found before any store is
read or any model trained, and leaves no output behind; ``stf -v`` logs progress and shows tracebacks.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

_DEFAULT = " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``stf <command>: error: ...``), exit status 2."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 1 (the error names the flag)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive(text: str) -> float:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _out_folder(text: str) -> str:
    """An ``argparse`` type: an output folder (absent, or an existing folder; not a file)."""
    p = Path(text)
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
    return text


def _model_names(models: list[str]) -> list[str]:
    from .module._registry import available_models

    known = [m for m, e in available_models(details=True).iterrows() if e.family != "superres"]
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


def _fit(args: argparse.Namespace) -> int:
    from ._cli_models import run_fit

    return run_fit(args)


def _predict(args: argparse.Namespace) -> int:
    from ._cli_models import run_predict

    return run_predict(args)


def _evaluate(args: argparse.Namespace) -> int:
    from ._cli_models import run_evaluate

    return run_evaluate(args)


def _add_fit(sub) -> None:
    from ._cli_models import devices_arg, genes_arg, json_object, optional_number, validation_arg

    f = sub.add_parser(
        "fit", help="train a model on SpatialData zarr stores and save it",
        description="Train a model (stf.tl.fit) on one or more SpatialData zarr stores and save it to a folder. "
        "Options that depend on the model default to the model's own (see `stf.module.available_models(details=True)`).",
    )
    f.add_argument("data", nargs="+", help="SpatialData zarr store(s) with embeddings (obsm['X_<backbone>']) and counts; "
                   "Visium HD stores with 2 µm bins and the H&E for --model superres")
    f.add_argument("--out", required=True, help="folder to save the trained model to (its parent folder must exist)")
    f.add_argument("--overwrite", action="store_true", help="replace a model already saved in --out (default: refuse)")
    f.add_argument("--model", default="stf", help="registered model: stf, he2rna, attention_mil, transmil, ridge, "
                   "ridge_cv, superres" + _DEFAULT)
    f.add_argument("--genes", type=genes_arg, default=50,
                   help="number of most variable genes, or comma-separated gene names" + _DEFAULT)
    f.add_argument("--embedding-key", default=None,
                   help="obsm key of the embeddings (default: the only X_* key shared by the stores)")
    f.add_argument("--loss", default=None, help="loss: mse, pcc, mse_pcc, zinb, poisson (superres: poisson, mse) "
                   "(default: the model's: mse_pcc; ridge: mse; superres: poisson)")
    f.add_argument("--level", default=None, choices=["spot", "slide"],
                   help="predict per spot or one profile per slide (default: the model's first level)")
    f.add_argument("--epochs", type=_positive_int, default=30, help="training epochs" + _DEFAULT)
    f.add_argument("--lr", type=_positive, default=None, help="learning rate (default: the model's: 3e-3; superres 5e-5)")
    f.add_argument("--batch-size", type=_positive_int, default=None,
                   help="slides (superres: patches) per step (default: the model's)")
    f.add_argument("--validation", type=validation_arg, default="auto",
                   help="held-out data for early stopping: patient, slide, none, or comma-separated slide "
                   "(superres: patient) ids; auto = the model's (none; superres: the last patient)" + _DEFAULT)
    f.add_argument("--patience", type=optional_number(int, minimum=1, words=("none", "auto")), default="auto",
                   help="early-stopping patience in epochs, or none; auto = the model's (15; superres 10)" + _DEFAULT)
    f.add_argument("--seed", type=int, default=0, help="random seed" + _DEFAULT)
    g = f.add_argument_group("model options (model_kwargs)")
    g.add_argument("--interactions", nargs="+", choices=["p2p", "p2h", "h2p", "h2h", "all"], default=None,
                   help="stf: enabled attention flows (pathway/histology quadrants) (default: p2p p2h h2p, the "
                   "pathway bottleneck)")
    g.add_argument("--pathway-init", action="store_true",
                   help="stf: initialise the gene reconstructor from the gene-set membership (default: off)")
    g.add_argument("--token-dim", type=_positive_int, default=None, help="stf: transformer width (default: 64)")
    g.add_argument("--n-layers", type=_positive_int, default=None,
                   help="stf / superres: transformer layers (default: 2)")
    g.add_argument("--n-heads", type=_positive_int, default=None, help="stf / superres: attention heads (default: 4)")
    g.add_argument("--num-pathways", type=_positive_int, default=None,
                   help="stf: number of pathway tokens when they are not named by gene sets (default: one per "
                   "gene set, else 50)")
    g.add_argument("--backbone", default=None, help="superres: frozen image encoder (default: virchow2)")
    g.add_argument("--weights", default=None, help="superres: backbone weight file (default: the Hugging Face cache)")
    g.add_argument("--patch-um", type=_positive_int, default=None, help="superres: patch edge in µm (default: 256)")
    g.add_argument("--model-kwargs", type=json_object, default=None,
                   help='any other model option as a JSON object, e.g. \'{"dropout": 0.1}\' (default: none)')
    g = f.add_argument_group("training and data options (plan_kwargs, data_kwargs)")
    g.add_argument("--pathway-loss-weight", type=_non_negative, default=None,
                   help="stf: weight of the auxiliary pathway loss (default: 0.1 with gene sets)")
    g.add_argument("--pcc-weight", type=_non_negative, default=None, help="weight of the PCC term of mse_pcc (default: 1)")
    g.add_argument("--log-transform", action=argparse.BooleanOptionalAction, default=None,
                   help="train the Gaussian losses on log1p counts (default: on)")
    g.add_argument("--context-radius", type=optional_number(float, minimum=0, words=("none", "auto")), default=None,
                   help="neighbourhood context of each spot's input in grid pitches, none, or auto (default: auto: "
                   "1.5 for stf, none otherwise)")
    g.add_argument("--gene-sets", default=None,
                   help="gene sets naming the pathway tokens: hallmark, a GMT file, or none (default: hallmark)")
    g.add_argument("--layer", default=None, help="layer with raw counts, or none for X (default: counts)")
    g.add_argument("--plan-kwargs", type=json_object, default=None,
                   help="other training-plan options as a JSON object (default: none)")
    g.add_argument("--data-kwargs", type=json_object, default=None,
                   help="other data options as a JSON object (default: none)")
    g = f.add_argument_group("run")
    g.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu" + _DEFAULT)
    g.add_argument("--devices", type=devices_arg, default="auto",
                   help="number of devices or comma-separated device indices" + _DEFAULT)
    g.add_argument("--table-key", default=None, help="table of the stores (default: the only table, or 'table')")
    g.add_argument("--quiet", action="store_true", help="no progress bars (default: show them)")
    f.set_defaults(func=_fit)


def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict", help="predict a zarr store with a saved model; write a new zarr store",
        description="Predict expression (stf.tl.predict) of a SpatialData zarr store with a model saved by "
        "`stf fit` (or model.save) and write the store with the predictions to --out. Spot models write "
        "predicted expression and pathway scores into the table; a super-resolution model writes a multiscale "
        "image element of 2 µm expected counts.",
    )
    p.add_argument("data", help="SpatialData zarr store to predict (embeddings for spot models, the H&E for superres)")
    p.add_argument("--model", required=True, help="folder of a saved model")
    p.add_argument("--out", required=True, help="zarr store to write (the input with the predictions)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out store (default: refuse)")
    p.add_argument("--key-added", default=None,
                   help="key of the predictions (default: stf_pred; superres: the image element stf_superres)")
    p.add_argument("--window-spots", type=_positive_int, default=None,
                   help="spot models: predict slides larger than this in overlapping spatial windows (default: "
                   "the library's, 8192)")
    p.add_argument("--return-attention", action="store_true",
                   help="stf: also store the head-averaged attention each pathway token pays to each spot in the "
                   "last layer, as obsm['stf_attention'] (spots x pathways; plot it with stf.pl.attention(None, "
                   "data, weights=...)); slides of at most 20,000 spots (default: off)")
    p.add_argument("--table-key", default=None, help="table of the store (default: the only table, or 'table')")
    p.add_argument("--quiet", action="store_true", help="no progress bars (default: show them)")
    p.set_defaults(func=_predict)


def _add_evaluate(sub) -> None:
    e = sub.add_parser(
        "evaluate", help="score predictions against measured counts",
        description="Score predictions (stf.tl.evaluate): those stored in the zarr stores by `stf predict`, or, "
        "with --model, those of a saved model made on copies of the stores (the stores are not modified). Prints "
        "the mean Pearson r per slide (superres: masked PCC and SSIM per scale) and writes the full table with --out.",
    )
    e.add_argument("data", nargs="+", help="SpatialData zarr store(s) with measured counts")
    e.add_argument("--model", default=None, help="folder of a saved model to predict with first (default: none, "
                   "score the stored predictions)")
    e.add_argument("--features", default="genes", choices=["genes", "pathways"],
                   help="score predicted genes or pathway scores (spot models)" + _DEFAULT)
    e.add_argument("--pred-key", default="stf_pred", help="key of the stored predictions" + _DEFAULT)
    e.add_argument("--pathway-key", default="stf_pathways", help="obsm key of stored pathway scores" + _DEFAULT)
    e.add_argument("--layer", default="counts", help="layer with the measured raw counts, or none for X" + _DEFAULT)
    e.add_argument("--log-transform", action=argparse.BooleanOptionalAction, default=True,
                   help="compare on log1p counts" + _DEFAULT)
    e.add_argument("--out", default=None, help="CSV file for the full metrics table (default: none)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out file (default: refuse)")
    e.add_argument("--table-key", default=None, help="table of the stores (default: the only table, or 'table')")
    e.add_argument("--quiet", action="store_true", help="no progress bars (default: show them)")
    e.set_defaults(func=_evaluate)


def build_parser() -> argparse.ArgumentParser:
    """The ``stf`` argument parser."""
    from . import __version__

    p = _Parser(prog="stf", description="spatialtranscriptformer: expression from H&E histology.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                   help="print the version and exit")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log progress messages and show tracebacks of errors (default: off)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    _add_fit(sub)
    _add_predict(sub)
    _add_evaluate(sub)

    d = sub.add_parser("demo", help="tile, embed, fit and map the bundled her2st section",
                       description="Run the demo on the bundled her2st section (see docs).")
    d.add_argument("--out", default="stf_demo_out", type=_out_folder, help="output folder" + _DEFAULT)
    d.add_argument("--backbone", default="handcrafted", help="backbone name (handcrafted needs no weights)" + _DEFAULT)
    d.add_argument("--weights", default=None, help="backbone weight file, for backbones that need weights (default: none)")
    d.add_argument("--model", default="stf", help="model to fit" + _DEFAULT)
    d.add_argument("--genes", type=_positive_int, default=50, help="number of most variable genes" + _DEFAULT)
    d.add_argument("--epochs", type=_positive_int, default=None, help="training epochs (default: the library's, 30)")
    d.add_argument("--seed", type=int, default=0, help="random seed" + _DEFAULT)
    d.add_argument("--quiet", action="store_true", help="no progress bars (default: show them)")
    d.set_defaults(func=_demo)

    b = sub.add_parser("benchmark", help="cross-validate STF and the baselines on the same folds",
                       description="Cross-validate several models on the same folds (stf.tl.benchmark).")
    b.add_argument("--dataset", default="her2st", choices=["her2st", "synthetic"],
                   help="her2st (bundled + local sections) or synthetic slides" + _DEFAULT)
    b.add_argument("--data-dir", default=None, help="folder with her2st sections (default: stf.settings.data_dir)")
    b.add_argument("--backbone", default="handcrafted", help="backbone to embed the spots with" + _DEFAULT)
    b.add_argument("--weights", default=None, help="backbone weight file (default: none)")
    b.add_argument("--models", nargs="+", default=["stf", "ridge", "he2rna", "attention_mil", "transmil"],
                   help="registered spot models to compare" + _DEFAULT)
    b.add_argument("--genes", type=_positive_int, default=50, help="number of most variable genes" + _DEFAULT)
    b.add_argument("--groups", default="slide", choices=["patient", "slide"],
                   help="leave one patient or one slide out" + _DEFAULT)
    b.add_argument("--epochs", type=_positive_int, default=60, help="training epochs" + _DEFAULT)
    b.add_argument("--seed", type=int, default=0, help="random seed" + _DEFAULT)
    b.add_argument("--out", default="stf_benchmark_out", type=_out_folder, help="output folder" + _DEFAULT)
    b.set_defaults(func=_benchmark)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``stf`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("spatialtranscriptformer").setLevel(logging.INFO)
    from ._atomic import OutputLockedError

    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, OutputLockedError,
            ImportError) as err:
        if args.verbose:
            raise
        msg = err.args[0] if isinstance(err, KeyError) and len(err.args) == 1 else str(err)
        parser.exit(2, f"stf {args.command}: error: {' '.join(str(msg).split())}\n")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
