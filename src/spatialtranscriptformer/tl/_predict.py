"""``stf.tl.predict``: write predicted expression and pathway scores into the user's slides."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .. import _constants as K
from .._data import as_slide_list, copy_data, get_table, is_spatialdata
from .._docs import doc_copy, doc_params, doc_progress, doc_slides, doc_table_key
from .._logging import logger
from .._validate import check_finite_output, check_table
from ._base import BaseModel, as_model
from ._model import DEFAULT_WINDOW_CONTEXT, TrainedModel

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


DEFAULT_WINDOW_SPOTS = 8192


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
    model: BaseModel | str | os.PathLike,
    *,
    key_added: str = K.PRED_KEY,
    pathway_key_added: str = K.PRED_PATHWAY_KEY,
    window_spots: int | None = DEFAULT_WINDOW_SPOTS,
    window_context: float = DEFAULT_WINDOW_CONTEXT,
    slide_key: str = K.SLIDE_KEY,
    device: str | None = None,
    amp: bool | str = False,
    compile: bool | str = False,
    table_key: str | None = None,
    progress: bool | None = None,
    copy: bool = False,
    inplace: bool = True,
):
    """Predict expression (and pathway activity) of every spot from its embedding.

    Everything is validated for all slides (embedding key and width, gene overlap, output keys) before
    anything is written. Predictions are in the model's target space (``record['target_space']``:
    ``"log1p"`` for log-transformed Gaussian losses, ``"counts"`` otherwise) and cover the model's genes
    only. Where they go (see ``docs/outputs.md``):

    - a SpatialData: a table per output, ``tables[key_added]`` (spots x the model's genes) and, for models
      with pathway tokens, ``tables[pathway_key_added]`` (spots x pathways, ``var_names`` = pathway names).
      Each has the predicted values in ``X``, the expression table's ``obs`` (same index, same region /
      instance keys: linked to the same shapes), ``obsm['spatial']``, ``uns['spatial']`` and
      ``uns['stf_slide']``, so ``sc.pl.spatial(sdata.tables["stf_pathways"], color="HALLMARK_HYPOXIA")``,
      ``sq.gr.spatial_autocorr(sdata.tables["stf_pred"])`` and spatialdata-plot
      (``render_shapes("spots", color=gene, table_name="stf_pred")``) read them as they are. The record is
      ``uns[key]`` of each table (``kind``, ``params``, ``target_space``, ``source_table``); the expression
      table is left unchanged. ``var['measured']`` marks the genes the expression table also has;
    - an AnnData: ``obsm[key_added]`` and ``obsm[pathway_key_added]``, DataFrames with one column per gene /
      pathway, and the records ``uns[key_added]``, ``uns[pathway_key_added]``;
      :func:`~spatialtranscriptformer.tl.prediction_table` turns them into the tables above, and
      ``inplace=False`` returns those tables without writing anything;
    - slide-level models (one profile per slide): ``uns[key_added]['slide_expr']`` (and
      ``['slide_pathways']``), slides x features DataFrames, in the expression table.

    Parameters
    ----------
    {data}
    model
        A trained model (:func:`~spatialtranscriptformer.tl.fit`) or the folder it was saved to. A
        :class:`~spatialtranscriptformer.tl.SuperResModel` writes 2 µm expected counts as a multiscale
        image element instead (see :func:`~spatialtranscriptformer.tl.predict_superres`; element name
        ``"stf_superres"`` unless ``key_added`` is given; with ``copy=True`` into copies of the slides).
    key_added
        Table / ``obsm`` / ``uns`` key of the predicted expression.
    pathway_key_added
        Table / ``obsm`` / ``uns`` key of the predicted pathway scores.
    window_spots
        Slides with more spots are predicted in spatial windows of at most this many spots, so memory
        stays bounded and time grows linearly with the slide: the slide is cut into compact cores of
        equal size, each predicted together with a ring of the spots nearest to it as context
        (:func:`~spatialtranscriptformer.tl._model.spatial_windows`). Attention (and the pathway tokens)
        then see only the window: spots far apart do not interact. ``None``: whole slides.
    window_context
        Context spots per core spot of a window (the network runs on ``1 + window_context`` tokens per
        spot).
    slide_key
        ``obs`` column splitting a table into slides (each slide is predicted on its own).
    device
        Torch device (``None``: ``stf.settings.device``). CPU threads: ``stf.settings.n_threads``.
    amp
        Mixed precision: ``True`` / ``"bf16"`` (bfloat16 autocast) or ``"fp16"``; fast on GPUs, usually
        slower on CPUs. ``False``: float32.
    compile
        Run the network through :func:`torch.compile` (``True``: the inductor backend; or a backend name).
        Compilation costs seconds to minutes once per process; it pays off on large slides and GPUs.
    {table_key}
    {progress}
    {copy}
    inplace
        ``False``: write nothing and return the prediction tables.

    Returns
    -------
    ``None``; with ``copy=True`` the modified copy (list of copies); with ``inplace=False`` a dict
    ``{{key_added: AnnData, pathway_key_added: AnnData}}`` of prediction tables (the second only for models
    with pathway tokens; slides x features for slide-level models), or a list of such dicts for a list of
    slides.
    """
    from tqdm.auto import tqdm

    from .._settings import settings
    from ..train._data import collect_slides, slide_features

    if copy and not inplace:
        raise ValueError("`copy=True` returns a modified copy and `inplace=False` writes nothing: choose one.")
    model = as_model(model)  # a folder is read by its saved kind
    if model.kind == "superres":  # 2 µm super-resolution: a multiscale image element per slide
        from ._superres_predict import predict_superres_slides

        if not inplace:
            raise ValueError("`inplace=False` is not available for super-resolution models (their output is an "
                             "image element written into each SpatialData); use `copy=True`.")
        single = not isinstance(data, Sequence)
        slides = [copy_data(s) for s in as_slide_list(data)] if copy else as_slide_list(data)
        predict_superres_slides(slides, model, table_key=table_key, progress=progress,
                                key_added=K.SUPERRES_KEY if key_added == K.PRED_KEY else key_added)
        if copy:
            return slides[0] if single else slides
        return None
    from .._accel import amp_dtype_name, check_compile

    amp_dtype_name(amp)
    check_compile(compile)
    if not (isinstance(window_context, int | float) and np.isfinite(window_context) and window_context >= 0):
        raise ValueError(f"window_context must be a number >= 0, got {window_context!r}.")
    single = not isinstance(data, Sequence)
    slides = as_slide_list(data)
    if copy:
        slides = [copy_data(s) for s in slides]
    tables = [get_table(s, table_key) for s in slides]
    for i, t in enumerate(tables):
        check_table(t, element=f"Slide {i}")
        _check_table(t, model, i)
        _check_keys(slides[i], t, key_added=key_added, pathway_key_added=pathway_key_added, i=i,
                    table_key=table_key, inplace=inplace)
    work = []
    for i, t in enumerate(tables):
        for r in collect_slides(t, slide_key=slide_key):
            work.append((i, r, *slide_features(r, model.embedding_key)))

    show = settings.progress if progress is None else progress
    preds: dict[int, list] = {i: [] for i in range(len(tables))}
    for i, r, x, coords in tqdm(work, desc="predict", disable=not show or len(work) < 2):
        preds[i].append((r, model.predict_arrays(x, coords, window_spots=window_spots, window_context=window_context,
                                                  device=device, amp=amp, compile=compile)))

    for i, lst in preds.items():  # nothing is written unless every prediction is finite
        for r, p in lst:
            for part in ("expr", "pathway_scores"):
                if p[part] is not None:
                    check_finite_output(p[part], what=f"predict: {part} of slide {r.slide_id!r} (table {i})",
                                        hint="The model's weights may be corrupt (NaN/inf); retrain or reload it.")
    params = {
        "model": model.model_name, "embedding_key": model.embedding_key, "n_genes": len(model.genes),
        "window_spots": window_spots, "window_context": window_context, "amp": amp, "compile": compile,
        "level": model.level, "loss": model.loss, "target_space": model.target_space,
    }
    outputs = [_outputs(t, model, preds[i], key_added=key_added, pathway_key_added=pathway_key_added, params=params)
               for i, t in enumerate(tables)]
    if not inplace:
        res = [_as_tables(t, out) for t, out in zip(tables, outputs, strict=True)]
        return res[0] if single else res
    for s, t, out in zip(slides, tables, outputs, strict=True):
        _write(s, t, out, table_key=table_key)
    if copy:
        return slides[0] if single else slides
    return None


def _check_keys(sdata, t: AnnData, *, key_added: str, pathway_key_added: str, i: int, table_key: str | None,
                inplace: bool) -> None:
    """Output keys that would overwrite the expression table, or data not written by ``predict``, are refused."""
    from .._data import prediction_record, resolve_table_key

    if key_added == pathway_key_added:
        raise ValueError(f"`key_added` and `pathway_key_added` are both {key_added!r}; give them different names.")
    if not inplace:
        return
    if is_spatialdata(sdata):
        source = resolve_table_key(sdata, table_key)
        for key in (key_added, pathway_key_added):
            if key == source:
                raise ValueError(f"Slide {i}: {key!r} is the expression table's name; choose another output key.")
            if key in sdata.tables and prediction_record(sdata.tables[key], key) is None:
                raise ValueError(f"Slide {i}: table {key!r} exists and was not written by `stf.tl.predict`; it is "
                                 "not overwritten: choose another output key.")
    for key in (key_added, pathway_key_added):
        rec = t.uns.get(key)
        ours = isinstance(rec, Mapping) and rec.get("kind") in K.PRED_KINDS
        if (key in t.obsm or key in t.uns) and not ours:
            where = "obsm" if key in t.obsm else "uns"
            raise ValueError(f"Slide {i}: `{where}[{key!r}]` exists and was not written by `stf.tl.predict`; it is "
                             "not overwritten: choose another output key.")


def _outputs(t: AnnData, model: TrainedModel, preds: list, *, key_added: str, pathway_key_added: str,
             params: dict) -> dict:
    """Per output key: ``(names, values, record)``; ``values`` spots x features, or slides x features (slide level)."""
    base = {"params": dict(params), "target_space": model.target_space, "level": model.level}
    ids = [r.slide_id for r, _ in preds]
    if model.level == "slide":
        out = {key_added: (list(model.genes), pd.DataFrame(np.stack([p["expr"] for _, p in preds]), index=ids,
                                                                  columns=list(model.genes)), {**base, "kind": "expression"})}
        if preds[0][1]["pathway_scores"] is not None and model.pathways:
            out[pathway_key_added] = (list(model.pathways), pd.DataFrame(
                np.stack([p["pathway_scores"] for _, p in preds]), index=ids, columns=list(model.pathways)),
                {**base, "kind": "pathways", "target_space": "score"})
        return out
    expr = np.zeros((t.n_obs, len(model.genes)), dtype=np.float32)
    pw = None
    for r, p in preds:
        expr[r.rows] = p["expr"]
        if p["pathway_scores"] is not None:
            if pw is None:
                pw = np.zeros((t.n_obs, p["pathway_scores"].shape[1]), dtype=np.float32)
            pw[r.rows] = p["pathway_scores"]
    out = {key_added: (list(model.genes), expr, {**base, "kind": "expression"})}
    if pw is not None:
        names = list(model.pathways or [f"pathway_{k}" for k in range(pw.shape[1])])
        out[pathway_key_added] = (names, pw, {**base, "kind": "pathways", "target_space": "score"})
    return out


def _as_tables(t: AnnData, outputs: dict) -> dict:
    """``inplace=False``: the prediction tables (nothing written)."""
    from ._prediction_table import _slide_table, build_table

    res = {}
    for key, (names, values, rec) in outputs.items():
        if isinstance(values, pd.DataFrame):
            res[key] = _slide_table(values, key=key, record=rec)
        else:
            res[key] = build_table(t, values, names, key=key, record=rec)
    return res


def _write(sdata, t: AnnData, outputs: dict, *, table_key: str | None) -> None:
    """Write the outputs of one slide: prediction tables (SpatialData), ``obsm`` DataFrames (AnnData), ``uns``."""
    from .._data import resolve_table_key
    from ._prediction_table import SLIDE_FRAMES, build_table

    for key, (names, values, rec) in outputs.items():
        # an earlier prediction under this key in another layout (spot / slide level) is removed, never left stale
        if is_spatialdata(sdata) and key in sdata.tables:
            del sdata.tables[key]
        t.obsm.pop(key, None)
        t.uns.pop(key, None)
        if isinstance(values, pd.DataFrame):  # slide level: in the expression table
            t.uns[key] = {**rec, "stored_in": "uns", SLIDE_FRAMES[rec["kind"]]: values}
            logger.info("Wrote slide-level predictions of %d features to uns[%r].", len(names), key)
        elif is_spatialdata(sdata):
            rec = {**rec, "source_table": resolve_table_key(sdata, table_key)}
            sdata.tables[key] = build_table(t, values, names, key=key, record=rec)
            logger.info("Wrote the %s of %d spots x %d %s to table %r.", "predictions" if rec["kind"] == "expression"
                        else "pathway scores", t.n_obs, len(names), "genes" if rec["kind"] == "expression"
                        else "pathways", key)
        else:
            t.obsm[key] = pd.DataFrame(values, index=t.obs_names, columns=names)
            t.uns[key] = {**rec, "stored_in": "obsm"}
