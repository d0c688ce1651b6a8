"""The model layer: a model and a loss added from this file alone, the one runner, the base class, the grouped fit."""

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import spatialtranscriptformer as stf
from spatialtranscriptformer.module import _losses, _registry

GENES = ["G0", "G1", "G2", "G3"]


class ToyLinear(nn.Module):
    """A two-layer linear spot model: all that the forward contract asks for (``"expr"`` per spot)."""

    def __init__(self, input_dim, num_genes, *, width=4, level="spot", loss="mse", gene_means=None):
        super().__init__()
        self.level, self.loss = level, loss
        self.net = nn.Sequential(nn.Linear(input_dim, width), nn.Linear(width, num_genes))

    def forward(self, x, coords, mask, *, return_attention=False):
        return {"expr": self.net(x)}


@pytest.fixture
def scratch_tables(monkeypatch):
    """Registrations made by a test go into copies of the registry and the loss table (undone afterwards)."""
    _registry._load_providers()
    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))
    monkeypatch.setattr(_losses, "_LOSS_TABLE", dict(_losses._LOSS_TABLE))


@pytest.fixture
def slides(make_toy_slide):
    return [make_toy_slide(f"s{i}", f"p{i}", seed=i) for i in range(3)]


def test_a_model_and_a_loss_added_from_one_file(scratch_tables, slides, tmp_path):
    from spatialtranscriptformer.module import (
        available_losses,
        available_models,
        register_loss,
        register_model,
    )

    @register_model("toy_linear", description="two linear layers (test)")
    def build(input_dim, num_genes, *, level, loss, **model_kwargs) -> ToyLinear:
        return ToyLinear(input_dim, num_genes, level=level, loss=loss, **model_kwargs)

    calls = []

    @register_loss("toy_l1", description="mean absolute error (test)")
    def l1(out, target, mask, **_):
        calls.append(1)
        m = torch.ones_like(target[..., :1]) if mask is None else mask.unsqueeze(-1).to(target.dtype)
        return ((out["expr"] - target).abs() * m).sum() / (m.sum() * target.shape[-1])

    assert "toy_linear" in available_models() and "toy_l1" in available_losses()
    assert available_models(details=True).loc["toy_linear", "model_kwargs"] == {"width": 4}
    m = stf.tl.fit(slides, model="toy_linear", loss="toy_l1", genes=GENES, embedding_key="X_toy", max_epochs=3,
                   model_kwargs={"width": 3}, progress=False, accelerator="cpu")
    assert calls and m.loss == "toy_l1" and m.target_space == "log1p" and m.model_kwargs == {"width": 3}
    assert np.isfinite(m.history["train_loss"]).all() and m.history["train_loss"].iloc[-1] < m.history["train_loss"].iloc[0]
    # predict, save and load work through the base class
    res = m.evaluate(slides[0], progress=False)  # predicts a copy, scores it
    assert sorted(res["gene"].unique()) == GENES and "stf_pred" not in slides[0].uns
    m.save(tmp_path / "toy")
    back = stf.tl.BaseModel.load(tmp_path / "toy")
    assert isinstance(back, stf.tl.TrainedModel) and back.model_name == "toy_linear" and back.loss == "toy_l1"
    x, c = slides[1].obsm["X_toy"], slides[1].obsm["spatial"]
    np.testing.assert_array_equal(back.predict_arrays(x, c)["expr"], m.predict_arrays(x, c)["expr"])
    # the new loss works with the registered models too (they build the head the loss asks for)
    s = stf.tl.fit(slides, loss="toy_l1", genes=GENES, embedding_key="X_toy", max_epochs=1, progress=False,
                   model_kwargs={"token_dim": 8, "n_heads": 2}, data_kwargs={"gene_sets": None})
    assert s.loss == "toy_l1" and np.isfinite(s.history["train_loss"]).all()
    # a count loss (rate head) trains on raw counts and predicts counts
    register_loss("toy_rate_mse", lambda out, y, m, **_: _losses.masked_mse(out["rate"], y, m), head="rate",
                  counts=True)
    h = stf.tl.fit(slides, model="he2rna", loss="toy_rate_mse", genes=GENES, embedding_key="X_toy", max_epochs=1,
                   model_kwargs={"hidden": [8]}, progress=False)
    assert h.target_space == "counts" and (h.predict_arrays(x, c)["expr"] >= 0).all()
    with pytest.raises(ValueError, match=r"no model_kwargs \['depth'\]; valid: \['width'\]"):
        stf.tl.fit(slides, model="toy_linear", genes=GENES, model_kwargs={"depth": 2})
    with pytest.raises(ValueError, match="accepts loss"):
        stf.tl.fit(slides, model="ridge", loss="toy_l1", genes=GENES)
    with pytest.raises(ValueError, match="head must be one of"):
        register_loss("bad", l1, head="gamma")


def test_fit_is_deterministic_and_the_former_keywords_give_the_same_model(slides):
    gene_sets = {"A": ["G0", "G1", "G2", "G3", "G4"], "B": ["G2", "G3", "G4", "G5", "G6"]}
    kw = {"genes": GENES, "embedding_key": "X_toy", "max_epochs": 2, "progress": False, "seed": 3,
          "model_kwargs": {"token_dim": 8, "n_heads": 2}}
    a = stf.tl.fit(slides, data_kwargs={"gene_sets": gene_sets}, plan_kwargs={"pcc_weight": 0.5}, **kw)
    b = stf.tl.fit(slides, data_kwargs={"gene_sets": gene_sets}, plan_kwargs={"pcc_weight": 0.5}, **kw)
    with pytest.warns(FutureWarning, match=r"gene_sets -> data_kwargs.*pcc_weight -> plan_kwargs"):
        c = stf.tl.fit(slides, gene_sets=gene_sets, pcc_weight=0.5, **kw)
    x, xy = slides[2].obsm["X_toy"], slides[2].obsm["spatial"]
    ref = a.predict_arrays(x, xy)
    for other in (b, c):
        out = other.predict_arrays(x, xy)
        np.testing.assert_array_equal(out["expr"], ref["expr"])
        np.testing.assert_array_equal(out["pathway_scores"], ref["pathway_scores"])
    assert a.pathways == ["A", "B"] and a.fit_params == c.fit_params and a.model_kwargs == c.model_kwargs
    # every hyperparameter is recorded (a saved model rebuilds the same architecture whatever defaults change)
    assert {"token_dim", "n_layers", "interactions", "dropout", "gene_head"} <= set(a.model_kwargs)
    with pytest.raises(ValueError, match="unknown plan_kwargs key"):
        stf.tl.fit(slides, genes=GENES, plan_kwargs={"pcc_wieght": 1.0})
    with pytest.raises(ValueError, match="both as a keyword and in data_kwargs"):
        stf.tl.fit(slides, genes=GENES, layer="counts", data_kwargs={"layer": "counts"})


def test_the_runner_merges_callbacks_and_restores_the_best_epoch(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, TensorDataset

    from spatialtranscriptformer.train._runner import run_lightning

    class Plan(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def training_step(self, batch, i):
            x, y = batch
            loss = ((self.lin(x) - y) ** 2).mean()
            self.log("train_loss", loss, on_epoch=True, on_step=False)
            return loss

        def validation_step(self, batch, i):
            # a validation loss that is best at epoch 1, whatever the weights
            self.log("val_loss", torch.tensor([3.0, 1.0, 2.0, 4.0][self.current_epoch]), on_epoch=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Count(Callback):
        def __init__(self):
            self.epochs = 0

        def on_train_epoch_end(self, trainer, pl_module):
            self.epochs += 1

    class Snapshot(Callback):
        def __init__(self):
            self.weights = {}

        def on_validation_end(self, trainer, pl_module):
            self.weights[trainer.current_epoch] = pl_module.lin.weight.detach().clone()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=g)
    ds = TensorDataset(x, x.sum(1, keepdim=True))
    ours, user, snap = Count(), Count(), Snapshot()
    torch.manual_seed(0)
    plan = Plan()
    res = run_lightning(plan, DataLoader(ds, batch_size=4), DataLoader(ds, batch_size=16), max_epochs=4,
                        callbacks=[ours], trainer_defaults={"gradient_clip_val": 1.0},
                        trainer_kwargs={"callbacks": [user, snap], "precision": "bf16-mixed"})
    assert ours.epochs == user.epochs == 4 and res["best_epoch"] == 1 and res["last_checkpoint"] is None
    torch.testing.assert_close(plan.lin.weight, snap.weights[1])  # the best epoch's weights are restored
    h = res["history"]
    assert list(h.columns[:4]) == ["epoch", "train_loss", "val_loss", "lr"] and h["val_loss"].tolist() == [3, 1, 2, 4]
    # with a checkpoint folder: Lightning's best / last checkpoints, the same restored epoch
    torch.manual_seed(0)
    res2 = run_lightning(Plan(), DataLoader(ds, batch_size=4), DataLoader(ds, batch_size=16), max_epochs=4,
                         checkpoint_dir=tmp_path, early_stopping_patience=1)
    assert res2["best_epoch"] == 1 and len(res2["history"]) == 3  # stopped after one epoch without improvement
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]


def test_base_model_load_reads_either_kind_and_refuses_the_other(slides, tmp_path):
    m = stf.tl.fit(slides, model="ridge", genes=GENES, embedding_key="X_toy")
    m.save(tmp_path / "r")
    assert isinstance(stf.tl.BaseModel.load(tmp_path / "r"), stf.tl.TrainedModel)
    with pytest.raises(ValueError, match="not a saved SuperResModel"):
        stf.tl.SuperResModel.load(tmp_path / "r")
    # a version-1 folder (before both kinds shared one format) is read as before
    import json

    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (cfg["format"], cfg["version"], cfg["kind"]) == ("spatialtranscriptformer.model", 2, "spot")
    del cfg["kind"]
    cfg["version"] = 1
    (tmp_path / "r" / "config.json").write_text(json.dumps(cfg))
    old = stf.tl.TrainedModel.load(tmp_path / "r")
    x, c = slides[0].obsm["X_toy"], slides[0].obsm["spatial"]
    np.testing.assert_array_equal(old.predict_arrays(x, c)["expr"], m.predict_arrays(x, c)["expr"])
    assert isinstance(old.history, pd.DataFrame)


def test_module_namespace_is_public_and_light():
    import subprocess
    import sys

    code = ("import sys, spatialtranscriptformer.module as m; assert 'torch' not in sys.modules; "
            "print(sorted(m.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in ("SpatialTranscriptFormer", "HE2RNA", "AttentionMIL", "TransMIL", "RidgeProbe", "SuperResDecoder",
                 "register_model", "available_models", "register_loss", "available_losses"):
        assert name in out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert stf.module.SpatialTranscriptFormer.__name__ == "SpatialTranscriptFormer"
