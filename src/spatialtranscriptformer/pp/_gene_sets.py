"""Gene sets: the bundled MSigDB Hallmarks, GMT files, dicts; the membership matrix."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from importlib.resources import files
from pathlib import Path

import numpy as np
import pandas as pd

HALLMARK_GMT = "h.all.v2024.1.Hs.symbols.gmt"


def hallmark_path() -> Path:
    """Path of the bundled MSigDB Hallmark 2024.1 GMT (CC BY 4.0; Liberzon et al. 2015)."""
    return Path(str(files("spatialtranscriptformer.datasets") / "data" / "msigdb" / HALLMARK_GMT))


def load_gene_sets(gene_sets: str | os.PathLike | Mapping[str, Sequence[str]] = "hallmark") -> dict[str, list[str]]:
    """Load gene sets as ``{name: [genes]}``.

    Parameters
    ----------
    gene_sets
        ``"hallmark"`` for the bundled MSigDB Hallmark collection (release 2024.1.Hs, 50 sets; Liberzon et
        al., *Cell Systems* 2015; CC BY 4.0), a path to any GMT file (read with :func:`gseapy.read_gmt`),
        or a mapping of set names to gene lists.

    Returns
    -------
    An ordered dict of gene-set name to the list of its genes.
    """
    if isinstance(gene_sets, Mapping):
        out = {str(k): [str(g) for g in v] for k, v in gene_sets.items()}
    else:
        path = hallmark_path() if str(gene_sets).lower() in {"hallmark", "hallmarks", "h"} else Path(gene_sets)
        if not path.is_file():
            raise FileNotFoundError(f"Gene-set file not found: {path} (pass 'hallmark', a GMT path or a dict).")
        import gseapy

        out = {str(k): [str(g) for g in v] for k, v in gseapy.read_gmt(str(path)).items()}
    if not out:
        raise ValueError("No gene sets given (empty collection).")
    empty = [k for k, v in out.items() if not v]
    if empty:
        raise ValueError(f"Gene sets without genes: {empty[:5]}.")
    return out


def membership_matrix(
    gene_sets: str | os.PathLike | Mapping[str, Sequence[str]],
    genes: Sequence[str],
    *,
    min_genes: int = 1,
) -> pd.DataFrame:
    """Binary genes x pathways membership matrix for ``genes``.

    Parameters
    ----------
    gene_sets
        As for :func:`load_gene_sets`.
    genes
        Gene names (rows of the result, in this order).
    min_genes
        Minimum number of a set's genes among ``genes``; sets with fewer are an error (listed).

    Returns
    -------
    A float32 :class:`~pandas.DataFrame` of 0/1, index ``genes``, columns the gene-set names.
    """
    sets = load_gene_sets(gene_sets)
    genes = pd.Index([str(g) for g in genes])
    pos = {g: i for i, g in enumerate(genes)}
    m = np.zeros((len(genes), len(sets)), dtype=np.float32)
    for j, members in enumerate(sets.values()):
        idx = [pos[g] for g in members if g in pos]
        m[idx, j] = 1.0
    counts = m.sum(0)
    if counts.sum() == 0:
        n_all = len({g for v in sets.values() for g in v})
        raise ValueError(
            f"None of the {n_all} genes of the gene sets is among the {len(genes)} genes of the data "
            f"(e.g. data genes {genes[:3].tolist()}); are the gene names symbols of the same species?"
        )
    few = [f"{k} ({int(c)})" for k, c in zip(sets, counts, strict=True) if c < min_genes]
    if few:
        raise ValueError(f"{len(few)} gene sets have fewer than {min_genes} genes in the data: {few[:5]}.")
    return pd.DataFrame(m, index=genes, columns=list(sets))
