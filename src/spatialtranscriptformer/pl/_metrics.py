"""Per-gene metric distributions per model, and model-vs-model scatter."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._docs import doc_params, doc_show_save
from ._utils import check_save, figure_dpi, finish

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

METRIC_COLUMNS = ("pearson", "spearman", "mse")


def per_gene(
    table: pd.DataFrame, *, metric: str, models: Sequence[str] | None, level: str | None
) -> tuple[pd.DataFrame, list[str]]:
    """Mean metric per (model, gene) over slides/folds; the ``model`` labels in plotting order."""
    if not isinstance(table, pd.DataFrame):
        raise TypeError(
            f"`table` must be a pandas DataFrame (from stf.tl.evaluate/cross_validate), got {type(table).__name__}."
        )
    for col in ("gene", metric):
        if col not in table.columns:
            raise KeyError(f"`table` has no column {col!r}; columns: {list(table.columns)}.")
    df = table.copy()
    if "model" not in df.columns:
        df["model"] = "model"
    df["model"] = df["model"].astype(str)
    if "level" in df.columns:
        levels = list(pd.unique(df["level"].astype(str)))
        if level is not None:
            if str(level) not in levels:
                raise KeyError(f"`level={level!r}` not in the table's levels {levels}.")
            df = df[df["level"].astype(str) == str(level)]
        elif len(levels) > 1:
            df["model"] = df["model"] + " (" + df["level"].astype(str) + ")"
    elif level is not None:
        raise KeyError(f"`level={level!r}` given but the table has no 'level' column.")
    present = list(pd.unique(df["model"]))
    if models is None:
        order = present
    else:
        order = [str(m) for m in ([models] if isinstance(models, str) else models)]
        missing = [m for m in order if m not in present]
        if missing:
            raise KeyError(f"Models not in the table: {missing}; available: {present}.")
        df = df[df["model"].isin(order)]
    df[metric] = pd.to_numeric(df[metric], errors="coerce")
    agg = df.groupby(["model", "gene"], observed=True, sort=False)[metric].mean().reset_index()
    if agg[metric].notna().sum() == 0:
        raise ValueError(f"`table` has no finite {metric!r} values for models {order}.")
    return agg, order


@doc_params(show_save=doc_show_save)
def metrics(
    table: pd.DataFrame,
    *,
    kind: Literal["box", "violin", "scatter"] = "box",
    metric: str = "pearson",
    models: Sequence[str] | None = None,
    x: str | None = None,
    y: str | None = None,
    level: str | None = None,
    points: bool = True,
    figsize: tuple[float, float] | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    return_fig: bool = False,
) -> Figure | Axes | None:
    """Compare models by a per-gene metric (by default the Pearson r of the HEST-Benchmark).

    Takes the tidy table of :func:`spatialtranscriptformer.tl.evaluate`,
    :func:`~spatialtranscriptformer.tl.cross_validate` or ``stf benchmark`` (columns ``gene``, the
    metric, and optionally ``model``, ``slide``, ``fold``, ``level``). The metric is first averaged per
    gene over slides and folds (Jaume et al. 2024), then

    - ``kind="box"`` / ``"violin"``: its distribution over genes per model, with the genes as points
      and the mean in the tick label;
    - ``kind="scatter"``: one point per gene, model ``x`` against model ``y``, with the diagonal; points
      above it are genes ``y`` predicts better.

    Parameters
    ----------
    table
        Metrics table, one row per gene (and slide / fold / model / level).
    kind
        ``"box"``, ``"violin"`` or ``"scatter"``.
    metric
        Column to plot: ``"pearson"``, ``"spearman"``, ``"mse"`` or any numeric column.
    models
        Models to show, in this order; default: all, in order of appearance.
    x, y
        Models on the scatter's axes; default: the first two models.
    level
        Keep only rows of this ``level`` (e.g. spot- vs slide-level evaluation). Without it, models
        evaluated at several levels are shown as ``"model (level)"``.
    points
        Overlay the per-gene values on the box / violin plot.
    figsize
        Figure size in inches (new figure only).
    ax
        Axes to draw into.
    {show_save}

    Returns
    -------
    The figure if ``return_fig``, the axes if not shown, else ``None``.
    """
    import matplotlib.pyplot as plt

    if kind not in ("box", "violin", "scatter"):
        raise ValueError(f"`kind` must be 'box', 'violin' or 'scatter', got {kind!r}.")
    save_path = check_save(save)
    agg, order = per_gene(table, metric=metric, models=models, level=level)
    label = f"per-gene {metric}"

    if kind == "scatter":
        xm = str(x) if x is not None else order[0]
        ym = str(y) if y is not None else next((m for m in order if m != xm), None)
        if ym is None or xm == ym:
            raise ValueError(
                f"A scatter needs two different models; got x={xm!r}, y={ym!r} (models: {order})."
            )
        for name, m in (("x", xm), ("y", ym)):
            if m not in order:
                raise KeyError(f"`{name}={m!r}` is not a model in the table; available: {order}.")
        wide = agg.pivot(index="gene", columns="model", values=metric)[[xm, ym]].dropna()
        if wide.empty:
            raise ValueError(f"Models {xm!r} and {ym!r} share no gene with a finite {metric!r}.")
    fig, a = (
        plt.subplots(figsize=figsize or (5, 5), layout="constrained", dpi=figure_dpi())
        if ax is None
        else (ax.figure, ax)
    )

    if kind == "scatter":
        a.scatter(wide[xm], wide[ym], s=14, alpha=0.7, color="C0", edgecolors="none")
        lo = float(np.nanmin(wide.to_numpy()))
        hi = float(np.nanmax(wide.to_numpy()))
        pad = 0.05 * (hi - lo if hi > lo else 1.0)
        a.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", lw=1, ls="--", zorder=0)
        a.set_xlim(lo - pad, hi + pad)
        a.set_ylim(lo - pad, hi + pad)
        a.set_aspect("equal")
        a.set_xlabel(f"{xm} ({label})")
        a.set_ylabel(f"{ym} ({label})")
        better = int((wide[ym] > wide[xm]).sum()) if metric != "mse" else int((wide[ym] < wide[xm]).sum())
        a.set_title(f"{ym} vs {xm}: {ym} better on {better}/{len(wide)} genes")
    else:
        data = [agg.loc[agg["model"] == m, metric].dropna().to_numpy() for m in order]
        pos = np.arange(1, len(order) + 1)
        if kind == "box":
            a.boxplot(data, positions=pos, widths=0.6, showfliers=not points)
        else:
            a.violinplot([d if d.size else np.array([np.nan]) for d in data], positions=pos, showmedians=True)
        if points:
            rng = np.random.default_rng(0)
            for p, d in zip(pos, data, strict=True):
                a.scatter(
                    p + rng.uniform(-0.15, 0.15, d.size), d, s=8, alpha=0.5, color="C0", edgecolors="none"
                )
        a.set_xticks(pos)
        a.set_xticklabels(
            [f"{m}\n(mean {np.mean(d):.3f})" if d.size else m for m, d in zip(order, data, strict=True)]
        )
        a.set_xlabel("model")
        a.set_ylabel(label)
        a.set_title(f"Per-gene {metric} by model")
    return finish(fig, a, show=show, save=save_path, return_fig=return_fig, user_ax=ax is not None)
