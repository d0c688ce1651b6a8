"""Synthetic check of the design's claim: Poisson multi-scale training beats MSE on z-scores at 2 µm."""

import pytest

import spatialtranscriptformer as stf

torch = pytest.importorskip("torch")


@pytest.mark.slow
def test_poisson_beats_mse_at_2um(tmp_path):
    from spatialtranscriptformer.tl._superres import fit_superres
    from spatialtranscriptformer.tl._superres_evaluate import evaluate_superres
    from test_superres import tiny_backbone

    slides = stf.datasets.synthetic(
        technology="visium_hd", bin_size_um=2, size_um=256, n_genes=20, n_pathways=4, n_slides=2, n_patients=2
    )
    bb = tiny_backbone()
    pcc = {}
    for loss in ("poisson", "mse"):
        m = fit_superres(
            slides,
            backbone=bb,
            genes=8,
            patch_um=64,
            loss=loss,
            gradnorm=loss == "poisson",
            max_epochs=6,
            batch_size=8,
            accumulate_grad_batches=1,
            lr=3e-3,
            hidden=32,
            patience=None,
            progress=False,
            cache_dir=tmp_path,
        )
        assert m.params["val_patients"] == ["P1"]
        res = evaluate_superres(slides, m, truth="true_rates", patient="P1", aggregate=True, progress=False)
        pcc[loss] = res["mean_pcc"]
    assert pcc["poisson"][2] > pcc["mse"][2] + 0.03, pcc
    assert pcc["poisson"][2] > 0.1
