"""Synthetic check of the design's argument for the Poisson loss, on a held-out test patient.

The design (Virchow2 2 µm super-resolution) argues that an MSE on z-scored log1p counts "regresses to the
mean" and predicts low values where Poisson training on raw counts predicts the counts' scale. That is
what this test checks, leak-free (P0 trains and chooses the genes, P1 validates, P2 is tested). The
design's larger claim — a higher 2 µm PCC for Poisson — is *not* reproduced on simulated data under this
split (see ``benchmarks/bench_superres.py``: Poisson and MSE are within one sd of each other), so it is
not asserted here.
"""

import numpy as np
import pytest

import spatialtranscriptformer as stf

torch = pytest.importorskip("torch")


@pytest.mark.slow
def test_mse_on_log1p_predicts_lower_counts_than_poisson(tmp_path):
    from spatialtranscriptformer.tl._superres import fit_superres, slide_tokens
    from spatialtranscriptformer.tl._superres_evaluate import evaluate_superres
    from spatialtranscriptformer.train._superres_data import superres_targets
    from test_superres import tiny_backbone

    slides = stf.datasets.synthetic(
        technology="visium_hd", bin_size_um=2, size_um=256, n_genes=20, n_pathways=4, n_slides=3, n_patients=3
    )  # P0 trains, P1 validates (best epoch), P2 is the held-out test patient
    bb = tiny_backbone()
    totals, pcc = {}, {}
    for loss in ("poisson", "mse"):
        m = fit_superres(
            slides[:2],
            genes=8,
            loss=loss,
            max_epochs=6,
            batch_size=8,
            lr=3e-3,
            early_stopping_patience=None,
            progress=False,
            model_kwargs={"backbone": bb, "patch_um": 64, "hidden": 32},
            plan_kwargs={"gradnorm": loss == "poisson"},
            data_kwargs={"cache_dir": tmp_path},
            accumulate_grad_batches=1,
        )
        assert m.params["val_patients"] == ["P1"] and m.params["train_patients"] == ["P0"]
        test = superres_targets(slides[2], genes=m.genes, patch_um=64, values="true_rates")
        pred = m.predict_tokens(slide_tokens(slides[2], m.backbone, test.centers_px, test.patch_px))
        totals[loss] = (pred * test.mask[:, None]).sum((0, 2, 3))  # expected counts per gene on tissue
        res = evaluate_superres(slides[2], m, truth="true_rates", aggregate=True, progress=False)
        pcc[loss] = res["mean_pcc"]
    ratio = totals["mse"] / totals["poisson"]
    assert np.all(ratio < 1.0) and np.median(ratio) < 0.85, ratio  # MSE hedges low, gene by gene
    assert pcc["poisson"][16] > 0.1 and pcc["mse"][16] > 0.1, pcc  # both learn the tissue's layout
