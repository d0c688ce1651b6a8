"""Bridge from scanpy/squidpy AnnData objects to a slide :class:`~spatialdata.SpatialData`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import _constants as K
from .._data import spot_coords
from .._logging import logger
from ._build import build_slide
from ._visium import VISIUM_SPOT_DIAMETER_UM, check_mpp, choose_image

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData


def _library(adata: AnnData, library_id: str | None) -> tuple[str | None, dict | None]:
    spatial = adata.uns.get("spatial")
    if not isinstance(spatial, dict) or not spatial:
        if library_id is not None:
            raise KeyError(f"library_id={library_id!r} given, but the AnnData has no uns['spatial'] libraries.")
        return None, None
    libs = list(spatial)
    if library_id is None:
        if len(libs) > 1:
            raise KeyError(f"uns['spatial'] holds several libraries {libs}; pass library_id= to choose one.")
        library_id = libs[0]
    if library_id not in spatial:
        raise KeyError(f"Library {library_id!r} not found in uns['spatial']; available libraries: {libs}.")
    return library_id, spatial[library_id]


def from_anndata(
    adata: AnnData,
    *,
    library_id: str | None = None,
    image: np.ndarray | None = None,
    image_scalef: float = 1.0,
    mpp: float | None = None,
    spot_diameter_um: float | None = None,
    img_key: str | None = "auto",
    slide_id: str | None = None,
    patient_id: str | None = None,
) -> SpatialData:
    """Turn a scanpy-style spatial AnnData into a one-slide :class:`~spatialdata.SpatialData`.

    Two inputs are understood:

    - a scanpy/squidpy Visium AnnData (:func:`scanpy.read_visium`, :func:`squidpy.read.visium`;
      Wolf et al. 2018, *Genome Biol.* 19:15; Palla et al. 2022, *Nat. Methods* 19:171): ``obsm['spatial']``
      in full-resolution pixels, ``uns['spatial'][library_id]['images'][img_key]`` and
      ``['scalefactors']`` (``tissue_<img_key>_scalef``, ``spot_diameter_fullres``). The chosen image becomes
      ``"he"``, placed on the spots by the transformation ``Scale(1 / scalefactor)`` to ``"global"``;
    - an AnnData with ``obsm['spatial']`` plus an explicit ``image`` array and ``mpp``.

    ``obsm['spatial']`` keeps your coordinates and units, and ``uns['spatial'][library_id]`` (images and
    scalefactors) is kept as you brought it (only the chosen library), so :func:`scanpy.pl.spatial` and
    :func:`squidpy.pl.spatial_scatter` draw the table as before; without one, it is built from the image.
    ``uns['stf_slide']`` records the image used (``image_source``), its ``image_scalef`` (image px per
    coordinate unit) and ``image_mpp`` (µm per image px). An image much coarser than the tiles of a
    pathology encoder is refused when tiles are cut (see :func:`spatialtranscriptformer.pp.tiles`).

    ``adata`` is never modified; the table of the result is a copy (raw counts expected in ``X``).

    Parameters
    ----------
    adata
        Spots x genes with ``obsm['spatial']`` (x, y).
    library_id
        Library in ``uns['spatial']``; ``None`` takes the only one.
    image
        H&E image ``(y, x, 3)`` (uint8, or float in [0, 1]); overrides ``uns['spatial']`` images.
    image_scalef
        Pixels of ``image`` per unit of ``obsm['spatial']`` (1 when the coordinates are pixels of ``image``).
    mpp
        Microns per unit of ``obsm['spatial']`` (per full-resolution pixel for scanpy Visium data). ``None``
        derives it as ``spot_diameter_um / spot_diameter_fullres`` from the scalefactors.
    spot_diameter_um
        Spot diameter in µm. ``None``: ``spot_diameter_fullres * mpp`` when both are known, else 55 µm (Visium)
        for scanpy Visium data (``uns['spatial']`` comes from Space Ranger); required otherwise.
    img_key
        Image of ``uns['spatial'][library_id]['images']`` to use: ``"auto"`` (highest-resolution image that
        is not blank), a key such as ``"hires"`` / ``"lowres"``, or ``None`` for a slide without image.
        Ignored when ``image`` is given.
    slide_id
        Slide identifier; defaults to ``library_id``, else ``"slide"``.
    patient_id
        Patient identifier; defaults to the slide id.

    Returns
    -------
    A :class:`~spatialdata.SpatialData` with image ``"he"``, circles ``"spots"`` and table ``"table"``.
    """
    from anndata import AnnData

    if not isinstance(adata, AnnData):
        raise TypeError(f"Expected an AnnData, got {type(adata).__name__}.")
    check_mpp(mpp, source="from_anndata")
    check_mpp(image_scalef, source="from_anndata (image_scalef)")
    coords = spot_coords(adata)
    library_id, lib = _library(adata, library_id)
    slide_id = slide_id or library_id or "slide"
    sf = dict(lib.get("scalefactors", {})) if lib else {}
    sdf = sf.get("spot_diameter_fullres")
    if spot_diameter_um is not None:
        check_mpp(spot_diameter_um, source="from_anndata (spot_diameter_um)")
    if mpp is None:
        if not sdf:
            raise ValueError(
                f"Unknown microns per pixel for slide {slide_id!r}: pass mpp= (µm per unit of obsm['spatial']), "
                "or provide uns['spatial'][library_id]['scalefactors']['spot_diameter_fullres'] (scanpy Visium)."
            )
        if spot_diameter_um is None:
            spot_diameter_um = VISIUM_SPOT_DIAMETER_UM
            logger.info("slide %s: assuming %.0f µm Visium spots", slide_id, spot_diameter_um)
        mpp = float(spot_diameter_um) / float(sdf)
        check_mpp(mpp, source=f"slide {slide_id!r} (from spot_diameter_fullres={sdf!r})")
    elif spot_diameter_um is None:
        if not sdf:
            raise ValueError(
                f"Unknown spot diameter for slide {slide_id!r}: pass spot_diameter_um= (55 for Visium, 100 for "
                "legacy ST)."
            )
        spot_diameter_um = float(sdf) * mpp

    if image is not None:
        name, img, scalef = "array", np.asarray(image), float(image_scalef)
    elif img_key is None:
        name, img, scalef = None, None, 1.0
    else:
        images = dict(lib.get("images", {})) if lib else {}
        if not images:
            raise ValueError(
                f"No H&E image for slide {slide_id!r}: the AnnData has no uns['spatial'][library_id]['images']. "
                "Pass image= (array) with mpp=, or img_key=None for a slide without image."
            )
        if img_key != "auto" and img_key not in images:
            raise KeyError(
                f"Image {img_key!r} not found in uns['spatial'][{library_id!r}]['images']; "
                f"available: {list(images)}."
            )
        order = sorted(images, key=lambda k: -float(sf.get(f"tissue_{k}_scalef") or 0))
        where = f"uns['spatial'][{library_id!r}]['images']"
        candidates = [
            (k, sf.get(f"tissue_{k}_scalef"), (lambda k=k: np.asarray(images[k])), f"{where}[{k!r}]") for k in order
        ]
        name, img, scalef = choose_image(candidates, img_key, source=f"slide {slide_id!r}")

    kept = None
    if lib is not None and lib.get("images") and lib.get("scalefactors"):  # they refer to obsm['spatial']: keep
        import copy

        kept = copy.deepcopy(dict(lib))  # never share arrays with the user's AnnData
        if len(adata.uns[K.UNS_SPATIAL_KEY]) > 1:
            logger.info("slide %s: keeping library %r of uns['spatial'] (the others are other slides)",
                        slide_id, library_id)
    if name is not None:
        logger.info("slide %s: H&E image %s, %.3g µm/px (%.3g px per obsm['spatial'] unit)",
                    slide_id, name, float(mpp) / scalef, scalef)
    return build_slide(
        img,
        adata,
        coords=coords,
        mpp=float(mpp),
        spot_diameter_um=float(spot_diameter_um),
        slide_id=slide_id,
        patient_id=patient_id,
        image_scalef=scalef,
        library_id=library_id or slide_id,
        spatial_uns=kept,
        extra_meta={"image_source": name, "mpp_fullres": float(mpp)},
    )
