"""her2st accuracy: SpatialTranscriptFormer vs the HEST ridge probe, leave-one-section-out.

    python benchmarks/bench_her2st_accuracy.py [--backbone handcrafted|tiny] [--config NAME ...]
        [--select NAME ...] [--seeds 0 1 2]

Protocol (HEST-Benchmark, Jaume et al. 2024, adapted to one patient): the four real sections C2-C5 of
her2st patient C (Andersson et al. 2021) from ``../shared/data/her2st``; frozen embeddings of 112 µm
tiles; targets log1p raw counts of the 50 most variable genes, chosen on the training sections of each
fold (``stf.tl.cross_validate`` re-selects them per fold); metric: Pearson r per gene across the spots of
the held-out section, averaged over genes, then over the four folds. The ridge probe is the HEST probe
(StandardScaler -> PCA(256) -> Ridge, ``stf.tl.fit(model="ridge")``).

STF settings are fixed before looking at the test folds (``--config``), or chosen per fold by an inner
leave-one-section-out over that fold's three training sections only (``--select A B ...``; nested CV:
the held-out section never influences the choice). Embeddings are cached in
``benchmarks/results/her2st_emb_<backbone>.npz``.

Backbones: ``handcrafted`` (46-d stain / colour / texture statistics, no weights) and ``tiny`` (timm
``resnet10t``, randomly initialised with seed 0, 512-d, 224 px at 0.5 µm/px; *random* features, a
sanity baseline, not a foundation model).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from _common import RESULTS, SHARED, write_result

SECTIONS = ("C2", "C3", "C4", "C5")

# STF configurations: keyword arguments of ``stf.tl.fit`` on top of ``COMMON``. "default" is the library
# default; the others use a small, strongly regularised model (3 training sections, ~550 spots) trained
# for a fixed number of epochs on all training sections (no validation section taken away from them).
COMMON = {"genes": 50, "progress": False, "seed": 0}
SMALL = {"token_dim": 64, "n_heads": 4, "n_layers": 1, "dropout": 0.2}
FIXED = {"model_kwargs": SMALL, "validation": None, "max_epochs": 30, "lr": 3e-3}
CONFIGS: dict[str, dict] = {
    # D=256, 2 layers, mse_pcc, lr 1e-3, early stopping on one of the three training sections
    "default": {},
    "small": {"model_kwargs": SMALL},
    "small_fixed": FIXED,
    "small_fixed_pcc": {**FIXED, "loss": "pcc"},
    "small_fixed_pcc_60": {**FIXED, "loss": "pcc", "max_epochs": 60},
    "small_fixed_reg": {**FIXED, "model_kwargs": {**SMALL, "dropout": 0.3}, "weight_decay": 0.1},
    "small_fixed_noh2h": {**FIXED, "model_kwargs": {**SMALL, "n_layers": 2}, "interactions": ("p2p", "p2h", "h2p")},
    "small_fixed_pw": {**FIXED, "pathway_loss_weight": 0.1},
    "small_fixed_pwinit": {**FIXED, "pathway_init": True},
    "d256_fixed": {**FIXED, "model_kwargs": {}, "lr": 1e-3},
}


def load_sections(backbone: str, folder) -> list:
    """The four sections with ``obsm['X_<backbone>']`` (embeddings computed once, then cached)."""
    import spatialtranscriptformer as stf

    key = f"X_{backbone}"
    cache = RESULTS / f"her2st_emb_{backbone}.npz"
    if cache.exists():
        slides = stf.datasets.her2st(list(SECTIONS), path=folder, load_image=False)
        with np.load(cache) as z:
            for s, sec in zip(slides, SECTIONS, strict=True):
                t = s.tables["table"]
                if list(z[f"{sec}_obs"]) != list(t.obs_names):
                    raise ValueError(f"Cached embeddings of {sec} do not match its spots; delete {cache}.")
                t.obsm[key] = z[sec]
        return slides
    slides = stf.datasets.her2st(list(SECTIONS), path=folder)
    t0 = time.perf_counter()
    if backbone == "handcrafted":
        stf.pp.embed(slides, backbone="handcrafted", progress=False)
    elif backbone == "tiny":
        import timm
        import torch

        torch.manual_seed(0)
        net = timm.create_model("resnet10t", pretrained=False, num_classes=0).eval()
        stf.pp.embed(slides, backbone=net, key_added=key, progress=False)
    else:
        raise ValueError(f"Unknown backbone {backbone!r}; use 'handcrafted' or 'tiny'.")
    print(f"embedded {sum(s.tables['table'].n_obs for s in slides)} spots with {backbone} in "
          f"{time.perf_counter() - t0:.1f} s")
    RESULTS.mkdir(exist_ok=True)
    arrays = {}
    for s, sec in zip(slides, SECTIONS, strict=True):
        t = s.tables["table"]
        arrays[sec] = np.asarray(t.obsm[key], dtype=np.float32)
        arrays[f"{sec}_obs"] = np.asarray(t.obs_names, dtype=str)
    np.savez(cache, **arrays)
    return slides


def zscore_per_slide(tables, key: str) -> str:
    """Add ``obsm[key + '_z']``: each section's embeddings z-scored with that section's own statistics.

    Unsupervised and applied identically to training and held-out sections (no targets, no other
    section involved), so it leaks nothing; it removes per-section stain / scanner offsets and puts all
    features on one scale (the STF projects raw features linearly; the ridge probe standardises itself).
    """
    out = f"{key}_z"
    for t in tables:
        x = np.asarray(t.obsm[key], dtype=np.float64)
        t.obsm[out] = ((x - x.mean(0)) / np.maximum(x.std(0), 1e-6)).astype(np.float32)
    return out


def fold_scores(res: pd.DataFrame) -> pd.Series:
    """Mean Pearson r over genes per held-out section (NaN genes, e.g. constant ones, skipped)."""
    return res.groupby("fold")["pearson"].mean()


def run_cv(tables, *, model: str, embedding_key: str, **kw) -> tuple[pd.Series, float]:
    """Leave-one-section-out scores of ``model`` and wall time."""
    import spatialtranscriptformer as stf

    t0 = time.perf_counter()
    res = stf.tl.cross_validate(tables, model=model, groups="slide", embedding_key=embedding_key, **kw)
    return fold_scores(res), time.perf_counter() - t0


def nested(tables, *, names: list[str], embedding_key: str, seed: int) -> tuple[pd.Series, float, dict]:
    """Outer LOSO; per fold, the config with the best inner-LOSO mean r on the training sections."""
    import spatialtranscriptformer as stf

    t0 = time.perf_counter()
    ids = [str(t.obs["slide_id"].iloc[0]) for t in tables]
    scores, chosen = {}, {}
    for i, test_id in enumerate(ids):
        train = [t for j, t in enumerate(tables) if j != i]
        inner = {}
        for name in names:
            kw = {**COMMON, **CONFIGS[name], "seed": seed}
            inner[name] = float(fold_scores(stf.tl.cross_validate(
                train, model="stf", groups="slide", embedding_key=embedding_key, **kw)).mean())
        best = max(inner, key=inner.get)
        chosen[test_id] = (best, inner)
        m = stf.tl.fit(train, model="stf", embedding_key=embedding_key, **{**COMMON, **CONFIGS[best], "seed": seed})
        test = tables[i].copy()
        stf.tl.predict(test, m, progress=False)
        scores[test_id] = float(stf.tl.evaluate(test)["pearson"].mean())
    return pd.Series(scores), time.perf_counter() - t0, chosen


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="handcrafted", choices=["handcrafted", "tiny"])
    p.add_argument("--config", nargs="*", default=["small_fixed_pcc"], choices=list(CONFIGS),
                   help="fixed STF configurations to run (a priori settings)")
    p.add_argument("--select", nargs="*", default=[], choices=list(CONFIGS),
                   help="candidate configurations chosen per fold by inner LOSO on the training sections")
    p.add_argument("--seeds", nargs="*", type=int, default=[0])
    p.add_argument("--no-ridge", action="store_true")
    p.add_argument("--raw", action="store_true",
                   help="use the raw embeddings (default: z-scored per section, see `zscore_per_slide`)")
    args = p.parse_args()

    folder = SHARED / "her2st"
    if not all((folder / s).is_dir() for s in SECTIONS):
        print(f"SKIP: her2st sections {SECTIONS} not found under {folder}.")
        return
    import spatialtranscriptformer as stf

    stf.settings.progress = False
    import logging
    import warnings

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*Pathway tokens stay unnamed.*")

    raw = f"X_{args.backbone}"
    tables = [s.tables["table"] for s in load_sections(args.backbone, folder)]
    key = raw if args.raw else zscore_per_slide(tables, raw)
    rows: dict[str, tuple[pd.Series, float]] = {}
    notes = []
    if not args.no_ridge:
        rows["ridge (HEST probe), raw embeddings"] = run_cv(tables, model="ridge", embedding_key=raw, genes=50)
        if key != raw:
            rows["ridge (HEST probe), per-section z-scored"] = run_cv(tables, model="ridge", embedding_key=key, genes=50)
    for name in args.config:
        for seed in args.seeds:
            kw = {**COMMON, **CONFIGS[name], "seed": seed}
            rows[f"stf `{name}` seed {seed}"] = run_cv(tables, model="stf", embedding_key=key, **kw)
            print(f"done {name} seed {seed}: {rows[f'stf `{name}` seed {seed}'][0].mean():.4f}", flush=True)
    if args.select:
        for seed in args.seeds:
            s, t, chosen = nested(tables, names=args.select, embedding_key=key, seed=seed)
            rows[f"stf nested-selected seed {seed}"] = (s, t)
            for fold, (best, inner) in chosen.items():
                notes.append(f"- seed {seed}, fold {fold}: chose `{best}`; inner mean r "
                             + ", ".join(f"{k} {v:.3f}" for k, v in inner.items()))

    head = "| model | " + " | ".join(SECTIONS) + " | mean r | wall s |\n|---|" + "---:|" * (len(SECTIONS) + 2) + "\n"
    body = "".join(
        f"| {name} | " + " | ".join(f"{s.get(sec, np.nan):.3f}" for sec in SECTIONS)
        + f" | **{s.mean():.3f}** | {t:.0f} |\n"
        for name, (s, t) in rows.items()
    )
    text = (f"## her2st leave-one-section-out, top-50 HVGs (per fold), backbone `{args.backbone}`\n\n"
            "Pearson r per gene across the held-out section's spots, mean over genes (per fold) and over folds. "
            f"STF on `obsm['{key}']`.\n\n"
            + head + body + ("\n" + "\n".join(notes) + "\n" if notes else ""))
    write_result(f"her2st_accuracy_{args.backbone}", text)


if __name__ == "__main__":
    main()
