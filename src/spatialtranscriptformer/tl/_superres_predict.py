"""Whole-slide 2 µm expression maps from H&E, streamed patch by patch into a chunked zarr store."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _constants as K
from .._data import get_table, is_spatialdata, slide_mpp
from .._logging import logger
from .._settings import settings

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from ._superres import SuperResModel

SCALES_UM = (2, 4, 8, 16)


def _tissue_patches(
    level, *, n_rows: int, n_cols: int, patch_px: float, downscale: float, thr: int = 220
) -> np.ndarray:
    """Patches (row, col) holding any non-background (not near-white) pixel on a coarse image level."""
    img = level.read(0, level.shape_yx[0], 0, level.shape_yx[1]).astype(np.int16)
    tissue = img.min(-1) < thr
    step = patch_px / downscale
    keep = []
    for r in range(n_rows):
        for c in range(n_cols):
            y0, x0 = int(r * step), int(c * step)
            if tissue[y0 : int((r + 1) * step) + 1, x0 : int((c + 1) * step) + 1].any():
                keep.append((r, c))
    return np.asarray(keep, dtype=np.int64).reshape(-1, 2)


def predict_superres(
    sdata: SpatialData,
    model: SuperResModel,
    *,
    key_added: str = K.SUPERRES_KEY,
    store: str | Path | None = None,
    image_key: str | None = None,
    table_key: str | None = None,
    batch_size: int = 8,
    skip_background: bool = True,
    overwrite: bool = False,
    progress: bool | None = None,
) -> None:
    """Predict 2 µm expected counts over a whole H&E slide into a multiscale image element.

    Patches of ``model.patch_um`` µm on a grid over the image are embedded with the model's frozen
    backbone and decoded one batch at a time; each batch is written straight into a chunked zarr store
    (one chunk per patch and level), so memory stays flat whatever the slide size. The element
    ``sdata.images[key_added]`` has one channel per gene and four levels: expected counts per 2 µm bin
    (``scale0``) and their sums over 4, 8 and 16 µm bins (count conserving), aligned to the H&E by a
    scale transformation into the ``"global"`` pixel coordinate system. The store is written to a
    temporary sibling and moved into place when complete (an existing store is replaced only then, and
    a second concurrent writer of the same store is refused); nothing is added to ``sdata`` and no
    store is left behind when a step fails. Non-finite predictions are an error.

    Parameters
    ----------
    sdata
        A slide with its H&E (no expression needed) and a table carrying ``uns['stf_slide']['mpp']``.
    model
        A trained :class:`~spatialtranscriptformer.tl.SuperResModel` (:func:`fit_superres`).
    key_added
        Name of the image element; parameters go to ``table.uns[key_added]['params']``.
    store
        Zarr folder for the levels; default a new folder under ``stf.settings.cache_dir / "superres"``.
    image_key, table_key
        Elements of ``sdata``.
    batch_size
        Patches per decoder batch.
    skip_background
        Leave patches without any tissue-coloured pixel at zero (not decoded).
    overwrite
        Replace an existing element / store.
    progress
        Progress bar; ``None`` follows ``stf.settings.progress``.
    """
    predict_superres_slides(
        [sdata], model, key_added=key_added, stores=[store], image_key=image_key, table_key=table_key,
        batch_size=batch_size, skip_background=skip_background, overwrite=overwrite, progress=progress,
    )


@dataclass
class _Plan:
    """What one slide's prediction needs, gathered (and validated) before anything is computed."""

    sdata: Any
    adata: Any
    mpp: float
    levels: list
    store: Path
    todo: np.ndarray
    n_rows: int
    n_cols: int
    patch_px: float


def _plan(sdata, model, *, i: int, key_added: str, store, image_key, table_key, skip_background, overwrite) -> _Plan:
    from ..pp._image import choose_level, resolve_image

    where = f"slide {i}: " if i >= 0 else ""
    if not is_spatialdata(sdata):
        raise TypeError(f"{where}predict_superres needs a SpatialData with the H&E, got {type(sdata).__name__}.")
    try:
        adata = get_table(sdata, table_key)
        mpp = slide_mpp(adata)
        levels = resolve_image(sdata, adata, image_key)
    except (KeyError, ValueError) as err:
        if not where or type(err) not in (KeyError, ValueError):
            raise
        raise type(err)(f"{where}{err.args[0] if err.args else err}") from None
    if key_added in sdata.images and not overwrite:
        raise ValueError(
            f"{where}Image element {key_added!r} already exists; pass overwrite=True or another key_added."
        )
    store = (
        Path(store)
        if store is not None
        else settings.cache_dir / "superres" / f"{key_added}_{uuid.uuid4().hex[:8]}.zarr"
    )
    if store.exists() and not overwrite:
        raise FileExistsError(f"{where}Store {store} already exists; pass overwrite=True or another store.")
    h, w = levels[0].extent_yx  # coordinate units (full-resolution px)
    patch_px = model.patch_um / mpp
    n_rows, n_cols = int(np.ceil(h / patch_px)), int(np.ceil(w / patch_px))
    if skip_background:
        coarse = choose_level(levels, slide_mpp=mpp, target_mpp=16.0)
        todo = _tissue_patches(
            coarse, n_rows=n_rows, n_cols=n_cols, patch_px=patch_px, downscale=coarse.downscale
        )
    else:
        todo = np.stack(np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij"), -1).reshape(-1, 2)
    return _Plan(sdata, adata, mpp, levels, store, todo, n_rows, n_cols, patch_px)


def _compute(p: _Plan, root_path: Path, model, *, i: int, batch_size: int, table_key, image_key, progress) -> None:
    """Decode every patch of one slide into the (temporary) zarr store at ``root_path``."""
    import zarr
    from tqdm.auto import tqdm

    from .._validate import check_finite_output
    from ..train._superres_data import sum_pool
    from ._superres import slide_tokens

    S, G = model.out_size, len(model.genes)
    root = zarr.open_group(str(root_path), mode="w")
    arrays = []
    for s in SCALES_UM:
        f = s // 2
        arrays.append(
            root.create_array(
                f"{s}um",
                shape=(G, p.n_rows * S // f, p.n_cols * S // f),
                dtype="float32",
                chunks=(G, S // f, S // f),
                fill_value=0.0,
            )
        )
    root.attrs.update(
        {"genes": list(model.genes), "mpp": p.mpp, "patch_um": model.patch_um, "scales_um": list(SCALES_UM)}
    )
    bar = tqdm(total=len(p.todo), disable=not progress, desc="super-resolution")
    for b in range(0, len(p.todo), batch_size):
        rc = p.todo[b : b + batch_size]
        centers = (rc[:, ::-1] + 0.5) * p.patch_px
        tok = slide_tokens(p.sdata, model.backbone, centers, p.patch_px, table_key=table_key, image_key=image_key)
        pred = model.predict_tokens(tok, batch_size=batch_size)
        check_finite_output(pred, what=f"predict_superres: slide {i}, patches {b}..{b + len(rc) - 1}",
                            hint="Check the model's weights and the image.")
        for (r, c), pr in zip(rc, pred, strict=True):
            for s, arr in zip(SCALES_UM, arrays, strict=True):
                f = s // 2
                e = S // f
                arr[:, r * e : (r + 1) * e, c * e : (c + 1) * e] = sum_pool(pr, f)
        bar.update(len(rc))
    bar.close()


def predict_superres_slides(
    slides: list,
    model: SuperResModel,
    *,
    key_added: str = K.SUPERRES_KEY,
    stores: list | None = None,
    image_key: str | None = None,
    table_key: str | None = None,
    batch_size: int = 8,
    skip_background: bool = True,
    overwrite: bool = False,
    progress: bool | None = None,
) -> None:
    """:func:`predict_superres` over several slides, all or nothing.

    Every slide is validated first; all stores are computed into temporary siblings (each locked
    against concurrent writers, see :mod:`~spatialtranscriptformer._atomic`) and moved into place only
    when every slide succeeded; only then are the elements added to the slides.
    """
    import contextlib

    import dask.array as da

    from .._atomic import atomic_output
    from .._validate import check_number

    check_number("batch_size", batch_size, minimum=1, integer=True)
    stores = [None] * len(slides) if stores is None else list(stores)
    if len(stores) != len(slides):
        raise ValueError(f"{len(stores)} stores for {len(slides)} slides.")
    progress = settings.progress if progress is None else progress
    many = len(slides) > 1
    plans = [
        _plan(s, model, i=i if many else -1, key_added=key_added, store=st, image_key=image_key,
              table_key=table_key, skip_background=skip_background, overwrite=overwrite)
        for i, (s, st) in enumerate(zip(slides, stores, strict=True))
    ]
    paths = [p.store.resolve() for p in plans]
    if len(set(paths)) != len(paths):
        raise ValueError("Several slides would be written to the same store; give one store per slide.")
    with contextlib.ExitStack() as stack:  # all temporaries are committed at the end, or all removed
        for i, p in enumerate(plans):
            tmp = stack.enter_context(atomic_output(p.store, kind="dir", overwrite=overwrite, replaceable=_zarr_check))
            _compute(p, tmp, model, i=i, batch_size=batch_size, table_key=table_key, image_key=image_key,
                     progress=progress)
    for p in plans:
        p.sdata.images[key_added] = _multiscale_element(p.store, model.genes, p.mpp, da)
        p.adata.uns[key_added] = {
            "params": {
                "model": repr(model),
                "backbone": model.backbone.name,
                "patch_um": model.patch_um,
                "batch_size": batch_size,
                "skip_background": skip_background,
                "store": str(p.store),
            },
            "genes": list(model.genes),
            "scales_um": list(SCALES_UM),
            "n_patches": int(len(p.todo)),
        }
        logger.info("super-resolution: %d patches written to %s", len(p.todo), p.store)


def _zarr_check(path: Path) -> str | None:
    from .._atomic import _is_zarr_store

    return _is_zarr_store(path)


def _multiscale_element(store: Path, genes: list[str], mpp: float, da):
    """A SpatialData multiscale image (DataTree) over the zarr levels, mapped onto the H&E pixels."""
    import xarray as xr
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    nodes = {}
    for i, s in enumerate(SCALES_UM):
        arr = xr.DataArray(
            da.from_zarr(str(store), component=f"{s}um"), dims=("c", "y", "x"), coords={"c": list(genes)}
        )
        # 2 µm bin (y, x) covers H&E pixels [y, y + 1) * s / mpp: a pure scale into "global"
        arr.attrs["transform"] = {
            K.COORDINATE_SYSTEM: Scale([s / mpp, s / mpp], axes=("y", "x")),
            K.MICRON_COORDINATE_SYSTEM: Scale([float(s), float(s)], axes=("y", "x")),
        }
        nodes[f"scale{i}"] = xr.Dataset({"image": arr})
    tree = xr.DataTree.from_dict(nodes)
    Image2DModel().validate(tree)
    return tree
