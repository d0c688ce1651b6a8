"""The one-API-style entry points dispatch to the super-resolution model: fit / predict / evaluate."""

import inspect

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


def test_fit_superres_defaults_are_the_registry_defaults_of_fit():
    # fit(model="superres") resolves its model-dependent defaults from the registry: they must be fit_superres's
    from spatialtranscriptformer.module._registry import get_model_entry

    entry = get_model_entry("superres")
    sig = inspect.signature(stf.tl.fit_superres).parameters
    for name in ("loss", "lr", "batch_size", "early_stopping_patience", "validation"):
        assert entry.default(name) == sig[name].default, name
    fit_sig = inspect.signature(stf.tl.fit).parameters
    assert fit_sig["max_epochs"].default == sig["max_epochs"].default == 30 and fit_sig["genes"].default == sig["genes"].default
    shared = [p for p in sig if p not in ("data",)]
    assert set(shared) <= set(fit_sig)  # the same names in every family


@pytest.mark.slow
def test_fit_predict_evaluate_dispatch_superres(tmp_path):
    from lightning.pytorch.callbacks import Callback

    class Epochs(Callback):
        def __init__(self):
            self.n = 0

        def on_train_epoch_end(self, trainer, pl_module):
            self.n += 1

    slides = stf.datasets.synthetic(technology="visium_hd", bin_size_um=2, size_um=128, n_genes=8, n_pathways=2,
                                    n_slides=3, n_patients=3, seed=3)
    test = slides[2]  # held out: neither trained nor validated on
    counter = Epochs()
    model = stf.tl.fit(slides[:2], model="superres", genes=4, max_epochs=2, batch_size=4, progress=False, lr=2e-4,
                       loss="mse", validation=["P0"], early_stopping_patience=7,
                       model_kwargs={"backbone": _rebuildable_tiny_backbone(), "patch_um": 64, "hidden": 8},
                       plan_kwargs={"warmup_epochs": 1, "weight_decay": 0.05, "gradnorm": False},
                       data_kwargs={"cache_dir": tmp_path / "cache"}, accumulate_grad_batches=1, devices=1,
                       callbacks=[counter])  # the user's callbacks join ours (no "multiple values" error)
    assert isinstance(model, stf.tl.SuperResModel) and len(model.genes) == 4 and counter.n == 2
    # everything was passed through, nothing dropped
    p = model.params
    assert (p["lr"], p["batch_size"], p["loss"], p["early_stopping_patience"], p["max_epochs"]) == (2e-4, 4, "mse", 7, 2)
    assert p["val_patients"] == ["P0"] and p["train_patients"] == ["P1"] and p["hidden"] == 8
    plan = model.plan
    assert (plan.lr, plan.weight_decay, plan.warmup_epochs, plan.gradnorm) == (2e-4, 0.05, 1, None)
    res = stf.tl.evaluate(test, model=model)
    assert set(res["scale_um"]) == {2, 4, 8, 16} and res["pcc"].notna().all()
    model.save(tmp_path / "sr")
    # predict(copy=True) returns a copy and leaves the user's slide as it was
    copied = stf.tl.predict(test, tmp_path / "sr", copy=True, progress=False)
    assert K.SUPERRES_KEY in copied.images and K.SUPERRES_KEY not in test.images
    stf.tl.predict(test, tmp_path / "sr", progress=False)  # a saved folder is recognised by its kind
    el = test.images[K.SUPERRES_KEY]
    assert np.asarray(el["scale0"]["image"].values).shape[0] == 4
    assert isinstance(stf.tl.BaseModel.load(tmp_path / "sr"), stf.tl.SuperResModel)
    with pytest.raises(FileNotFoundError, match="folder not found"):
        stf.tl.evaluate(test, model="stf")  # a model name is not a model
    with pytest.raises(ValueError, match="do not apply to model='superres'"):
        stf.tl.fit(slides[:2], model="superres", embedding_key="X_uni")
