"""stf.tl.fit: training, history, determinism, resume, gene selection, dispatch and bad input."""

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

import spatialtranscriptformer as stf
from spatialtranscriptformer.pp._gene_sets import load_gene_sets

TINY = {"token_dim": 16, "n_heads": 2, "num_pathways": 4}
FAST = {"max_epochs": 2, "data_kwargs": {"gene_sets": None}, "model_kwargs": TINY, "accelerator": "cpu", "progress": False}


@pytest.fixture
def slides(make_toy_slide):
    return [make_toy_slide(f"s{i}", f"p{i // 2}", seed=i) for i in range(4)]


def _weights(m):
    return {k: v.clone() for k, v in m.module.state_dict().items()}


@pytest.mark.slow
def test_fit_history_metrics_and_determinism(slides):
    m = stf.tl.fit(slides, genes=6, max_epochs=3, data_kwargs={"gene_sets": None}, model_kwargs=TINY, accelerator="cpu", progress=False,
                   validation="patient")
    h = m.history
    assert list(h.columns) == ["epoch", "train_loss", "val_loss", "val_pcc", "lr"]
    assert h["epoch"].tolist() == [0, 1, 2]
    # pitfall 2: every reported metric is actually produced, each epoch
    assert np.isfinite(h[["train_loss", "val_loss", "val_pcc"]].to_numpy()).all()
    assert m.best_epoch == int(h["val_loss"].idxmin())
    assert len(m.genes) == 6 and m.embedding_key == "X_toy" and m.input_dim == 8 and m.level == "spot"
    assert set(m.fit_params["val_slides"]) in ({"s0", "s1"}, {"s2", "s3"})  # one whole patient held out
    m2 = stf.tl.fit(slides, genes=6, max_epochs=3, data_kwargs={"gene_sets": None}, model_kwargs=TINY, accelerator="cpu", progress=False,
                    validation="patient")
    w1, w2 = _weights(m), _weights(m2)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    m3 = stf.tl.fit(slides, genes=6, max_epochs=1, data_kwargs={"gene_sets": None}, model_kwargs=TINY, accelerator="cpu",
                    progress=False, seed=1)
    assert not all(torch.equal(w1[k], v) for k, v in _weights(m3).items())


def test_fit_restores_best_epoch_weights(slides, tmp_path):
    kw = {**FAST, "max_epochs": 3, "validation": "patient", "plan_kwargs": {"monitor": "val_pcc"}}
    m = stf.tl.fit(slides, genes=4, **kw, checkpoint_dir=tmp_path)
    best = torch.load(tmp_path / "best.ckpt", weights_only=True)
    assert m.best_epoch == best["epoch"] == int(m.history["val_pcc"].idxmax())
    sd = {k.removeprefix("module."): v for k, v in best["state_dict"].items()}
    assert all(torch.equal(sd[k], v) for k, v in m.module.state_dict().items())
    # without a checkpoint folder the best weights are kept in memory (nothing written): same result
    mem = stf.tl.fit(slides, genes=4, **kw)
    assert mem.best_epoch == m.best_epoch
    assert all(torch.equal(mem.module.state_dict()[k], v) for k, v in m.module.state_dict().items())
    # default: no validation, a fixed schedule, the last weights
    last = stf.tl.fit(slides, genes=4, **FAST)
    assert last.best_epoch is None and last.fit_params["val_slides"] == [] and len(last.history) == 2


class StopAfter(Callback):
    def __init__(self, n):
        self.n = n

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.n:
            trainer.should_stop = True


@pytest.mark.slow
def test_resume_continues_an_interrupted_run_exactly(slides, tmp_path, make_toy_slide):
    kw = {**FAST, "max_epochs": 4, "early_stopping_patience": None, "validation": None}
    full = stf.tl.fit(slides, genes=4, **kw)
    stf.tl.fit(slides, genes=4, **kw, checkpoint_dir=tmp_path / "a", callbacks=[StopAfter(2)])
    ckpt = tmp_path / "a" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    resumed = stf.tl.fit(slides, genes=4, **kw, resume_from=ckpt, checkpoint_dir=tmp_path / "b")
    assert resumed.history["epoch"].tolist() == [0, 1, 2, 3]
    w1, w2 = _weights(full), _weights(resumed)
    assert all(torch.allclose(w1[k], w2[k], atol=1e-6) for k in w1)
    other = [make_toy_slide(f"s{i}", f"p{i}", seed=i, genes=[f"H{j}" for j in range(8)]) for i in range(2)]
    with pytest.raises(ValueError, match="genes"):
        stf.tl.fit(other, genes=4, **kw, resume_from=ckpt)


def test_top_genes_are_chosen_before_the_validation_split(slides):
    # G7 is extremely variable only on s0. Validation slides are the user's training data: genes are chosen on
    # all slides given to fit, so that models trained with or without a validation split share their genes;
    # held-out test slides are never given to fit (cross_validate / benchmark choose genes on training folds).
    from spatialtranscriptformer.pp._genes import select_top_genes

    slides[0].layers["counts"][:, 7] = np.tile([0, 500], 18)
    with_val = stf.tl.fit(slides, genes=3, validation=["s0"], **{**FAST, "max_epochs": 1})
    without = stf.tl.fit(slides, genes=3, **{**FAST, "max_epochs": 1})
    assert "G7" in with_val.genes and with_val.genes == without.genes == select_top_genes(slides, 3)
    assert "G7" not in select_top_genes(slides[1:], 3)


def test_pathway_tokens_named_by_gene_sets_measured_whatever_genes_are_predicted(make_toy_slide):
    hm = load_gene_sets("hallmark")
    measured = list(dict.fromkeys(hm["HALLMARK_HYPOXIA"][:6] + hm["HALLMARK_APOPTOSIS"][:6] + ["G_OTHER"]))
    data = [make_toy_slide(f"s{i}", f"p{i}", genes=measured, seed=i) for i in range(3)]
    kw = {"max_epochs": 2, "model_kwargs": {"token_dim": 16, "n_heads": 2}, "accelerator": "cpu", "progress": False}
    # predicting only G_OTHER (in no gene set): the tokens are still named, supervised by all measured genes
    m = stf.tl.fit(data, genes=["G_OTHER"], **kw)
    assert m.fit_params["pathway_loss_weight"] == 0.1 and m.fit_params["pathway_structure_weight"] == 1.0
    named = [p for p, g in hm.items() if sum(x in measured for x in g) >= 5]
    assert m.pathways == named and m.module.num_pathways == len(named) >= 2
    assert np.isfinite(m.history["train_loss"]).all()
    s = data[0].copy()
    stf.tl.predict(s, m, progress=False)
    assert list(s.obsm["stf_pathways"].columns) == named
    # weight 0: nothing ties tokens to names -> unnamed scores
    m0 = stf.tl.fit(data, genes=["G_OTHER"], plan_kwargs={"pathway_loss_weight": 0}, **kw)
    assert m0.pathways == [f"token_{i}" for i in range(m0.module.num_pathways)]
    # pathway_init links tokens to their predicted member genes (needs a reconstructor in the gene head)
    mi = stf.tl.fit(data, genes=measured[:4],
                    **{**kw, "model_kwargs": {**kw["model_kwargs"], "gene_head": "both", "pathway_init": True}})
    assert mi.model_arrays["pathway_membership"].shape == (4, len(named))
    # data whose genes are not symbols: auto -> a warning and unnamed tokens; an explicit weight is an error
    toy = make_toy_slide("x", "p")
    with pytest.warns(UserWarning, match="stay unnamed"):
        mt = stf.tl.fit(toy, genes=["G0", "G1"], max_epochs=1, progress=False)
    assert mt.pathways[0] == "token_0"
    with pytest.raises(ValueError, match="No gene set has >= 5 members"):
        stf.tl.fit(toy, genes=["G0", "G1"], plan_kwargs={"pathway_loss_weight": 0.5}, max_epochs=1)


def test_ridge_dispatch_and_unknown_model(slides):
    m = stf.tl.fit(slides, model="ridge", genes=5)
    assert m.model_name == "ridge" and m.target_space == "log1p"
    pred = m.predict_arrays(slides[0].obsm["X_toy"], slides[0].obsm["spatial"])["expr"]
    truth = np.log1p(slides[0][:, m.genes].layers["counts"])
    r = np.mean([np.corrcoef(pred[:, j], truth[:, j])[0, 1] for j in range(5)])
    assert r > 0.3  # the planted linear signal is found
    with pytest.raises(ValueError, match=r"Unknown model 'nope'"):
        stf.tl.fit(slides, model="nope")


@pytest.mark.slow
def test_fit_slide_level_baseline_and_count_loss(slides):
    m = stf.tl.fit(slides, model="attention_mil", genes=4, max_epochs=2, accelerator="cpu", progress=False,
                   model_kwargs={"hidden": 16, "attention_dim": 8}, validation="patient")
    assert m.level == "slide" and np.isfinite(m.history["val_pcc"]).all()
    z = stf.tl.fit(slides, genes=4, loss="zinb", **FAST, validation="patient")
    assert z.target_space == "counts" and np.isfinite(z.history["val_loss"]).all()


def _unchanged(a, b):
    assert a.obsm.keys() == b.obsm.keys() and a.layers.keys() == b.layers.keys() and a.uns.keys() == b.uns.keys()
    np.testing.assert_array_equal(np.nan_to_num(a.layers["counts"]), np.nan_to_num(b.layers["counts"]))




@pytest.mark.parametrize(
    ("mutate", "kwargs", "err", "match"),
    [
        (lambda s: None, {"embedding_key": "X_uni"}, KeyError, r"X_uni.*available.*X_toy"),
        (lambda s: s[1].obsm.__setitem__("X_toy", np.zeros((36, 5), np.float32)), {}, ValueError, "widths differ"),
        (lambda s: None, {"genes": ["G0", "ERBB2", "CD74"]}, KeyError, r"ERBB2.*CD74|CD74.*ERBB2"),
        (lambda s: s[2].layers["counts"].__setitem__(slice(1, None), 0), {}, ValueError, "at least 2"),
        (lambda s: s[0].obsm["X_toy"].__setitem__((0, 0), np.nan), {}, ValueError, "NaN"),
        (lambda s: s[3].layers["counts"].__setitem__((0, 0), np.inf), {}, ValueError, "NaN/inf"),
        (lambda s: s[1].layers.__setitem__("counts", s[1].layers["counts"] * 0.5), {"loss": "poisson"}, ValueError, "integer"),
        (lambda s: None, {"model_kwargs": {**TINY, "n_layers": 1, "interactions": ("p2p", "p2h", "h2p")}}, ValueError, "h2h"),
        (lambda s: None, {"data_kwargs": {"gene_sets": None, "layer": "raw"}}, KeyError, "raw"),
        (lambda s: None, {"loss": "huber"}, ValueError, "huber"),
    ],
)
def test_bad_input_raises_and_leaves_data_unchanged(slides, mutate, kwargs, err, match):
    mutate(slides)
    before = [s.copy() for s in slides]
    with pytest.raises(err, match=match):
        stf.tl.fit(slides, genes=kwargs.pop("genes", 4), **{**FAST, "max_epochs": 1, **kwargs})
    for a, b in zip(slides, before, strict=True):
        _unchanged(a, b)
