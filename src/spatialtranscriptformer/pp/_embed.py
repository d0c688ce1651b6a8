"""``stf.pp.embed``: frozen backbone embeddings of spot tiles, written to ``obsm``."""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _constants as K
from .._data import as_slide_list, copy_data, get_table, is_spatialdata
from .._docs import (
    doc_copy,
    doc_embed_key,
    doc_embed_tiles,
    doc_image_slides,
    doc_params,
    doc_progress,
    doc_table_key,
    doc_upsampling,
)
from .._logging import logger
from .._settings import settings
from ._backbones import Backbone, get_backbone
from ._tiles import planned_batches, tile_plan

if TYPE_CHECKING:
    from spatialdata import SpatialData

_DONE = object()


def _prefetch(gen, bb: Backbone, depth: int):
    """Run tile reading + preprocessing in a background thread, ``depth`` batches ahead."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            for idx, tiles in gen:
                item = (idx, bb.preprocess(tiles) if bb.spec.is_torch else tiles)
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as exc:  # re-raised in the consumer
            q.put(exc)
            return
        q.put(_DONE)

    th = threading.Thread(target=work, daemon=True)
    th.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def embed_settings(bb: Backbone, *, key_added: str | None, tile_size: int | None, mpp: float | None):
    """The ``obsm`` key, tile size (px) and resolution (µm/px) of an embedding: the given ones or the backbone's."""
    return key_added or f"{K.EMBEDDING_PREFIX}{bb.name}", tile_size or bb.spec.input_size, mpp or bb.spec.mpp


def embedding_params(bb: Backbone, *, weights: Any, tile_size: int, mpp: float, dim: int, **extra) -> dict:
    """The ``uns[key_added]["params"]`` record of an embedding (``extra`` appended, e.g. timing)."""
    return {"backbone": bb.name, "weights": None if weights is None else str(weights), "tile_size": tile_size,
            "mpp": mpp, "dim": int(dim), "license": bb.spec.license, **extra}


def embed_slide(
    data: SpatialData,
    bb: Backbone,
    *,
    tile_size: int | None,
    mpp: float | None,
    batch_size: int,
    table_key: str | None,
    image_key: str | None,
    progress: bool,
    prefetch: int = 2,
    amp: bool | str = False,
    compile: bool | str = False,
    allow_upsampling: bool = False,
    bar: Any = None,
    plan: tuple | None = None,
) -> np.ndarray:
    """Embeddings of all spots of one slide, in table order (nothing written).

    ``bar``: a progress bar shared by several slides (updated, not closed); ``plan``: the slide's
    :func:`~spatialtranscriptformer.pp._tiles.tile_plan`, when already made (and its upsampling checked).
    """
    from .._accel import autocast
    from .._progress import progress_bar

    adata = get_table(data, table_key)
    size = tile_size or bb.spec.input_size
    res = mpp or bb.spec.mpp
    if plan is None:
        plan = tile_plan(data, adata, tile_size=size, mpp=res, image_key=image_key, allow_upsampling=allow_upsampling)
    gen = planned_batches(plan, tile_size=size, batch_size=batch_size, pad_mode="reflect", cval=255)
    out = np.zeros((adata.n_obs, bb.dim), dtype=np.float32) if bb.dim else None
    forward = bb.compiled_forward(compile)
    use_amp = amp if bb.spec.is_torch else False  # numpy feature extractors run as they are
    own = bar is None
    if own:
        bar = progress_bar(total=adata.n_obs, disable=not progress, desc=f"embed {bb.name}", unit="tile")
    try:
        for idx, x in _prefetch(gen, bb, prefetch):
            with autocast(bb.device, use_amp):
                f = forward(x)
            f = np.asarray(f, dtype=np.float32)
            if out is None:
                out = np.zeros((adata.n_obs, f.shape[1]), dtype=np.float32)
            out[idx] = f
            bar.update(len(idx))
    finally:
        if own:
            bar.close()
    return out


@doc_params(data=doc_image_slides, tiles=doc_embed_tiles, key=doc_embed_key, table_key=doc_table_key,
            copy=doc_copy, progress=doc_progress, upsampling=doc_upsampling)
def embed(
    data: SpatialData | list,
    *,
    backbone: str | Any = "handcrafted",
    weights: str | os.PathLike | None = None,
    tile_size: int | None = None,
    mpp: float | None = None,
    batch_size: int = 32,
    device: str | None = None,
    amp: bool | str = False,
    compile: bool | str = False,
    key_added: str | None = None,
    overwrite: bool = False,
    image_key: str | None = None,
    table_key: str | None = None,
    allow_upsampling: bool = False,
    progress: bool | None = None,
    copy: bool = False,
) -> SpatialData | list | None:
    """Embed each spot's tile with a frozen backbone and write one row per spot into ``obsm``.

    Tiles are cut at the backbone's native scale (``mpp``, ``tile_size``) around every spot, read block
    by block into memory by a background thread that stays ``2`` batches ahead of the model, so reading
    hides behind compute. Inference runs under :func:`torch.inference_mode` with ``stf.settings.n_threads``
    CPU threads (mixed precision with ``amp``, :func:`torch.compile` with ``compile``). Slides that already
    hold the embedding are skipped unless ``overwrite``; every slide is checked (image, spots, upsampling)
    before any is embedded, and one progress bar counts the tiles of all slides. For many slides on several
    GPUs or nodes use :func:`spatialtranscriptformer.pp.embed_distributed`.

    Parameters
    ----------
    {data}
    backbone
        A registered name (:func:`list_backbones`), e.g. ``"handcrafted"`` (no weights), ``"resnet50"``,
        ``"ctranspath"``, ``"phikon"``, ``"uni"``, ``"virchow2"``, ``"gigapath"``, ``"hibou_b"``,
        ``"h_optimus_0"``; or any ``torch.nn.Module``/callable mapping normalised ``(B, 3, S, S)`` tensors
        to ``(B, D)``.
    {tiles}
    batch_size
        Tiles per forward pass.
    device
        Torch device; default ``stf.settings.device``.
    amp
        Mixed precision for torch backbones: ``True`` / ``"bf16"`` (bfloat16 autocast) or ``"fp16"``; several
        times faster on GPUs with tensor cores, usually slower on CPUs. ``False``: float32.
    compile
        Run a torch backbone through :func:`torch.compile` (``True``: the inductor backend, or a backend
        name); compiling costs up to minutes once per process and pays off on many tiles.
    {key}
    {table_key}
    {upsampling}
    {progress}
    {copy}

    Returns
    -------
    ``None`` (or the copied slide(s) with ``copy=True``), writing on each slide's table:

    - ``obsm[key_added]``: ``(n_spots, dim)`` float32 embeddings;
    - ``uns[key_added]["params"]``: backbone, weights, tile size, µm/px, licence, dim, time.
    """
    from .._validate import check_finite_output, check_number

    check_number("tile_size", tile_size, minimum=1, integer=True, none_ok=True)
    check_number("mpp", mpp, minimum=0, exclusive=True, none_ok=True)
    check_number("batch_size", batch_size, minimum=1, integer=True)
    slides = as_slide_list(data)
    for i, s in enumerate(slides):
        if not is_spatialdata(s):
            raise TypeError(
                f"Slide {i}: embedding needs the H&E image, pass a SpatialData (got {type(s).__name__}); "
                "turn an AnnData into one with `stf.io.from_anndata(adata, image=..., mpp=...)`."
            )
    from .._accel import amp_dtype_name, check_compile

    amp_dtype_name(amp)
    check_compile(compile)
    if copy:
        slides = [copy_data(s) for s in slides]
    bb = get_backbone(backbone, weights=weights, device=device)
    key, size, res = embed_settings(bb, key_added=key_added, tile_size=tile_size, mpp=mpp)
    progress = settings.progress if progress is None else progress
    todo = []
    for s in slides:
        adata = get_table(s, table_key)
        if key in adata.obsm and not overwrite:
            logger.info("embed: %r already in obsm of slide %s, skipped (overwrite=True recomputes)", key,
                        adata.uns.get(K.SLIDE_META_KEY, {}).get("slide_id"))
            continue
        # validate (image, spots, upsampling) before any compute
        plan = tile_plan(s, adata, tile_size=size, mpp=res, image_key=image_key, allow_upsampling=allow_upsampling)
        todo.append((s, adata, plan))
    from .._progress import progress_bar

    n_tiles = sum(a.n_obs for _, a, _ in todo)
    desc = f"embed {bb.name}" + (f" ({len(todo)} slides)" if len(todo) > 1 else "")
    results = []  # all slides are embedded before any is written: an error leaves every slide unchanged
    with progress_bar(total=n_tiles, disable=not progress or not todo, desc=desc, unit="tile") as bar, \
            settings.torch_threads():
        for i, (s, adata, plan) in enumerate(todo):
            t0 = time.perf_counter()
            emb = embed_slide(s, bb, tile_size=size, mpp=res, batch_size=batch_size, table_key=table_key,
                              image_key=image_key, progress=progress, amp=amp, compile=compile, bar=bar, plan=plan)
            check_finite_output(emb, what=f"embed: backbone {bb.name!r} on slide {i} of {len(todo)}",
                                hint="Check the backbone's weights and the tiles (blank or corrupt image?).")
            results.append((adata, emb, time.perf_counter() - t0))
    for adata, emb, dt in results:
        adata.obsm[key] = emb
        adata.uns[key] = {"params": embedding_params(bb, weights=weights, tile_size=size, mpp=res, dim=emb.shape[1],
                                                     seconds=round(dt, 3))}
        logger.info("embed: %d spots with %s in %.1f s", adata.n_obs, bb.name, dt)
    if copy:
        return slides if isinstance(data, list) else slides[0]
    return None
