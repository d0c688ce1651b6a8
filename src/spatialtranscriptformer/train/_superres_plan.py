"""Lightning training of the 2 µm super-resolution decoder.

The exact Poisson negative log-likelihood (``λ - k log λ + log k!``, never negative) of the raw counts at
2/4/8/16 µm, where the coarser rates are sum-pooled from the 2 µm rates (``avg_pool2d(x, k) * k**2``) and
every scale is masked to tissue; the four losses are balanced by GradNorm (Chen et al. 2018, α = 1.5, its
own learning rate 0.025), which needs positive losses (ratios to their initial values). ``loss="mse"`` fits
z-scored log1p counts with a masked mean squared error instead (the baseline of the design). AdamW
(lr 5e-5) with a linear warm-up over the first epochs, gradient accumulation, early stopping on the
validation loss, mixed precision on GPU; the run itself is the shared runner's
(:func:`~spatialtranscriptformer.train._runner.run_lightning`).
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..module._gradnorm import GradNorm
from ._runner import HISTORY_COLUMNS, on_gpu, run_lightning

BIN_UM = 2
DEFAULT_ACCUMULATE = 4
"""Batches per optimisation step (the design: 8 x 4); ``accumulate_grad_batches=`` changes it."""


class PatchDataset(Dataset):
    """Token grids, 2 µm targets and tissue masks of patches (in memory)."""

    def __init__(self, tokens: np.ndarray, values: np.ndarray, mask: np.ndarray) -> None:
        self.tokens, self.values, self.mask = tokens, values, mask

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int):
        return (
            torch.from_numpy(np.ascontiguousarray(self.tokens[i], dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(self.values[i], dtype=np.float32)),
            torch.from_numpy(np.ascontiguousarray(self.mask[i], dtype=np.float32)),
        )


def _pool_sum(x: torch.Tensor, f: int) -> torch.Tensor:
    return x if f == 1 else F.avg_pool2d(x, f) * (f * f)


def zscore_stats(values: np.ndarray, mask: np.ndarray, scales: Sequence[int]) -> np.ndarray:
    """Mean and sd of log1p(sum-pooled counts) per scale and gene over tissue: ``(n_scales, G, 2)``."""
    out = np.zeros((len(scales), values.shape[1], 2), dtype=np.float32)
    v, m = torch.from_numpy(values.astype(np.float32)), torch.from_numpy(mask.astype(np.float32))[:, None]
    for s, scale in enumerate(scales):
        f = scale // BIN_UM
        y = torch.log1p(_pool_sum(v * m, f))
        mk = (F.avg_pool2d(m, f) >= 0.5).float() if f > 1 else m
        n = mk.sum().clamp_min(1)
        mean = (y * mk).sum((0, 2, 3)) / n
        sd = (((y - mean[None, :, None, None]) ** 2) * mk).sum((0, 2, 3)).div(n).sqrt().clamp_min(1e-3)
        out[s, :, 0], out[s, :, 1] = mean.numpy(), sd.numpy()
    return out


class SuperResPlan(L.LightningModule):
    """Multi-scale Poisson (or z-score MSE) training of a :class:`~..module._superres.SuperResDecoder`."""

    def __init__(
        self,
        decoder: torch.nn.Module,
        *,
        loss: str = "poisson",
        scales: Sequence[int] = (2, 4, 8, 16),
        gradnorm: bool = True,
        alpha: float = 1.5,
        gradnorm_lr: float = 0.025,
        lr: float = 5e-5,
        weight_decay: float = 1e-2,
        warmup_epochs: int = 2,
        zstats: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        if loss not in ("poisson", "mse"):
            raise ValueError(f"loss must be 'poisson' or 'mse', got {loss!r}.")
        bad = [s for s in scales if s % BIN_UM or s < BIN_UM]
        if bad or not scales:
            raise ValueError(f"scales must be multiples of {BIN_UM} µm, got {list(scales)}.")
        if loss == "mse" and zstats is None:
            raise ValueError("loss='mse' needs the z-score statistics (zstats).")
        self.decoder, self.loss_name, self.scales = decoder, loss, tuple(int(s) for s in scales)
        self.gradnorm = (
            GradNorm(len(self.scales), alpha=alpha, lr=gradnorm_lr, names=[f"{s} µm" for s in self.scales])
            if gradnorm
            else None
        )
        self.lr, self.weight_decay, self.warmup_epochs = lr, weight_decay, warmup_epochs
        self.register_buffer("zstats", torch.as_tensor(zstats if zstats is not None else np.zeros((0, 0, 2))))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Decoder output: log λ (Poisson) or z-scores (MSE) at 2 µm."""
        return self.decoder(tokens)

    def scale_losses(self, out: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """One masked loss per scale (mean over tissue bins and genes).

        Poisson: the exact negative log-likelihood ``λ - k log λ + log Γ(k + 1)`` of the (sum-pooled)
        counts ``k`` under the (sum-pooled) rates ``λ``, which is never negative. MSE: the squared error of
        the z-scored log1p counts (the prediction averaged over the tissue bins of a pooled bin).
        """
        out = out.float()
        m = mask[:, None]
        losses = []
        for s, scale in enumerate(self.scales):
            f = scale // BIN_UM
            yk = _pool_sum(y * m, f)
            mk = (F.avg_pool2d(m, f) >= 0.5).float() if f > 1 else m
            if self.loss_name == "poisson":
                if f == 1:
                    nll = torch.exp(out) - yk * out + torch.lgamma(yk + 1)
                else:
                    rate = _pool_sum(torch.exp(out) * m, f)
                    nll = rate - yk * torch.log(rate + 1e-8) + torch.lgamma(yk + 1)
            else:
                mu, sd = self.zstats[s, :, 0][None, :, None, None], self.zstats[s, :, 1][None, :, None, None]
                pred = F.avg_pool2d(out * m, f) / F.avg_pool2d(m, f).clamp_min(1e-6) if f > 1 else out
                nll = (pred - (torch.log1p(yk) - mu) / sd) ** 2
            losses.append((nll * mk).sum() / (mk.sum() * out.shape[1]).clamp_min(1.0))
        return losses

    def expected_counts(self, out: torch.Tensor) -> torch.Tensor:
        """Expected counts per 2 µm bin from the decoder output."""
        if self.loss_name == "poisson":
            return torch.exp(out.float())
        mu, sd = self.zstats[0, :, 0][None, :, None, None], self.zstats[0, :, 1][None, :, None, None]
        return torch.expm1(out.float() * sd + mu).clamp_min(0.0)

    def training_step(self, batch, batch_idx):
        """Weighted multi-scale loss ``sum_i w_i(t) L_i``; GradNorm then updates the weights to ``w_i(t+1)``.

        Logged per epoch (means over the steps): each scale's loss, and with GradNorm its weight
        ``w_<s>um`` and relative inverse training rate ``r_<s>um``.
        """
        tokens, y, mask = batch
        losses = self.scale_losses(self(tokens), y, mask)
        if self.gradnorm is not None:
            loss = self.gradnorm.weighted(losses)  # w_i(t), as in Chen et al.'s Algorithm 1
            for s, w in zip(self.scales, self.gradnorm.weights.detach(), strict=True):
                self.log(f"w_{s}um", w, on_step=False, on_epoch=True)
            self.gradnorm.step(losses, self.decoder.shared_layer)
            for s, r in zip(self.scales, self.gradnorm.last_ratio, strict=True):
                self.log(f"r_{s}um", r.clone(), on_step=False, on_epoch=True)
        else:
            loss = sum(losses) / len(losses)
        for s, lk in zip(self.scales, losses, strict=True):
            self.log(f"train_loss_{s}um", lk.detach(), on_step=False, on_epoch=True)
        self.log("train_loss", loss.detach(), on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        """Unweighted mean of the scale losses (so early stopping does not follow GradNorm's weights)."""
        tokens, y, mask = batch
        losses = self.scale_losses(self(tokens), y, mask)
        self.log(
            "val_loss",
            sum(losses) / len(losses),
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            batch_size=len(tokens),
        )

    def configure_optimizers(self):
        """AdamW on the decoder; linear warm-up over ``warmup_epochs`` epochs, then constant."""
        opt = torch.optim.AdamW(self.decoder.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        per_epoch = max(int(self.trainer.estimated_stepping_batches) // epochs, 1)
        warm = max(min(self.warmup_epochs, epochs // 2) * per_epoch, 1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def train_superres(
    plan: SuperResPlan,
    train: PatchDataset,
    val: PatchDataset | None,
    *,
    max_epochs: int,
    batch_size: int,
    seed: int,
    accelerator: str = "auto",
    **runner_kwargs,
) -> dict:
    """Fit ``plan`` with :func:`~spatialtranscriptformer.train._runner.run_lightning`; restore the best epoch.

    Patches are shuffled by a generator seeded with ``seed``; gradients are accumulated over 4 batches and
    training runs in mixed precision on GPU unless the ``trainer_kwargs`` of ``runner_kwargs`` say otherwise.
    Returns the runner's result.
    """
    L.seed_everything(seed, workers=True, verbose=False)
    train_dl = DataLoader(
        train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    val_dl = DataLoader(val, batch_size=batch_size) if val is not None and len(val) else None
    defaults = {"accumulate_grad_batches": DEFAULT_ACCUMULATE, "precision": "16-mixed" if on_gpu(accelerator) else "32-true"}
    return run_lightning(
        plan, train_dl, val_dl, max_epochs=max_epochs, accelerator=accelerator, history_columns=HISTORY_COLUMNS,
        trainer_defaults=defaults, **runner_kwargs,
    )
