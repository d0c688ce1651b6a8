"""Fit the 2 µm Poisson super-resolution model on Visium HD slides."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from .._data import as_slide_list, get_table, slide_mpp
from .._docs import doc_params, doc_progress, doc_table_key, doc_train, doc_trainer_kwargs
from .._logging import logger
from .._settings import settings
from ._base import BaseModel

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


class SuperResModel(BaseModel):
    """A trained super-resolution decoder with its frozen backbone, genes and patch geometry.

    Made by :func:`fit_superres` (or ``stf.tl.fit(model="superres")``); applied with
    :func:`~spatialtranscriptformer.tl.predict` / :func:`predict_superres` and scored with :meth:`evaluate`
    (:func:`evaluate_superres`); saved in the folder format of :class:`~spatialtranscriptformer.tl.BaseModel`.

    Attributes
    ----------
    plan
        The training plan holding the decoder, the loss and the scales (``plan.decoder``: the
        :class:`~spatialtranscriptformer.module._superres.SuperResDecoder`).
    backbone
        The frozen :class:`~spatialtranscriptformer.pp.Backbone` whose patch tokens the decoder reads.
    genes
        Predicted genes.
    patch_um
        Patch edge in µm.
    params
        Parameters of the fit (``fit_params``): backbone, genes, patch size, loss, scales, GradNorm, the
        training and validation patients and patch counts, ...
    history
        Per-epoch ``train_loss``, ``val_loss``, ``lr``, each scale's loss and, with GradNorm, its weights
        ``w_<s>um`` and relative inverse training rates ``r_<s>um``.
    best_epoch
        Epoch whose weights were restored (``None`` without validation).
    """

    kind = "superres"

    def __init__(
        self,
        plan,
        backbone,
        *,
        genes: list[str],
        patch_um: int,
        params: dict | None = None,
        history=None,
        best_epoch: int | None = None,
    ) -> None:
        super().__init__(model_name="superres", genes=genes, loss=plan.loss_name, fit_params=params, history=history,
                         best_epoch=best_epoch)
        self.plan, self.backbone, self.patch_um = plan, backbone, int(patch_um)

    @property
    def decoder(self):
        """The :class:`~spatialtranscriptformer.module._superres.SuperResDecoder`."""
        return self.plan.decoder

    @property
    def module(self):
        """The decoder (as ``module`` of every trained model)."""
        return self.plan.decoder

    @property
    def out_size(self) -> int:
        """Bins per patch edge at 2 µm."""
        return self.patch_um // 2

    @property
    def target_space(self) -> str:
        """Predictions are expected counts per 2 µm bin."""
        return "counts"

    def __repr__(self) -> str:
        return (
            f"SuperResModel(backbone={self.backbone.name!r}, loss={self.plan.loss_name!r}, "
            f"genes={len(self.genes)}, patch_um={self.patch_um})"
        )

    def _config(self) -> dict:
        from ._superres_io import superres_config

        return superres_config(self)

    def _write_state(self, folder: Path) -> None:
        from ._superres_io import write_superres_state

        write_superres_state(self, folder)

    @classmethod
    def _read(cls, path: Path, cfg: dict, **kwargs) -> SuperResModel:
        from ._superres_io import read_superres

        return read_superres(path, cfg, **kwargs)

    @classmethod
    def load(
        cls, path: str | Path, *, backbone: Any = None, backbone_weights: str | Path | None = None
    ) -> SuperResModel:
        """Read a model written by :meth:`save` (state dicts read with ``weights_only=True``, loaded strictly).

        The folder holds ``config.json`` (genes, patch geometry, loss, scales, decoder and plan
        hyperparameters, the backbone's registry name and weights path, or its plain-data spec),
        ``weights.pt`` (decoder state dict), ``arrays.npz`` (z-score statistics of ``loss="mse"``),
        ``history.csv`` and, unless the backbone is a registered one with weights from a file or the Hugging
        Face cache, ``backbone.pt`` (its state dict). Optimiser and GradNorm states are not saved.

        Parameters
        ----------
        path
            Folder written by :meth:`save`.
        backbone
            Only needed when the saved backbone cannot be rebuilt from its description (a user's module,
            a timm model built with non-JSON arguments): its architecture, as a ``torch.nn.Module`` or a
            :class:`~spatialtranscriptformer.pp.Backbone` (the saved backbone weights, if any, are loaded
            into it), or a registered name.
        backbone_weights
            Weights of a registered backbone, replacing the path recorded at fit time (``None``: the
            recorded path, else the local Hugging Face cache).

        Returns
        -------
        The :class:`SuperResModel`, in eval mode.
        """
        return super().load(path, backbone=backbone, backbone_weights=backbone_weights)

    def evaluate(self, data, **kwargs) -> pd.DataFrame:
        """:func:`evaluate_superres(data, self, **kwargs) <spatialtranscriptformer.tl.evaluate_superres>`."""
        from ._superres_evaluate import evaluate_superres

        return evaluate_superres(data, self, **kwargs)

    def tokens(
        self,
        data,
        centers_px,
        patch_px,
        *,
        table_key=None,
        image_key=None,
        cache=None,
        cache_key="",
        batch_size: int = 16,
        progress: bool = False,
    ) -> np.ndarray:
        """Backbone token grids of the patches of one slide (``centers_px``/``patch_px`` in full-res pixels)."""
        return slide_tokens(
            data,
            self.backbone,
            centers_px,
            patch_px,
            table_key=table_key,
            image_key=image_key,
            cache=cache,
            cache_key=cache_key,
            batch_size=batch_size,
            progress=progress,
        )

    def predict_tokens(self, tokens: np.ndarray, *, batch_size: int = 8) -> np.ndarray:
        """Expected counts ``(N, G, S, S)`` at 2 µm from token grids."""
        import torch

        self.plan.eval()
        dev = next(self.plan.parameters()).device
        out = np.empty((len(tokens), len(self.genes), self.out_size, self.out_size), dtype=np.float32)
        with torch.inference_mode():
            for b in range(0, len(tokens), batch_size):
                x = torch.as_tensor(np.asarray(tokens[b : b + batch_size], dtype=np.float32), device=dev)
                out[b : b + len(x)] = self.plan.expected_counts(self.plan(x)).cpu().numpy()
        return out


def slide_tokens(
    data,
    backbone,
    centers_px,
    patch_px,
    *,
    table_key=None,
    image_key=None,
    cache=None,
    cache_key="",
    batch_size=16,
    progress=False,
) -> np.ndarray:
    """Token grids for square patches of one slide's H&E, read from the pyramid level nearest the need."""
    from ..pp._image import choose_level, resolve_image
    from ..train._superres_data import patch_tokens

    adata = get_table(data, table_key)
    levels = resolve_image(data, adata, image_key)
    mpp = slide_mpp(adata)
    patch_px = np.broadcast_to(np.asarray(patch_px, dtype=float), (len(centers_px),))
    target = float(patch_px.min()) * mpp / backbone.spec.input_size
    level = choose_level(levels, slide_mpp=mpp, target_mpp=target)
    return patch_tokens(
        level,
        np.asarray(centers_px) / level.downscale,
        patch_px / level.downscale,
        backbone,
        batch_size=batch_size,
        cache=cache,
        cache_key=f"{cache_key}|{level.index}",
        progress=progress,
    )


def _split(patient_ids: np.ndarray, validation, seed: int):
    """Training and validation patch indices: patients held out, or (one patient) 20% of the patches."""
    pids = np.unique(patient_ids)
    if validation is None:
        return np.arange(len(patient_ids)), np.array([], dtype=int)
    if validation == "patient":
        if len(pids) >= 2:
            validation = [str(pids[-1])]
        else:
            warnings.warn(
                "Only one patient: validating on a random 20% of the patches (not a held-out patient).",
                stacklevel=4,
            )
            rng = np.random.default_rng(seed)
            perm = rng.permutation(len(patient_ids))
            n_val = max(1, len(patient_ids) // 5)
            return np.sort(perm[n_val:]), np.sort(perm[:n_val])
    if isinstance(validation, str):
        raise ValueError(
            f"validation must be 'patient', None or a list of patient ids for model='superres', got {validation!r}."
        )
    validation = [str(v) for v in validation]
    missing = sorted(set(validation) - set(pids.astype(str)))
    if missing:
        raise ValueError(f"Validation patient(s) {missing} not found; patients: {pids.tolist()}.")
    val = np.isin(patient_ids.astype(str), validation)
    if val.all():
        raise ValueError(f"All patches belong to the validation patients {validation}; nothing left to train on.")
    return np.flatnonzero(~val), np.flatnonzero(val)


def _legacy_validation(val_patient):
    """``val_patient`` of earlier versions as ``validation``: None -> "patient", False -> None, an id -> [id]."""
    if val_patient is None:
        return "patient"
    if val_patient is False:
        return None
    return [str(val_patient)]


@doc_params(table_key=doc_table_key, progress=doc_progress, train=doc_train, trainer_kwargs=doc_trainer_kwargs)
def fit_superres(
    data: SpatialData | AnnData | Sequence[SpatialData],
    *,
    genes: int | Sequence[str] = 50,
    loss: Literal["poisson", "mse"] = "poisson",
    validation: Literal["patient"] | Sequence[str] | None = "patient",
    max_epochs: int = 30,
    lr: float = 5e-5,
    batch_size: int = 8,
    early_stopping_patience: int | None = 10,
    seed: int = 0,
    model_kwargs: dict | None = None,
    plan_kwargs: dict | None = None,
    data_kwargs: dict | None = None,
    accelerator: str = "auto",
    devices: int | str | Sequence[int] = "auto",
    checkpoint_dir: str | Path | None = None,
    progress: bool | None = None,
    table_key: str | None = None,
    **trainer_kwargs: Any,
) -> SuperResModel:
    """Train a 2 µm super-resolution decoder on Visium HD slides (2 µm bins).

    The Virchow2 super-resolution design (vanbelkummax/virchow2-st-2uM): a frozen pathology encoder's
    patch-token grid for each 256 µm patch, a Hist2ST-style decoder (Zeng et al. 2022) producing log λ
    at 128 x 128 x G, the exact Poisson negative log-likelihood of raw counts at 2/4/8/16 µm (coarser rates
    sum-pooled from the 2 µm rates) masked to tissue, GradNorm balancing (Chen et al. 2018, α = 1.5,
    lr 0.025), AdamW (lr 5e-5, 2-epoch warm-up), gradient accumulation (4 batches of 8), early stopping on
    the loss of a held-out patient, restoration of the best epoch's weights. ``loss="mse"`` fits z-scored
    log1p counts instead (the design's baseline). The same as ``stf.tl.fit(data, model="superres", ...)``,
    with the same argument names; the run is the shared Lightning runner's.

    Parameters
    ----------
    data
        One slide or a list of slides with 2 µm bins (``uns['stf_slide']['bin_size_um'] == 2``) and an H&E.
    genes
        Number of top-variance genes (50), chosen on the training patches only (never on the validation
        patient), or a list of genes. Held-out test slides must not be passed here at all: evaluate them
        with :func:`~spatialtranscriptformer.tl.evaluate_superres` (or use
        :func:`~spatialtranscriptformer.tl.cross_validate_superres`).
    loss
        ``"poisson"`` (raw counts) or ``"mse"`` (z-scored log1p counts).
    validation
        ``"patient"``: the last patient is held out for validation (early stopping and the choice of the best
        epoch's weights; with one patient, a random 20% of the patches, with a warning); a list of patient
        ids; ``None``: no validation (the last epoch's weights). The validation patient selects the model,
        so its scores are not held-out scores: test on patients not passed to this function.
    {train}
    {progress}
    {table_key}
    {trainer_kwargs}

    Notes
    -----
    ``model_kwargs``: ``backbone`` (``"virchow2"``; a registered name, see
    :func:`~spatialtranscriptformer.pp.list_backbones`, a :class:`~spatialtranscriptformer.pp.Backbone` or a
    ``torch.nn.Module``), ``weights`` (backbone weights: a path, ``None`` = Hugging Face cache, ``"random"``
    for tests only), ``patch_um`` (256; patch edge in µm, a multiple of 16: the 2 µm raster is
    ``patch_um / 2`` bins wide), ``arch`` (``"hist2st"`` or ``"unet"``), ``hidden`` (128), ``n_layers`` (2),
    ``n_heads`` (4), ``dropout`` (0.1).

    ``plan_kwargs``: ``scales`` ((2, 4, 8, 16) µm), ``gradnorm`` (True; else the scales' mean loss),
    ``alpha`` (1.5) and ``gradnorm_lr`` (0.025) of GradNorm, ``warmup_epochs`` (2), ``weight_decay`` (1e-2).

    ``data_kwargs``: ``min_tissue`` (0.05; minimum tissue fraction of a patch), ``cache_dir`` (token grids
    cached as zarr; ``None``: ``stf.settings.cache_dir / "superres"``), ``image_key`` (the H&E element).

    Trainer defaults: ``accumulate_grad_batches=4``, ``precision="16-mixed"`` on GPU.

    Returns
    -------
    The trained :class:`SuperResModel` (``.history``, ``.best_epoch``).
    """
    import torch

    from ..module._registry import build_model, get_model_entry
    from ..pp._backbones import Backbone, get_backbone
    from ..train._superres_data import patch_layout, select_genes
    from ..train._superres_plan import (
        DEFAULT_ACCUMULATE,
        PatchDataset,
        SuperResPlan,
        train_superres,
        zscore_stats,
    )
    from ._options import SUPERRES_DATA, SUPERRES_LEGACY, SUPERRES_MODEL, SUPERRES_PLAN, group, route_legacy

    # --- options: the former keywords, then every group checked before any work -------------------------
    model_kwargs, plan_kwargs, data_kwargs = dict(model_kwargs or {}), dict(plan_kwargs or {}), dict(data_kwargs or {})
    trainer_kwargs = dict(trainer_kwargs)
    legacy_trainer = trainer_kwargs.pop("trainer_kwargs", None)
    renamed = route_legacy(
        trainer_kwargs, {"model_kwargs": model_kwargs, "plan_kwargs": plan_kwargs, "data_kwargs": data_kwargs},
        SUPERRES_LEGACY, caller="fit_superres",
        renamed={"val_patient": "validation", "patience": "early_stopping_patience"},
    )  # fmt: skip
    if "validation" in renamed:
        validation = _legacy_validation(renamed["validation"])
    if "early_stopping_patience" in renamed:
        early_stopping_patience = renamed["early_stopping_patience"]
    if legacy_trainer is not None:
        warnings.warn("fit_superres: trainer_kwargs={...} moved: pass Trainer arguments as keywords "
                      "(**trainer_kwargs); the old form will be removed in a future version.", FutureWarning,
                      stacklevel=2)
        trainer_kwargs = {**dict(legacy_trainer), **trainer_kwargs}
    entry = get_model_entry("superres")
    entry.check_loss(loss)
    decoder_kw = {k: v for k, v in entry.model_kwargs().items() if k not in SUPERRES_MODEL}
    mk = group("model_kwargs", model_kwargs, {**SUPERRES_MODEL, **decoder_kw}, caller="fit_superres")
    plan = group("plan_kwargs", plan_kwargs, SUPERRES_PLAN, caller="fit_superres")
    opts = group("data_kwargs", data_kwargs, SUPERRES_DATA, caller="fit_superres")
    from .._validate import check_number

    check_number("max_epochs", max_epochs, minimum=1, integer=True)
    check_number("batch_size", batch_size, minimum=1, integer=True)
    check_number("lr", lr, minimum=0, exclusive=True)
    check_number("early_stopping_patience", early_stopping_patience, minimum=1, integer=True, none_ok=True)
    backbone, weights, patch_um = mk.pop("backbone"), mk.pop("weights"), int(mk.pop("patch_um"))
    scales = plan["scales"]

    progress = settings.progress if progress is None else progress
    slides = as_slide_list(data)
    layout = patch_layout(slides, patch_um=patch_um, values="counts", min_tissue=opts["min_tissue"],
                          table_key=table_key)
    tr, va = _split(layout.patient_ids, validation, seed)
    # top genes from the training patches only: no validation bin takes part in choosing them
    gene_list = select_genes(layout.tables, genes, layer=layout.layer, rows=layout.rows(tr))
    patches = layout.rasters(gene_list)
    bb = backbone if isinstance(backbone, Backbone) else get_backbone(backbone, weights=weights)
    cache = Path(opts["cache_dir"]) if opts["cache_dir"] is not None else settings.cache_dir / "superres"
    cache.mkdir(parents=True, exist_ok=True)
    tokens = None
    for i, s in enumerate(slides):
        sel = np.flatnonzero(patches.slide_index == i)
        if not len(sel):
            continue
        t = slide_tokens(
            s,
            bb,
            patches.centers_px[sel],
            patches.patch_px[sel],
            table_key=table_key,
            image_key=opts["image_key"],
            cache=cache,
            cache_key=str(patches.slide_ids[sel[0]]),
            progress=progress,
        )
        if tokens is None:
            tokens = np.empty((len(patches), *t.shape[1:]), dtype=np.float32)
        tokens[sel] = t
    torch.manual_seed(seed)
    decoder = build_model("superres", tokens.shape[-1], len(patches.genes), level="bin", loss=loss,
                          grid=tokens.shape[1], out_size=patches.values.shape[-1], **mk)
    zstats = None
    if loss == "poisson":
        m = patches.mask[tr][:, None]
        mean = (patches.values[tr] * m).sum((0, 2, 3)) / max(m.sum(), 1)
        decoder.set_output_bias(torch.log(torch.as_tensor(mean).clamp_min(1e-4)))
    else:
        zstats = zscore_stats(patches.values[tr], patches.mask[tr], scales)
    plan_module = SuperResPlan(decoder, loss=loss, lr=lr, zstats=zstats, **plan)
    train_ds = PatchDataset(tokens[tr], patches.values[tr], patches.mask[tr])
    val_ds = PatchDataset(tokens[va], patches.values[va], patches.mask[va]) if len(va) else None
    logger.info("super-resolution: %d training / %d validation patches", len(tr), len(va))
    res = train_superres(
        plan_module, train_ds, val_ds, max_epochs=max_epochs, batch_size=batch_size, seed=seed,
        accelerator=accelerator, devices=devices, early_stopping_patience=early_stopping_patience,
        checkpoint_dir=checkpoint_dir, progress=progress, trainer_kwargs=trainer_kwargs,
    )  # fmt: skip
    params = {
        "backbone": bb.name,
        "backbone_weights": None
        if weights is None or isinstance(backbone, Backbone)
        else (str(weights) if str(weights) == "random" else str(Path(weights).resolve())),
        "genes": len(patches.genes),
        "patch_um": patch_um,
        "loss": loss,
        "scales": list(scales),
        "gradnorm": plan["gradnorm"],
        "arch": mk["arch"],
        "hidden": mk["hidden"],
        "n_layers": mk["n_layers"],
        "max_epochs": max_epochs,
        "batch_size": batch_size,
        "accumulate_grad_batches": trainer_kwargs.get("accumulate_grad_batches", DEFAULT_ACCUMULATE),
        "lr": lr,
        "warmup_epochs": plan["warmup_epochs"],
        "early_stopping_patience": early_stopping_patience,
        "seed": seed,
        "train_patches": int(len(tr)),
        "val_patches": int(len(va)),
        "train_patients": sorted(set(patches.patient_ids[tr].tolist())),
        "val_patients": sorted(set(patches.patient_ids[va].tolist())),
        "gene_selection": "given" if not isinstance(genes, int | np.integer) else "training patches",
    }
    return SuperResModel(
        plan_module.cpu(),
        bb,
        genes=patches.genes,
        patch_um=patch_um,
        params=params,
        history=res["history"],
        best_epoch=res["best_epoch"],
    )
