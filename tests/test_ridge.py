import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from spatialtranscriptformer.module._ridge import RidgeProbe, hest_alpha


def _data(n=120, f=40, g=6, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, f)) * rng.uniform(0.5, 3, size=f) + rng.normal(size=f)
    W = rng.normal(size=(f, g))
    counts = rng.poisson(np.exp(0.3 * (X @ W) / np.sqrt(f) + 1.0))
    return X, np.log1p(counts).astype(np.float64)


def _hest_reference(X_tr, Y_tr, X_te, n_comp):
    """HEST-Benchmark code path, written out directly with scikit-learn."""
    pipe = Pipeline([("scaler", StandardScaler()), ("PCA", PCA(n_components=n_comp, random_state=1))])
    Z_tr = pipe.fit_transform(X_tr).astype(np.float32)
    Z_te = pipe.transform(X_te).astype(np.float32)
    alpha = 100 / (Z_tr.shape[1] * Y_tr.shape[1])
    reg = Ridge(solver="lsqr", alpha=alpha, random_state=1, fit_intercept=False, max_iter=1000)
    reg.fit(Z_tr, Y_tr)
    return reg.predict(Z_te), alpha


@pytest.mark.parametrize(("n", "f", "expected_pcs"), [(120, 40, 40), (30, 300, 30), (400, 300, 256)])
def test_ridge_matches_sklearn_pipeline(n, f, expected_pcs):
    X, Y = _data(n=n, f=f)
    Xte, _ = _data(n=25, f=f, seed=1)
    probe = RidgeProbe().fit(X, Y)
    ref, alpha = _hest_reference(X, Y, Xte, expected_pcs)
    assert probe.alpha_ == pytest.approx(alpha)
    assert probe.alpha_ == pytest.approx(hest_alpha(expected_pcs, Y.shape[1]))
    pred = probe.predict(Xte)
    assert pred.shape == (25, Y.shape[1])
    np.testing.assert_allclose(pred, ref, rtol=1e-4, atol=1e-4)


def test_ridge_learns_signal_and_roundtrips():
    X, Y = _data(n=300, f=30, g=5)
    Xte, Yte = _data(n=100, f=30, g=5, seed=0)  # same generator: the train distribution
    probe = RidgeProbe(n_components=20).fit(X[:200], Y[:200])
    pred = probe.predict(X[200:])
    r = [np.corrcoef(pred[:, j], Y[200:, j])[0, 1] for j in range(Y.shape[1])]
    assert np.mean(r) > 0.3
    arrays = probe.to_arrays()
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    back = RidgeProbe.from_arrays(arrays)
    np.testing.assert_array_equal(back.predict(Xte), probe.predict(Xte))
    assert back.n_components == 20 and back.n_targets == 5 and back.n_features_in == 30
    # np.savez round trip without pickle
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    buf.seek(0)
    loaded = dict(np.load(buf, allow_pickle=False))
    np.testing.assert_array_equal(RidgeProbe.from_arrays(loaded).predict(Xte), probe.predict(Xte))


def test_ridge_bad_input():
    X, Y = _data()
    with pytest.raises(ValueError, match="rows"):
        RidgeProbe().fit(X, Y[:10])
    with pytest.raises(ValueError, match="not fitted"):
        RidgeProbe().predict(X)
    Xbad = X.copy()
    Xbad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        RidgeProbe().fit(Xbad, Y)
    assert np.isnan(Xbad[0, 0])  # input unchanged
    probe = RidgeProbe().fit(X, Y)
    with pytest.raises(ValueError, match="features"):
        probe.predict(X[:, :5])
    with pytest.raises(KeyError, match="missing"):
        RidgeProbe.from_arrays({"coef": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="n_components"):
        RidgeProbe(n_components=0)
