"""her2st accuracy: the SpatialTranscriptFormer's defaults against linear probes, leave-one-section-out.

    python benchmarks/bench_her2st_accuracy.py [--backbone handcrafted|tiny] [--seeds 0 1 2]
        [--configs NAME ...] [--quick]

Protocol (HEST-Benchmark, Jaume et al. 2024, adapted to one patient): the four real sections C2-C5 of
her2st patient C (Andersson et al. 2021) from ``../shared/data/her2st``; frozen embeddings of 112 µm
tiles; targets log1p raw counts of the 50 most variable genes, chosen on the *training* sections of each
fold (the same list for every model of the fold); metric: Pearson r per gene across the spots of the
held-out section (a collapsed, constant prediction scores 0), averaged over genes, then over the four
folds; mean ± sd over seeds. Nothing is selected on the held-out section: every model runs with the
settings listed in ``CONFIGS``, fixed before this script is run.

Shortcut control: serial sections of one patient share their layout, so each held-out section is also
scored with its coordinates mirrored and rotated by a quarter turn (``stf.tl.cross_validate(controls=)``).
A model that memorised where tissue sits on the array (the previous defaults' absolute positional
encoding) loses there; one that reads tissue and neighbourhood does not.

Also reported: the mean r of the STF's 50 named Hallmark maps against the activity computed from all
measured genes, their collapse index (median pairwise |r| between maps), the Spearman agreement of
observed and predicted Moran's I over genes, collapsed genes, and fit wall time (s per fold).

Backbones: ``handcrafted`` (46-d stain / colour / texture statistics, no weights) and ``tiny`` (timm
``resnet10t``, randomly initialised with seed 0, 512-d, 224 px at 0.5 µm/px: *random* features, a
sanity baseline, not a foundation model). Embeddings are cached in ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from _common import RESULTS, SHARED, write_result

SECTIONS = ("C2", "C3", "C4", "C5")
CONTROLS = ("mirror", "rot90")

PREVIOUS_DEFAULTS = {  # the library's defaults before the model-truth round (for the before/after rows)
    "model_kwargs": {"token_dim": 256, "n_layers": 2, "dropout": 0.1, "interactions": "all",
                     "positional_encoding": "sinusoidal", "gene_head": "pathways"},
    "plan_kwargs": {"pathway_loss_weight": 0.0},
    "data_kwargs": {"context_radius": None, "output_smoothing": 0.0, "gene_sets": None},
    "validation": "patient", "max_epochs": 100, "lr": 1e-3,
}
# name -> (model, fit keyword arguments, deterministic)
CONFIGS: dict[str, tuple[str, dict, bool]] = {
    "stf (defaults)": ("stf", {}, False),
    "stf (previous defaults)": ("stf", PREVIOUS_DEFAULTS, False),
    "ridge (HEST probe)": ("ridge", {}, True),
    "ridge_cv (alpha by inner LOSO)": ("ridge_cv", {}, True),
    "he2rna": ("he2rna", {}, False),
    "ridge_cv + neighbourhood context": ("ridge_cv", {"data_kwargs": {"context_radius": 1.5}}, True),
    "ridge_cv + context + smoothing": ("ridge_cv", {"data_kwargs": {"context_radius": 1.5, "output_smoothing": 0.3}},
                                       True),
    "he2rna + context + smoothing": ("he2rna", {"data_kwargs": {"context_radius": 1.5, "output_smoothing": 0.3}},
                                     False),
}


def load_sections(backbone: str, folder) -> list:
    """The four sections' tables with ``obsm['X_<backbone>']`` (embeddings computed once, then cached)."""
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
        return [s.tables["table"] for s in slides]
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
    return [s.tables["table"] for s in slides]


def run_config(tables, name: str, key: str, seed: int, *, quick: bool) -> dict:
    """One configuration, one seed: per-fold gene r for each control, pathway metrics, wall time."""
    import spatialtranscriptformer as stf
    from spatialtranscriptformer._stats import mean_r, rank_agreement

    model, kw, _ = CONFIGS[name]
    kw = dict(kw)
    if quick:
        kw["max_epochs"] = 2
    t0 = time.perf_counter()
    res = stf.tl.cross_validate(tables, model=model, groups="slide", genes=50, controls=CONTROLS,
                                embedding_key=key, seed=seed, progress=False, **kw)
    wall = (time.perf_counter() - t0) / len(SECTIONS)
    out = {"wall_per_fold": wall, "r": {}, "n_collapsed": int(res["collapsed"].sum()), "moran": {}}
    for (control, fold), d in res.groupby(["control", "fold"]):
        out["r"].setdefault(control, {})[fold] = mean_r(d["pearson"].to_numpy(float))
        if control == "none":
            out["moran"][fold] = rank_agreement(d["moran_true"].to_numpy(float), d["moran_pred"].to_numpy(float))
    pw = res.attrs.get("pathways")
    if pw is not None:
        out["pathway_r"] = {f: mean_r(d["pearson"].to_numpy(float)) for f, d in pw.groupby("fold")}
        out["n_pathways"] = int(pw.groupby("fold")["pathway"].nunique().min())
    return out


def collapse_indices(tables, key: str, seed: int, *, quick: bool) -> dict:
    """Collapse index of the STF's predicted pathway maps and of the measured activities, per held-out section."""
    import spatialtranscriptformer as stf
    from spatialtranscriptformer._stats import collapse_index

    out = {}
    for i, sec in enumerate(SECTIONS):
        train = [t for j, t in enumerate(tables) if j != i]
        m = stf.tl.fit(train, embedding_key=key, seed=seed, progress=False, **({"max_epochs": 2} if quick else {}))
        test = tables[i].copy()
        stf.tl.predict(test, m, progress=False)
        stf.pp.pathway_activity(test)
        qc = np.asarray(test.layers["counts"].sum(1)).ravel() >= 1
        pred = test.obsm["stf_pathways"].to_numpy()[qc]
        true = test.obsm["pathway_activity"][test.obsm["stf_pathways"].columns].to_numpy()[qc]
        out[sec] = (collapse_index(pred), collapse_index(true))
    return out


def pm(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f} ± {v.std():.3f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="handcrafted", choices=["handcrafted", "tiny"])
    p.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--quick", action="store_true", help="2 epochs (a smoke run of the script, not a result)")
    args = p.parse_args()

    folder = SHARED / "her2st"
    if not all((folder / s).is_dir() for s in SECTIONS):
        print(f"SKIP: her2st sections {SECTIONS} not found under {folder}.")
        return
    import torch

    import spatialtranscriptformer as stf

    torch.set_num_threads(1)
    stf.settings.progress = False
    key = f"X_{args.backbone}"
    tables = load_sections(args.backbone, folder)
    results: dict[str, list[dict]] = {}
    for name in args.configs:
        seeds = args.seeds[:1] if CONFIGS[name][2] else args.seeds
        results[name] = []
        for seed in seeds:
            results[name].append(run_config(tables, name, key, seed, quick=args.quick))
            r = results[name][-1]["r"]["none"]
            print(f"{name} seed {seed}: mean r {np.mean(list(r.values())):.4f}", flush=True)
    coll = [collapse_indices(tables, key, s, quick=args.quick) for s in args.seeds] if "stf (defaults)" in results else []

    lines = [f"## her2st leave-one-section-out, backbone `{args.backbone}`, seeds {args.seeds}", "",
             "Mean Pearson r over the 50 genes per held-out section (genes chosen on the training sections); "
             "mean ± sd over seeds (deterministic models: one run). `mirror` / `rot90`: the held-out section's "
             "coordinates mirrored / rotated (shortcut control).", "",
             "| model | control | " + " | ".join(SECTIONS) + " | mean r | fit+predict s/fold |",
             "|---|---|" + "---:|" * (len(SECTIONS) + 2)]
    for name, runs in results.items():
        for control in ("none", *CONTROLS):
            per_fold = {f: [r["r"][control][f] for r in runs] for f in SECTIONS}
            means = [np.mean([r["r"][control][f] for f in SECTIONS]) for r in runs]
            lines.append(f"| {name} | {control} | " + " | ".join(pm(per_fold[f]) for f in SECTIONS)
                         + f" | **{pm(means)}** | {np.mean([r['wall_per_fold'] for r in runs]):.0f} |")
    lines += ["", "| model | collapsed genes | Moran's I rank agreement (mean over folds) | pathway maps | "
              "pathway r (mean over folds) |", "|---|---:|---:|---:|---:|"]
    for name, runs in results.items():
        moran = [np.mean(list(r["moran"].values())) for r in runs]
        pw = [np.mean(list(r["pathway_r"].values())) for r in runs if "pathway_r" in r]
        npw = runs[0].get("n_pathways", 0)
        lines.append(f"| {name} | {sum(r['n_collapsed'] for r in runs)} | {pm(moran)} | {npw} | "
                     f"{pm(pw) if pw else 'n/a'} |")
    if coll:
        lines += ["", "STF defaults, collapse index of the 50 predicted pathway maps per held-out section "
                  "(median pairwise |r|; measured activities in brackets): "
                  + ", ".join(f"{s} {pm([c[s][0] for c in coll])} ({coll[0][s][1]:.3f})" for s in SECTIONS)]
    text = "\n".join(lines) + "\n"
    write_result(f"her2st_accuracy_{args.backbone}", text)
    (RESULTS / f"her2st_accuracy_{args.backbone}.json").write_text(json.dumps(
        {"results": results, "collapse": coll}, indent=1, default=float))


if __name__ == "__main__":
    main()
