"""Whole-slide 2 µm expression maps from H&E, streamed patch by patch into a chunked zarr store."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

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
    scale transformation into the ``"global"`` pixel coordinate system. Nothing is added to ``sdata``
    and no store is left behind when a step fails.

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
    import dask.array as da
    import zarr
    from tqdm.auto import tqdm

    from ..pp._image import choose_level, resolve_image
    from ..train._superres_data import sum_pool
    from ._superres import slide_tokens

    if not is_spatialdata(sdata):
        raise TypeError(f"predict_superres needs a SpatialData with the H&E, got {type(sdata).__name__}.")
    adata = get_table(sdata, table_key)
    mpp = slide_mpp(adata)
    levels = resolve_image(sdata, adata, image_key)
    if key_added in sdata.images and not overwrite:
        raise ValueError(
            f"Image element {key_added!r} already exists; pass overwrite=True or another key_added."
        )
    store = (
        Path(store)
        if store is not None
        else settings.cache_dir / "superres" / f"{key_added}_{uuid.uuid4().hex[:8]}.zarr"
    )
    if store.exists() and not overwrite:
        raise FileExistsError(f"Store {store} already exists; pass overwrite=True or another store.")
    progress = settings.progress if progress is None else progress
    S, G = model.out_size, len(model.genes)
    h, w = levels[0].shape_yx
    patch_px = model.patch_um / mpp
    n_rows, n_cols = int(np.ceil(h / patch_px)), int(np.ceil(w / patch_px))
    if skip_background:
        coarse = choose_level(levels, slide_mpp=mpp, target_mpp=16.0)
        todo = _tissue_patches(
            coarse, n_rows=n_rows, n_cols=n_cols, patch_px=patch_px, downscale=coarse.downscale
        )
    else:
        todo = np.stack(np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij"), -1).reshape(-1, 2)
    tmp = store.with_name(f".{store.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        root = zarr.open_group(str(tmp), mode="w")
        arrays = []
        for s in SCALES_UM:
            f = s // 2
            arrays.append(
                root.create_array(
                    f"{s}um",
                    shape=(G, n_rows * S // f, n_cols * S // f),
                    dtype="float32",
                    chunks=(G, S // f, S // f),
                    fill_value=0.0,
                )
            )
        root.attrs.update(
            {"genes": list(model.genes), "mpp": mpp, "patch_um": model.patch_um, "scales_um": list(SCALES_UM)}
        )
        bar = tqdm(total=len(todo), disable=not progress, desc="super-resolution")
        for b in range(0, len(todo), batch_size):
            rc = todo[b : b + batch_size]
            centers = (rc[:, ::-1] + 0.5) * patch_px
            tok = slide_tokens(
                sdata, model.backbone, centers, patch_px, table_key=table_key, image_key=image_key
            )
            pred = model.predict_tokens(tok, batch_size=batch_size)
            for (r, c), p in zip(rc, pred, strict=True):
                for s, arr in zip(SCALES_UM, arrays, strict=True):
                    f = s // 2
                    e = S // f
                    arr[:, r * e : (r + 1) * e, c * e : (c + 1) * e] = sum_pool(p, f)
            bar.update(len(rc))
        bar.close()
        if store.exists():
            shutil.rmtree(store)
        tmp.rename(store)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    element = _multiscale_element(store, model.genes, mpp, da)
    sdata.images[key_added] = element
    adata.uns[key_added] = {
        "params": {
            "model": repr(model),
            "backbone": model.backbone.name,
            "patch_um": model.patch_um,
            "batch_size": batch_size,
            "skip_background": skip_background,
            "store": str(store),
        },
        "genes": list(model.genes),
        "scales_um": list(SCALES_UM),
        "n_patches": int(len(todo)),
    }
    logger.info("super-resolution: %d patches written to %s", len(todo), store)


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
        arr.attrs["transform"] = {K.COORDINATE_SYSTEM: Scale([s / mpp, s / mpp], axes=("y", "x"))}
        nodes[f"scale{i}"] = xr.Dataset({"image": arr})
    tree = xr.DataTree.from_dict(nodes)
    Image2DModel().validate(tree)
    return tree
