"""The one-API-style entry points dispatch to the super-resolution model: fit / predict / evaluate."""

import numpy as np
import pytest

import spatialtranscriptformer as stf
from spatialtranscriptformer import _constants as K
from test_superres import tiny_backbone

pytest.importorskip("torch")


def _rebuildable_tiny_backbone():
    """The tiny ViT of test_superres with the timm arguments recorded, so a saved model can rebuild it."""
    from dataclasses import replace

    bb = tiny_backbone()
    bb.spec = replace(bb.spec, timm_kwargs={"img_size": 64})
    return bb


@pytest.mark.slow
def test_fit_predict_evaluate_dispatch_superres(tmp_path):
    slides = stf.datasets.synthetic(technology="visium_hd", bin_size_um=2, size_um=128, n_genes=8, n_pathways=2,
                                    n_slides=3, n_patients=3, seed=3)
    test = slides[2]  # held out: neither trained nor validated on
    model = stf.tl.fit(slides[:2], model="superres", genes=4, max_epochs=1, backbone=_rebuildable_tiny_backbone(), patch_um=64,
                       batch_size=4, accumulate_grad_batches=1, hidden=8, progress=False,
                       cache_dir=tmp_path / "cache", devices=1)
    assert isinstance(model, stf.tl.SuperResModel) and len(model.genes) == 4
    res = stf.tl.evaluate(test, model=model)
    assert set(res["scale_um"]) == {2, 4, 8, 16} and res["pcc"].notna().all()
    model.save(tmp_path / "sr")
    stf.tl.predict(test, tmp_path / "sr")  # a saved folder is recognised by its format
    el = test.images[K.SUPERRES_KEY]
    assert np.asarray(el["scale0"]["image"].values).shape[0] == 4
    with pytest.raises(TypeError, match="only used for super-resolution"):
        stf.tl.evaluate(test, model="stf")
