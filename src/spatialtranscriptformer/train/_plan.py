"""The Lightning training plan of the torch models, its callbacks and the training run.

AdamW (no weight decay on biases, norms, temperatures and tokens of dimension < 2) with a linear
warm-up then a cosine decay per optimisation step (Loshchilov & Hutter, ICLR 2017 / 2019), gradient
clipping by the Lightning ``Trainer``, early stopping on a validation metric and restoration of the
best checkpoint. Validation runs on whole slides (no crops, no augmentation) and reports the loss and
the spatial Pearson correlation at real spots only.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torch.utils.data import DataLoader

from .._logging import logger
from ._data import EpochSampler, SlideArrays, SlideDataset, collate_slides

META_KEY = "stf_meta"
"""Checkpoint entry with the genes / embedding / model configuration of the run."""


def spot_pcc(pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over genes of the Pearson r across the real spots of each slide: (B,).

    Genes constant in the truth of a slide are left out of its mean (r undefined); a constant
    prediction of a varying gene counts as r = 0. A slide without any varying gene scores 0.
    """
    m = mask.unsqueeze(-1).to(pred.dtype)
    n = m.sum(1).clamp_min(1)
    pc = (pred - (pred * m).sum(1, keepdim=True) / n.unsqueeze(1)) * m
    yc = (y - (y * m).sum(1, keepdim=True) / n.unsqueeze(1)) * m
    sp, sy = pc.pow(2).sum(1).sqrt(), yc.pow(2).sum(1).sqrt()
    r = (pc * yc).sum(1) / (sp * sy).clamp_min(1e-12)
    r = torch.where(sp > 1e-8, r, torch.zeros_like(r))
    valid = (sy > 1e-8).to(r.dtype)
    return (r * valid).sum(-1) / valid.sum(-1).clamp_min(1)


def profile_pcc(pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Slide-level models: Pearson r across genes between the predicted and mean true profile, (B,)."""
    m = mask.unsqueeze(-1).to(y.dtype)
    t = (y * m).sum(1) / m.sum(1).clamp_min(1)
    pc, tc = pred - pred.mean(-1, keepdim=True), t - t.mean(-1, keepdim=True)
    den = (pc.pow(2).sum(-1) * tc.pow(2).sum(-1)).sqrt()
    return torch.where(den > 1e-12, (pc * tc).sum(-1) / den.clamp_min(1e-12), torch.zeros_like(den))


class WarmupCosine:
    """LR factor: linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""

    def __init__(self, warmup: int, total: int, min_ratio: float = 0.0) -> None:
        self.warmup, self.total, self.min_ratio = int(warmup), max(int(total), 1), float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


class TrainingPlan(L.LightningModule):
    """Train any registered module on padded slide batches with :func:`~spatialtranscriptformer.module._losses.compute_loss`.

    Parameters
    ----------
    module
        A model following the module contract (``forward(x, coords, mask) -> dict`` with ``"expr"``).
    loss, pcc_weight, pathway_loss_weight, pathway_structure_weight
        Passed to ``compute_loss``.
    lr, weight_decay
        AdamW learning rate and decoupled weight decay.
    warmup_epochs
        Epochs of linear warm-up before the cosine decay.
    min_lr_ratio
        Final learning rate as a fraction of ``lr``.
    meta
        JSON-able run description stored in every checkpoint (checked when resuming).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        loss: str = "mse_pcc",
        pcc_weight: float = 1.0,
        pathway_loss_weight: float = 0.0,
        pathway_structure_weight: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        warmup_epochs: int = 5,
        min_lr_ratio: float = 0.0,
        meta: dict | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.loss_name, self.pcc_weight, self.pathway_loss_weight = loss, pcc_weight, pathway_loss_weight
        self.pathway_structure_weight = pathway_structure_weight
        self.lr, self.weight_decay, self.warmup_epochs, self.min_lr_ratio = lr, weight_decay, warmup_epochs, min_lr_ratio
        self.meta = dict(meta or {})

    def forward(self, batch: dict) -> dict:
        """Module outputs for a batch."""
        return self.module(batch["x"], batch["coords"], batch["mask"])

    def _loss(self, batch: dict) -> tuple[dict, torch.Tensor]:
        from ..module._losses import compute_loss

        out = self(batch)
        total, _ = compute_loss(
            out, batch, loss=self.loss_name, pcc_weight=self.pcc_weight, pathway_loss_weight=self.pathway_loss_weight,
            pathway_structure_weight=self.pathway_structure_weight,
        )
        return out, total

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """Loss of one batch of (cropped, augmented) slides."""
        _, total = self._loss(batch)
        self.log("train_loss", total, on_step=False, on_epoch=True, batch_size=len(batch["slide"]), sync_dist=True)
        return total

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Loss and spatial PCC on whole validation slides (real spots only)."""
        out, total = self._loss(batch)
        expr = out["expr"]
        pcc = profile_pcc(expr, batch["y"], batch["mask"]) if expr.dim() == 2 else spot_pcc(expr, batch["y"], batch["mask"])
        b = len(batch["slide"])
        self.log("val_loss", total, on_step=False, on_epoch=True, batch_size=b, sync_dist=True)
        self.log("val_pcc", pcc.mean(), on_step=False, on_epoch=True, batch_size=b, sync_dist=True)

    def configure_optimizers(self):
        """AdamW + per-step linear warm-up / cosine schedule."""
        decay = [p for p in self.module.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in self.module.parameters() if p.requires_grad and p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=self.lr
        )
        total = int(self.trainer.estimated_stepping_batches)
        epochs = max(1, self.trainer.max_epochs or 1)
        per_epoch = max(1, total // epochs)
        warmup = min(self.warmup_epochs, epochs // 2)  # short runs still reach the peak learning rate
        sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(warmup * per_epoch, total, self.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store the run description beside the weights."""
        checkpoint[META_KEY] = self.meta


class EpochSeed(Callback):
    """Seed the crops, the slide order and torch's RNG (dropout) from ``(seed, epoch, batch, rank)``.

    Lightning sets the sampler's epoch (hence the crops) before every epoch; under DDP the sampler is
    wrapped, so the epoch hook sets it too. Torch's RNG is re-seeded before every batch, so a run
    resumed from a checkpoint continues exactly as an uninterrupted one.
    """

    def __init__(self, dataset: SlideDataset, sampler: EpochSampler, seed: int) -> None:
        self.dataset, self.sampler, self.seed = dataset, sampler, seed

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: D102
        self.sampler.set_epoch(trainer.current_epoch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:  # noqa: D102
        key = [self.seed, trainer.current_epoch, batch_idx, trainer.global_rank]
        torch.manual_seed(int(np.random.default_rng(key).integers(2**62)))


class History(Callback):
    """Record train/val loss, val PCC and learning rate per epoch; one log line per epoch."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: D102
        m = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch}
        for k in ("train_loss", "val_loss", "val_pcc"):
            row[k] = float(m[k]) if k in m else float("nan")
        row["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else float("nan")
        self.rows = [r for r in self.rows if r["epoch"] != row["epoch"]] + [row]
        if trainer.is_global_zero:
            logger.info(
                "epoch %d/%d  train_loss %.4f  val_loss %.4f  val_pcc %.4f  lr %.2e",
                row["epoch"] + 1, trainer.max_epochs, row["train_loss"], row["val_loss"], row["val_pcc"], row["lr"],
            )

    def state_dict(self) -> dict:  # noqa: D102
        return {"rows": [dict(r) for r in self.rows]}

    def load_state_dict(self, state_dict: dict) -> None:  # noqa: D102
        self.rows = [dict(r) for r in state_dict.get("rows", [])]

    def frame(self) -> pd.DataFrame:
        """History as a DataFrame (one row per epoch)."""
        cols = ["epoch", "train_loss", "val_loss", "val_pcc", "lr"]
        return pd.DataFrame(self.rows, columns=cols)


class BestWeights(Callback):
    """Keep the weights of the best validation epoch in memory (runs without a checkpoint folder).

    Writing checkpoints that nobody can resume from (a temporary folder) cost about a third of the time
    of a small fit; with a ``checkpoint_dir`` Lightning's :class:`~lightning.pytorch.callbacks.ModelCheckpoint`
    is used instead. The validation metric is synchronised across processes, so every rank keeps the
    same epoch.
    """

    def __init__(self, monitor: str, mode: str) -> None:
        self.monitor, self.mode = monitor, mode
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.state: dict | None = None

    def on_validation_end(self, trainer, pl_module) -> None:  # noqa: D102
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        v = float(trainer.callback_metrics[self.monitor])
        if not math.isfinite(v):
            return
        better = self.best is None or (v > self.best if self.mode == "max" else v < self.best)
        if better:
            self.best, self.best_epoch = v, int(trainer.current_epoch)
            self.state = {k: t.detach().clone() for k, t in pl_module.state_dict().items()}


def read_checkpoint(path: str | Path) -> dict:
    """Load a training checkpoint without unpickling code (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}.")
    return torch.load(path, map_location="cpu", weights_only=True)


def _strategy(strategy):
    """Lightning strategy; plain ``"ddp"`` tolerates parameters a configuration leaves unused.

    Some configurations train parameters on only part of their outputs (e.g. the STF's pathway scoring
    without the auxiliary pathway loss, or its reconstructor with ``gene_head="token"``); DDP then needs
    ``find_unused_parameters`` or it stops with an error.
    """
    if strategy is None:
        return "auto"
    if strategy == "ddp":
        return "ddp_find_unused_parameters_true"
    return strategy


def run_training(
    module: torch.nn.Module,
    train_slides: Sequence[SlideArrays],
    val_slides: Sequence[SlideArrays],
    *,
    plan_kwargs: dict,
    max_epochs: int,
    batch_size: int,
    max_spots: int | None,
    crop: str,
    augment: bool,
    early_stopping_patience: int | None,
    monitor: str,
    accelerator: str,
    devices,
    strategy,
    seed: int,
    resume_from: str | Path | None,
    checkpoint_dir: str | Path | None,
    progress: bool,
    gradient_clip_val: float | None,
    trainer_kwargs: dict,
) -> dict:
    """Fit ``module`` with Lightning; restore the best weights. Returns history, best epoch, rank info."""
    train_ds = SlideDataset(train_slides, train=True, max_spots=max_spots, crop=crop, augment=augment, seed=seed)
    sampler = EpochSampler(len(train_ds), seed=seed, dataset=train_ds)
    train_dl = DataLoader(train_ds, batch_size=batch_size, sampler=sampler, collate_fn=collate_slides)
    val_dl = None
    if val_slides:
        val_ds = SlideDataset(val_slides, train=False)
        val_dl = DataLoader(val_ds, batch_size=batch_size, shuffle=False, collate_fn=collate_slides)
    plan = TrainingPlan(module, **plan_kwargs)

    tmp = None
    if checkpoint_dir is None:
        tmp = tempfile.mkdtemp(prefix="stf_ckpt_")  # Lightning's default_root_dir; nothing is written there
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else Path(tmp)
    mode = "max" if monitor == "val_pcc" else "min"
    history = History()
    callbacks: list = [EpochSeed(train_ds, sampler, seed), history]
    ckpt = best = None
    if checkpoint_dir is not None:
        ckpt = ModelCheckpoint(
            dirpath=ckpt_dir, filename="best", monitor=monitor if val_dl is not None else None, mode=mode,
            save_top_k=1, save_last=True, enable_version_counter=True,
        )
        callbacks.append(ckpt)
    elif val_dl is not None:
        best = BestWeights(monitor, mode)
        callbacks.append(best)
    if val_dl is not None and early_stopping_patience:
        callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=early_stopping_patience))
    kw = dict(trainer_kwargs)
    callbacks += list(kw.pop("callbacks", []) or [])
    kw.setdefault("logger", False)
    kw.setdefault("enable_model_summary", False)
    kw.setdefault("num_sanity_val_steps", 0)
    kw.setdefault("log_every_n_steps", 1)
    kw.setdefault("default_root_dir", str(ckpt_dir))
    if ckpt is None:
        kw.setdefault("enable_checkpointing", False)
    quiet = [logging.getLogger(n) for n in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:  # Lightning's set-up chatter (device summary, tips); our logger reports each epoch
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        trainer = L.Trainer(
            max_epochs=max_epochs, accelerator=accelerator, devices=devices, strategy=_strategy(strategy),
            gradient_clip_val=gradient_clip_val, enable_progress_bar=progress, callbacks=callbacks, **kw,
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*but have no `val_dataloader`.*")
            warnings.filterwarnings("ignore", message=".*The dirpath has changed from.*")
            warnings.filterwarnings("ignore", message=".*is smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
            trainer.fit(plan, train_dl, val_dl, ckpt_path=None if resume_from is None else str(resume_from))
        best_epoch = None
        if val_dl is not None and ckpt is not None and ckpt.best_model_path:
            state = read_checkpoint(ckpt.best_model_path)
            plan.load_state_dict(state["state_dict"], strict=True)
            best_epoch = int(state["epoch"])
        elif best is not None and best.state is not None:
            plan.load_state_dict(best.state, strict=True)
            best_epoch = best.best_epoch
        trainer.strategy.barrier()
    finally:
        for lg, lv in zip(quiet, levels, strict=True):
            lg.setLevel(lv)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    module.eval()
    return {
        "history": history.frame(),
        "best_epoch": best_epoch,
        "is_global_zero": bool(trainer.is_global_zero),
        "last_checkpoint": None if ckpt is None else ckpt.last_model_path or None,
        "best_checkpoint": None if ckpt is None else ckpt.best_model_path or None,
    }
