"""``stf.tl.fit``: train an expression model on frozen embeddings of one or several slides."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .. import _constants as K
from .._docs import doc_params, doc_progress, doc_slides, doc_table_key
from .._logging import logger
from ._model import TrainedModel
from ._resume import check_resume, run_settings

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

ALL_INTERACTIONS = ("p2p", "p2h", "h2p", "h2h")
_LOSSES = ("mse", "pcc", "mse_pcc", "zinb", "poisson")
RIDGE_MODELS = ("ridge", "ridge_cv")
DEFAULT_CONTEXT_RADIUS = 1.5
"""Neighbourhood radius (grid pitches) of the STF's input context (:class:`~spatialtranscriptformer.tl._inputs.InputSpec`)."""
DEFAULT_OUTPUT_SMOOTHING = 0.3
"""Weight of the neighbours' mean prediction in the STF's spot predictions (``output_smoothing``)."""
DEFAULT_PATHWAY_LOSS_WEIGHT = 0.1
DEFAULT_PATHWAY_STRUCTURE_WEIGHT = 1.0
MIN_PATHWAY_GENES = 5
"""A gene set names a pathway token when at least this many of its members are measured in every slide."""


def default_embedding_key(refs) -> str:
    """The only ``obsm['X_*']`` key shared by all slides; a ``KeyError`` lists them otherwise."""
    keys = None
    for r in refs:
        ks = {k for k in r.table.obsm.keys() if k.startswith(K.EMBEDDING_PREFIX)}
        keys = ks if keys is None else keys & ks
    if not keys or len(keys) > 1:
        raise KeyError(
            f"Pass `embedding_key=`: the slides share {sorted(keys) if keys else 'no'} `obsm['X_*']` embeddings "
            "(compute one with `stf.pp.embed`)."
        )
    return next(iter(keys))


def pathway_sets_for(refs, gene_sets, *, min_genes: int = MIN_PATHWAY_GENES) -> dict[str, list[str]]:
    """The gene sets with at least ``min_genes`` members measured in *every* slide (name -> members)."""
    from ..pp._gene_sets import load_gene_sets

    sets = load_gene_sets(gene_sets)
    n_measured = {k: min(int(r.table.var_names.isin(v).sum()) for r in refs) for k, v in sets.items()}
    keep = {k: v for k, v in sets.items() if n_measured[k] >= min_genes}
    dropped = sorted(set(sets) - set(keep))
    if dropped:
        logger.info("%d of %d gene sets have fewer than %d members measured in every slide and name no token: %s",
                    len(dropped), len(sets), min_genes, dropped[:10])
    if not keep:
        raise ValueError(
            f"No gene set has >= {min_genes} members among the measured genes of every slide (best: "
            f"{max(n_measured.values())}); are var_names gene symbols? Pass other `gene_sets=` or "
            "`pathway_loss_weight=0` for unnamed tokens."
        )
    return keep


@doc_params(data=doc_slides, table_key=doc_table_key, progress=doc_progress)
def fit(
    data: AnnData | SpatialData | Sequence[AnnData | SpatialData],
    *,
    model: str = "stf",
    embedding_key: str | None = None,
    genes: int | Sequence[str] = 50,
    layer: str | None = K.COUNTS_LAYER,
    slide_key: str = K.SLIDE_KEY,
    patient_key: str = K.PATIENT_KEY,
    loss: Literal["mse", "pcc", "mse_pcc", "zinb", "poisson"] = "mse_pcc",
    log_transform: bool = True,
    pcc_weight: float = 1.0,
    pathway_loss_weight: float | Literal["auto"] = "auto",
    pathway_structure_weight: float = DEFAULT_PATHWAY_STRUCTURE_WEIGHT,
    gene_sets: str | os.PathLike | Mapping[str, Sequence[str]] | None = "hallmark",
    pathway_init: bool = False,
    interactions: Sequence[str] | str | None = None,
    level: Literal["spot", "slide"] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    validation: Literal["patient", "slide"] | Sequence[str] | None = None,
    val_fraction: float = 0.2,
    min_counts: float = 1,
    standardize: Literal["slide"] | None = "slide",
    context_radius: float | None | Literal["auto"] = "auto",
    output_smoothing: float | Literal["auto"] = "auto",
    gene_selection: Literal["variance", "seurat"] = "variance",
    max_epochs: int = 30,
    lr: float = 3e-3,
    weight_decay: float = 1e-2,
    warmup_epochs: int = 5,
    batch_size: int | None = None,
    max_spots: int | None = 4096,
    crop: Literal["spatial", "random"] = "spatial",
    augment: bool = True,
    early_stopping_patience: int | None = 15,
    monitor: Literal["val_loss", "val_pcc"] = "val_loss",
    gradient_clip_val: float | None = 1.0,
    accelerator: str = "auto",
    devices: int | str | Sequence[int] = "auto",
    strategy: str | None = None,
    seed: int = 0,
    resume_from: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
    table_key: str | None = None,
    **trainer_kwargs: Any,
) -> TrainedModel:
    """Train a model that predicts spot expression from frozen histology embeddings.

    Trains the SpatialTranscriptFormer (pathway tokens + quadrant attention, see
    :class:`~spatialtranscriptformer.module._stf.SpatialTranscriptFormer`), a registered baseline, or the
    HEST-Benchmark ridge probe (Jaume et al. 2024) with PyTorch Lightning: AdamW, linear warm-up then
    cosine decay, gradient clipping, early stopping on the validation slides and restoration of the best
    weights, dihedral augmentation of the coordinates and random spatial crops of large slides.

    Parameters
    ----------
    {data}
        Each table may hold several slides (``obs[slide_key]``).
    model
        A registered model (``"stf"``, ``"he2rna"``, ``"attention_mil"``, ``"transmil"``), ``"ridge"``, or
        ``"superres"``: the 2 µm Poisson super-resolution decoder on Visium HD slides, trained by
        :func:`~spatialtranscriptformer.tl.fit_superres` with ``genes``, ``max_epochs``, ``seed``,
        ``accelerator``, ``devices``, ``progress``, ``table_key``, ``loss`` (``"poisson"``/``"mse"``) and
        its own options passed as keywords (``backbone=``, ``weights=``, ``patch_um=``, ``gradnorm=``, ...).
    embedding_key
        ``obsm`` key of the embeddings; ``None`` uses the only ``X_*`` key shared by the slides.
    genes
        Number of most variable genes, chosen on the *training* slides only (HEST convention: variance
        of log1p counts), or a list of gene names (all must be in every slide).
    layer
        Layer with raw counts (``None``: ``X``).
    slide_key, patient_key
        ``obs`` columns with slide and patient ids (patients drive the validation split).
    loss
        ``"mse"``, ``"pcc"``, ``"mse_pcc"`` (on log1p counts when ``log_transform``), ``"zinb"`` or
        ``"poisson"`` (raw integer counts; ``log_transform`` does not apply).
    log_transform
        Train the Gaussian losses on ``log1p`` counts.
    pcc_weight
        Weight of the PCC term of ``mse_pcc``.
    pathway_loss_weight
        Weight of the auxiliary pathway loss (``"stf"``): targets are the per-slide z-scored
        log1p-CP10k expression of the model genes averaged over the members of each pathway.
    gene_sets
        Gene sets naming the pathway tokens of ``"stf"`` (``"hallmark"``, a GMT path or a dict); pathways
        without a member among the genes are dropped. ``None``: unnamed tokens.
    pathway_init
        Initialise the STF gene reconstructor from the membership matrix.
    interactions
        Enabled STF attention flows (``"p2p"``, ``"p2h"``, ``"h2p"``, ``"h2h"``).
    level
        ``"spot"`` (dense) or ``"slide"`` (one vector per slide); default: the model's first level.
    model_kwargs
        More model hyperparameters (e.g. ``token_dim``, ``n_layers``, ``dropout`` for ``"stf"``;
        ``n_components`` for ``"ridge"``).
    validation
        ``"patient"`` (hold out ``val_fraction`` of the patients; one patient -> held-out slides, logged),
        ``"slide"``, ``None`` or a list of slide ids. A single slide trains without validation (logged):
        no early stopping, the last weights are kept. With very few training slides (e.g. three sections
        of one patient), holding one out for early stopping costs a third of the data: a small model
        trained for a fixed number of epochs on all of them (``validation=None``) did better in our
        her2st leave-one-section-out study (``benchmarks/bench_her2st_accuracy.py``).
    val_fraction
        Fraction of patients / slides used for validation.
    min_counts
        Spots with fewer total counts in ``layer`` fail QC and are left out (never trained on zeros).
    standardize
        ``"slide"``: z-score each embedding feature over the spots of its own slide before the network
        (at training and prediction), which removes per-slide offsets from staining and scanning and puts
        features of any scale on one footing; ``None``: raw embeddings. The ridge probe always follows the
        HEST protocol (its own StandardScaler over the training spots).
    max_epochs, lr, weight_decay, warmup_epochs
        Optimisation (AdamW; warm-up then cosine decay per step).
    batch_size
        Slides per step (padded to the longest).
    max_spots
        Spots per slide per training step; larger slides are cropped (``crop``). Validation uses whole slides.
    crop
        ``"spatial"`` (nearest spots of a random centre) or ``"random"`` (uniform subset).
    augment
        Random flips / quarter-turns of the coordinates.
    early_stopping_patience
        Epochs without improvement of ``monitor`` before stopping (``None``: never).
    monitor
        Metric for early stopping and best-weight restoration.
    gradient_clip_val
        Gradient-norm clipping (``None``: off).
    accelerator, devices, strategy
        Lightning ``Trainer`` settings; ``strategy="ddp"`` trains on several GPUs / nodes (each process
        runs the script: save the model where ``model.is_global_zero``).
    seed
        Seed of the split, initialisation, crops and dropout (runs on CPU are reproducible).
    resume_from
        A checkpoint (e.g. ``<checkpoint_dir>/last.ckpt``) of an interrupted run with the same data and
        settings, continued to ``max_epochs``.
    checkpoint_dir
        Folder for ``best.ckpt`` / ``last.ckpt`` (kept; needed to resume). ``None``: a temporary folder.
    {progress}
    {table_key}
    **trainer_kwargs
        More :class:`lightning.pytorch.Trainer` arguments (e.g. ``precision``, ``callbacks``).

    Returns
    -------
    A :class:`~spatialtranscriptformer.tl.TrainedModel` with ``history`` (per-epoch train/val loss and val
    PCC: the mean over genes of the Pearson r across the spots of each validation slide, averaged over
    slides; for slide-level models the Pearson r across genes of the slide's mean profile).
    """
    from ..train._data import build_slide_arrays, check_embeddings, check_genes, collect_slides
    from ..train._splits import split_validation
    from ._inputs import InputSpec

    if model == "superres":  # the 2 µm Poisson super-resolution decoder: same call, its own trainer
        from ._superres import fit_superres

        kw = dict(trainer_kwargs)
        if loss in ("poisson", "mse"):
            kw.setdefault("loss", loss)
        if devices != "auto":
            kw.setdefault("devices", devices)
        return fit_superres(data, genes=genes, max_epochs=max_epochs, seed=seed, accelerator=accelerator,
                            progress=progress, table_key=table_key, **kw)
    is_ridge = model in RIDGE_MODELS
    if not is_ridge:
        from ..module._registry import get_model_entry

        entry = get_model_entry(model)
        level = entry.levels[0] if level is None else level
        if level not in entry.levels:
            raise ValueError(f"Model {model!r} supports level(s) {list(entry.levels)}, not {level!r}.")
    elif level not in (None, "spot"):
        raise ValueError("The ridge probe predicts single spots: level must be 'spot'.")
    level = level or "spot"
    if loss not in _LOSSES:
        raise ValueError(f"Unknown loss {loss!r}; valid losses: {list(_LOSSES)}.")
    if is_ridge:
        loss = "mse"  # the ridge probe is a least-squares fit
    auto_pathways = pathway_loss_weight == "auto"
    if auto_pathways:
        pathway_loss_weight = DEFAULT_PATHWAY_LOSS_WEIGHT if (model == "stf" and gene_sets is not None) else 0.0
    if model != "stf":
        if pathway_init or interactions is not None or pathway_loss_weight > 0:
            raise ValueError("pathway_init, pathway_loss_weight and interactions apply to model='stf' only.")
        pathway_structure_weight = 0.0  # no pathway tokens
    elif level == "slide":
        pathway_structure_weight = 0.0  # one score vector per slide: no spot-wise map structure
    if interactions is None:
        from ..module._stf import DEFAULT_INTERACTIONS

        interactions = DEFAULT_INTERACTIONS
    interactions = list(ALL_INTERACTIONS) if interactions == "all" else (
        [interactions] if isinstance(interactions, str) else list(interactions))
    if context_radius == "auto":
        context_radius = DEFAULT_CONTEXT_RADIUS if model == "stf" else None
    if output_smoothing == "auto":
        output_smoothing = DEFAULT_OUTPUT_SMOOTHING if model == "stf" and level == "spot" else 0.0
    if not (0.0 <= float(output_smoothing) < 1.0):
        raise ValueError(f"output_smoothing must be in [0, 1), got {output_smoothing!r}.")
    if level == "slide" and output_smoothing > 0:
        raise ValueError("output_smoothing applies to spot-level models only.")
    input_spec = InputSpec(standardize=None if is_ridge else standardize, context_radius=context_radius)
    if gene_selection not in ("variance", "seurat"):
        raise ValueError(f"gene_selection must be 'variance' or 'seurat', got {gene_selection!r}.")
    if int(max_epochs) < 1:
        raise ValueError(f"max_epochs must be >= 1, got {max_epochs}.")
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if monitor not in ("val_loss", "val_pcc"):
        raise ValueError(f"monitor must be 'val_loss' or 'val_pcc', got {monitor!r}.")

    from .._validate import check_fit_params, check_tables

    check_fit_params(lr=lr, weight_decay=weight_decay, pcc_weight=pcc_weight, pathway_loss_weight=pathway_loss_weight,
                     warmup_epochs=warmup_epochs, min_counts=min_counts, max_spots=max_spots, seed=seed,
                     early_stopping_patience=early_stopping_patience, gradient_clip_val=gradient_clip_val,
                     val_fraction=val_fraction)
    if pathway_structure_weight < 0:
        raise ValueError(f"pathway_structure_weight must be >= 0, got {pathway_structure_weight}.")
    check_tables(data, table_key=table_key, caller="fit")
    refs = collect_slides(data, slide_key=slide_key, patient_key=patient_key, table_key=table_key)
    embedding_key = embedding_key or default_embedding_key(refs)
    input_dim = check_embeddings(refs, embedding_key)
    if isinstance(genes, int | np.integer):  # on all given slides, before any validation split
        from ..pp._genes import select_top_genes

        genes = select_top_genes([r.table[r.rows] for r in refs], int(genes), layer=layer, flavor=gene_selection)
    genes = [str(g) for g in genes]
    check_genes(refs, genes)
    train_ids, val_ids = split_validation(
        [r.slide_id for r in refs], [r.patient_id for r in refs],
        validation=None if is_ridge else validation, val_fraction=val_fraction, seed=seed,
    )
    if val_ids:
        logger.info("Validation slides: %s; training slides: %s.", val_ids, train_ids)
    if batch_size is None:
        batch_size = 1 if level == "spot" else max(1, min(8, len(train_ids)))
    batch_size = int(batch_size)
    if level == "slide" and batch_size < 2 and (loss in ("pcc", "mse_pcc") or pathway_loss_weight > 0):
        raise ValueError(
            f"A slide-level model's correlation losses ({loss!r}{', pathway loss' if pathway_loss_weight > 0 else ''}) "
            "compare the slides of a batch: batch_size must be >= 2 (or use loss='mse' and pathway_loss_weight=0)."
        )

    pathway_sets = None
    if model == "stf" and gene_sets is not None and (pathway_loss_weight > 0 or pathway_init):
        try:
            pathway_sets = pathway_sets_for(refs, gene_sets)
        except ValueError as err:
            if not auto_pathways:
                raise
            import warnings

            warnings.warn(f"The pathway tokens stay unnamed (no auxiliary pathway loss): {err}", stacklevel=2)
            pathway_loss_weight = 0.0
    elif model == "stf" and gene_sets is None and (pathway_loss_weight > 0 or pathway_init):
        raise ValueError("pathway_init / pathway_loss_weight need gene sets (`gene_sets=`).")
    if model == "stf" and pathway_loss_weight == 0 and gene_sets is not None and not pathway_init:
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
        "pcc_weight": pcc_weight, "pathway_loss_weight": pathway_loss_weight,
        "pathway_structure_weight": pathway_structure_weight, "min_counts": min_counts,
        "train_slides": train_ids, "val_slides": val_ids, "max_epochs": max_epochs, "lr": lr,
        "weight_decay": weight_decay, "warmup_epochs": warmup_epochs, "batch_size": batch_size,
        "max_spots": max_spots, "crop": crop, "augment": augment, "early_stopping_patience": early_stopping_patience,
        "monitor": monitor, "gradient_clip_val": gradient_clip_val, "seed": seed, "standardize": input_spec.standardize,
        "context_radius": input_spec.context_radius, "output_smoothing": float(output_smoothing),
        "gene_selection": gene_selection,
        "gene_sets": gene_sets if isinstance(gene_sets, str | type(None)) else str(type(gene_sets).__name__),
    }
    common = {"genes": genes, "embedding_key": embedding_key, "input_dim": input_dim, "loss": loss,
              "log_transform": log_transform, "fit_params": fit_params}
    width = input_spec.width(input_dim)

    if is_ridge:
        from ..module._ridge import RidgeProbe

        kw = dict(model_kwargs or {})
        if model == "ridge_cv":
            kw.setdefault("alpha", "cv")
        probe = RidgeProbe(**kw).fit(
            np.concatenate([s.x for s in train]), np.concatenate([s.y for s in train]),
            groups=np.concatenate([np.full(s.n_spots, s.slide_id) for s in train]),
            coords=np.concatenate([s.coords for s in train]),
        )
        if probe.cv_scores_ is not None:
            logger.info("ridge_cv: alpha %.3g chosen by %s cross-validation (mean r %.3f).", probe.alpha_,
                        "leave-one-slide-out" if len(train) > 1 else "spatial-block", max(probe.cv_scores_.values()))
        return TrainedModel(probe, model_name=model, level="spot", model_kwargs=dict(model_kwargs or {}), **common)

    import lightning as L

    from .._settings import settings
    from ..module._registry import build_model
    from ..train._plan import META_KEY, read_checkpoint, run_training

    hp: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {"gene_means": np.concatenate([s.y for s in train]).mean(0).astype(np.float32)}
    pathways = None
    if model == "stf":
        hp.update(interactions=list(interactions), pathway_init=bool(pathway_init))
        if pathway_sets is not None:  # membership of the *predicted* genes (zero columns allowed)
            pos = {g: i for i, g in enumerate(genes)}
            membership = np.zeros((len(genes), len(pathway_sets)), dtype=np.float32)
            for j, members in enumerate(pathway_sets.values()):
                membership[[pos[g] for g in members if g in pos], j] = 1.0
            arrays["pathway_membership"] = membership
            if pathway_loss_weight > 0:
                pathways = list(pathway_sets)
    for k, v in dict(model_kwargs or {}).items():  # arrays are stored as .npz on save, the rest as JSON
        (arrays if isinstance(v, np.ndarray) else hp)[k] = v
    L.seed_everything(seed, workers=True, verbose=False)
    module = build_model(model, width, len(genes), level=level, loss=loss, **hp, **arrays)
    if pathways is None and model == "stf":
        pathways = [f"token_{i}" for i in range(module.num_pathways)]
    meta = {"model": model, "genes": genes, "embedding_key": embedding_key, "input_dim": input_dim, "loss": loss,
            "level": level, "hparams": run_settings(fit_params, hp, arrays)}
    if resume_from is not None:
        check_resume(read_checkpoint(resume_from).get(META_KEY), meta, resume_from)
    res = run_training(
        module, train, val,
        plan_kwargs={"loss": loss, "pcc_weight": pcc_weight, "pathway_loss_weight": pathway_loss_weight,
                     "pathway_structure_weight": pathway_structure_weight, "lr": lr,
                     "weight_decay": weight_decay, "warmup_epochs": warmup_epochs, "meta": meta},
        max_epochs=int(max_epochs), batch_size=batch_size, max_spots=max_spots, crop=crop, augment=augment,
        early_stopping_patience=early_stopping_patience, monitor=monitor, accelerator=accelerator, devices=devices,
        strategy=strategy, seed=seed, resume_from=resume_from, checkpoint_dir=checkpoint_dir,
        progress=settings.progress if progress is None else bool(progress), gradient_clip_val=gradient_clip_val,
        trainer_kwargs=trainer_kwargs,
    )
    module = module.cpu().eval()
    return TrainedModel(
        module, model_name=model, level=level, pathways=pathways, model_kwargs=hp, model_arrays=arrays,
        history=res["history"], best_epoch=res["best_epoch"], is_global_zero=res["is_global_zero"], **common,
    )
