"""Training curves: loss and validation Pearson r per epoch."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._docs import doc_params, doc_show_save
from ._utils import check_save, finish, make_axes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

LOSS_COLUMNS = ("train_loss", "val_loss")
PCC_COLUMN = "val_pcc"


def history_frame(model: Any) -> pd.DataFrame:
    """Get the per-epoch history of a fitted model (its ``.history``) or the DataFrame itself."""
    hist = model if isinstance(model, pd.DataFrame) else getattr(model, "history", None)
    if hist is None:
        raise TypeError(
            f"Expected a fitted model with a `.history` DataFrame (from `stf.tl.fit`) or the DataFrame, "
            f"got {type(model).__name__}."
        )
    if not isinstance(hist, pd.DataFrame):
        raise TypeError(f"`history` must be a DataFrame, got {type(hist).__name__}.")
    if hist.empty:
        raise ValueError("The training history is empty (was the model trained?).")
    present = [c for c in (*LOSS_COLUMNS, PCC_COLUMN) if c in hist.columns]
    if not any(np.isfinite(pd.to_numeric(hist[c], errors="coerce")).any() for c in present):
        raise ValueError(
            f"The history has no finite values in {list(LOSS_COLUMNS) + [PCC_COLUMN]}; columns: {list(hist.columns)}."
        )
    return hist


@doc_params(show_save=doc_show_save)
def history(
    model: Any,
    *,
    logy: bool = False,
    panel_size: tuple[float, float] = (4.5, 3.5),
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    return_fig: bool = False,
) -> Figure | np.ndarray | None:
    """Training and validation curves of a fitted model.

    Left: training and validation loss per epoch; right: validation Pearson r (mean over genes of the
    per-gene correlation across spots), with the best epoch marked. The validation panel is left out when
    the model was trained without validation data.

    Parameters
    ----------
    model
        A model from :func:`spatialtranscriptformer.tl.fit` (its ``.history``), or a DataFrame with
        columns ``epoch``, ``train_loss``, ``val_loss``, ``val_pcc`` (any may be missing or NaN).
    logy
        Logarithmic loss axis.
    panel_size
        Width and height (inches) of one panel.
    ax
        Axes to draw into: one per panel (two when ``val_pcc`` is present, else one).
    {show_save}

    Returns
    -------
    The figure if ``return_fig``, the axes if not shown, else ``None``.
    """
    save_path = check_save(save)
    hist = history_frame(model)
    epoch = (
        pd.to_numeric(hist["epoch"], errors="coerce").to_numpy(dtype=float)
        if "epoch" in hist.columns
        else np.arange(len(hist), dtype=float)
    )

    def col(name: str) -> np.ndarray | None:
        if name not in hist.columns:
            return None
        v = pd.to_numeric(hist[name], errors="coerce").to_numpy(dtype=float)
        return v if np.isfinite(v).any() else None

    losses = {c: col(c) for c in LOSS_COLUMNS}
    pcc = col(PCC_COLUMN)
    has_loss = any(v is not None for v in losses.values())
    n = int(has_loss) + int(pcc is not None)
    fig, axes = make_axes(1, n, ax=ax, panel_size=panel_size)
    axes = axes.ravel()
    i = 0
    if has_loss:
        a = axes[i]
        for c, label in zip(LOSS_COLUMNS, ("train", "validation"), strict=True):
            v = losses[c]
            if v is not None:
                m = np.isfinite(v)
                a.plot(epoch[m], v[m], marker="o", ms=3, label=label)
        if logy:
            a.set_yscale("log")
        a.set_xlabel("epoch")
        a.set_ylabel("loss")
        a.set_title("Loss")
        a.legend()
        i += 1
    if pcc is not None:
        a = axes[i]
        m = np.isfinite(pcc)
        a.plot(epoch[m], pcc[m], marker="o", ms=3, color="C2", label="validation")
        best = int(np.nanargmax(pcc))
        a.axvline(epoch[best], color="grey", ls="--", lw=1)
        a.set_xlabel("epoch")
        a.set_ylabel("mean Pearson r")
        a.set_title(f"Validation Pearson r (best {pcc[best]:.3f} @ epoch {epoch[best]:g})")
    return finish(fig, axes, show=show, save=save_path, return_fig=return_fig, user_ax=ax is not None)
