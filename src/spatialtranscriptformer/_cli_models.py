"""What ``stf fit``, ``stf predict`` and ``stf evaluate`` do: check the arguments, read zarr stores, call the library.

Everything the command line can get wrong (paths, output folders, model names, losses, options that do not
apply to the model) is checked here before any store is read or any model trained; a failed command leaves
no output behind (every output goes through :mod:`~spatialtranscriptformer._atomic`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from . import _constants as K


class UserError(ValueError):
    """A mistake in the command line, reported as one line (exit status 2)."""


# --- argument types ------------------------------------------------------------------------------------------
def genes_arg(text: str) -> int | list[str]:
    """``--genes``: a number of most variable genes, or a comma-separated list of gene names."""
    text = text.strip()
    if text.isdigit():
        if int(text) < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
        return int(text)
    genes = [g.strip() for g in text.split(",") if g.strip()]
    if not genes:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated gene names, got {text!r}")
    return genes


def validation_arg(text: str):
    """``--validation``: auto, patient, slide, none, or a comma-separated list of slide (patient) ids."""
    low = text.strip().lower()
    if low in ("auto", "patient", "slide"):
        return low
    if low == "none":
        return None
    ids = [x.strip() for x in text.split(",") if x.strip()]
    if not ids:
        raise argparse.ArgumentTypeError(f"expected auto, patient, slide, none or a list of ids, got {text!r}")
    return ids


def optional_number(kind: type, *, minimum: float | None = None, words: tuple[str, ...] = ("none",)):
    """An ``argparse`` type: a number (>= ``minimum``) or one of ``words`` (kept as the word, see :func:`word`)."""

    def parse(text: str):
        low = text.strip().lower()
        if low in words:
            return low
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a {'whole ' if kind is int else ''}number or {' / '.join(words)}, got {text!r}"
            ) from None
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value

    return parse


def word(value):
    """A parsed option: ``"none"`` -> ``None``; anything else as it is."""
    return None if value == "none" else value


def devices_arg(text: str):
    """``--devices``: ``auto``, a number of devices, or a comma-separated list of device indices."""
    text = text.strip()
    if text == "auto":
        return text
    try:
        ids = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, a number or a list such as 0,1, got {text!r}") from None
    if any(i < 0 for i in ids) or (len(ids) == 1 and ids[0] < 1 and "," not in text):
        raise argparse.ArgumentTypeError(f"expected a positive number of devices or device indices, got {text!r}")
    return ids[0] if len(ids) == 1 and "," not in text else ids


def json_object(text: str) -> dict:
    """``--model-kwargs`` and friends: a JSON object."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"dropout\": 0.1}}', got {text!r}")
    return obj


# --- paths ---------------------------------------------------------------------------------------------------
def check_store(path: str) -> Path:
    """An existing SpatialData zarr store."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"input {path!r} does not exist")
    if not p.is_dir() or not any((p / m).is_file() for m in ("zarr.json", ".zgroup", ".zattrs")):
        raise UserError(f"input {path!r} is not a zarr store (a SpatialData written with .write() or by stf)")
    return p


def check_model_dir(path: str) -> tuple[dict, str]:
    """The configuration and kind of a saved model folder (read before any data)."""
    from .tl._base import read_config

    try:
        return read_config(path)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"--model {path!r}: {err}") from None


def check_output(path: str, *, overwrite: bool, kind: str, what: str, inputs: list[Path] = ()) -> Path:
    """An output path that can be written: its folder exists; an existing output only with ``--overwrite``."""
    from ._atomic import _is_zarr_store, saved_model_check

    p = Path(path)
    if not p.parent.is_dir():
        raise UserError(f"--out {path!r}: the folder {str(p.parent)!r} does not exist")
    if any(p.resolve() == i.resolve() for i in inputs):
        raise UserError(f"--out {path!r} is an input; write the output to another path")
    if not p.exists():
        return p
    if kind == "file":
        if p.is_dir():
            raise UserError(f"--out {path!r} is a folder; give a file name for the {what}")
    elif not p.is_dir():
        raise UserError(f"--out {path!r} exists and is not a folder")
    elif not any(p.iterdir()):
        return p
    if not overwrite:
        raise UserError(f"--out {path!r} exists; pass --overwrite to replace it")
    if kind != "file":
        why = saved_model_check(p) if kind == "model" else _is_zarr_store(p)
        if why:
            raise UserError(f"--out {path!r} {why}")
    return p


def read_stores(paths: list[Path]) -> list:
    """The SpatialData objects of zarr stores (already checked to exist)."""
    from spatialdata import read_zarr

    from ._validate import reading

    out = []
    for p in paths:
        with reading(p, "zarr store"):
            out.append(read_zarr(p))
    return out


# --- stf fit -------------------------------------------------------------------------------------------------
def fit_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`~spatialtranscriptformer.tl.fit` from the flags, checked against the model."""
    from .module._registry import get_model_entry

    try:
        entry = get_model_entry(args.model)
        if args.loss is not None:
            entry.check_loss(args.loss)
        if args.level is not None:
            entry.check_level(args.level)
    except ValueError as err:
        raise UserError(str(err)) from None
    mk = dict(args.model_kwargs or {})
    flags = {"interactions": args.interactions, "pathway_init": True if args.pathway_init else None,
             "token_dim": args.token_dim, "n_layers": args.n_layers, "n_heads": args.n_heads,
             "num_pathways": args.num_pathways, "backbone": args.backbone, "weights": args.weights,
             "patch_um": args.patch_um}  # fmt: skip
    names = {"interactions": "--interactions", "pathway_init": "--pathway-init", "token_dim": "--token-dim",
             "n_layers": "--n-layers", "n_heads": "--n-heads", "num_pathways": "--num-pathways",
             "backbone": "--backbone", "weights": "--weights", "patch_um": "--patch-um"}  # fmt: skip
    valid = entry.model_kwargs()
    for key, value in flags.items():
        if value is None:
            continue
        if key not in valid:
            raise UserError(f"{names[key]} does not apply to --model {args.model} (its options: {sorted(valid)})")
        if key in mk:
            raise UserError(f"{names[key]} and --model-kwargs both set {key!r}; give it once")
        mk[key] = value
    if mk.get("interactions") and "all" in mk["interactions"]:
        mk["interactions"] = "all"
    bad = sorted(set(mk) - set(valid))
    if bad:
        raise UserError(f"--model-kwargs: model {args.model!r} has no options {bad}; valid: {sorted(valid)}")
    plan = dict(args.plan_kwargs or {})
    if args.pathway_loss_weight is not None:
        if not entry.pathway_tokens:
            raise UserError(f"--pathway-loss-weight applies to models with pathway tokens (e.g. stf), not {args.model}")
        plan["pathway_loss_weight"] = args.pathway_loss_weight
    if args.pcc_weight is not None:
        plan["pcc_weight"] = args.pcc_weight
    data = dict(args.data_kwargs or {})
    if entry.family == "superres":
        spot_flags = [f for f, v in (("--embedding-key", args.embedding_key), ("--level", args.level),
                                      ("--context-radius", args.context_radius), ("--gene-sets", args.gene_sets),
                                      ("--layer", args.layer), ("--log-transform", args.log_transform))
                      if v is not None]  # fmt: skip
        if spot_flags:
            raise UserError(f"{', '.join(spot_flags)} do not apply to --model superres (it reads image patches)")
    else:
        for key, value in (("context_radius", args.context_radius), ("layer", args.layer),
                           ("log_transform", args.log_transform)):
            if value is not None:
                data[key] = word(value)
        if args.gene_sets is not None:
            data["gene_sets"] = None if args.gene_sets.lower() == "none" else args.gene_sets
    kw: dict[str, Any] = {
        "model": args.model, "genes": args.genes, "max_epochs": args.epochs, "seed": args.seed,
        "validation": args.validation, "early_stopping_patience": word(args.patience), "accelerator": args.accelerator,
        "devices": args.devices, "progress": not args.quiet, "table_key": args.table_key,
    }  # fmt: skip
    for key, value in (("loss", args.loss), ("lr", args.lr), ("batch_size", args.batch_size),
                       ("embedding_key", args.embedding_key), ("level", args.level)):
        if value is not None:
            kw[key] = value
    for key, value in (("model_kwargs", mk), ("plan_kwargs", plan), ("data_kwargs", data)):
        if value:
            kw[key] = value
    return kw


def run_fit(args: argparse.Namespace) -> int:
    """``stf fit``: train a model on zarr stores and save it to ``--out``."""
    stores = [check_store(p) for p in args.data]
    out = check_output(args.out, overwrite=args.overwrite, kind="model", what="model", inputs=stores)
    kw = fit_options(args)
    from . import tl

    model = tl.fit(read_stores(stores), **kw)
    if getattr(model, "is_global_zero", True):
        model.save(out, overwrite=args.overwrite)
    epochs = len(model.history) if model.history is not None else 0
    print(f"Trained {model!r}: {len(model.genes)} genes, {epochs} epochs"
          + (f", best epoch {model.best_epoch}" if model.best_epoch is not None else ""))
    print(f"Model saved to {out}")
    return 0


# --- stf predict ---------------------------------------------------------------------------------------------
def run_predict(args: argparse.Namespace) -> int:
    """``stf predict``: predict a zarr store with a saved model and write the result as a new zarr store."""
    (store,) = [check_store(args.data)]
    cfg, kind = check_model_dir(args.model)
    out = check_output(args.out, overwrite=args.overwrite, kind="zarr", what="store", inputs=[store])
    if args.return_attention and (kind != "spot" or not cfg.get("pathways") or cfg.get("level") != "spot"):
        raise UserError(f"--return-attention needs a spot-level model with pathway tokens (e.g. stf); {args.model!r} "
                        f"is a {cfg.get('model')!r} model{' without pathway tokens' if kind == 'spot' else ''}")
    if kind == "superres" and args.window_spots is not None:
        raise UserError("--window-spots applies to spot models, not to a super-resolution model")
    import tempfile

    from . import tl
    from ._atomic import write_spatialdata
    from ._data import get_table

    (sdata,) = read_stores([store])
    model = tl.BaseModel.load(args.model)
    if args.return_attention:
        from .pl._attention import MAX_ATTENTION_SPOTS

        n = get_table(sdata, args.table_key).n_obs
        if n > MAX_ATTENTION_SPOTS:
            raise UserError(f"--return-attention: the slide has {n} spots; explicit attention maps are computed for "
                            f"at most {MAX_ATTENTION_SPOTS} (O((P + S)^2) memory per layer)")
    key = args.key_added or (K.SUPERRES_KEY if kind == "superres" else K.PRED_KEY)
    if kind == "superres":  # the levels are streamed into a scratch store, then copied into the output store
        with tempfile.TemporaryDirectory(prefix="stf_predict_") as tmp:
            tl.predict_superres(sdata, model, key_added=key, store=Path(tmp) / "levels.zarr", table_key=args.table_key,
                                progress=not args.quiet)
            get_table(sdata, args.table_key).uns[key]["params"]["store"] = str(out)  # where the levels will live
            write_spatialdata(sdata, out, overwrite=args.overwrite)
    else:
        extra = {} if args.window_spots is None else {"window_spots": args.window_spots}
        tl.predict(sdata, model, key_added=key, table_key=args.table_key, progress=not args.quiet, **extra)
        if args.return_attention:
            store_attention(sdata, model, table_key=args.table_key)
        write_spatialdata(sdata, out, overwrite=args.overwrite)
    what = f"2 µm expected counts of {len(model.genes)} genes (image element {key!r})" if kind == "superres" else (
        f"predictions of {len(model.genes)} genes (key {key!r})"
        + (f" and the pathway attention (obsm[{K.ATTENTION_KEY!r}])" if args.return_attention else ""))
    print(f"Wrote {what} to {out}")
    return 0


def store_attention(sdata, model, *, table_key: str | None) -> None:
    """``obsm['stf_attention']``: the head-averaged attention each pathway token pays to each spot (last layer).

    In the SpatialTranscriptFormer the pathway tokens query the spots (the P→H flow); this is what
    :func:`~spatialtranscriptformer.pl.attention` draws, stored so that it can be plotted later without the
    model (``stf.pl.attention(None, sdata, weights=table.obsm["stf_attention"])``).
    """
    from ._data import get_table
    from .pl._attention import attention_frame, model_attention

    table = get_table(sdata, table_key)
    maps = model_attention(model, table)
    table.obsm[K.ATTENTION_KEY] = attention_frame(maps, n_spots=table.n_obs, obs_names=table.obs_names, layer=-1,
                                                  names=model.pathways)
    table.uns[K.ATTENTION_KEY] = {"params": {"layer": "last", "heads": "mean", "model": model.model_name}}


# --- stf evaluate --------------------------------------------------------------------------------------------
def run_evaluate(args: argparse.Namespace) -> int:
    """``stf evaluate``: score predictions stored in zarr stores (or made by ``--model`` on copies)."""
    import pandas as pd

    stores = [check_store(p) for p in args.data]
    kind = None
    if args.model is not None:
        _, kind = check_model_dir(args.model)
    out = None
    if args.out is not None:
        out = check_output(args.out, overwrite=args.overwrite, kind="file", what="metrics table", inputs=stores)
    if kind == "superres" and args.features != "genes":
        raise UserError("--features pathways applies to spot models; a super-resolution model is scored per gene")
    from . import tl
    from ._atomic import atomic_output

    slides = read_stores(stores)
    data = slides[0] if len(slides) == 1 else slides
    if kind == "superres":
        res = tl.BaseModel.load(args.model).evaluate(data, table_key=args.table_key, progress=not args.quiet)
        summary = res.groupby("scale_um")[["pcc", "ssim"]].mean()
        print("Mean masked PCC and SSIM over genes, per scale (µm):")
        print(summary.to_string(float_format=lambda v: f"{v:.3f}"))
    else:
        kw = {"features": args.features, "true_layer": None if args.layer == "none" else args.layer,
              "log_transform": args.log_transform, "table_key": args.table_key}
        if args.model is not None:
            res = tl.evaluate(data, model=args.model, **kw)
        else:
            res = tl.evaluate(data, pred_key=args.pred_key, pathway_key=args.pathway_key, **kw)
        col = "gene" if args.features == "genes" else "pathway"
        spot = res["level"] == "spot" if "level" in res else None
        rows = res[spot] if spot is not None and spot.any() else res
        summary = rows.groupby("slide")["pearson"].agg(["mean", "count"]).rename(
            columns={"mean": "mean_pearson", "count": f"n_{col}s"})
        print(f"Mean Pearson r per slide ({args.features}; collapsed predictions count as 0):")
        print(summary.to_string(float_format=lambda v: f"{v:.3f}"))
    if out is not None:
        with atomic_output(out, overwrite=args.overwrite) as tmp:
            pd.DataFrame(res).to_csv(tmp, index=False)
        print(f"Metrics written to {out}")
    return 0
