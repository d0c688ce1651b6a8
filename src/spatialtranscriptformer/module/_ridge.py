"""The HEST-Benchmark linear probe: StandardScaler -> PCA -> Ridge (no torch), and its tuned-α variant.

Reference
---------
Jaume G. et al., "HEST-1k: A Dataset for Spatial Transcriptomics and Histology Image Analysis",
*NeurIPS Datasets and Benchmarks* (2024); public code ``mahmoodlab/HEST``
(``src/hest/bench/benchmark.py``, ``src/hest/bench/trainer.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._registry import register_model

HEST_N_COMPONENTS = 256
"""PCA latent dimension of HEST-Benchmark (``--latent_dim``)."""
HEST_SEED = 1
"""Seed of HEST-Benchmark (``--seed``), used for PCA and Ridge ``random_state``."""
HEST_MAX_ITER = 1000
"""``max_iter`` of HEST-Benchmark's Ridge."""

_ARRAY_KEYS = ("scaler_mean", "scaler_scale", "pca_mean", "pca_components", "coef", "alpha")
DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-1, 5, 13))
"""Grid of ridge penalties searched by ``alpha="cv"`` (0.1 to 1e5, two per decade)."""


def hest_alpha(n_features: int, n_targets: int) -> float:
    """HEST-Benchmark ridge penalty ``100 / (n_features * n_targets)``.

    ``n_features`` is the width of the matrix the ridge is fitted on, i.e. the number of PCA
    components (``X_train.shape[1]`` after PCA in ``hest.bench.trainer.train_test_reg``).
    """
    if n_features < 1 or n_targets < 1:
        raise ValueError(f"n_features and n_targets must be >= 1, got {n_features} and {n_targets}.")
    return 100.0 / (n_features * n_targets)


class RidgeProbe:
    """HEST-Benchmark probe from frozen embeddings to (log1p) expression.

    The protocol of ``hest.bench`` with ``--dimreduce PCA`` (the published HEST table):

    1. ``StandardScaler()`` fitted on the training embeddings;
    2. ``PCA(n_components=256, random_state=1)`` on the standardised embeddings; here the count is
       ``min(256, n_samples, n_features)`` so that small folds still work (HEST would fail);
    3. the PCA scores are rounded to float32 (HEST wraps them in a ``torch.Tensor``) and the ridge is
       solved in float64 (scikit-learn converts that tensor to a float64 array);
    4. ``Ridge(solver="lsqr", fit_intercept=False, alpha=100 / (n_pcs * n_targets), max_iter=1000,
       random_state=1)`` where ``n_pcs`` is the number of PCA components (HEST computes
       ``X_train.shape[1]`` after the PCA) and ``n_targets`` the number of genes.

    One deliberate difference: HEST fits the ridge without intercept on centred PCA scores and never
    adds the targets' mean back, so its predictions sit around 0 instead of on the log1p scale of the
    targets (their mean is about 2 on her2st). Here the same ridge is fitted and the mean training
    residual (the targets' mean) is added back: each gene's prediction is HEST's plus a constant, so
    HEST's per-gene Pearson r is unchanged while the predictions (their MSE, their maps on a shared colour
    scale) are on the target scale.

    ``alpha="cv"`` is the stronger, fairer baseline (:func:`~spatialtranscriptformer.tl.fit` model
    ``"ridge_cv"``): the penalty is chosen from ``alphas`` by cross-validation *inside the training
    data* — leave one training slide out when ``groups`` has at least two slides, otherwise five
    spatially contiguous blocks of spots — maximising the mean over genes of the per-slide Pearson r
    (the evaluation metric). HEST's fixed ``100 / (n_pcs * n_genes)`` (about 0.008 for 256 PCs and 50
    genes) is close to ordinary least squares. The cross-validated fits use the exact closed-form
    solution (singular value decomposition); the final fit uses the same solver.

    Targets are log1p raw counts (HEST's ``normalize_adata``: ``sc.pp.log1p`` without library-size
    normalisation); :func:`spatialtranscriptformer.tl.fit` passes them in that space. The probe
    works on single spots: it is a dense (``level="spot"``) model.

    Parameters
    ----------
    n_components
        Maximum number of principal components (HEST: 256).
    alpha
        Ridge penalty; ``None`` uses the HEST formula :func:`hest_alpha`; ``"cv"`` chooses it from
        ``alphas`` by cross-validation on the training data.
    alphas
        Candidate penalties for ``alpha="cv"``.
    random_state
        Seed of PCA and Ridge (HEST default 1).
    max_iter
        Maximum lsqr iterations (HEST: 1000).
    """

    level = "spot"

    def __init__(
        self,
        *,
        n_components: int = HEST_N_COMPONENTS,
        alpha: float | str | None = None,
        alphas: tuple[float, ...] | list[float] = DEFAULT_ALPHAS,
        random_state: int = HEST_SEED,
        max_iter: int = HEST_MAX_ITER,
    ) -> None:
        if n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components}.")
        if isinstance(alpha, str):
            if alpha != "cv":
                raise ValueError(f"alpha must be a number >= 0, None (HEST) or 'cv', got {alpha!r}.")
        elif alpha is not None and not (np.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, None (HEST) or 'cv', got {alpha!r}.")
        alphas = tuple(float(a) for a in alphas)
        if not alphas or not all(np.isfinite(a) and a >= 0 for a in alphas):
            raise ValueError(f"alphas must be a non-empty list of finite numbers >= 0, got {alphas!r}.")
        self.n_components = int(n_components)
        self.alpha = alpha
        self.alphas = alphas
        self.cv_scores_: dict[float, float] | None = None
        self.random_state = random_state
        self.max_iter = int(max_iter)
        self._arrays: dict[str, np.ndarray] | None = None

    # --- fitting -------------------------------------------------------------------------------
    def fit(self, X: np.ndarray, Y: np.ndarray, *, groups: np.ndarray | None = None,
            coords: np.ndarray | None = None) -> RidgeProbe:
        """Fit scaler, PCA and ridge on embeddings ``X`` (n, F) and targets ``Y`` (n, G).

        ``groups`` (slide of each row) and ``coords`` (spot centres, for the spatial blocks of a single
        slide) are used by ``alpha="cv"`` only.
        """
        X = _as_2d(X, "X")
        Y = _as_2d(Y, "Y")
        if X.shape[0] != Y.shape[0]:
            raise ValueError(
                f"X has {X.shape[0]} rows but Y has {Y.shape[0]}; they must match (one per spot)."
            )
        if X.shape[0] < 2:
            raise ValueError(f"The ridge probe needs at least 2 training spots, got {X.shape[0]}.")
        if not np.isfinite(Y).all():
            raise ValueError("Y has NaN/inf values.")
        alpha = self.alpha
        if alpha == "cv":
            self.cv_scores_ = self._cross_validate(X, Y, _cv_folds(len(X), groups, coords))
            alpha = max(self.cv_scores_, key=lambda a: (self.cv_scores_[a], a))  # ties: the stronger penalty
        scaler, pca, Z = self._project_fit(X)
        if alpha is None:
            alpha = hest_alpha(Z.shape[1], Y.shape[1])
        # fitted to Y as HEST does (the PCA scores are centred, so the coefficients are those of the centred
        # targets); the mean of the residual is added back at prediction: HEST's prediction + a constant
        coef = _ridge(Z, Y, float(alpha), exact=self.alpha == "cv", random_state=self.random_state,
                      max_iter=self.max_iter)
        y_mean = Y.mean(axis=0) - Z.mean(axis=0) @ coef.T
        self._arrays = {
            "scaler_mean": np.asarray(scaler.mean_, dtype=np.float64),
            "scaler_scale": np.asarray(scaler.scale_, dtype=np.float64),
            "pca_mean": np.asarray(pca.mean_, dtype=np.float64),
            "pca_components": np.asarray(pca.components_, dtype=np.float64),
            "coef": coef.astype(np.float64),
            "alpha": np.asarray(alpha, dtype=np.float64),
            "y_mean": y_mean.astype(np.float64),
        }
        return self

    def _cross_validate(self, X: np.ndarray, Y: np.ndarray, folds) -> dict[float, float]:
        """Mean over folds of the mean per-gene Pearson r on the held-out fold, for every candidate alpha."""
        from .._stats import column_pearson, mean_r

        scores = np.zeros(len(self.alphas))
        for tr, te in folds:
            scaler, pca, Z = self._project_fit(X[tr])
            U, s, Vt = np.linalg.svd(Z, full_matrices=False)
            uty = U.T @ (Y[tr] - Y[tr].mean(axis=0))
            zte = pca.transform(scaler.transform(X[te])).astype(np.float32).astype(np.float64) @ Vt.T
            for i, a in enumerate(self.alphas):
                scores[i] += mean_r(column_pearson(zte @ ((s / (s**2 + a))[:, None] * uty), Y[te]))
        return {a: float(v / len(folds)) for a, v in zip(self.alphas, scores, strict=True)}

    def _project_fit(self, X: np.ndarray):
        from sklearn.decomposition import PCA
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(X)
        n_comp = min(self.n_components, X.shape[0], X.shape[1])
        pca = PCA(n_components=n_comp, random_state=self.random_state)
        Z = pca.fit_transform(scaler.transform(X)).astype(np.float32).astype(np.float64)  # HEST: float32 scores
        return scaler, pca, Z

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` (or :meth:`from_arrays`) has run."""
        return self._arrays is not None

    def _require_fitted(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            raise ValueError("The RidgeProbe is not fitted: call `fit(X, Y)` first.")
        return self._arrays

    @property
    def n_features_in(self) -> int:
        """Embedding width seen in :meth:`fit`."""
        return int(self._require_fitted()["scaler_mean"].shape[0])

    @property
    def n_targets(self) -> int:
        """Number of predicted genes."""
        return int(self._require_fitted()["coef"].shape[0])

    @property
    def alpha_(self) -> float:
        """The ridge penalty actually used."""
        return float(self._require_fitted()["alpha"])

    # --- prediction ------------------------------------------------------------------------------
    def transform(self, X: np.ndarray) -> np.ndarray:
        """Standardise and project ``X`` onto the principal components (rounded to float32, as in HEST)."""
        a = self._require_fitted()
        X = _as_2d(X, "X")
        if X.shape[1] != a["scaler_mean"].shape[0]:
            raise ValueError(
                f"X has {X.shape[1]} features but the probe was fitted on {a['scaler_mean'].shape[0]}."
            )
        Xs = (X - a["scaler_mean"]) / a["scaler_scale"]
        return ((Xs - a["pca_mean"]) @ a["pca_components"].T).astype(np.float32)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted targets (n, G) for embeddings ``X`` (n, F), on the scale of the training targets."""
        a = self._require_fitted()
        return self.transform(X).astype(np.float64) @ a["coef"].T + a.get("y_mean", 0.0)

    # --- pickle-free persistence ------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Fitted state as plain arrays (for ``np.savez`` / safetensors; no pickle)."""
        a = self._require_fitted()
        out = {k: v.copy() for k, v in a.items()}
        out["n_components"] = np.asarray(self.n_components)
        out["alphas"] = np.asarray(self.alphas, dtype=np.float64)
        out["cv"] = np.asarray(self.alpha == "cv")
        out["random_state"] = np.asarray(-1 if self.random_state is None else self.random_state)
        out["max_iter"] = np.asarray(self.max_iter)
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any]) -> RidgeProbe:
        """Rebuild a fitted probe from :meth:`to_arrays` output."""
        missing = [k for k in _ARRAY_KEYS if k not in arrays]
        if missing:
            raise KeyError(f"RidgeProbe arrays are missing {missing}.")
        rs = int(np.asarray(arrays.get("random_state", HEST_SEED)))
        probe = cls(
            n_components=int(np.asarray(arrays.get("n_components", HEST_N_COMPONENTS))),
            alphas=tuple(np.asarray(arrays.get("alphas", DEFAULT_ALPHAS), dtype=np.float64).ravel()),
            random_state=None if rs < 0 else rs,
            max_iter=int(np.asarray(arrays.get("max_iter", HEST_MAX_ITER))),
        )
        st = {k: np.asarray(arrays[k]) for k in _ARRAY_KEYS}
        if "y_mean" in arrays:  # absent in models saved before the mean was added back
            st["y_mean"] = np.asarray(arrays["y_mean"], dtype=np.float64)
        n_feat, n_comp = st["scaler_mean"].shape[0], st["pca_components"].shape[0]
        if st["scaler_scale"].shape != (n_feat,) or st["pca_components"].shape[1] != n_feat:
            raise ValueError("RidgeProbe arrays are inconsistent: scaler and PCA widths differ.")
        if st["coef"].ndim != 2 or st["coef"].shape[1] != n_comp:
            raise ValueError("RidgeProbe arrays are inconsistent: ridge coefficients do not match the PCA.")
        if "y_mean" in st and st["y_mean"].shape != (st["coef"].shape[0],):
            raise ValueError("RidgeProbe arrays are inconsistent: y_mean does not match the coefficients.")
        st["coef"] = st["coef"].astype(np.float64)
        probe._arrays = st
        probe.alpha = "cv" if bool(np.asarray(arrays.get("cv", False))) else float(st["alpha"])
        return probe

    def __repr__(self) -> str:
        state = f"fitted, {self.n_features_in} -> {self.n_targets}, alpha={self.alpha_:.3g}" if self.is_fitted else "not fitted"
        return f"RidgeProbe(n_components={self.n_components}, {state})"


def _as_2d(a: Any, name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n_spots, n_columns), got shape {arr.shape}.")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} has NaN/inf values.")
    return arr


def _ridge(Z: np.ndarray, Y: np.ndarray, alpha: float, *, exact: bool, random_state, max_iter: int) -> np.ndarray:
    """Ridge coefficients ``(G, k)`` without intercept: lsqr as HEST, or the exact SVD solution."""
    if exact:
        U, s, Vt = np.linalg.svd(Z, full_matrices=False)
        return ((Vt.T * (s / (s**2 + alpha))) @ (U.T @ Y)).T
    from sklearn.linear_model import Ridge

    reg = Ridge(solver="lsqr", alpha=alpha, random_state=random_state, fit_intercept=False, max_iter=max_iter)
    reg.fit(Z, Y)
    return np.atleast_2d(np.asarray(reg.coef_, dtype=np.float64))


def _cv_folds(n: int, groups: np.ndarray | None, coords: np.ndarray | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Leave-one-slide-out folds, or five spatially contiguous blocks of a single slide."""
    idx = np.arange(n)
    if groups is not None:
        groups = np.asarray(groups)
        if len(groups) != n:
            raise ValueError(f"groups has {len(groups)} entries for {n} spots.")
        labels = list(dict.fromkeys(groups.tolist()))
        if len(labels) >= 2:
            return [(idx[groups != g], idx[groups == g]) for g in labels]
    if coords is None:
        raise ValueError("alpha='cv' needs at least two slides (`groups`) or spot coordinates for spatial blocks.")
    coords = np.asarray(coords, dtype=np.float64)
    k = min(5, n // 2)
    if k < 2:
        raise ValueError(f"alpha='cv' needs at least 4 spots, got {n}.")
    # contiguous blocks: k quantile bands along the slide's longer axis
    ax = int(np.argmax(np.ptp(coords, axis=0)))
    band = np.minimum((np.argsort(np.argsort(coords[:, ax], kind="stable")) * k) // n, k - 1)
    return [(idx[band != b], idx[band == b]) for b in range(k)]


@register_model("ridge", family="probe", losses=("mse",),
                description="HEST-Benchmark probe (Jaume et al. 2024): StandardScaler -> PCA(256) -> Ridge")
def build_ridge(input_dim: int, num_genes: int, *, level: str, loss: str, **hparams: Any) -> RidgeProbe:
    """Build a :class:`RidgeProbe` with HEST's fixed penalty (hparams: ``n_components``, ``alpha``, ...)."""
    return RidgeProbe(**hparams)


@register_model("ridge_cv", family="probe", losses=("mse",), defaults={"model_kwargs": {"alpha": "cv"}},
                description="the HEST probe with its penalty chosen by cross-validation inside the training slides")
def build_ridge_cv(input_dim: int, num_genes: int, *, level: str, loss: str, **hparams: Any) -> RidgeProbe:
    """Build a :class:`RidgeProbe` with ``alpha="cv"`` unless another ``alpha`` is given."""
    return RidgeProbe(**{"alpha": "cv", **hparams})
