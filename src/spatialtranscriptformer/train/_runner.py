"""The one Lightning runner behind every trained model family (spot models and the 2 µm decoder).

:func:`run_lightning` fits a training plan (a :class:`lightning.pytorch.LightningModule`) on its data
loaders and owns everything that is the same for every family: the per-epoch history, early stopping,
best-weight selection (in memory, or Lightning's checkpoints in a ``checkpoint_dir`` that a run can be
resumed from), restoring those weights at the end, the user's callbacks merged with ours, the precision,
the strategy and a quiet set-up (no device summary or tips in a notebook; our logger reports each epoch).
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

from .._logging import logger

HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "lr")
"""Columns every training history has (NaN where a value does not exist, e.g. without validation)."""
_QUIET_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda")
_IGNORED_WARNINGS = (
    ".*does not have many workers.*",
    ".*but have no `val_dataloader`.*",
    ".*The dirpath has changed from.*",
    ".*is smaller than the logging interval.*",
    ".*Checkpoint directory .* exists and is not empty.*",
)


class History(Callback):
    """Record every logged epoch metric and the learning rate; one log line per epoch.

    ``columns`` come first (NaN when not logged); any other metric the plan logs (e.g. GradNorm's weights)
    follows in the order it first appears.
    """

    def __init__(self, columns: Sequence[str] = HISTORY_COLUMNS) -> None:
        self.columns = list(columns)
        self.rows: list[dict] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: D102  (runs after the epoch's validation)
        m = trainer.callback_metrics
        row: dict[str, Any] = {"epoch": int(trainer.current_epoch)}
        for k in self.columns:
            if k not in ("epoch", "lr"):
                row[k] = float(m[k]) if k in m else float("nan")
        row["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"]) if trainer.optimizers else float("nan")
        for k, v in m.items():
            if k not in row:
                row[k] = float(v)
        self.rows = [r for r in self.rows if r["epoch"] != row["epoch"]] + [row]
        if trainer.is_global_zero:
            shown = "  ".join(
                f"{k} {row[k]:.2e}" if k == "lr" else f"{k} {row[k]:.4f}" for k in self.columns if k != "epoch"
            )
            logger.info("epoch %d/%d  %s", row["epoch"] + 1, trainer.max_epochs, shown)

    def state_dict(self) -> dict:  # noqa: D102
        return {"rows": [dict(r) for r in self.rows]}

    def load_state_dict(self, state_dict: dict) -> None:  # noqa: D102
        self.rows = [dict(r) for r in state_dict.get("rows", [])]

    def frame(self) -> pd.DataFrame:
        """History as a DataFrame (one row per epoch)."""
        extra = [k for r in self.rows for k in r if k not in self.columns]
        return pd.DataFrame(self.rows, columns=self.columns + list(dict.fromkeys(extra)))


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


def lightning_strategy(strategy):
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


def on_gpu(accelerator: str) -> bool:
    """Whether Lightning will train on a CUDA device for ``accelerator``."""
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def run_lightning(
    plan: L.LightningModule,
    train_dl,
    val_dl=None,
    *,
    max_epochs: int,
    monitor: str = "val_loss",
    mode: str = "min",
    early_stopping_patience: int | None = None,
    checkpoint_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    accelerator: str = "auto",
    devices: Any = "auto",
    progress: bool = False,
    callbacks: Sequence[Callback] = (),
    history_columns: Sequence[str] = HISTORY_COLUMNS,
    trainer_defaults: dict | None = None,
    trainer_kwargs: dict | None = None,
    compile: bool | str = False,
) -> dict:
    """Fit ``plan``; restore the weights of the best validation epoch.

    Torch runs with ``stf.settings.n_threads`` CPU threads.

    Parameters
    ----------
    plan
        The training plan.
    train_dl, val_dl
        Training and validation data loaders (``val_dl=None``: no validation, the last weights are kept).
    max_epochs
        Epochs.
    monitor, mode
        Validation metric of early stopping and best-weight selection, and whether lower (``"min"``) or
        higher (``"max"``) is better.
    early_stopping_patience
        Epochs without improvement of ``monitor`` before stopping (``None``: never).
    checkpoint_dir
        Folder for Lightning's ``best.ckpt`` / ``last.ckpt`` (kept; needed to resume). ``None``: nothing is
        written; the best weights are kept in memory.
    resume_from
        A checkpoint to continue from.
    accelerator, devices
        Lightning ``Trainer`` settings.
    progress
        Lightning's progress bar.
    callbacks
        The family's own callbacks (e.g. seeding), placed before ours and the user's.
    history_columns
        Leading columns of the history.
    trainer_defaults
        The family's defaults for other ``Trainer`` arguments (e.g. ``precision``, ``gradient_clip_val``).
    trainer_kwargs
        The user's ``Trainer`` arguments; they win over every default. Their ``callbacks`` are appended to
        ours, and ``strategy="ddp"`` tolerates unused parameters.
    compile
        Compile the plan's network (``plan.module``) in place with :func:`torch.compile` for the run
        (``True``: inductor, or a backend name; :func:`~spatialtranscriptformer._accel.compile_in_place`);
        it runs eagerly again afterwards.

    Returns
    -------
    ``{"history", "best_epoch", "is_global_zero", "last_checkpoint", "best_checkpoint"}``.
    """
    from .._accel import check_compile, compile_in_place, uncompile
    from .._settings import settings

    net = getattr(plan, "module", None)
    if check_compile(compile) is not None and not isinstance(net, torch.nn.Module):
        raise ValueError(f"compile= needs a training plan with a `module` network ({type(plan).__name__} has none).")
    tmp = None
    if checkpoint_dir is None:
        tmp = tempfile.mkdtemp(prefix="stf_ckpt_")  # Lightning's default_root_dir; nothing is written there
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else Path(tmp)
    history = History(history_columns)
    cbs: list = [*callbacks, history]
    ckpt = best = None
    if checkpoint_dir is not None:
        ckpt = ModelCheckpoint(
            dirpath=ckpt_dir, filename="best", monitor=monitor if val_dl is not None else None, mode=mode,
            save_top_k=1, save_last=True, enable_version_counter=True,
        )
        cbs.append(ckpt)
    elif val_dl is not None:
        best = BestWeights(monitor, mode)
        cbs.append(best)
    if val_dl is not None and early_stopping_patience:
        cbs.append(EarlyStopping(monitor=monitor, mode=mode, patience=early_stopping_patience))
    kw = {
        "logger": False, "enable_model_summary": False, "num_sanity_val_steps": 0, "log_every_n_steps": 1,
        "default_root_dir": str(ckpt_dir), "accelerator": accelerator, "devices": devices,
        **(trainer_defaults or {}), **(trainer_kwargs or {}),
    }  # fmt: skip
    user_callbacks = kw.pop("callbacks", None) or []
    cbs += [user_callbacks] if isinstance(user_callbacks, Callback) else list(user_callbacks)
    kw["strategy"] = lightning_strategy(kw.get("strategy"))
    if ckpt is None:
        kw.setdefault("enable_checkpointing", False)
    kw.setdefault("enable_progress_bar", bool(progress))
    quiet = [logging.getLogger(n) for n in _QUIET_LOGGERS]
    levels = [lg.level for lg in quiet]
    for lg in quiet:  # Lightning's set-up chatter (device summary, tips); our logger reports each epoch
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    threads = settings.torch_threads()
    threads.__enter__()
    try:
        if net is not None:
            compile_in_place(net, compile)
        trainer = L.Trainer(max_epochs=int(max_epochs), callbacks=cbs, **kw)
        with warnings.catch_warnings():
            for msg in _IGNORED_WARNINGS:
                warnings.filterwarnings("ignore", message=msg)
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
        if net is not None:
            uncompile(net)
        threads.__exit__(None, None, None)
        for lg, lv in zip(quiet, levels, strict=True):
            lg.setLevel(lv)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    plan.eval()
    return {
        "history": history.frame(),
        "best_epoch": best_epoch,
        "is_global_zero": bool(trainer.is_global_zero),
        "last_checkpoint": None if ckpt is None else ckpt.last_model_path or None,
        "best_checkpoint": None if ckpt is None else ckpt.best_model_path or None,
    }
