"""``stf.tl.fit``: train any registered model (spot models on embeddings, or the 2 µm super-resolution model)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from .. import _constants as K
from .._docs import doc_params, doc_progress, doc_slides, doc_table_key, doc_train, doc_trainer_kwargs
from .._logging import logger
from ._options import GROUPS, SPOT_LEGACY, group, route_legacy

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from ._base import BaseModel

MIN_PATHWAY_GENES = 5
"""A gene set names a pathway token when at least this many of its members are measured in every slide."""
_SPOT_ONLY = ("embedding_key", "level", "resume_from")


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
            f"{max(n_measured.values())}); are var_names gene symbols? Pass other `data_kwargs={{'gene_sets': ...}}` "
            "or `plan_kwargs={'pathway_loss_weight': 0}` for unnamed tokens."
        )
    return keep


@doc_params(data=doc_slides, table_key=doc_table_key, progress=doc_progress, train=doc_train,
            trainer_kwargs=doc_trainer_kwargs)
def fit(
    data: AnnData | SpatialData | Sequence[AnnData | SpatialData],
    *,
    model: str = "stf",
    genes: int | Sequence[str] = 50,
    embedding_key: str | None = None,
    loss: str | None = None,
    level: Literal["spot", "slide"] | None = None,
    validation: Literal["patient", "slide", "auto"] | Sequence[str] | None = "auto",
    max_epochs: int = 30,
    lr: float | None = None,
    batch_size: int | None = None,
    early_stopping_patience: int | None | Literal["auto"] = "auto",
    seed: int = 0,
    model_kwargs: Mapping[str, Any] | None = None,
    plan_kwargs: Mapping[str, Any] | None = None,
    data_kwargs: Mapping[str, Any] | None = None,
    accelerator: str = "auto",
    devices: int | str | Sequence[int] = "auto",
    amp: bool | str = False,
    compile: bool | str = False,
    checkpoint_dir: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
    progress: bool | None = None,
    table_key: str | None = None,
    **trainer_kwargs: Any,
) -> BaseModel:
    """Train a model that predicts expression from histology.

    Every model of the registry (:func:`stf.module.available_models <spatialtranscriptformer.module.available_models>`)
    is trained by this one call: the SpatialTranscriptFormer (pathway tokens + quadrant attention, see
    :class:`~spatialtranscriptformer.module.SpatialTranscriptFormer`) and the baselines on frozen spot
    embeddings (PyTorch Lightning: AdamW, linear warm-up then cosine decay, gradient clipping, early stopping
    and restoration of the best weights when there are validation slides, dihedral augmentation of the
    coordinates and random spatial crops of large slides), the HEST-Benchmark ridge probes (Jaume et al.
    2024), and ``"superres"``, the 2 µm decoder on Visium HD slides
    (:func:`~spatialtranscriptformer.tl.fit_superres`, which receives every argument).

    Defaults that depend on the model (``None`` / ``"auto"`` above):

    =========================== ======================== ================ ==================
    option                      spot models (``"stf"``)  ridge probes     ``"superres"``
    =========================== ======================== ================ ==================
    ``loss``                    ``"mse_pcc"``            ``"mse"``        ``"poisson"``
    ``lr``                      3e-3                     –                5e-5
    ``batch_size``              1 slide (8 slide-level)  –                8 patches
    ``validation``              ``None``                 ``None``         ``"patient"``
    ``early_stopping_patience`` 15                       –                10
    =========================== ======================== ================ ==================

    Parameters
    ----------
    {data}
        Each table may hold several slides (``obs[slide_key]``).
    model
        A registered model: ``"stf"``, ``"he2rna"``, ``"attention_mil"``, ``"transmil"``, ``"ridge"``,
        ``"ridge_cv"``, ``"superres"``, or one registered with
        :func:`~spatialtranscriptformer.module.register_model`.
    genes
        Number of most variable genes, chosen on all given slides before any validation split (HEST
        convention: variance of log1p counts), or a list of gene names (all must be in every slide).
    embedding_key
        ``obsm`` key of the embeddings; ``None`` uses the only ``X_*`` key shared by the slides (spot models).
    loss
        A loss of the table (:func:`~spatialtranscriptformer.module.available_losses`): ``"mse"``, ``"pcc"``,
        ``"mse_pcc"`` (on log1p counts when ``log_transform``), ``"zinb"``, ``"poisson"`` (raw integer counts)
        or a registered one; ``None``: the model's default.
    level
        ``"spot"`` (dense) or ``"slide"`` (one vector per slide); default: the model's first level.
    validation
        ``"patient"`` (hold out ``val_fraction`` of the patients; one patient -> held-out slides, logged),
        ``"slide"``, ``None`` or a list of slide (super-resolution: patient) ids; ``"auto"``: the model's
        default. A single slide trains without validation (logged): no early stopping, the last weights are
        kept. With very few training slides (e.g. three sections of one patient), holding one out for early
        stopping costs a third of the data: a small model trained for a fixed number of epochs on all of them
        (``validation=None``) did better in our her2st leave-one-section-out study
        (``benchmarks/bench_her2st_accuracy.py``).
    {train}
    amp
        Mixed precision: ``True`` / ``"bf16"`` (Lightning ``precision="bf16-mixed"``) or ``"fp16"``
        (``"16-mixed"``, with loss scaling); fast on GPUs, usually slower on CPUs. ``False``: float32. On
        CPU, torch uses ``stf.settings.n_threads`` threads.
    compile
        Compile the network's forward with :func:`torch.compile` for training (``True``: inductor, or a
        backend name); the returned model runs eagerly. Compiling costs up to minutes once. Spot models only.
    resume_from
        A checkpoint (e.g. ``<checkpoint_dir>/last.ckpt``) of an interrupted run with the same data and
        settings, continued to ``max_epochs``.
    {progress}
    {table_key}
    {trainer_kwargs}

    Notes
    -----
    ``plan_kwargs`` of spot models: ``weight_decay`` (1e-2), ``warmup_epochs`` (5), ``pcc_weight`` (1.0,
    the PCC term of ``mse_pcc``), ``pathway_loss_weight`` (``"auto"``: 0.1 for models with named pathway
    tokens, else 0; the auxiliary pathway loss, whose targets are the pathway activities computed from all
    measured genes of each slide), ``pathway_structure_weight`` (1.0; correlation structure of the pathway
    maps, against collapse) and ``monitor`` (``"val_loss"`` or ``"val_pcc"``).

    ``data_kwargs`` of spot models: ``layer`` (``"counts"``; ``None``: ``X``), ``slide_key`` /
    ``patient_key`` (``obs`` columns), ``log_transform`` (True: Gaussian losses on ``log1p`` counts),
    ``min_counts`` (1; spots with fewer total counts are left out), ``standardize`` (``"slide"``: z-score
    each embedding feature over its slide's spots; ``None``), ``context_radius`` (``"auto"``: 1.5 grid
    pitches for ``"stf"``, none otherwise; each spot's input is its embedding and its neighbours' mean),
    ``output_smoothing`` (``"auto"``: 0.3 for ``"stf"``; weight of the neighbours' mean prediction),
    ``gene_selection`` (``"variance"`` or ``"seurat"``), ``gene_sets`` (``"hallmark"``, a GMT path or a
    dict naming the pathway tokens; ``None``: unnamed tokens), ``val_fraction`` (0.2), ``max_spots`` (4096
    spots per slide per step; larger slides are cropped), ``crop`` (``"spatial"`` or ``"random"``) and
    ``augment`` (random flips / quarter-turns of the coordinates).

    The super-resolution model's groups are listed by :func:`~spatialtranscriptformer.tl.fit_superres`.

    Returns
    -------
    A :class:`~spatialtranscriptformer.tl.TrainedModel` (spot models) or
    :class:`~spatialtranscriptformer.tl.SuperResModel` with ``history`` (per-epoch train/val loss and, for
    spot models, val PCC: the mean over genes of the Pearson r across the spots of each validation slide,
    averaged over slides; for slide-level models the Pearson r across genes of the slide's mean profile).
    """
    from .._accel import check_compile, lightning_precision
    from ..module._registry import get_model_entry

    entry = get_model_entry(model)  # unknown name -> ValueError listing the registered ones
    precision = lightning_precision(amp)
    if precision is not None:
        if "precision" in trainer_kwargs:
            raise ValueError("Pass either amp= or precision=, not both.")
        trainer_kwargs["precision"] = precision
    if check_compile(compile) is not None and entry.family == "superres":
        raise ValueError("compile= applies to spot models; the super-resolution decoder trains eagerly.")
    if entry.family == "superres":
        given = {"embedding_key": embedding_key, "level": level, "resume_from": resume_from}
        bad = [k for k in _SPOT_ONLY if given[k] is not None]
        if bad:
            raise ValueError(f"{bad} do not apply to model='superres' (it reads image patches; no resuming).")
        from ._superres import fit_superres

        return fit_superres(
            data, genes=genes, loss=loss or entry.default("loss"),
            validation=entry.default("validation") if validation == "auto" else validation, max_epochs=max_epochs,
            lr=entry.default("lr") if lr is None else lr,
            batch_size=entry.default("batch_size") if batch_size is None else batch_size,
            early_stopping_patience=(entry.default("early_stopping_patience") if early_stopping_patience == "auto"
                                     else early_stopping_patience),
            seed=seed, model_kwargs=model_kwargs, plan_kwargs=plan_kwargs, data_kwargs=data_kwargs,
            accelerator=accelerator, devices=devices, checkpoint_dir=checkpoint_dir, progress=progress,
            table_key=table_key, **trainer_kwargs,
        )  # fmt: skip
    from ._fit_spot import fit_spot

    model_kwargs, plan_kwargs, data_kwargs = dict(model_kwargs or {}), dict(plan_kwargs or {}), dict(data_kwargs or {})
    trainer_kwargs = dict(trainer_kwargs)
    route_legacy(trainer_kwargs, {"model_kwargs": model_kwargs, "plan_kwargs": plan_kwargs,
                                  "data_kwargs": data_kwargs}, SPOT_LEGACY, caller="fit")
    groups = GROUPS[entry.family]
    return fit_spot(
        data, entry, genes=genes, embedding_key=embedding_key, loss=loss or entry.default("loss"), level=level,
        validation=entry.default("validation") if validation == "auto" else validation, max_epochs=max_epochs,
        lr=entry.default("lr") if lr is None else lr, batch_size=batch_size,
        early_stopping_patience=(entry.default("early_stopping_patience") if early_stopping_patience == "auto"
                                 else early_stopping_patience),
        seed=seed, model_kwargs=model_kwargs,
        plan=group("plan_kwargs", plan_kwargs, groups["plan_kwargs"], caller="fit"),
        opts=group("data_kwargs", data_kwargs, groups["data_kwargs"], caller="fit"),
        accelerator=accelerator, devices=devices, checkpoint_dir=checkpoint_dir, resume_from=resume_from,
        progress=progress, table_key=table_key, trainer_kwargs=trainer_kwargs, compile=compile,
    )  # fmt: skip
