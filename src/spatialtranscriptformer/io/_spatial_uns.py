"""The scanpy/squidpy image store ``uns['spatial'][library_id]`` of a slide.

scanpy (:func:`scanpy.pl.spatial`; Wolf et al. 2018, *Genome Biol.* 19:15) and squidpy
(:func:`squidpy.pl.spatial_scatter`; Palla et al. 2022, *Nat. Methods* 19:171) draw spots on an image
they find in ``adata.uns['spatial'][library_id]``: ``'images'`` holds ``'hires'`` and ``'lowres'``
``(y, x, 3)`` arrays, and ``'scalefactors'`` maps ``obsm['spatial']`` units to their pixels
(``tissue_<img>_scalef``) and gives the spot diameter in ``obsm['spatial']`` units
(``spot_diameter_fullres``). Space Ranger writes the same layout (hires: longest side 2,000 px, lowres:
600 px); we build it from the slide's image pyramid when the input did not bring one.
"""

from __future__ import annotations

import numpy as np

from .._logging import logger

HIRES_SIDE = 2000
"""Longest side (px) of the ``'hires'`` image (as Space Ranger's ``tissue_hires_image.png``)."""
LOWRES_SIDE = 600
"""Longest side (px) of the ``'lowres'`` image (as Space Ranger's ``tissue_lowres_image.png``)."""
LAZY_READ_BUDGET_PX = 16_000_000
"""Largest coarsest level of a lazy (out-of-core) image read to make the ``'hires'`` image (16 Mpx).

Of a whole-slide image only the file's coarsest pyramid level is read (typically 1–3k px a side)."""


def element_levels(element) -> list:
    """The ``(c, y, x)`` arrays of an image element, finest first (DataTree levels or the DataArray)."""
    if hasattr(element, "children") and len(element.children):
        keys = sorted(element.children, key=lambda k: int("".join(ch for ch in str(k) if ch.isdigit()) or 0))
        return [next(iter(element[k].data_vars.values())).data for k in keys]
    return [element.data]


def _resize(img: np.ndarray, side: int) -> np.ndarray:
    """``img`` (y, x, 3 uint8) with its longest side brought down to ``side`` (never enlarged)."""
    from PIL import Image

    h, w = img.shape[:2]
    f = side / max(h, w)
    if f >= 1:
        return np.ascontiguousarray(img)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    pil = Image.fromarray(np.ascontiguousarray(img))
    return np.asarray(pil.resize(size, Image.Resampling.BOX))  # area averaging: fast, no aliasing


def scanpy_library(
    levels: list,
    *,
    px_per_unit: float,
    mpp: float,
    spot_diameter_um: float,
    lazy: bool = False,
    budget_px: int = LAZY_READ_BUDGET_PX,
) -> dict:
    """The ``uns['spatial'][library_id]`` entry of a slide.

    Parameters
    ----------
    levels
        The slide image as ``(c, y, x)`` uint8 arrays (numpy or dask), finest first; ``[]`` for none.
    px_per_unit
        Pixels of ``levels[0]`` per unit of ``obsm['spatial']``.
    mpp
        Microns per unit of ``obsm['spatial']``.
    spot_diameter_um
        Spot diameter (bin edge) in µm.
    lazy
        The image is out of core (e.g. a whole-slide TIFF read through dask): see ``budget_px``. An
        in-memory image (numpy, or dask over numpy) is read at the coarsest level that has the hires side.
    budget_px
        Of a lazy (dask) image only the coarsest level of its own pyramid (never level 0) is read, and
        only when it has at most this many pixels; otherwise the entry has scale factors but no images (scanpy draws the spots without the
        H&E).

    Returns
    -------
    ``{'images': {'hires', 'lowres'}, 'scalefactors': {...}, 'metadata': {...}}``.
    """
    lib = {
        "images": {},
        "scalefactors": {"spot_diameter_fullres": float(spot_diameter_um) / float(mpp)},
        "metadata": {"source": "spatialtranscriptformer"},
    }
    if not levels:
        return lib
    w0 = int(levels[0].shape[-1])
    if lazy:  # out of core (a whole-slide image): read nothing but the file's coarsest level, if small
        chosen = levels[-1]
    else:  # in memory: the coarsest level that still has the hires side (else the finest, already smaller)
        chosen = levels[0]
        for a in levels:
            if max(a.shape[-2:]) >= HIRES_SIDE:
                chosen = a
    n_px = int(chosen.shape[-1]) * int(chosen.shape[-2])
    if lazy and (len(levels) < 2 or n_px > budget_px):
        logger.info(
            "uns['spatial']: no hires/lowres image (a lazy image is not read, except a coarse pyramid level of "
            "the file of at most %d px); scanpy/squidpy draw the spots without the H&E",
            budget_px,
        )
        return lib
    arr = np.asarray(chosen[:3].compute() if hasattr(chosen, "compute") else chosen[:3])
    img = np.moveaxis(arr, 0, -1)
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    hires = _resize(img, HIRES_SIDE)
    lowres = _resize(hires, LOWRES_SIDE)
    for name, im in (("hires", hires), ("lowres", lowres)):
        lib["images"][name] = im
        lib["scalefactors"][f"tissue_{name}_scalef"] = float(px_per_unit) * im.shape[1] / w0
    return lib
