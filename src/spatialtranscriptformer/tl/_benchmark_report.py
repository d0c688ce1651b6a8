"""Files written by :func:`spatialtranscriptformer.tl.benchmark`: CSV, Markdown table, PNG figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .._logging import logger

CSV_NAME = "metrics.csv"
MD_NAME = "summary.md"
PNG_NAME = "pcc_per_gene.png"


def _pm(mean: float, sd: float) -> str:
    return "n/a" if not np.isfinite(mean) else f"{mean:.3f} ± {sd:.3f}"


def _num(v: float) -> str:
    return "n/a" if not np.isfinite(v) else f"{v:.3f}"


def summary_markdown(table: pd.DataFrame) -> str:
    """The benchmark summary as a Markdown table with a short legend."""
    p = table.attrs.get("params", {})
    lines = [
        "# Benchmark",
        "",
        f"Embeddings `{p.get('embedding_key', '?')}`, genes: {p.get('genes', '?')}, "
        f"leave-one-{p.get('groups', '?')}-out folds: {', '.join(map(str, p.get('folds', [])))}.",
        "",
        "| model | level | evaluated on | control | PCC (mean ± sd) | collapsed | Moran's I rank agreement | "
        "slide-mean PCC | pathway PCC | pathway collapse index | genes | folds | wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table.itertuples(index=False):
        lines.append(
            f"| {r.model} | {r.level} | {r.evaluated_on} | {r.control} | {_pm(r.pcc_mean, r.pcc_sd)} | "
            f"{r.n_collapsed} | {_num(r.moran_rank_agreement)} | {_pm(r.slide_mean_pcc, r.slide_mean_pcc_sd)} | "
            f"{_num(r.pathway_pcc)} | {_num(r.pathway_collapse_index)} | {r.n_genes} | {r.n_folds} | "
            f"{r.wall_time_s:.1f} |"
        )
    lines += [
        "",
        "- *spot*: Pearson r per gene across the spots of each held-out slide (log1p counts), mean over genes "
        "per fold, then mean ± sd over folds (HEST-Benchmark protocol).",
        "- *slide mean*: Pearson r per gene across all held-out slides (pooled over folds) between predicted "
        "and measured mean log1p expression; mean ± sd over genes. Global (slide-level) models are scored "
        "only this way; dense models get it from the mean of their spot predictions.",
        "- A collapsed (constant) prediction scores r = 0, never NaN; *collapsed* counts such gene x slide pairs.",
        "- *Moran's I rank agreement*: Spearman r over genes between measured and predicted Moran's I.",
        "- *control*: held-out slides scored as they are (`none`), mirrored or rotated (shortcut control).",
        "- *pathway PCC*: named pathway maps against activity from all measured genes; *collapse index*: "
        "median pairwise |r| between predicted pathway maps (1: one map under many names).",
        "- Wall time: fitting, prediction and scoring over all folds.",
        "",
    ]
    return "\n".join(lines)


def per_gene_pcc(long: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per model: per-gene PCC used in the figure (spot PCC averaged over folds, or slide-mean PCC)."""
    out = {}
    for model, d in long.groupby("model", sort=False):
        level = d["level"].iloc[0]
        sel = d[d["evaluated_on"] == ("spot" if level == "spot" else "slide mean")]
        if "control" in sel:
            sel = sel[sel["control"].fillna("none") == "none"]
        vals = sel.groupby("gene")["pearson"].mean().to_numpy(dtype=float)
        out[f"{model}\n({'spot' if level == 'spot' else 'slide mean'})"] = vals[np.isfinite(vals)]
    return out


def write_report(table: pd.DataFrame, long: pd.DataFrame, out_dir: Path) -> None:
    """Write ``metrics.csv``, ``summary.md`` and ``pcc_per_gene.png`` into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .._atomic import atomic_output, atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(out_dir / CSV_NAME) as tmp:  # each file whole or as before, never half-written
        long.to_csv(tmp, index=False)
    atomic_write_text(out_dir / MD_NAME, summary_markdown(table))
    data = per_gene_pcc(long)
    fig, ax = plt.subplots(figsize=(1.6 * max(len(data), 2) + 1, 4))
    labels = list(data)
    vals = [data[k] if len(data[k]) else np.array([np.nan]) for k in labels]
    ax.boxplot(vals, showfliers=False)
    rng = np.random.default_rng(0)
    for i, v in enumerate(vals, start=1):
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(v)), v, s=6, alpha=0.5, color="k")
    ax.set_xticks(range(1, len(labels) + 1), labels)
    ax.axhline(0, color="grey", lw=0.8, ls="--")
    ax.set_ylabel("Pearson r per gene")
    ax.set_title("Per-gene PCC on held-out folds")
    fig.tight_layout()
    try:
        with atomic_output(out_dir / PNG_NAME) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    logger.info("Benchmark report written to %s (%s, %s, %s).", out_dir, CSV_NAME, MD_NAME, PNG_NAME)
