"""The Lightning training plan of the torch models, its callbacks and the training run.

AdamW (no weight decay on biases, norms, temperatures and tokens of dimension < 2) with a linear
warm-up then a cosine decay per optimisation step (Loshchilov & Hutter, ICLR 2017 / 2019), gradient
clipping by the Lightning ``Trainer``, early stopping on a validation metric and restoration of the
best checkpoint. Validation runs on whole slides (no crops, no augmentation) and reports the loss and
the spatial Pearson correlation at real spots only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from ._data import EpochSampler, SlideArrays, SlideDataset, collate_slides
from ._runner import read_checkpoint, run_lightning  # noqa: F401  (read_checkpoint: re-exported)

META_KEY = "stf_meta"
"""Checkpoint entry with the genes / embedding / model configuration of the run."""
SPOT_HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_pcc", "lr")
"""Columns of a spot model's training history."""
DEFAULT_GRADIENT_CLIP = 1.0
"""Gradient-norm clipping of the spot models (``gradient_clip_val``; pass ``None`` to turn it off)."""


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
    seed: int,
    monitor: str = "val_loss",
    **runner_kwargs,
) -> dict:
    """Fit ``module`` on padded slide batches with :func:`~spatialtranscriptformer.train._runner.run_lightning`.

    Training slides are cropped to ``max_spots`` and augmented; validation runs on whole slides. The crops,
    the slide order and torch's RNG are seeded per epoch and batch (:class:`EpochSeed`), so a resumed run
    continues exactly as an uninterrupted one. ``runner_kwargs`` go to the runner (early stopping,
    checkpoints, devices, ``trainer_kwargs``). Returns the runner's result.
    """
    train_ds = SlideDataset(train_slides, train=True, max_spots=max_spots, crop=crop, augment=augment, seed=seed)
    sampler = EpochSampler(len(train_ds), seed=seed, dataset=train_ds)
    train_dl = DataLoader(train_ds, batch_size=batch_size, sampler=sampler, collate_fn=collate_slides)
    val_dl = None
    if val_slides:
        val_ds = SlideDataset(val_slides, train=False)
        val_dl = DataLoader(val_ds, batch_size=batch_size, shuffle=False, collate_fn=collate_slides)
    plan = TrainingPlan(module, **plan_kwargs)
    return run_lightning(
        plan, train_dl, val_dl, max_epochs=max_epochs, monitor=monitor, mode="max" if monitor == "val_pcc" else "min",
        callbacks=[EpochSeed(train_ds, sampler, seed)], history_columns=SPOT_HISTORY_COLUMNS,
        trainer_defaults={"gradient_clip_val": DEFAULT_GRADIENT_CLIP}, **runner_kwargs,
    )
