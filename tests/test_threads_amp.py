"""stf.settings.n_threads (applied in fit / predict / embed) and the amp / compile options of fit and embed."""

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

import spatialtranscriptformer as stf
from spatialtranscriptformer._settings import available_cpus, default_n_threads

TINY = {"token_dim": 16, "n_heads": 2, "num_pathways": 4}
FAST = {"max_epochs": 1, "gene_sets": None, "model_kwargs": TINY, "accelerator": "cpu", "progress": False,
        "validation": None}


@pytest.fixture
def threads():
    """Set stf.settings.n_threads for a test, restoring the suite's single thread afterwards."""
    old = stf.settings.n_threads
    yield stf.settings
    stf.settings.n_threads = old


def test_n_threads_values_and_defaults(threads, monkeypatch):
    for var in ("STF_N_THREADS", "OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        monkeypatch.delenv(var, raising=False)
    assert 1 <= available_cpus() <= (__import__("os").cpu_count() or 1)
    assert default_n_threads() == available_cpus()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_n_threads() == 3
    monkeypatch.setenv("STF_N_THREADS", "2")  # ours first
    assert default_n_threads() == 2
    threads.n_threads = "auto"
    assert threads.resolved_n_threads() == 2
    threads.n_threads = 5
    assert threads.resolved_n_threads() == 5 and "n_threads=5" in repr(threads)
    threads.n_threads = None
    assert threads.resolved_n_threads() is None
    for bad in (0, -1, 1.5, "many", True):
        with pytest.raises(ValueError, match="n_threads"):
            threads.n_threads = bad


def test_torch_threads_context_sets_and_restores(threads):
    torch.set_num_threads(1)
    threads.n_threads = 2
    with threads.torch_threads():
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 1
    threads.n_threads = None
    with threads.torch_threads():
        assert torch.get_num_threads() == 1


class _Recorder(torch.nn.Module):
    """A spot-level 'model' that records torch's thread count when called."""

    def __init__(self, dim, genes):
        super().__init__()
        self.lin = torch.nn.Linear(dim, genes)
        self.seen = []

    def forward(self, x, coords, mask):
        self.seen.append(torch.get_num_threads())
        return {"expr": self.lin(x)}


def test_predict_and_embed_run_with_the_configured_threads(threads, bundled_sdata):
    import spatialdata as sd

    from spatialtranscriptformer.tl._model import TrainedModel

    torch.set_num_threads(1)
    threads.n_threads = 2
    rec = _Recorder(3, 2)
    model = TrainedModel(rec, model_name="rec", genes=["a", "b"], embedding_key="X_r", input_dim=3, level="spot",
                         loss="mse", log_transform=False)
    model.predict_arrays(np.ones((5, 3), np.float32), np.random.default_rng(0).uniform(size=(5, 2)))
    assert rec.seen == [2] and torch.get_num_threads() == 1

    seen = []

    class Net(torch.nn.Module):
        num_features = 3

        def forward(self, x):
            seen.append(torch.get_num_threads())
            return x.mean((2, 3))

    s = sd.deepcopy(bundled_sdata)
    stf.pp.embed(s, backbone=Net(), tile_size=16, mpp=8.0, progress=False, key_added="X_net")
    assert seen and set(seen) == {2} and torch.get_num_threads() == 1


class _Threads(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(torch.get_num_threads())


@pytest.fixture
def slides(make_toy_slide):
    return [make_toy_slide(f"s{i}", f"p{i}", seed=i) for i in range(2)]


def test_fit_runs_with_the_configured_threads(threads, slides):
    torch.set_num_threads(1)
    threads.n_threads = 2
    cb = _Threads()
    stf.tl.fit(slides, genes=4, callbacks=[cb], **FAST)
    assert cb.seen and set(cb.seen) == {2} and torch.get_num_threads() == 1


def test_fit_amp_bf16_on_cpu_and_option_errors(slides):
    m = stf.tl.fit(slides, genes=4, amp="bf16", **FAST)
    assert np.isfinite(m.history["train_loss"]).all()
    assert all(p.dtype == torch.float32 for p in m.module.parameters())
    pred = m.predict_arrays(slides[0].obsm["X_toy"], slides[0].obsm["spatial"])["expr"]
    assert np.isfinite(pred).all()
    with pytest.raises(ValueError, match="amp"):
        stf.tl.fit(slides, genes=4, amp="int8", **FAST)
    with pytest.raises(ValueError, match="either amp= or precision="):
        stf.tl.fit(slides, genes=4, amp=True, precision="bf16-mixed", **FAST)
    with pytest.raises(ValueError, match="compile"):
        stf.tl.fit(slides, genes=4, compile=2, **FAST)


@pytest.mark.slow
def test_fit_compiled_trains_like_eager_and_returns_a_plain_module(slides):
    eager = stf.tl.fit(slides, genes=4, **FAST)
    comp = stf.tl.fit(slides, genes=4, compile="aot_eager", **FAST)
    assert comp.module._compiled_call_impl is None  # runs eagerly afterwards, saves plain weights
    for (k, a), (k2, b) in zip(eager.module.state_dict().items(), comp.module.state_dict().items(), strict=True):
        assert k == k2
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_embed_amp_on_cpu_matches_float32(bundled_sdata):
    import spatialdata as sd
    import timm

    torch.manual_seed(0)
    from spatialtranscriptformer.pp._backbones import get_backbone

    # 32-px network input (not the default 224): the test checks the precision path, not the model
    net = get_backbone(timm.create_model("resnet10t", pretrained=False, num_classes=0), input_size=32, mpp=4.0)
    s = sd.deepcopy(bundled_sdata)
    stf.pp.embed(s, backbone=net, key_added="X_32", tile_size=32, mpp=4.0, progress=False)
    stf.pp.embed(s, backbone=net, key_added="X_bf", tile_size=32, mpp=4.0, progress=False, amp="bf16")
    t = s.tables["table"]
    a, b = t.obsm["X_32"], t.obsm["X_bf"]
    assert b.dtype == np.float32 and not np.array_equal(a, b)  # autocast ran
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98
    with pytest.raises(ValueError, match="amp"):
        stf.pp.embed(s, backbone=net, key_added="X_x", tile_size=32, mpp=4.0, progress=False, amp="int4")


@pytest.mark.slow
def test_embed_compiled_matches_eager(bundled_sdata):
    import spatialdata as sd
    import timm

    torch.manual_seed(0)
    from spatialtranscriptformer.pp._backbones import get_backbone

    # 32-px network input (not the default 224): the test checks the precision path, not the model
    net = get_backbone(timm.create_model("resnet10t", pretrained=False, num_classes=0), input_size=32, mpp=4.0)
    s = sd.deepcopy(bundled_sdata)
    stf.pp.embed(s, backbone=net, key_added="X_e", tile_size=32, mpp=4.0, progress=False, batch_size=64)
    stf.pp.embed(s, backbone=net, key_added="X_c", tile_size=32, mpp=4.0, progress=False, batch_size=64,
                 compile="aot_eager")
    t = s.tables["table"]
    np.testing.assert_allclose(t.obsm["X_c"], t.obsm["X_e"], rtol=1e-4, atol=1e-5)
