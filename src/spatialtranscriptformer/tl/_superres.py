"""Fit the 2 µm Poisson super-resolution model on Visium HD slides."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._data import as_slide_list, get_table, slide_mpp
from .._logging import logger
from .._settings import settings

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


class SuperResModel:
    """A trained super-resolution decoder with its frozen backbone, genes and patch geometry.

    Made by :func:`fit_superres`; used by :func:`predict_superres` and :func:`evaluate_superres`.
    """

    def __init__(
        self,
        plan,
        backbone,
        *,
        genes: list[str],
        patch_um: int,
        params: dict,
        history=None,
        best_epoch: int | None = None,
    ) -> None:
        self.plan, self.backbone, self.genes, self.patch_um = plan, backbone, list(genes), int(patch_um)
        self.params, self.history, self.best_epoch = dict(params), history, best_epoch

    @property
    def decoder(self):
        """The :class:`~spatialtranscriptformer.module._superres.SuperResDecoder`."""
        return self.plan.decoder

    @property
    def out_size(self) -> int:
        """Bins per patch edge at 2 µm."""
        return self.patch_um // 2

    def __repr__(self) -> str:
        return (
            f"SuperResModel(backbone={self.backbone.name!r}, loss={self.plan.loss_name!r}, "
            f"genes={len(self.genes)}, patch_um={self.patch_um})"
        )

    def save(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Write the model to folder ``path``; no code is pickled.

        ``config.json`` (genes, patch geometry, loss, scales, decoder and plan hyperparameters, the
        backbone's registry name and weights path, or its plain-data spec), ``weights.pt`` (decoder state
        dict), ``arrays.npz`` (z-score statistics of ``loss="mse"``), ``history.csv`` and, unless the
        backbone is a registered one with weights from a file or the Hugging Face cache, ``backbone.pt``
        (its state dict). Optimiser and GradNorm states are not saved: the model is saved for inference.
        The folder is written whole into a temporary sibling and moved into place when complete, so an
        interrupted save leaves the previous model as it was; a concurrent save to the same folder is
        refused (``OutputLockedError``).

        Parameters
        ----------
        path
            Folder to write (created; must be empty unless ``overwrite``).
        overwrite
            Replace a model already saved in ``path`` (never a folder holding anything else).
        """
        from ._superres_io import save_superres

        save_superres(self, path, overwrite=overwrite)

    @classmethod
    def load(
        cls, path: str | Path, *, backbone: Any = None, backbone_weights: str | Path | None = None
    ) -> SuperResModel:
        """Read a model written by :meth:`save` (state dicts read with ``weights_only=True``, loaded strictly).

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
        from ._superres_io import load_superres

        return load_superres(path, backbone=backbone, backbone_weights=backbone_weights)

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


def _split(patient_ids: np.ndarray, val_patient: str | bool | None, seed: int):
    """Training and validation patch indices: one patient held out, or (one patient) 20% of the patches."""
    pids = np.unique(patient_ids)
    if val_patient is False:
        return np.arange(len(patient_ids)), np.array([], dtype=int)
    if val_patient is None:
        if len(pids) >= 2:
            val_patient = str(pids[-1])
        else:
            warnings.warn(
                "Only one patient: validating on a random 20% of the patches (not a held-out patient).",
                stacklevel=3,
            )
            rng = np.random.default_rng(seed)
            perm = rng.permutation(len(patient_ids))
            n_val = max(1, len(patient_ids) // 5)
            return np.sort(perm[n_val:]), np.sort(perm[:n_val])
    if str(val_patient) not in set(pids.astype(str)):
        raise ValueError(f"val_patient {val_patient!r} not found; patients: {pids.tolist()}.")
    val = patient_ids == str(val_patient)
    if val.all():
        raise ValueError(f"All patches belong to val_patient {val_patient!r}; nothing left to train on.")
    return np.flatnonzero(~val), np.flatnonzero(val)


def fit_superres(
    data: SpatialData | AnnData | Sequence[SpatialData],
    *,
    backbone: str | Any = "virchow2",
    weights: str | Path | None = None,
    genes: int | Sequence[str] = 50,
    patch_um: int = 256,
    loss: Literal["poisson", "mse"] = "poisson",
    scales: Sequence[int] = (2, 4, 8, 16),
    gradnorm: bool = True,
    arch: Literal["hist2st", "unet"] = "hist2st",
    hidden: int = 128,
    n_layers: int = 2,
    val_patient: str | bool | None = None,
    max_epochs: int = 30,
    batch_size: int = 8,
    accumulate_grad_batches: int = 4,
    lr: float = 5e-5,
    warmup_epochs: int = 2,
    patience: int | None = 10,
    min_tissue: float = 0.05,
    cache_dir: str | Path | None = None,
    table_key: str | None = None,
    image_key: str | None = None,
    accelerator: str = "auto",
    devices: int | str = 1,
    seed: int = 0,
    progress: bool | None = None,
    trainer_kwargs: dict | None = None,
) -> SuperResModel:
    """Train a 2 µm super-resolution decoder on Visium HD slides (2 µm bins).

    The Virchow2 super-resolution design (vanbelkummax/virchow2-st-2uM): a frozen pathology encoder's
    patch-token grid for each 256 µm patch, a Hist2ST-style decoder (Zeng et al. 2022) producing log λ
    at 128 x 128 x G, a Poisson negative log-likelihood on raw counts at 2/4/8/16 µm (coarser rates
    sum-pooled from the 2 µm rates) masked to tissue, GradNorm balancing (Chen et al. 2018, α = 1.5,
    lr 0.025), AdamW (lr 5e-5, 2-epoch warm-up), gradient accumulation, early stopping on the loss of a
    held-out patient. ``loss="mse"`` fits z-scored log1p counts instead (the design's baseline).

    Parameters
    ----------
    data
        One slide or a list of slides with 2 µm bins (``uns['stf_slide']['bin_size_um'] == 2``) and an H&E.
    backbone
        Registered backbone name (see :func:`~spatialtranscriptformer.pp.list_backbones`), a
        :class:`~spatialtranscriptformer.pp.Backbone` or a ``torch.nn.Module``.
    weights
        Backbone weights (path, ``None`` = Hugging Face cache, ``"random"`` for tests only).
    genes
        Number of top-variance genes (50), chosen on the training patches only (never on the validation
        patient), or a list of genes. Held-out test slides must not be passed here at all: evaluate them
        with :func:`~spatialtranscriptformer.tl.evaluate_superres` (or use
        :func:`~spatialtranscriptformer.tl.cross_validate_superres`).
    patch_um
        Patch edge in µm (multiple of 16); the 2 µm raster is ``patch_um / 2`` bins wide.
    loss
        ``"poisson"`` (raw counts) or ``"mse"`` (z-scored log1p counts).
    scales
        Supervision scales in µm (multiples of 2).
    gradnorm
        Balance the scale losses with GradNorm (else their mean).
    arch
        ``"hist2st"`` or ``"unet"`` decoder.
    hidden, n_layers
        Decoder width and transformer depth.
    val_patient
        Patient held out for validation: early stopping and the choice of the best epoch's weights.
        ``None``: the last patient (a random 20% of the patches, with a warning, when there is one
        patient); ``False``: no validation (the last epoch's weights). The validation patient selects the
        model, so its scores are not held-out scores: test on patients not passed to this function.
    max_epochs, batch_size, accumulate_grad_batches, lr, warmup_epochs, patience
        Optimisation (the design: 30 epochs, 8 x 4 accumulation, 5e-5, 2 warm-up epochs).
    min_tissue
        Minimum tissue fraction of a patch.
    cache_dir
        Folder caching the token grids as zarr (default: ``stf.settings.cache_dir / "superres"``).
    table_key, image_key
        Elements of the SpatialData.
    accelerator, devices
        Lightning accelerator and devices (mixed precision on GPU).
    seed
        Random seed.
    progress
        Show progress bars; ``None`` follows ``stf.settings.progress``.
    trainer_kwargs
        More :class:`lightning.pytorch.Trainer` arguments.

    Returns
    -------
    The trained :class:`SuperResModel` (``.history``, ``.best_epoch``).
    """
    import torch

    from ..module._superres import SuperResDecoder
    from ..pp._backbones import Backbone, get_backbone
    from ..train._superres_data import patch_layout, select_genes
    from ..train._superres_plan import PatchDataset, SuperResPlan, train_superres, zscore_stats

    progress = settings.progress if progress is None else progress
    slides = as_slide_list(data)
    layout = patch_layout(slides, patch_um=patch_um, values="counts", min_tissue=min_tissue, table_key=table_key)
    tr, va = _split(layout.patient_ids, val_patient, seed)
    # top genes from the training patches only: no validation bin takes part in choosing them
    gene_list = select_genes(layout.tables, genes, layer=layout.layer, rows=layout.rows(tr))
    patches = layout.rasters(gene_list)
    bb = backbone if isinstance(backbone, Backbone) else get_backbone(backbone, weights=weights)
    cache = Path(cache_dir) if cache_dir is not None else settings.cache_dir / "superres"
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
            image_key=image_key,
            cache=cache,
            cache_key=str(patches.slide_ids[sel[0]]),
            progress=progress,
        )
        if tokens is None:
            tokens = np.empty((len(patches), *t.shape[1:]), dtype=np.float32)
        tokens[sel] = t
    torch.manual_seed(seed)
    decoder = SuperResDecoder(
        tokens.shape[-1],
        len(patches.genes),
        grid=tokens.shape[1],
        arch=arch,
        hidden=hidden,
        out_size=patches.values.shape[-1],
        n_layers=n_layers,
    )
    zstats = None
    if loss == "poisson":
        m = patches.mask[tr][:, None]
        mean = (patches.values[tr] * m).sum((0, 2, 3)) / max(m.sum(), 1)
        decoder.set_output_bias(torch.log(torch.as_tensor(mean).clamp_min(1e-4)))
    else:
        zstats = zscore_stats(patches.values[tr], patches.mask[tr], scales)
    plan = SuperResPlan(
        decoder,
        loss=loss,
        scales=scales,
        gradnorm=gradnorm,
        lr=lr,
        warmup_epochs=warmup_epochs,
        zstats=zstats,
    )
    train_ds = PatchDataset(tokens[tr], patches.values[tr], patches.mask[tr])
    val_ds = PatchDataset(tokens[va], patches.values[va], patches.mask[va]) if len(va) else None
    logger.info("super-resolution: %d training / %d validation patches", len(tr), len(va))
    res = train_superres(
        plan,
        train_ds,
        val_ds,
        max_epochs=max_epochs,
        batch_size=batch_size,
        accumulate=accumulate_grad_batches,
        patience=patience,
        accelerator=accelerator,
        devices=devices,
        progress=progress,
        seed=seed,
        trainer_kwargs=trainer_kwargs,
    )
    params = {
        "backbone": bb.name,
        "backbone_weights": None
        if weights is None or isinstance(backbone, Backbone)
        else (str(weights) if str(weights) == "random" else str(Path(weights).resolve())),
        "genes": len(patches.genes),
        "patch_um": patch_um,
        "loss": loss,
        "scales": list(scales),
        "gradnorm": gradnorm,
        "arch": arch,
        "hidden": hidden,
        "n_layers": n_layers,
        "max_epochs": max_epochs,
        "batch_size": batch_size,
        "accumulate_grad_batches": accumulate_grad_batches,
        "lr": lr,
        "warmup_epochs": warmup_epochs,
        "patience": patience,
        "seed": seed,
        "train_patches": int(len(tr)),
        "val_patches": int(len(va)),
        "train_patients": sorted(set(patches.patient_ids[tr].tolist())),
        "val_patients": sorted(set(patches.patient_ids[va].tolist())),
        "gene_selection": "given" if not isinstance(genes, int | np.integer) else "training patches",
    }
    return SuperResModel(
        plan.cpu(),
        bb,
        genes=patches.genes,
        patch_um=patch_um,
        params=params,
        history=res["history"],
        best_epoch=res["best_epoch"],
    )
