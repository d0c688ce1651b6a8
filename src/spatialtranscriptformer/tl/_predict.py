"""``stf.tl.predict``: write predicted expression and pathway scores into the user's slides."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .. import _constants as K
from .._data import as_slide_list, copy_data, get_table, is_spatialdata
from .._docs import doc_copy, doc_params, doc_progress, doc_slides, doc_table_key
from .._logging import logger
from .._validate import check_finite_output, check_table
from ._model import TrainedModel

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from ._superres import SuperResModel

DEFAULT_WINDOW_SPOTS = 8192


def _saved_superres(path) -> bool:
    """Whether the folder ``path`` holds a saved :class:`SuperResModel` (by its config's format)."""
    import json
    from pathlib import Path

    from ._superres_io import FORMAT

    cfg = Path(path) / "config.json"
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _as_model(model) -> TrainedModel | SuperResModel:
    if isinstance(model, TrainedModel):
        return model
    if isinstance(model, str | os.PathLike):
        if _saved_superres(model):
            from ._superres import SuperResModel

            return SuperResModel.load(model)
        return TrainedModel.load(model)
    raise TypeError(f"model must be a TrainedModel (from stf.tl.fit) or the folder of a saved one, got {type(model).__name__}.")


def _check_table(t: AnnData, model: TrainedModel, i: int) -> None:
    if model.embedding_key not in t.obsm:
        avail = sorted(k for k in t.obsm.keys() if k.startswith(K.EMBEDDING_PREFIX))
        raise KeyError(
            f"Slide {i}: the model reads embedding `obsm[{model.embedding_key!r}]`, which is missing; available: "
            f"{avail or 'none'}. Embed the slide with the same backbone as the training slides."
        )
    dim = np.shape(t.obsm[model.embedding_key])
    if len(dim) != 2 or dim[1] != model.input_dim:
        raise ValueError(
            f"Slide {i}: `obsm[{model.embedding_key!r}]` has shape {dim} but the model was trained on "
            f"{model.input_dim}-d embeddings."
        )
    if t.n_vars > 0 and not t.var_names.isin(model.genes).any():
        raise ValueError(
            f"Slide {i}: none of the model's {len(model.genes)} genes (e.g. {model.genes[:3]}) is among the "
            f"table's {t.n_vars} genes (e.g. {t.var_names[:3].tolist()}); wrong model or gene naming?"
        )


@doc_params(data=doc_slides, table_key=doc_table_key, progress=doc_progress, copy=doc_copy)
def predict(
    data: AnnData | SpatialData | Sequence[AnnData | SpatialData],
    model: TrainedModel | SuperResModel | str | os.PathLike,
    *,
    key_added: str = K.PRED_KEY,
    pathway_key_added: str = K.PRED_PATHWAY_KEY,
    window_spots: int | None = DEFAULT_WINDOW_SPOTS,
    slide_key: str = K.SLIDE_KEY,
    device: str | None = None,
    table_key: str | None = None,
    progress: bool | None = None,
    copy: bool = False,
):
    """Predict expression (and pathway activity) of every spot from its embedding.

    Everything is validated for all slides (embedding key and width, gene overlap) before anything is
    written. Where the predictions go:

    - genes of the model present in ``var``: ``layers[key_added]``, a sparse CSR matrix whose columns
      of those genes hold the predictions (other columns are empty); ``uns[key_added]['genes']`` lists them;
    - genes of the model absent from ``var``: ``obsm[key_added]``, a DataFrame with one column per gene
      (``uns[key_added]['obsm_genes']``);
    - a table without genes (a slide without expression): in a SpatialData a new table
      ``tables[key_added]`` with the model's genes (same obs and region annotation); in an AnnData,
      ``obsm[key_added]`` with all the model's genes;
    - pathway scores (models with pathway tokens): ``obsm[pathway_key_added]``, pathway names as columns;
    - slide-level models: ``uns[key_added]['slide_expr']`` (slides x genes DataFrame) instead of per spot;
    - parameters: ``uns[key_added]['params']``.

    Predictions are in the model's target space (``uns[key_added]['target_space']``: ``"log1p"`` for
    log-transformed Gaussian losses, ``"counts"`` otherwise).

    Parameters
    ----------
    {data}
    model
        A :class:`~spatialtranscriptformer.tl.TrainedModel` or the folder it was saved to; a
        :class:`~spatialtranscriptformer.tl.SuperResModel` writes 2 µm expected counts as a multiscale
        image element instead (see :func:`~spatialtranscriptformer.tl.predict_superres`; element name
        ``"stf_superres"`` unless ``key_added`` is given).
    key_added
        Layer / obsm / uns / table key of the predictions.
    pathway_key_added
        ``obsm`` key of the pathway scores.
    window_spots
        Slides with more spots are predicted in overlapping spatial windows of this many spots (cores of
        at most half a window plus the nearest spots as context), so memory stays bounded. Attention (and
        the pathway tokens) then see only the window: spots far apart do not interact. ``None``: whole slides.
    slide_key
        ``obs`` column splitting a table into slides (each slide is predicted on its own).
    device
        Torch device (``None``: ``stf.settings.device``).
    {table_key}
    {progress}
    {copy}

    Returns
    -------
    ``None`` (or the modified copy / list of copies with ``copy=True``).
    """
    from tqdm.auto import tqdm

    from .._settings import settings
    from ..train._data import collect_slides, slide_features
    from ._superres import SuperResModel

    if isinstance(model, str | os.PathLike) and _saved_superres(model):
        model = SuperResModel.load(model)
    if isinstance(model, SuperResModel):  # 2 µm super-resolution: a multiscale image element per slide
        from ._superres_predict import predict_superres_slides

        predict_superres_slides(as_slide_list(data), model, table_key=table_key, progress=progress,
                                key_added=K.SUPERRES_KEY if key_added == K.PRED_KEY else key_added)
        return None
    model = _as_model(model)
    single = not isinstance(data, Sequence)
    slides = as_slide_list(data)
    if copy:
        slides = [copy_data(s) for s in slides]
    tables = [get_table(s, table_key) for s in slides]
    for i, t in enumerate(tables):
        check_table(t, element=f"Slide {i}")
        _check_table(t, model, i)
    work = []
    for i, t in enumerate(tables):
        for r in collect_slides(t, slide_key=slide_key):
            work.append((i, r, *slide_features(r, model.embedding_key)))

    show = settings.progress if progress is None else progress
    preds: dict[int, list] = {i: [] for i in range(len(tables))}
    for i, r, x, coords in tqdm(work, desc="predict", disable=not show or len(work) < 2):
        preds[i].append((r, model.predict_arrays(x, coords, window_spots=window_spots, device=device)))

    for i, lst in preds.items():  # nothing is written unless every prediction is finite
        for r, p in lst:
            for part in ("expr", "pathway_scores"):
                if p[part] is not None:
                    check_finite_output(p[part], what=f"predict: {part} of slide {r.slide_id!r} (table {i})",
                                        hint="The model's weights may be corrupt (NaN/inf); retrain or reload it.")
    params = {
        "model": model.model_name, "embedding_key": model.embedding_key, "n_genes": len(model.genes),
        "window_spots": window_spots, "level": model.level, "loss": model.loss, "target_space": model.target_space,
    }
    for i, (s, t) in enumerate(zip(slides, tables, strict=True)):
        _write(s, t, model, preds[i], key_added=key_added, pathway_key_added=pathway_key_added, params=params)
    if copy:
        return slides[0] if single else slides
    return None


def _write(sdata, t: AnnData, model: TrainedModel, preds: list, *, key_added: str, pathway_key_added: str, params: dict) -> None:
    uns = {"params": dict(params), "target_space": model.target_space, "level": model.level, "genes": [], "obsm_genes": []}
    if model.level == "slide":
        uns["slide_expr"] = pd.DataFrame(
            np.stack([p["expr"] for _, p in preds]), index=[r.slide_id for r, _ in preds], columns=model.genes
        )
        if preds[0][1]["pathway_scores"] is not None and model.pathways:
            uns["slide_pathways"] = pd.DataFrame(
                np.stack([p["pathway_scores"] for _, p in preds]), index=[r.slide_id for r, _ in preds],
                columns=model.pathways,
            )
        t.uns[key_added] = uns
        logger.info("Wrote slide-level predictions of %d genes to uns[%r].", len(model.genes), key_added)
        return
    expr = np.zeros((t.n_obs, len(model.genes)), dtype=np.float32)
    pw = None
    for r, p in preds:
        expr[r.rows] = p["expr"]
        if p["pathway_scores"] is not None:
            if pw is None:
                pw = np.zeros((t.n_obs, p["pathway_scores"].shape[1]), dtype=np.float32)
            pw[r.rows] = p["pathway_scores"]
    genes = pd.Index(model.genes)
    in_var = genes.isin(t.var_names)
    if t.n_vars == 0 and is_spatialdata(sdata):
        _new_table(sdata, t, expr, model, key_added=key_added, uns=uns)
    else:
        if in_var.any():
            cols = t.var_names.get_indexer(genes[in_var])
            block = expr[:, in_var]
            order = np.argsort(cols)
            indices = np.tile(cols[order], t.n_obs).astype(np.int32)
            indptr = np.arange(0, t.n_obs * len(cols) + 1, len(cols), dtype=np.int64)
            t.layers[key_added] = sp.csr_matrix((block[:, order].ravel(), indices, indptr), shape=(t.n_obs, t.n_vars))
            uns["genes"] = genes[in_var].tolist()
        if (~in_var).any():
            t.obsm[key_added] = pd.DataFrame(expr[:, ~in_var], index=t.obs_names, columns=genes[~in_var].tolist())
            uns["obsm_genes"] = genes[~in_var].tolist()
            logger.info("%d model genes are not in `var`; their predictions are in obsm[%r].", int((~in_var).sum()), key_added)
    if pw is not None:
        names = model.pathways or [f"pathway_{k}" for k in range(pw.shape[1])]
        t.obsm[pathway_key_added] = pd.DataFrame(pw, index=t.obs_names, columns=names)
    t.uns[key_added] = uns


def _new_table(sdata, t: AnnData, expr: np.ndarray, model: TrainedModel, *, key_added: str, uns: dict) -> None:
    import anndata as ad
    from spatialdata.models import TableModel

    new = ad.AnnData(expr, obs=t.obs.copy(), var=pd.DataFrame(index=pd.Index(model.genes)))
    for k in (K.SPATIAL_KEY, model.embedding_key):
        if k in t.obsm:
            new.obsm[k] = np.asarray(t.obsm[k]).copy()
    if K.SLIDE_META_KEY in t.uns:
        new.uns[K.SLIDE_META_KEY] = dict(t.uns[K.SLIDE_META_KEY])
    new.uns[key_added] = dict(uns, genes=list(model.genes))
    attrs = t.uns.get("spatialdata_attrs")
    if attrs:
        new = TableModel.parse(new, region=attrs["region"], region_key=attrs["region_key"], instance_key=attrs["instance_key"])
    if key_added in sdata.tables:
        del sdata.tables[key_added]
    sdata.tables[key_added] = new
    uns["table"] = key_added
    logger.info("The table has no genes: wrote a new table %r with the model's %d genes.", key_added, len(model.genes))
