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
    """HEST-Benchmark code path, written out directly with scikit-learn.

    HEST wraps the PCA scores in ``torch.Tensor`` (float32); scikit-learn turns that tensor into a float64
    array, so the ridge is solved in double precision on float32-rounded scores.
    """
    pipe = Pipeline([("scaler", StandardScaler()), ("PCA", PCA(n_components=n_comp, random_state=1))])
    Z_tr = pipe.fit_transform(X_tr).astype(np.float32).astype(np.float64)
    Z_te = pipe.transform(X_te).astype(np.float32).astype(np.float64)
    alpha = 100 / (Z_tr.shape[1] * Y_tr.shape[1])
    reg = Ridge(solver="lsqr", alpha=alpha, random_state=1, fit_intercept=False, max_iter=1000)
    reg.fit(Z_tr, Y_tr)
    return reg.predict(Z_te), alpha


def _r(a, b):
    return np.array([np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(a.shape[1])])


@pytest.mark.parametrize(("n", "f", "expected_pcs"), [(120, 40, 40), (30, 300, 30), (400, 300, 256)])
def test_ridge_matches_hest_up_to_the_added_mean(n, f, expected_pcs):
    X, Y = _data(n=n, f=f)
    Xte, _ = _data(n=25, f=f, seed=1)
    probe = RidgeProbe().fit(X, Y)
    ref, alpha = _hest_reference(X, Y, Xte, expected_pcs)
    assert probe.alpha_ == pytest.approx(alpha)
    assert probe.alpha_ == pytest.approx(hest_alpha(expected_pcs, Y.shape[1]))
    pred = probe.predict(Xte)
    assert pred.shape == (25, Y.shape[1])
    # HEST's predictions plus the training mean of each gene: same per-gene r, on the target scale
    np.testing.assert_allclose(pred - Y.mean(0), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_r(pred, Y[:25]), _r(ref, Y[:25]), atol=1e-6)
    assert abs(probe.predict(X).mean() - Y.mean()) < 1e-6 < abs(ref.mean() - Y.mean())


def test_ridge_cv_chooses_alpha_inside_the_training_slides():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(300, 60))
    Y = X[:, :3] @ rng.normal(size=(3, 4)) + 3.0 * rng.normal(size=(300, 4)) + 2.0  # noisy: shrinkage helps
    groups = np.repeat(["a", "b", "c"], 100)
    probe = RidgeProbe(alpha="cv").fit(X, Y, groups=groups)
    scores = probe.cv_scores_
    assert set(scores) == set(probe.alphas) and probe.alpha_ == max(scores, key=scores.get)
    assert probe.alpha_ > hest_alpha(60, 4) * 30  # far stronger than HEST's fixed penalty here
    # exact leave-one-slide-out score of the chosen alpha, recomputed by hand
    rs = []
    for g in "abc":
        tr, te = groups != g, groups == g
        p = RidgeProbe(alpha=probe.alpha_).fit(X[tr], Y[tr])
        rs.append(_r(p.predict(X[te]), Y[te]).mean())
    assert scores[probe.alpha_] == pytest.approx(np.mean(rs), abs=1e-3)
    # one slide: five spatial blocks; no groups and no coordinates is a clear error
    single = RidgeProbe(alpha="cv").fit(X[:100], Y[:100], coords=rng.uniform(size=(100, 2)))
    assert single.alpha_ in single.alphas
    with pytest.raises(ValueError, match="at least two slides"):
        RidgeProbe(alpha="cv").fit(X, Y)
    with pytest.raises(ValueError, match="'cv'"):
        RidgeProbe(alpha="auto")
    back = RidgeProbe.from_arrays(probe.to_arrays())
    assert back.alpha == "cv" and back.alpha_ == probe.alpha_
    np.testing.assert_array_equal(back.predict(X[:5]), probe.predict(X[:5]))


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
    old = {k: v for k, v in probe.to_arrays().items() if k != "y_mean"}  # saved before the mean was added back
    np.testing.assert_allclose(RidgeProbe.from_arrays(old).predict(X) + Y.mean(0), probe.predict(X), atol=1e-9)
    with pytest.raises(ValueError, match="n_components"):
        RidgeProbe(n_components=0)
