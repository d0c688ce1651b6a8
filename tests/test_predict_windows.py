"""Windowed whole-slide prediction: balanced cores, bounded context, exact where one window covers the slide."""

import numpy as np
import pytest
import torch

from spatialtranscriptformer.module._stf import SpatialTranscriptFormer
from spatialtranscriptformer.tl._model import TrainedModel, spatial_windows


def _layouts():
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(np.arange(90), np.arange(70)), -1).reshape(-1, 2) * 100.0
    holes = grid[rng.uniform(size=len(grid)) > 0.3]
    line = np.c_[np.arange(3000.0), np.zeros(3000)]
    return {"uniform": rng.uniform(0, 5000, (5000, 2)), "grid": grid, "grid_with_holes": holes, "line": line,
            "two_islands": np.r_[rng.uniform(0, 100, (2000, 2)), rng.uniform(9000, 9100, (2500, 2))]}


@pytest.mark.parametrize("name", list(_layouts()))
@pytest.mark.parametrize("window", [500, 1024])
def test_windows_balanced_cover_once_and_bounded(name, window):
    c = _layouts()[name]
    wins = spatial_windows(c, window)
    cores = [w[:k] for w, k in wins]
    assert np.array_equal(np.sort(np.concatenate(cores)), np.arange(len(c)))  # every spot is a core spot once
    sizes = [len(k) for k in cores]
    assert max(sizes) - min(sizes) <= 1  # balanced
    assert all(len(w) <= window and len(np.unique(w)) == len(w) for w, _ in wins)
    tokens = sum(len(w) for w, _ in wins) / len(c)
    assert tokens <= 1.25 + 1e-9
    assert len(wins) == -(-len(c) // int(window / 1.25))  # the fewest cores that fit


@pytest.mark.parametrize("name", ["uniform", "grid_with_holes", "line"])
def test_window_context_is_the_spots_nearest_to_the_core(name):
    c = _layouts()[name]
    for w, k in spatial_windows(c, 700):
        core = w[:k]
        lo, hi = c[core].min(0), c[core].max(0)
        d = np.hypot(*np.maximum(np.maximum(lo - c, c - hi), 0).T)
        outside = np.ones(len(c), bool)
        outside[core] = False
        n_ctx = len(w) - k
        assert n_ctx == min(700 - k, int(0.25 * k))  # the ring is full even along a line
        if n_ctx:
            assert d[w[k:]].max() <= np.sort(d[outside])[n_ctx - 1] + 1e-9


def test_window_context_option_and_errors():
    c = _layouts()["uniform"]
    assert sum(len(w) for w, _ in spatial_windows(c, 1000, context=0.0)) == len(c)
    assert sum(len(w) for w, _ in spatial_windows(c, 1000, context=1.0)) <= 2 * len(c)
    assert spatial_windows(c, None)[0][1] == len(c)
    assert spatial_windows(c, len(c))[0][1] == len(c)
    with pytest.raises(ValueError, match="window_spots"):
        spatial_windows(c, 1)
    with pytest.raises(ValueError, match="context"):
        spatial_windows(c, 100, context=-1)


def test_window_cost_is_linear_in_slide_size():
    rng = np.random.default_rng(1)
    for n in (3_000, 30_000, 120_000):
        c = rng.uniform(0, np.sqrt(n) * 8, (n, 2))
        wins = spatial_windows(c, 2048)
        assert sum(len(w) for w, _ in wins) <= 1.25 * n + len(wins)
        assert max(len(w) for w, _ in wins) <= 2048


def _stf_model(**fit_params):
    torch.manual_seed(0)
    width = 12 if fit_params.get("context_radius") else 6  # embeddings + their neighbours' mean
    module = SpatialTranscriptFormer(width, 5, token_dim=16, n_heads=2, n_layers=2, num_pathways=3, dropout=0.0).eval()
    return TrainedModel(module, model_name="stf", genes=[f"g{i}" for i in range(5)], embedding_key="X_t", input_dim=6,
                        level="spot", loss="mse_pcc", log_transform=True, pathways=["a", "b", "c"],
                        fit_params={"standardize": "slide", **fit_params})


@pytest.fixture(scope="module")
def model():
    """An STF with the defaults of ``stf.tl.fit``: neighbourhood context input and output smoothing."""
    from spatialtranscriptformer.module._stf import DEFAULT_CONTEXT_RADIUS, DEFAULT_OUTPUT_SMOOTHING

    m = _stf_model(context_radius=DEFAULT_CONTEXT_RADIUS, output_smoothing=DEFAULT_OUTPUT_SMOOTHING)
    assert m.input_spec.context_radius and m.output_smoothing > 0
    return m


def _grid(n_side, rng):
    """A Visium-HD-like square grid with a few holes (context and smoothing see real neighbours)."""
    g = np.stack(np.meshgrid(np.arange(n_side), np.arange(n_side)), -1).reshape(-1, 2) * 8.0
    return g[rng.uniform(size=len(g)) > 0.05]


@pytest.mark.parametrize("defaults", [True, False])
def test_prediction_unchanged_where_one_window_covers_the_slide(model, defaults):
    m = model if defaults else _stf_model()
    rng = np.random.default_rng(2)
    c = _grid(18, rng)
    x = rng.normal(size=(len(c), 6)).astype(np.float32)
    whole = m.predict_arrays(x, c, window_spots=None)
    for w in (len(c), len(c) + 1, 10_000):
        got = m.predict_arrays(x, c, window_spots=w)
        np.testing.assert_array_equal(got["expr"], whole["expr"])
        np.testing.assert_array_equal(got["pathway_scores"], whole["pathway_scores"])
    windowed = m.predict_arrays(x, c, window_spots=100)["expr"]
    assert not np.allclose(windowed, whole["expr"])  # smaller windows do change predictions (less context)


def test_windows_see_the_whole_slide_context_and_smoothing(model, monkeypatch):
    """Windowing changes only which spots attend to each other: the context features are computed over the
    whole slide before windowing, the output smoothing over the whole slide after it."""
    rng = np.random.default_rng(4)
    c = _grid(30, rng)
    x = rng.normal(size=(len(c), 6)).astype(np.float32)
    seen = []
    real = TrainedModel._predict_windows

    def spy(self, xin, coords, windows, **kw):
        seen.append((xin.copy(), windows))
        return real(self, xin, coords, windows, **kw)

    monkeypatch.setattr(TrainedModel, "_predict_windows", spy)
    whole = model.predict_arrays(x, c, window_spots=None)
    windowed = model.predict_arrays(x, c, window_spots=200)
    (x_whole, w_whole), (x_win, w_win) = seen
    assert len(w_whole) == 1 and len(w_win) > 1
    np.testing.assert_array_equal(x_win, x_whole)  # same prepared input (standardised + neighbourhood context)
    np.testing.assert_array_equal(x_whole, model.prepare_inputs(x, c))
    # the network's raw output per window, smoothed over the whole slide afterwards
    raw = real(model, x_win, c.astype(np.float32), w_win, device=None, amp=False, compile=False)
    smoothed = model._smooth(raw, c.astype(np.float32))
    # (recomputed outside predict's thread setting: equal up to float32 summation order)
    np.testing.assert_allclose(windowed["expr"], smoothed["expr"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(windowed["pathway_scores"], smoothed["pathway_scores"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(raw["expr"], windowed["expr"])  # smoothing did act, across window borders too
    assert whole["expr"].shape == windowed["expr"].shape


def test_amp_paths_match_float32_on_cpu(model):
    rng = np.random.default_rng(3)
    x, c = rng.normal(size=(200, 6)).astype(np.float32), rng.uniform(0, 2000, (200, 2))
    ref = model.predict_arrays(x, c, window_spots=120)["expr"]
    for amp in (True, "bf16", "fp16"):
        got = model.predict_arrays(x, c, window_spots=120, amp=amp)["expr"]
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, ref, atol=0.05 * np.abs(ref).max())
    with pytest.raises(ValueError, match="amp"):
        model.predict_arrays(x, c, amp="int8")
    with pytest.raises(ValueError, match="compile"):
        model.predict_arrays(x, c, compile=3)


@pytest.mark.slow
def test_compiled_prediction_matches_eager_on_cpu(model):
    rng = np.random.default_rng(3)
    x, c = rng.normal(size=(200, 6)).astype(np.float32), rng.uniform(0, 2000, (200, 2))
    ref = model.predict_arrays(x, c, window_spots=120)["expr"]
    got = model.predict_arrays(x, c, window_spots=120, compile="aot_eager")["expr"]  # windows of two sizes
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    assert type(model.module) is SpatialTranscriptFormer and not model.module._compiled_call_impl  # untouched


def test_zscore_over_several_row_blocks_matches_float64():
    # slides larger than one float64 block are standardised exactly as in one pass
    from spatialtranscriptformer.tl._inputs import _ZSCORE_BLOCK, zscore_features

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(2 * _ZSCORE_BLOCK + 17, 8)) * 3 + 5).astype(np.float32)
    x[:, 3] = 2.0  # a constant feature becomes 0
    ref = x.astype(np.float64) - x.mean(0, dtype=np.float64)
    sd = ref.std(0)
    ref = np.divide(ref, sd, out=np.zeros_like(ref), where=sd > 0)
    np.testing.assert_allclose(zscore_features(x), ref, atol=1e-5)
    assert np.all(zscore_features(x)[:, 3] == 0)
