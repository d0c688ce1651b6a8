"""Leak-free super-resolution evaluation: genes chosen on training patches only, distinct training /
validation / test patients, leave-one-patient-out cross-validation."""

import warnings

import numpy as np
import pytest

import spatialtranscriptformer as stf
from spatialtranscriptformer import _constants as K

torch = pytest.importorskip("torch")
pytest.importorskip("timm")


@pytest.fixture(scope="module")
def slides3():
    return stf.datasets.synthetic(
        technology="visium_hd", bin_size_um=2, size_um=128, n_genes=10, n_pathways=2, n_slides=3, n_patients=3,
        seed=5,
    )


def _boost_quiet_gene(sd):
    """Multiply the counts of the least variable gene of a slide by 40: a top-variance gene there only."""
    t = sd.tables[K.TABLE_KEY]
    X = t.layers[K.COUNTS_LAYER].toarray()
    g = int(np.argmin(X.var(0)))
    X[:, g] = X[:, g] * 40 + (X[:, g] == 0) * np.random.default_rng(0).poisson(2.0, len(X))
    import scipy.sparse as sp

    t.layers[K.COUNTS_LAYER] = sp.csr_matrix(X)
    t.X = t.layers[K.COUNTS_LAYER].copy()
    return str(t.var_names[g])


def test_split_and_gene_selection_use_training_patches_only(slides3):
    from spatialtranscriptformer.tl._superres import _split
    from spatialtranscriptformer.train._superres_data import patch_layout, select_genes

    layout = patch_layout(slides3, patch_um=64)
    tr, va = _split(layout.patient_ids, ["P1"], 0)
    assert set(layout.patient_ids[tr]) == {"P0", "P2"} and set(layout.patient_ids[va]) == {"P1"}
    rows = layout.rows(tr)
    assert len(rows[1]) == 0 and len(rows[0]) and len(rows[2])  # no bin of the validation slide
    # the selection over the training bins equals the selection over the training slides' patches alone
    only = patch_layout([slides3[0], slides3[2]], patch_um=64)
    assert select_genes(layout.tables, 4, layer=K.COUNTS_LAYER, rows=rows) == select_genes(
        only.tables, 4, layer=K.COUNTS_LAYER, rows=only.rows()
    )
    # one patient: a random 20% of the patches validate (warned), and their bins choose no gene
    with pytest.warns(UserWarning, match="Only one patient"):
        tr1, va1 = _split(np.array(["P0"] * 10), "patient", 0)
    assert len(va1) == 2 and not set(tr1) & set(va1)
    one = patch_layout(slides3[0], patch_um=64)
    with pytest.warns(UserWarning, match="Only one patient"):
        tr1, va1 = _split(one.patient_ids, "patient", 0)
    a, b = one.rows(tr1)[0], one.rows(va1)[0]
    assert len(a) and len(b) and not set(a.tolist()) & set(b.tolist())


@pytest.mark.slow
def test_fit_chooses_genes_without_the_validation_patient(tmp_path):
    from spatialtranscriptformer.tl._superres import fit_superres
    from spatialtranscriptformer.train._superres_data import superres_targets
    from test_superres import tiny_backbone

    slides = stf.datasets.synthetic(
        technology="visium_hd", bin_size_um=2, size_um=128, n_genes=10, n_pathways=2, n_slides=2, n_patients=2,
        seed=5,
    )
    boosted = _boost_quiet_gene(slides[1])  # patient P1, the validation patient
    assert boosted in superres_targets(slides, genes=3, patch_um=64).genes  # picked if P1's bins counted
    m = fit_superres(
        slides, genes=3, max_epochs=1, batch_size=8, progress=False, accumulate_grad_batches=1,
        model_kwargs={"backbone": tiny_backbone(), "patch_um": 64, "hidden": 8, "n_layers": 1},
        data_kwargs={"cache_dir": tmp_path},
    )
    assert m.params["val_patients"] == ["P1"] and m.params["train_patients"] == ["P0"]
    assert boosted not in m.genes and m.params["gene_selection"] == "training patches"
    assert m.genes == superres_targets(slides[0], genes=3, patch_um=64).genes


@pytest.mark.slow
def test_cross_validate_superres_leave_one_patient_out(slides3, tmp_path):
    from spatialtranscriptformer.train._superres_data import superres_targets
    from test_superres import tiny_backbone

    before = [(set(s.images), dict(s.tables[K.TABLE_KEY].uns), s.tables[K.TABLE_KEY].X.sum()) for s in slides3]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # three patients: no fallback, no "not held-out" warning
        res = stf.tl.cross_validate(
            slides3, model="superres", genes=3, max_epochs=1, batch_size=8, accumulate_grad_batches=1,
            model_kwargs={"backbone": tiny_backbone(), "patch_um": 64, "hidden": 8, "n_layers": 1},
            data_kwargs={"cache_dir": tmp_path}, progress=False,
        )
    assert sorted(res["fold"].unique()) == ["P0", "P1", "P2"]
    assert set(res.columns) >= {"fold", "gene", "scale_um", "pcc", "ssim", "n_bins"}
    for fold in ("P0", "P1", "P2"):
        tr, va = res.attrs["train_patients"][fold], res.attrs["val_patients"][fold]
        assert fold not in tr and fold not in va and len(va) == 1 and not set(tr) & set(va)
        assert set(tr) | set(va) | {fold} == {"P0", "P1", "P2"}
        # genes of the fold: the top-3 of its training patient's slide alone
        train_slides = [s for s in slides3 if s.tables[K.TABLE_KEY].uns[K.SLIDE_META_KEY]["patient_id"] in tr]
        assert res.attrs["genes"][fold] == superres_targets(train_slides, genes=3, patch_um=64).genes
        sub = res[res["fold"] == fold]
        assert set(sub["gene"]) == set(res.attrs["genes"][fold]) and set(sub["scale_um"]) == {2, 4, 8, 16}
        assert "w_2um" in res.attrs["histories"][fold].columns
    after = [(set(s.images), dict(s.tables[K.TABLE_KEY].uns), s.tables[K.TABLE_KEY].X.sum()) for s in slides3]
    assert [(a, set(u), x) for a, u, x in after] == [(a, set(u), x) for a, u, x in before]  # data untouched


def test_cross_validate_superres_bad_input(slides3):
    from spatialtranscriptformer.tl import cross_validate_superres

    with pytest.raises(ValueError, match="chooses the validation patient"):
        cross_validate_superres(slides3, validation=["P1"])
    with pytest.raises(ValueError, match="do not apply to model='superres'"):
        stf.tl.cross_validate(slides3, model="superres", layer=None)
    with pytest.raises(ValueError, match="at least 2 patient groups"):
        cross_validate_superres(slides3[0])
