"""The HEST-Benchmark linear probe: StandardScaler -> PCA -> Ridge (no torch).

Reference
---------
Jaume G. et al., "HEST-1k: A Dataset for Spatial Transcriptomics and Histology Image Analysis",
*NeurIPS Datasets and Benchmarks* (2024); public code ``mahmoodlab/HEST``
(``src/hest/bench/benchmark.py``, ``src/hest/bench/trainer.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

HEST_N_COMPONENTS = 256
"""PCA latent dimension of HEST-Benchmark (``--latent_dim``)."""
HEST_SEED = 1
"""Seed of HEST-Benchmark (``--seed``), used for PCA and Ridge ``random_state``."""
HEST_MAX_ITER = 1000
"""``max_iter`` of HEST-Benchmark's Ridge."""

_ARRAY_KEYS = ("scaler_mean", "scaler_scale", "pca_mean", "pca_components", "coef", "alpha")


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

    The exact protocol of ``hest.bench`` with ``--dimreduce PCA`` (the published HEST table):

    1. ``StandardScaler()`` fitted on the training embeddings;
    2. ``PCA(n_components=256, random_state=1)`` on the standardised embeddings; here the count is
       ``min(256, n_samples, n_features)`` so that small folds still work (HEST would fail);
    3. the PCA scores are cast to float32 (HEST wraps them in ``torch.Tensor``), so the ridge is
       solved in single precision as in HEST;
    4. ``Ridge(solver="lsqr", fit_intercept=False, alpha=100 / (n_pcs * n_targets), max_iter=1000,
       random_state=1)`` where ``n_pcs`` is the number of PCA components (HEST computes
       ``X_train.shape[1]`` after the PCA) and ``n_targets`` the number of genes.

    Targets are log1p raw counts (HEST's ``normalize_adata``: ``sc.pp.log1p`` without library-size
    normalisation); :func:`spatialtranscriptformer.tl.fit` passes them in that space. The probe
    works on single spots: it is a dense (``level="spot"``) model.

    Parameters
    ----------
    n_components
        Maximum number of principal components (HEST: 256).
    alpha
        Ridge penalty; ``None`` uses the HEST formula :func:`hest_alpha`.
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
        alpha: float | None = None,
        random_state: int = HEST_SEED,
        max_iter: int = HEST_MAX_ITER,
    ) -> None:
        if n_components < 1:
            raise ValueError(f"n_components must be >= 1, got {n_components}.")
        if alpha is not None and not (np.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}.")
        self.n_components = int(n_components)
        self.alpha = alpha
        self.random_state = random_state
        self.max_iter = int(max_iter)
        self._arrays: dict[str, np.ndarray] | None = None

    # --- fitting -------------------------------------------------------------------------------
    def fit(self, X: np.ndarray, Y: np.ndarray) -> RidgeProbe:
        """Fit scaler, PCA and ridge on embeddings ``X`` (n, F) and targets ``Y`` (n, G)."""
        from sklearn.decomposition import PCA
        from sklearn.linear_model import Ridge
        from sklearn.preprocessing import StandardScaler

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
        scaler = StandardScaler().fit(X)
        n_comp = min(self.n_components, X.shape[0], X.shape[1])
        pca = PCA(n_components=n_comp, random_state=self.random_state)
        Z = pca.fit_transform(scaler.transform(X)).astype(np.float32)
        alpha = hest_alpha(Z.shape[1], Y.shape[1]) if self.alpha is None else float(self.alpha)
        reg = Ridge(
            solver="lsqr",
            alpha=alpha,
            random_state=self.random_state,
            fit_intercept=False,
            max_iter=self.max_iter,
        )
        reg.fit(Z, Y)
        coef = np.atleast_2d(np.asarray(reg.coef_))
        self._arrays = {
            "scaler_mean": np.asarray(scaler.mean_, dtype=np.float64),
            "scaler_scale": np.asarray(scaler.scale_, dtype=np.float64),
            "pca_mean": np.asarray(pca.mean_, dtype=np.float64),
            "pca_components": np.asarray(pca.components_, dtype=np.float64),
            "coef": coef.astype(np.float32),
            "alpha": np.asarray(alpha, dtype=np.float64),
        }
        return self

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
        """Standardise and project ``X`` onto the principal components (float32, as in HEST)."""
        a = self._require_fitted()
        X = _as_2d(X, "X")
        if X.shape[1] != a["scaler_mean"].shape[0]:
            raise ValueError(
                f"X has {X.shape[1]} features but the probe was fitted on {a['scaler_mean'].shape[0]}."
            )
        Xs = (X - a["scaler_mean"]) / a["scaler_scale"]
        return ((Xs - a["pca_mean"]) @ a["pca_components"].T).astype(np.float32)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted targets (n, G) for embeddings ``X`` (n, F)."""
        a = self._require_fitted()
        return self.transform(X) @ a["coef"].T

    # --- pickle-free persistence ------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Fitted state as plain arrays (for ``np.savez`` / safetensors; no pickle)."""
        a = self._require_fitted()
        out = {k: v.copy() for k, v in a.items()}
        out["n_components"] = np.asarray(self.n_components)
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
            random_state=None if rs < 0 else rs,
            max_iter=int(np.asarray(arrays.get("max_iter", HEST_MAX_ITER))),
        )
        st = {k: np.asarray(arrays[k]) for k in _ARRAY_KEYS}
        n_feat, n_comp = st["scaler_mean"].shape[0], st["pca_components"].shape[0]
        if st["scaler_scale"].shape != (n_feat,) or st["pca_components"].shape[1] != n_feat:
            raise ValueError("RidgeProbe arrays are inconsistent: scaler and PCA widths differ.")
        if st["coef"].ndim != 2 or st["coef"].shape[1] != n_comp:
            raise ValueError("RidgeProbe arrays are inconsistent: ridge coefficients do not match the PCA.")
        st["coef"] = st["coef"].astype(np.float32)
        probe._arrays = st
        probe.alpha = float(st["alpha"])
        return probe

    def __repr__(self) -> str:
        state = f"fitted, {self.n_features_in} -> {self.n_targets}" if self.is_fitted else "not fitted"
        return f"RidgeProbe(n_components={self.n_components}, {state})"


def _as_2d(a: Any, name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n_spots, n_columns), got shape {arr.shape}.")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} has NaN/inf values.")
    return arr
