"""Training of the spot models (families ``"spot"`` and ``"probe"``) behind :func:`~spatialtranscriptformer.tl.fit`.

Nothing here depends on a model's name: what differs between models comes from their registry entry
(:mod:`~spatialtranscriptformer.module._registry`: family, levels, losses, pathway tokens, defaults).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from .._logging import logger
from ._model import TrainedModel
from ._resume import check_resume, run_settings


def _model_hparams(entry, model_kwargs: dict) -> tuple[dict, dict]:
    """``(hyperparameters, arrays)`` of the model: the given ``model_kwargs`` over the model's JSON-able defaults.

    Recording every default makes a saved model rebuild the same architecture whatever later versions
    change; arrays (``np.ndarray`` values) are stored as ``.npz``, the rest as JSON. Unknown keys are an error
    listing the valid ones (unless the model takes arbitrary keywords).
    """
    import inspect

    valid = entry.model_kwargs()
    target = entry.build
    try:
        import typing

        target = typing.get_type_hints(entry.build).get("return") or entry.build
    except Exception:  # noqa: BLE001
        pass
    try:
        params = inspect.signature(target).parameters.values()
        open_ended = any(p.kind == p.VAR_KEYWORD for p in params) and not valid
    except (TypeError, ValueError):
        open_ended = True
    bad = sorted(set(model_kwargs) - set(valid))
    if bad and not open_ended:
        raise ValueError(f"Model {entry.name!r} has no model_kwargs {bad}; valid: {sorted(valid)}.")

    def jsonable(v) -> bool:
        if isinstance(v, list | tuple):
            return all(jsonable(x) for x in v)
        return v is None or isinstance(v, bool | int | float | str)

    hp: dict[str, Any] = {k: list(v) if isinstance(v, tuple) else v for k, v in valid.items() if jsonable(v)}
    arrays: dict[str, np.ndarray] = {}
    for k, v in model_kwargs.items():
        (arrays if isinstance(v, np.ndarray) else hp)[k] = v
    return hp, arrays


def fit_spot(
    data,
    entry,
    *,
    genes,
    embedding_key,
    loss: str,
    level,
    validation,
    max_epochs: int,
    lr,
    batch_size,
    early_stopping_patience,
    seed: int,
    model_kwargs: dict,
    plan: dict,
    opts: dict,
    accelerator,
    devices,
    checkpoint_dir,
    resume_from,
    progress,
    table_key,
    trainer_kwargs: dict,
    compile: bool | str = False,
) -> TrainedModel:
    """Validate, prepare the slides and train a spot model (see :func:`~spatialtranscriptformer.tl.fit`)."""
    from ..train._data import build_slide_arrays, check_embeddings, check_genes, collect_slides
    from ..train._plan import DEFAULT_GRADIENT_CLIP
    from ..train._splits import split_validation
    from ._fit import default_embedding_key, pathway_sets_for
    from ._inputs import InputSpec

    model, probe = entry.name, entry.family == "probe"
    level = entry.levels[0] if level is None else level
    entry.check_level(level)
    entry.check_loss(loss)
    pathway_loss_weight = plan["pathway_loss_weight"]
    pathway_structure_weight = plan["pathway_structure_weight"]
    gene_sets = opts["gene_sets"]
    auto_pathways = pathway_loss_weight == "auto"
    if auto_pathways:
        pathway_loss_weight = entry.default("pathway_loss_weight") if (entry.pathway_tokens and gene_sets is not None) else 0.0
    pathway_init = bool(model_kwargs.get("pathway_init", False))
    if not entry.pathway_tokens:
        if pathway_loss_weight > 0 or pathway_init:
            raise ValueError(
                f"pathway_loss_weight and pathway_init apply to models with named pathway tokens (e.g. 'stf'), "
                f"not to {model!r}."
            )
        pathway_structure_weight = 0.0  # no pathway tokens
    elif level == "slide":
        pathway_structure_weight = 0.0  # one score vector per slide: no spot-wise map structure
    context_radius, output_smoothing = opts["context_radius"], opts["output_smoothing"]
    if context_radius == "auto":
        context_radius = entry.default("context_radius")
    if output_smoothing == "auto":
        output_smoothing = entry.default("output_smoothing") if level == "spot" else 0.0
    if not (0.0 <= float(output_smoothing) < 1.0):
        raise ValueError(f"output_smoothing must be in [0, 1), got {output_smoothing!r}.")
    if level == "slide" and output_smoothing > 0:
        raise ValueError("output_smoothing applies to spot-level models only.")
    input_spec = InputSpec(standardize=None if probe else opts["standardize"], context_radius=context_radius)
    if opts["gene_selection"] not in ("variance", "seurat"):
        raise ValueError(f"gene_selection must be 'variance' or 'seurat', got {opts['gene_selection']!r}.")
    if int(max_epochs) < 1:
        raise ValueError(f"max_epochs must be >= 1, got {max_epochs}.")
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if plan["monitor"] not in ("val_loss", "val_pcc"):
        raise ValueError(f"monitor must be 'val_loss' or 'val_pcc', got {plan['monitor']!r}.")
    gradient_clip_val = trainer_kwargs.get("gradient_clip_val", DEFAULT_GRADIENT_CLIP)

    from .._validate import check_fit_params, check_tables

    check_fit_params(lr=lr if not probe else 1.0, weight_decay=plan["weight_decay"], pcc_weight=plan["pcc_weight"],
                     pathway_loss_weight=pathway_loss_weight, warmup_epochs=plan["warmup_epochs"],
                     min_counts=opts["min_counts"], max_spots=opts["max_spots"], seed=seed,
                     early_stopping_patience=early_stopping_patience, gradient_clip_val=gradient_clip_val,
                     val_fraction=opts["val_fraction"])  # fmt: skip
    if pathway_structure_weight < 0:
        raise ValueError(f"pathway_structure_weight must be >= 0, got {pathway_structure_weight}.")
    hp, arrays = _model_hparams(entry, model_kwargs)
    check_tables(data, table_key=table_key, caller="fit")
    layer, log_transform, min_counts = opts["layer"], opts["log_transform"], opts["min_counts"]
    refs = collect_slides(data, slide_key=opts["slide_key"], patient_key=opts["patient_key"], table_key=table_key)
    embedding_key = embedding_key or default_embedding_key(refs)
    input_dim = check_embeddings(refs, embedding_key)
    if isinstance(genes, int | np.integer):  # on all given slides, before any validation split
        from ..pp._genes import select_top_genes

        genes = select_top_genes([r.table[r.rows] for r in refs], int(genes), layer=layer, flavor=opts["gene_selection"])
    genes = [str(g) for g in genes]
    check_genes(refs, genes)
    train_ids, val_ids = split_validation(
        [r.slide_id for r in refs], [r.patient_id for r in refs],
        validation=None if probe else validation, val_fraction=opts["val_fraction"], seed=seed,
    )
    if val_ids:
        logger.info("Validation slides: %s; training slides: %s.", val_ids, train_ids)
    if batch_size is None:
        batch_size = 1 if level == "spot" else max(1, min(8, len(train_ids)))
    batch_size = int(batch_size)
    correlating = loss in ("pcc", "mse_pcc")
    if level == "slide" and batch_size < 2 and (correlating or pathway_loss_weight > 0):
        raise ValueError(
            f"A slide-level model's correlation losses ({loss!r}{', pathway loss' if pathway_loss_weight > 0 else ''}) "
            "compare the slides of a batch: batch_size must be >= 2 (or use loss='mse' and pathway_loss_weight=0)."
        )

    pathway_sets = None
    if entry.pathway_tokens and gene_sets is not None and (pathway_loss_weight > 0 or pathway_init):
        try:
            pathway_sets = pathway_sets_for(refs, gene_sets)
        except ValueError as err:
            if not auto_pathways:
                raise
            warnings.warn(f"The pathway tokens stay unnamed (no auxiliary pathway loss): {err}", stacklevel=3)
            pathway_loss_weight = 0.0
    elif entry.pathway_tokens and gene_sets is None and (pathway_loss_weight > 0 or pathway_init):
        raise ValueError("pathway_init / pathway_loss_weight need gene sets (`data_kwargs={'gene_sets': ...}`).")
    if entry.pathway_tokens and pathway_loss_weight == 0 and gene_sets is not None and not pathway_init:
        logger.info("pathway_loss_weight=0: nothing ties the pathway tokens to gene sets; their scores are "
                    "written unnamed (token_0, ...).")
    slides = {
        r.slide_id: build_slide_arrays(
            r, embedding_key=embedding_key, genes=genes, layer=layer, loss=loss, log_transform=log_transform,
            min_counts=min_counts, pathway_sets=pathway_sets if pathway_loss_weight > 0 else None,
            pathway_zscore=level == "spot", input_spec=input_spec,
        )
        for r in refs
    }
    train = [slides[s] for s in train_ids]
    val = [slides[s] for s in val_ids]
    fit_params = {
        "embedding_key": embedding_key, "layer": layer, "loss": loss, "log_transform": log_transform,
        "pcc_weight": plan["pcc_weight"], "pathway_loss_weight": pathway_loss_weight,
        "pathway_structure_weight": pathway_structure_weight, "min_counts": min_counts,
        "train_slides": train_ids, "val_slides": val_ids, "max_epochs": max_epochs, "lr": lr,
        "weight_decay": plan["weight_decay"], "warmup_epochs": plan["warmup_epochs"], "batch_size": batch_size,
        "max_spots": opts["max_spots"], "crop": opts["crop"], "augment": opts["augment"],
        "early_stopping_patience": early_stopping_patience, "monitor": plan["monitor"],
        "gradient_clip_val": gradient_clip_val, "seed": seed, "standardize": input_spec.standardize,
        "context_radius": input_spec.context_radius, "output_smoothing": float(output_smoothing),
        "gene_selection": opts["gene_selection"],
        "gene_sets": gene_sets if isinstance(gene_sets, str | type(None)) else str(type(gene_sets).__name__),
    }  # fmt: skip
    common = {"genes": genes, "embedding_key": embedding_key, "input_dim": input_dim, "loss": loss,
              "log_transform": log_transform, "fit_params": fit_params}
    width = input_spec.width(input_dim)

    from ..module._registry import build_model

    if probe:
        kw = {**entry.defaults.get("model_kwargs", {}), **model_kwargs}
        estimator = build_model(model, width, len(genes), level=level, loss=loss, **kw)
        estimator.fit(
            np.concatenate([s.x for s in train]), np.concatenate([s.y for s in train]),
            groups=np.concatenate([np.full(s.n_spots, s.slide_id) for s in train]),
            coords=np.concatenate([s.coords for s in train]),
        )
        if getattr(estimator, "cv_scores_", None) is not None:
            logger.info("%s: alpha %.3g chosen by %s cross-validation (mean r %.3f).", model, estimator.alpha_,
                        "leave-one-slide-out" if len(train) > 1 else "spatial-block", max(estimator.cv_scores_.values()))
        return TrainedModel(estimator, model_name=model, level="spot", model_kwargs=dict(model_kwargs), **common)

    import lightning as L

    from .._settings import settings
    from ..train._plan import META_KEY, read_checkpoint, run_training

    user_arrays = arrays
    arrays = {"gene_means": np.concatenate([s.y for s in train]).mean(0).astype(np.float32)}
    pathways = None
    if pathway_sets is not None:  # membership of the *predicted* genes (zero columns allowed)
        pos = {g: i for i, g in enumerate(genes)}
        membership = np.zeros((len(genes), len(pathway_sets)), dtype=np.float32)
        for j, members in enumerate(pathway_sets.values()):
            membership[[pos[g] for g in members if g in pos], j] = 1.0
        arrays["pathway_membership"] = membership
        if pathway_loss_weight > 0:
            pathways = list(pathway_sets)
    arrays.update(user_arrays)  # arrays are stored as .npz on save, the rest as JSON
    L.seed_everything(seed, workers=True, verbose=False)
    module = build_model(model, width, len(genes), level=level, loss=loss, **hp, **arrays)
    if pathways is None and entry.pathway_tokens:
        pathways = [f"token_{i}" for i in range(module.num_pathways)]
    meta = {"model": model, "genes": genes, "embedding_key": embedding_key, "input_dim": input_dim, "loss": loss,
            "level": level, "hparams": run_settings(fit_params, hp, arrays)}
    if resume_from is not None:
        check_resume(read_checkpoint(resume_from).get(META_KEY), meta, resume_from)
    res = run_training(
        module, train, val,
        plan_kwargs={"loss": loss, "pcc_weight": plan["pcc_weight"], "pathway_loss_weight": pathway_loss_weight,
                     "pathway_structure_weight": pathway_structure_weight, "lr": lr,
                     "weight_decay": plan["weight_decay"], "warmup_epochs": plan["warmup_epochs"], "meta": meta},
        max_epochs=int(max_epochs), batch_size=batch_size, max_spots=opts["max_spots"], crop=opts["crop"],
        augment=opts["augment"], seed=seed, monitor=plan["monitor"], early_stopping_patience=early_stopping_patience,
        accelerator=accelerator, devices=devices, resume_from=resume_from, checkpoint_dir=checkpoint_dir,
        progress=settings.progress if progress is None else bool(progress), trainer_kwargs=trainer_kwargs,
        compile=compile,
    )  # fmt: skip
    module = module.cpu().eval()
    return TrainedModel(
        module, model_name=model, level=level, pathways=pathways, model_kwargs=hp, model_arrays=arrays,
        history=res["history"], best_epoch=res["best_epoch"], is_global_zero=res["is_global_zero"], **common,
    )
