"""The trained-model object returned by :func:`spatialtranscriptformer.tl.fit`: predict, save, load."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._base import CONFIG_FILE, BaseModel
from ._inputs import InputSpec, zscore_features  # noqa: F401  (zscore_features: re-exported)

_WEIGHTS, _ARRAYS, _RIDGE = "weights.pt", "arrays.npz", "ridge.npz"


DEFAULT_WINDOW_CONTEXT = 0.25
"""Context spots per core spot of a prediction window (tokens per spot = 1 + context)."""


def _balanced_cores(coords: np.ndarray, k: int) -> list[np.ndarray]:
    """Split the spots into ``k`` spatially compact cores whose sizes differ by at most one spot.

    A k-d split: each node is cut across its longer side at the quantile that gives its two children
    the number of spots of the leaves below them (``np.argpartition``: O(n) per level, O(n log k) in all).
    """
    n = len(coords)
    sizes = np.full(k, n // k, dtype=np.int64)
    sizes[: n % k] += 1
    cores: list[np.ndarray] = []
    stack = [(np.arange(n), coords, 0, k)]
    while stack:
        idx, c, first, count = stack.pop()
        if count == 1:
            cores.append(np.sort(idx))
            continue
        left = count // 2
        m = int(sizes[first : first + left].sum())
        ax = int(np.argmax(c.max(0) - c.min(0)))
        part = np.argpartition(c[:, ax], m - 1)
        lo, hi = part[:m], part[m:]
        stack += [(idx[hi], c[hi], first + left, count - left), (idx[lo], c[lo], first, left)]
    return cores


def spatial_windows(
    coords: np.ndarray, window_spots: int | None, *, context: float = DEFAULT_WINDOW_CONTEXT
) -> list[tuple[np.ndarray, int]]:
    """Spatial windows covering all spots for windowed prediction: ``[(spot indices, n_core), ...]``.

    The slide is split into the fewest spatially compact *cores* of at most ``window_spots / (1 +
    context)`` spots, all of the same size (within one spot; :func:`_balanced_cores`). Each window is a
    core followed by up to ``context`` x its size of the other spots nearest to the core's bounding box
    (a ring of context around it), never more than ``window_spots`` in all. The first ``n_core``
    indices of a window are its core: every spot is the core of exactly one window, and the model runs
    on at most ``1 + context`` tokens per spot (``1.25`` by default). Finding the context is linear in
    the number of spots: each core looks only at the spots of the cores next to it.

    Parameters
    ----------
    coords
        ``(n, 2)`` spot centres.
    window_spots
        Most spots per window; ``None`` (or at least ``n``) gives one window with the whole slide.
    context
        Context spots per core spot (>= 0).
    """
    coords = np.asarray(coords, dtype=np.float64)
    n = len(coords)
    if window_spots is None or n <= window_spots:
        return [(np.arange(n), n)]
    if window_spots < 2:
        raise ValueError(f"window_spots must be >= 2, got {window_spots}.")
    if not (np.isfinite(context) and context >= 0):
        raise ValueError(f"context must be a number >= 0, got {context!r}.")
    cores = _balanced_cores(coords, -(-n // max(1, int(window_spots / (1.0 + context)))))
    # lay the spots out core by core: every core (and its neighbours' spots) is a contiguous slice
    order = np.concatenate(cores)
    xy = coords[order]
    bounds = np.concatenate([[0], np.cumsum([len(c) for c in cores])])
    lo = np.stack([xy[a:b].min(0) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    hi = np.stack([xy[a:b].max(0) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    span = float((hi.max(0) - lo.min(0)).max())
    out = []
    for j, core in enumerate(cores):
        extra = min(window_spots - len(core), int(context * len(core)))
        if extra <= 0:
            out.append((core, len(core)))
            continue
        # a margin holding about `extra` spots at the core's density, doubled; searched in neighbouring cores only
        w, h = hi[j] - lo[j]
        floor = max(w, h, 1e-12) / np.sqrt(len(core))  # degenerate (collinear) cores
        w, h = max(w, floor), max(h, floor)
        margin = 2.0 * extra * w * h / (len(core) * 2 * (w + h))
        while True:  # widen the margin while it holds too few spots (thin or sparse tissue)
            near = [i for i in np.flatnonzero(((lo - margin <= hi[j]) & (hi + margin >= lo[j])).all(1)) if i != j]
            pos = np.concatenate([np.arange(bounds[i], bounds[i + 1]) for i in near]) if near else bounds[:0]
            c = xy[pos]
            d = np.hypot(*np.maximum(np.maximum(lo[j] - c, c - hi[j]), 0.0).T)
            keep = np.flatnonzero(d <= margin)
            if len(keep) >= extra or margin > span:
                break
            margin *= 2.0
        if len(keep) > extra:
            keep = keep[np.argpartition(d[keep], extra - 1)[:extra]]
        ctx = order[pos[keep]]
        ctx = ctx[np.lexsort((ctx, d[keep]))]
        out.append((np.concatenate([core, ctx]), len(core)))
    return out


class TrainedModel(BaseModel):
    """A trained spot model with its genes, pathways, embedding key and training history.

    Returned by :func:`~spatialtranscriptformer.tl.fit` for every spot model (the STF, the baselines, the
    ridge probes); applied with :func:`~spatialtranscriptformer.tl.predict` (or :meth:`predict`), scored on
    held-out slides with :meth:`evaluate`; stored with :meth:`save` / :meth:`load` in the folder format of
    :class:`~spatialtranscriptformer.tl.BaseModel` (weights as a ``torch`` state dict read back with
    ``weights_only=True``, arrays as ``.npz`` read without pickle, everything else as JSON: no code is ever
    unpickled).

    Attributes
    ----------
    module
        The :class:`torch.nn.Module` (or the :class:`~spatialtranscriptformer.module._ridge.RidgeProbe`).
    model_name
        Registered name (``"stf"``, ``"he2rna"``, ..., ``"ridge"``).
    genes
        Predicted genes, in output order.
    pathways
        Names of the pathway tokens (``None`` for models without named pathways).
    embedding_key
        ``obsm`` key of the embeddings the model reads.
    input_dim
        Width of those embeddings.
    level
        ``"spot"`` (one prediction per spot) or ``"slide"`` (one vector per slide).
    loss
        Training loss.
    log_transform
        Whether targets (hence predictions) are ``log1p`` counts.
    config
        Model hyperparameters (``"model_kwargs"``) and fit parameters (``"fit"``).
    history
        Per-epoch ``epoch``, ``train_loss``, ``val_loss``, ``val_pcc``, ``lr``.
    best_epoch
        Epoch whose weights were restored (``None`` without validation: last weights).
    """

    kind = "spot"

    def __init__(
        self,
        module: Any,
        *,
        model_name: str,
        genes: Sequence[str],
        embedding_key: str,
        input_dim: int,
        level: str,
        loss: str,
        log_transform: bool,
        pathways: Sequence[str] | None = None,
        model_kwargs: dict | None = None,
        model_arrays: dict[str, np.ndarray] | None = None,
        fit_params: dict | None = None,
        history: pd.DataFrame | None = None,
        best_epoch: int | None = None,
        is_global_zero: bool = True,
        target_space: str | None = None,
    ) -> None:
        if history is None:
            history = pd.DataFrame(columns=["epoch", "train_loss", "val_loss", "val_pcc", "lr"])
        super().__init__(model_name=model_name, genes=genes, loss=loss, fit_params=fit_params, history=history,
                         best_epoch=best_epoch)
        self.module = module
        self.pathways = None if pathways is None else [str(p) for p in pathways]
        self.embedding_key = str(embedding_key)
        self.input_dim = int(input_dim)
        self.level, self.log_transform = str(level), bool(log_transform)
        self.model_kwargs = dict(model_kwargs or {})
        self.model_arrays = {k: np.asarray(v) for k, v in (model_arrays or {}).items()}
        self.is_global_zero = is_global_zero
        if target_space is None:
            from ..module._losses import target_space as loss_space

            target_space = loss_space(self.loss, self.log_transform)
        self._target_space = str(target_space)
        self._family: str | None = None

    # --- description ----------------------------------------------------------------------------------
    @property
    def is_probe(self) -> bool:
        """Whether the model is a closed-form probe (registry family ``"probe"``, e.g. the ridge probes)."""
        if self._family is None:
            from ..module._registry import get_model_entry

            try:
                self._family = get_model_entry(self.model_name).family
            except ValueError:  # not registered in this session: a torch module is a spot model
                self._family = "spot" if hasattr(self.module, "state_dict") else "probe"
        return self._family == "probe"

    @property
    def target_space(self) -> str:
        """``"log1p"`` when predictions are log1p counts (a loss on log1p counts), ``"counts"`` otherwise."""
        return self._target_space

    def _config(self) -> dict:
        return {
            "pathways": self.pathways, "embedding_key": self.embedding_key, "input_dim": self.input_dim,
            "level": self.level, "log_transform": self.log_transform, "model_kwargs": self.model_kwargs,
            "model_arrays": sorted(self.model_arrays),
        }  # fmt: skip

    def __repr__(self) -> str:
        pw = f", {len(self.pathways)} pathways" if self.pathways else ""
        return (
            f"TrainedModel({self.model_name!r}, level={self.level!r}, loss={self.loss!r}, {len(self.genes)} genes{pw}, "
            f"embedding {self.embedding_key!r} ({self.input_dim}-d), {len(self.history)} epochs)"
        )

    # --- prediction -----------------------------------------------------------------------------------
    @property
    def input_spec(self) -> InputSpec:
        """How the model input is built from a slide's embeddings (standardisation, neighbourhood context)."""
        std = None if self.is_probe else self.fit_params.get("standardize")
        return InputSpec(standardize=std, context_radius=self.fit_params.get("context_radius"))

    @property
    def standardize(self) -> str | None:
        """How embeddings are standardised before the network (``"slide"`` or ``None``)."""
        return self.input_spec.standardize

    def prepare_inputs(self, x: np.ndarray, coords: np.ndarray) -> np.ndarray:
        """The model input for one slide's embeddings ``x`` (S, F) and spot centres ``coords`` (S, 2)."""
        return self.input_spec.prepare(x, coords)

    def predict_arrays(
        self,
        x: np.ndarray,
        coords: np.ndarray,
        *,
        window_spots: int | None = None,
        window_context: float = DEFAULT_WINDOW_CONTEXT,
        device: str | None = None,
        amp: bool | str = False,
        compile: bool | str = False,
    ) -> dict[str, np.ndarray | None]:
        """Predict one slide from embeddings ``x`` (S, F) and spot centres ``coords`` (S, 2) in µm.

        Returns ``{"expr": (S, G) (or (G,) for slide-level models), "pathway_scores": (S, P) | (P,) | None}``
        in the model's target space. With ``window_spots``, spot-level slides larger than that are
        predicted window by window (see :func:`spatial_windows`): a spot then only attends to the
        spots of its window (its core plus ``window_context`` x as many context spots around it), an
        approximation of whole-slide attention. ``amp`` (``True``/``"bf16"``/``"fp16"``) runs the network
        under autocast, ``compile`` through :func:`torch.compile` (see
        :mod:`~spatialtranscriptformer._accel`); torch uses ``stf.settings.n_threads`` CPU threads.
        """
        from .._accel import amp_dtype_name, check_compile

        amp_dtype_name(amp)
        check_compile(compile)
        x = np.asarray(x, dtype=np.float32)
        coords = np.asarray(coords, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"Embeddings must have shape (n_spots, {self.input_dim}) for this model, got {x.shape}.")
        if coords.shape != (x.shape[0], 2):
            raise ValueError(f"coords must have shape ({x.shape[0]}, 2), got {coords.shape}.")
        if not (np.isfinite(x).all() and np.isfinite(coords).all()):
            raise ValueError("Embeddings or coordinates contain NaN/inf.")
        x = self.prepare_inputs(x, coords)  # whole slide: context features never depend on the windows
        if self.is_probe:
            return self._smooth({"expr": np.asarray(self.module.predict(x), dtype=np.float32), "pathway_scores": None},
                                coords)
        from .._settings import settings

        windows = (
            [(np.arange(len(x)), len(x))] if self.level == "slide"
            else spatial_windows(coords, window_spots, context=window_context)
        )
        with settings.torch_threads():
            out = self._predict_windows(x, coords, windows, device=device, amp=amp, compile=compile)
        # output smoothing over the whole slide, after every window is predicted
        return out if self.level == "slide" else self._smooth(out, coords)

    def _predict_windows(self, x, coords, windows, *, device, amp, compile) -> dict[str, np.ndarray | None]:
        import torch

        from .._accel import autocast, compiled
        from .._settings import settings

        dev = settings.torch_device(device)
        module = self.module.to(dev).eval()
        run = compiled(module, compile)
        expr = np.zeros((len(x), len(self.genes)), dtype=np.float32)
        pws = None
        with torch.inference_mode(), autocast(dev, amp):
            for idx, n_core in windows:
                xt = torch.from_numpy(x[idx]).unsqueeze(0).to(dev)
                ct = torch.from_numpy(coords[idx]).unsqueeze(0).to(dev)
                mt = torch.ones(1, len(idx), dtype=torch.bool, device=dev)
                out = run(xt, ct, mt)
                e = out["expr"][0].float().cpu().numpy()
                pw = out.get("pathway_scores")
                pw = None if pw is None else pw[0].float().cpu().numpy()
                if self.level == "slide":
                    return {"expr": e, "pathway_scores": pw}
                expr[idx[:n_core]] = e[:n_core]
                if pw is not None:
                    if pws is None:
                        pws = np.zeros((len(x), pw.shape[-1]), dtype=np.float32)
                    pws[idx[:n_core]] = pw[:n_core]
        return {"expr": expr, "pathway_scores": pws}

    @property
    def output_smoothing(self) -> float:
        """Weight of the neighbours' mean prediction in each spot's prediction (0: none)."""
        return float(self.fit_params.get("output_smoothing") or 0.0)

    def _smooth(self, out: dict, coords: np.ndarray) -> dict:
        """``(1 - w) * own + w * mean of the neighbours'`` for spot predictions (the fitted ``output_smoothing``).

        Neighbours as for the input context (within ``context_radius`` or 1.5 grid pitches). Expression on
        spot arrays is spatially smooth at the scale of a few spots; averaging a prediction with its
        neighbours' removes part of the per-spot noise of the image features.
        """
        w = self.output_smoothing
        if w <= 0:
            return out
        from ._inputs import neighbour_mean

        radius = self.fit_params.get("context_radius") or 1.5
        return {k: None if v is None else ((1 - w) * v + w * neighbour_mean(v, coords, radius=radius)).astype(np.float32)
                for k, v in out.items()}

    # --- persistence ----------------------------------------------------------------------------------
    def _write_state(self, folder: Path) -> None:
        if self.is_probe:
            np.savez(folder / _RIDGE, **self.module.to_arrays())
        else:
            import torch

            torch.save({k: v.detach().cpu() for k, v in self.module.state_dict().items()}, folder / _WEIGHTS)
        if self.model_arrays:
            np.savez(folder / _ARRAYS, **self.model_arrays)

    @classmethod
    def _read(cls, path: Path, cfg: dict) -> TrainedModel:
        from .._validate import check_config_types, reading

        cfg_path = path / CONFIG_FILE
        missing = [k for k in ("model", "genes", "embedding_key", "input_dim", "level", "loss", "log_transform") if k not in cfg]
        if missing:
            raise ValueError(f"{cfg_path} lacks {missing}.")
        check_config_types(cfg, {"model": str, "genes": list, "pathways": list, "embedding_key": str, "input_dim": int,
                                 "level": str, "loss": str, "log_transform": bool, "model_kwargs": dict,
                                 "model_arrays": list, "fit": dict, "best_epoch": int, "target_space": str},
                           path=cfg_path)
        genes = cfg["genes"]
        if not genes or len(set(map(str, genes))) != len(genes):
            raise ValueError(f"{cfg_path}: the gene list is empty or has duplicates.")
        arrays = {}
        if cfg.get("model_arrays"):
            with reading(path / _ARRAYS, "model arrays"), np.load(path / _ARRAYS, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            lost = sorted(set(cfg["model_arrays"]) - set(arrays))
            if lost:
                raise ValueError(f"{path / _ARRAYS} lacks arrays {lost}.")
        from ..module._registry import build_model, get_model_entry

        if get_model_entry(cfg["model"]).family == "probe":  # a closed-form probe: its fitted arrays
            kind = type(build_model(cfg["model"], _net_width(cfg), len(genes), level=cfg["level"], loss=cfg["loss"],
                                    **cfg.get("model_kwargs", {})))
            with reading(path / _RIDGE, "ridge arrays"), np.load(path / _RIDGE, allow_pickle=False) as z:
                module = kind.from_arrays({k: z[k] for k in z.files})
            width = _net_width(cfg)
            if module.n_targets != len(genes) or module.n_features_in != width:
                raise ValueError(f"{path}: the ridge arrays do not match {len(genes)} genes / input width {width}.")
        else:
            import torch

            try:
                module = build_model(
                    cfg["model"], _net_width(cfg), len(genes), level=cfg["level"], loss=cfg["loss"],
                    **cfg.get("model_kwargs", {}), **arrays,
                )
            except (ValueError, TypeError, KeyError) as err:
                raise ValueError(f"{cfg_path}: the saved configuration does not match its arrays: {err}") from None
            wpath = path / _WEIGHTS
            if not wpath.is_file():
                raise FileNotFoundError(f"Weights not found: {wpath}.")
            with reading(wpath, "weights file"):
                state = torch.load(wpath, map_location="cpu", weights_only=True)
            try:
                module.load_state_dict(state, strict=True)
            except (RuntimeError, TypeError, AttributeError) as err:
                raise ValueError(f"{wpath} does not match the model configured in {cfg_path}: {err}") from None
            module.eval()
        return cls(
            module, model_name=cfg["model"], genes=genes, embedding_key=cfg["embedding_key"], input_dim=cfg["input_dim"],
            level=cfg["level"], loss=cfg["loss"], log_transform=cfg["log_transform"], pathways=cfg.get("pathways"),
            model_kwargs=cfg.get("model_kwargs"), model_arrays=arrays, fit_params=cfg.get("fit"),
            history=cls.read_history(path), best_epoch=cfg.get("best_epoch"), target_space=cfg.get("target_space"),
        )

    # --- evaluation -----------------------------------------------------------------------------------
    def evaluate(self, data, *, features: str = "genes", table_key: str | None = None, progress: bool | None = None,
                 **kwargs: Any) -> pd.DataFrame:
        """Predict ``data`` (copies; the slides are not modified) and score the predictions against its counts.

        Parameters
        ----------
        data
            Held-out slide(s) with measured counts.
        features
            ``"genes"`` or ``"pathways"`` (see :func:`~spatialtranscriptformer.tl.evaluate`).
        table_key
            Table of each slide.
        progress
            Progress bar of the prediction.
        **kwargs
            More arguments of :func:`~spatialtranscriptformer.tl.evaluate` (e.g. ``true_layer``, ``min_counts``).

        Returns
        -------
        The table of :func:`~spatialtranscriptformer.tl.evaluate`.
        """
        from ._evaluate import evaluate
        from ._predict import predict

        extra = {"slide_key": kwargs["slide_key"]} if "slide_key" in kwargs else {}
        copies = predict(data, self, table_key=table_key, progress=progress, copy=True, **extra)
        return evaluate(copies, features=features, table_key=table_key, **kwargs)


def _net_width(cfg: dict) -> int:
    """Width of the network input of a saved model: the embedding width, doubled with neighbourhood context."""
    radius = (cfg.get("fit") or {}).get("context_radius")
    return int(cfg["input_dim"]) * (2 if radius is not None else 1)
