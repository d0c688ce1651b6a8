"""Access to a slide's H&E image pyramid as in-memory numpy regions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .._data import is_spatialdata

if TYPE_CHECKING:
    from anndata import AnnData


@dataclass
class ImageLevel:
    """One pyramid level: a lazy ``(c, y, x)`` array and its size relative to the slide's coordinates.

    ``downscale`` is the number of coordinate units (``obsm['spatial']``, full-resolution pixels) per pixel
    of this level: ``2 ** level`` for a full-resolution pyramid, ``1 / scalefactor`` at level 0 of a Space
    Ranger hires/lowres image.
    """

    array: Any
    downscale: float
    index: int

    @property
    def shape_yx(self) -> tuple[int, int]:
        """Height and width in pixels."""
        return int(self.array.shape[-2]), int(self.array.shape[-1])

    @property
    def extent_yx(self) -> tuple[float, float]:
        """Height and width in coordinate units."""
        h, w = self.shape_yx
        return h * self.downscale, w * self.downscale

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Region ``[y0:y1, x0:x1]`` as ``(y, x, 3)`` uint8 (clipped to the image)."""
        return np.moveaxis(self.read_chw(y0, y1, x0, x1), 0, -1)

    def read_chw(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Region ``[y0:y1, x0:x1]`` as ``(3, y, x)`` uint8 (clipped to the image), as stored."""
        h, w = self.shape_yx
        y0, y1, x0, x1 = max(0, y0), min(h, y1), max(0, x0), min(w, x1)
        reg = self.array[:3, y0:y1, x0:x1]
        if hasattr(reg, "compute"):
            reg = reg.compute()
        return np.asarray(reg)


def image_levels(sdata, image_key: str) -> list[ImageLevel]:
    """The pyramid levels of image ``image_key`` of a SpatialData, finest first."""
    if image_key not in sdata.images:
        raise KeyError(f"Image {image_key!r} not found; available images: {list(sdata.images.keys()) or 'none'}.")
    el = sdata.images[image_key]
    if hasattr(el, "children") and len(getattr(el, "children", {})):  # DataTree (multiscale)
        arrays = []
        for name in sorted(el.children, key=lambda s: int(str(s).replace("scale", "") or 0)):
            node = el[name]
            var = list(node.data_vars)[0] if hasattr(node, "data_vars") else "image"
            arrays.append(node[var].data)
    else:
        arrays = [el.data]
    h0 = arrays[0].shape[-2]
    unit = units_per_pixel(el, name=image_key)
    return [ImageLevel(a, unit * h0 / a.shape[-2], i) for i, a in enumerate(arrays)]


def units_per_pixel(element, *, name: str = "image") -> float:
    """Coordinate units (``"global"``) per pixel of an image element's finest level.

    Read from the element's transformation to ``"global"``: 1 for ``Identity``, ``1 / scalefactor`` for
    the ``Scale`` a reader sets on a Space Ranger hires/lowres image. Rotations, shears, translations and
    unequal x/y scales are not supported (spots are cut as axis-aligned squares of the image).
    """
    from spatialdata.transformations import get_transformation

    from .._constants import COORDINATE_SYSTEM

    try:
        tf = get_transformation(element, to_coordinate_system=COORDINATE_SYSTEM)
    except (KeyError, ValueError):
        return 1.0
    m = np.asarray(tf.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float)
    sx, sy = m[0, 0], m[1, 1]
    if abs(m[0, 1]) > 1e-9 or abs(m[1, 0]) > 1e-9 or abs(m[0, 2]) > 1e-6 or abs(m[1, 2]) > 1e-6:
        raise ValueError(
            f"Image {name!r}: its transformation to {COORDINATE_SYSTEM!r} is not a pure scale ({tf}); "
            "rotated, sheared or translated images are not supported."
        )
    if not (sx > 0 and np.isclose(sx, sy, rtol=1e-3)):
        raise ValueError(f"Image {name!r}: unequal or non-positive x/y scales ({sx}, {sy}) to {COORDINATE_SYSTEM!r}.")
    return float(sx)


def array_levels(image: np.ndarray) -> list[ImageLevel]:
    """A single in-memory ``(y, x, 3)`` image as one level."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] < 3:
        raise ValueError(f"Image must be (y, x, 3), got shape {image.shape}.")
    return [ImageLevel(np.moveaxis(image[..., :3], -1, 0), 1.0, 0)]


def resolve_image(data, adata: AnnData, image_key: str | None) -> list[ImageLevel]:
    """Pyramid levels of the slide image of ``data`` (``image_key`` or the one in ``uns['stf_slide']``)."""
    from .._constants import SLIDE_META_KEY

    key = image_key or adata.uns.get(SLIDE_META_KEY, {}).get("image_key")
    if is_spatialdata(data):
        if key is None:
            names = list(data.images.keys())
            if len(names) != 1:
                raise KeyError(f"Pass `image_key=`; available images: {names or 'none'}.")
            key = names[0]
        return image_levels(data, key)
    raise ValueError(
        "This operation needs the H&E image: pass a SpatialData with an image element "
        "(e.g. from `stf.io.from_anndata(adata, image=...)`)."
    )


def choose_level(levels: list[ImageLevel], *, slide_mpp: float, target_mpp: float) -> ImageLevel:
    """The coarsest level that is still at least as fine as ``target_mpp`` (never upsample needlessly)."""
    best = levels[0]
    for lv in levels:
        if slide_mpp * lv.downscale <= target_mpp * 1.001:
            best = lv
    return best
