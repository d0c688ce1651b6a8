"""Reader for 10x Genomics Visium (Space Ranger) outputs, and image helpers shared by the readers."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from .._logging import logger
from .._validate import read_json, reading
from ._build import build_slide

if TYPE_CHECKING:
    from spatialdata import SpatialData

VISIUM_SPOT_DIAMETER_UM = 55.0
"""Diameter of a Visium spot (10x Genomics, Visium Spatial Gene Expression user guide)."""
VISIUM_PITCH_UM = 100.0
"""Centre-to-centre distance of Visium spots."""
IMG_KEYS = ("auto", "fullres", "hires", "lowres")
"""Accepted ``img_key`` values of the Space Ranger readers (``None``: no image)."""

ImgKey = Literal["auto", "fullres", "hires", "lowres"] | None


def is_blank(img) -> bool:
    """Whether an image (``y, x, c``; numpy or dask; pyramid levels: the coarsest) is a single colour.

    Checked on a strided subsample (of a dask image, only that subsample is computed).
    """
    a = img[-1] if isinstance(img, list | tuple) else img
    step = max(1, min(a.shape[:2]) // 512)
    sub = a[::step, ::step, :3] if a.ndim == 3 else a[::step, ::step]
    sub = np.asarray(sub.compute() if hasattr(sub, "compute") else sub)
    return bool(sub.size == 0 or (sub == sub.reshape(-1, *sub.shape[2:])[0]).all())


def read_image_file(path: str | os.PathLike, *, level: int = 0) -> tuple[np.ndarray, float]:
    """Read an image file into memory as ``(y, x, c)``.

    TIFF files (including pyramidal / OME / BigTIFF ``.btf``) are read with :mod:`tifffile`, at pyramid
    ``level``; other formats with Pillow (level 0 only).

    Returns
    -------
    The image and its downsampling factor relative to level 0.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image file not found: {path}")
    if path.suffix.lower() in (".tif", ".tiff", ".btf"):
        import tifffile

        with reading(path, "image file"), tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            levels = series.levels
            if not 0 <= level < len(levels):
                raise ValueError(
                    f"{path.name}: pyramid level {level} requested, the file has levels 0..{len(levels) - 1}."
                )
            axes = series.axes
            arr = levels[level].asarray()
            full_w = series.levels[0].shape[axes.index("X")]
            ds = full_w / arr.shape[axes.index("X")]
        arr = np.squeeze(arr) if arr.ndim > 3 else arr
        axes = axes.replace("Q", "").replace("Z", "").replace("T", "")[-arr.ndim :]
        if arr.ndim == 3 and axes[0] in "CS" and arr.shape[0] <= 4:
            arr = np.moveaxis(arr, 0, -1)
        return arr, float(ds)
    if level != 0:
        raise ValueError(f"{path.name}: pyramid levels are only supported for TIFF files, got level={level}.")
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with reading(path, "image file"), Image.open(path) as im:
        return np.asarray(im.convert("RGB") if im.mode not in ("RGB", "L") else im), 1.0


def open_image_file(path: str | os.PathLike, *, level: int = 0, chunks: int = 1024) -> tuple[np.ndarray | list, float]:
    """Open an image file for :func:`~spatialtranscriptformer.io._build.build_slide`, lazily if it can.

    A TIFF (pyramidal / OME / BigTIFF) is opened without reading pixels: its levels from ``level`` on
    become lazy dask arrays (see :func:`~spatialtranscriptformer.io._tiff.tiff_levels`), so a whole-slide
    image is read region by region when tiles are cut. A JPEG is not decoded either: its pyramid levels
    are decoded on first use, the coarse ones directly at their scale
    (:func:`~spatialtranscriptformer.io._lazy.jpeg_levels`). Other formats (PNG) are read into memory
    with :func:`read_image_file`.

    Returns
    -------
    The image (a list of ``(y, x, c)`` levels, finest first, for a TIFF or a JPEG; an array otherwise)
    and the downsampling factor of ``level`` relative to level 0.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image file not found: {path}")
    if path.suffix.lower() in (".tif", ".tiff", ".btf"):
        from ._tiff import tiff_levels

        return tiff_levels(path, level=level, chunks=chunks)
    from ._lazy import JPEG_SUFFIXES, jpeg_levels

    if path.suffix.lower() in JPEG_SUFFIXES and level == 0:
        return jpeg_levels(path, chunks=chunks), 1.0
    return read_image_file(path, level=level)


def choose_image(
    candidates: list[tuple[str, float | None, Callable[[], np.ndarray | list] | None, str]],
    img_key: str | None,
    *,
    source: str,
) -> tuple[str | None, np.ndarray | None, float]:
    """Pick the H&E image of a slide.

    Parameters
    ----------
    candidates
        ``(name, scalefactor, loader, description)`` from the highest to the lowest resolution; ``loader``
        is ``None`` for an image that is absent, ``scalefactor`` maps full-resolution pixels to the
        image's pixels (``None`` when unknown).
    img_key
        ``"auto"`` (the highest-resolution image that is not blank), a candidate name, or ``None`` (no image).
    source
        Name of the data set for messages.

    Returns
    -------
    Name, image and scalefactor of the chosen image (``None, None, 1.0`` for ``img_key=None``).
    """
    names = [c[0] for c in candidates]
    if img_key is None:
        return None, None, 1.0
    if img_key != "auto" and img_key not in names:
        raise ValueError(f"{source}: unknown img_key {img_key!r}; expected 'auto', None or one of {names}.")
    todo = candidates if img_key == "auto" else [c for c in candidates if c[0] == img_key]
    present = [c for c in todo if c[2] is not None]
    if not present:
        what = "; ".join(f"{n}: {d}" for n, _, _, d in todo)
        raise FileNotFoundError(
            f"{source}: no H&E image found ({what}). Provide the image, or pass img_key=None to load the "
            "expression without an image."
        )
    blank = []
    for name, scalef, loader, desc in present:
        img = loader()
        if is_blank(img):
            if img_key == "auto":
                blank.append(desc)
                continue
            warnings.warn(f"{source}: the {name} image ({desc}) is blank (a single colour).", stacklevel=3)
        if blank:
            warnings.warn(
                f"{source}: skipped blank (single-colour) image(s) {blank}; using the {name} image ({desc}).",
                stacklevel=3,
            )
        if scalef is None or not np.isfinite(scalef) or scalef <= 0:
            raise ValueError(f"{source}: unknown or invalid scalefactor ({scalef!r}) of the {name} image ({desc}).")
        logger.info("%s: using the %s image (%s), %s px per full-resolution px", source, name, desc, scalef)
        return name, img, float(scalef)
    raise ValueError(
        f"{source}: every available image is blank (a single colour): {blank}. Pass img_key=<name> to use one "
        "anyway, or img_key=None to load the expression without an image."
    )


def check_mpp(mpp: float | None, *, source: str) -> None:
    """Raise a ``ValueError`` for a given µm/px that is not a positive finite number."""
    if mpp is not None and (not isinstance(mpp, int | float | np.number) or not np.isfinite(mpp) or mpp <= 0):
        raise ValueError(f"{source}: microns per pixel must be a positive number, got mpp={mpp!r}.")


def _find_counts(folder: Path, counts_file: str) -> tuple[Path, str | None]:
    direct = folder / counts_file
    if direct.is_file():
        return direct, None
    hits = sorted(folder.glob(f"*_{counts_file}"))
    if hits:
        return hits[0], hits[0].name[: -len(counts_file) - 1]
    raise FileNotFoundError(f"Visium counts file not found: {direct} (nor <library_id>_{counts_file}).")


def read_visium(
    path: str | os.PathLike,
    *,
    counts_file: str = "filtered_feature_bc_matrix.h5",
    fullres_image_file: str | os.PathLike | None = None,
    img_key: ImgKey = "auto",
    mpp: float | None = None,
    spot_diameter_um: float = VISIUM_SPOT_DIAMETER_UM,
    slide_id: str | None = None,
    patient_id: str | None = None,
) -> SpatialData:
    """Read a 10x Genomics Visium slide (Space Ranger ``outs`` folder).

    Counts, spot positions and the hires/lowres images are read with :func:`spatialdata_io.visium`
    (Marconato et al. 2024, *Nat. Methods* 22:58), then normalised to this library's conventions. The
    microns per full-resolution pixel follow from the spot size: ``mpp = 55 / spot_diameter_fullres``
    (55 µm Visium spots, ``scalefactors_json.json``).

    ``obsm['spatial']`` holds the spot centres in full-resolution pixels, as in Space Ranger and scanpy, and
    ``uns['spatial'][library_id]`` the hires/lowres PNGs (those that are not blank) with Space Ranger's
    scalefactors, so :func:`scanpy.pl.spatial` and :func:`squidpy.pl.spatial_scatter` draw on the H&E.
    When no full-resolution image is given, the hires image (else the lowres one) becomes the slide image
    ``"he"``, placed on the spots by ``Scale(1 / scalefactor)``. ``uns['stf_slide']`` records which image was
    used (``image_source``), its ``image_scalef`` (px per full-resolution px) and ``image_mpp`` (µm/px); the
    choice is logged at INFO level. Space Ranger's PNGs are 10–30× coarser than the 0.5 µm/px tiles of
    pathology encoders: :func:`spatialtranscriptformer.pp.tiles` and :func:`~spatialtranscriptformer.pp.embed`
    refuse such an image unless ``allow_upsampling=True`` — pass ``fullres_image_file=``.

    Parameters
    ----------
    path
        The Space Ranger ``outs`` folder (``filtered_feature_bc_matrix.h5``, ``spatial/``).
    counts_file
        Counts file name (a ``<library_id>_`` prefix is found automatically).
    fullres_image_file
        The full-resolution H&E given to Space Ranger (TIFF/BigTIFF/JPEG/PNG), absolute or relative to
        ``path``. A TIFF is opened lazily (read region by region when tiles are cut; its own pyramid
        levels are used); JPEG/PNG are read into memory.
    img_key
        ``"auto"``: the full-resolution image if given, else the highest-resolution image that is not blank
        (a single colour, with a warning); ``"fullres"``, ``"hires"``, ``"lowres"`` to choose; ``None`` for
        no image.
    mpp
        Microns per full-resolution pixel; ``None`` derives it from ``spot_diameter_fullres``.
    spot_diameter_um
        Physical spot diameter.
    slide_id
        Slide identifier; defaults to the library id (counts file prefix) or the folder name.
    patient_id
        Patient identifier; defaults to the slide id.

    Returns
    -------
    A :class:`~spatialdata.SpatialData` with image ``"he"``, circles ``"spots"`` and table ``"table"``
    (see :func:`spatialtranscriptformer.io.read_her2st`).
    """
    folder = Path(path)
    check_mpp(mpp, source=f"Visium folder {folder}")
    if not folder.is_dir():
        raise FileNotFoundError(f"Visium folder not found: {folder}")
    counts_path, library = _find_counts(folder, counts_file)
    spatial = folder / "spatial"
    positions = [spatial / "tissue_positions_list.csv", spatial / "tissue_positions.csv"]
    if not any(p.is_file() for p in positions):
        raise FileNotFoundError(f"Visium spot positions not found: {positions[0]} or {positions[1].name}.")
    sf_path = spatial / "scalefactors_json.json"
    if not sf_path.is_file():
        raise FileNotFoundError(f"Visium scalefactors file not found: {sf_path}")
    scalefactors = read_json(sf_path, "scalefactors file")
    required = ("tissue_hires_scalef", "tissue_lowres_scalef", "spot_diameter_fullres")
    missing = [k for k in required if k not in scalefactors]
    if missing:
        raise ValueError(f"{sf_path}: missing keys {missing}; cannot place the spots or know the µm/px.")
    if mpp is None:
        sdf = float(scalefactors["spot_diameter_fullres"])
        if not np.isfinite(sdf) or sdf <= 0:
            raise ValueError(
                f"{sf_path}: invalid spot_diameter_fullres {sdf!r}; pass mpp= (µm per full-resolution pixel)."
            )
        mpp = spot_diameter_um / sdf
    fullres_path = None
    if fullres_image_file is not None:
        fullres_path = folder / fullres_image_file
        if not fullres_path.is_file():
            raise FileNotFoundError(f"Full-resolution image not found: {fullres_path}")
    slide_id = slide_id or library or (folder.parent.name if folder.name == "outs" else folder.name)

    import anndata as ad
    import spatialdata_io

    dataset_id = library or "visium"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Converting `region_key", category=UserWarning)
        with reading(folder, f"Visium outputs ({counts_path.name}, spatial/) in"):
            sdata = spatialdata_io.visium(folder, dataset_id=dataset_id, counts_file=counts_path.name)
    t = sdata.tables["table"]
    coords = np.asarray(t.obsm["spatial"], dtype=np.float64)
    nan = ~np.isfinite(coords).all(axis=1)
    if nan.any():
        raise ValueError(
            f"{int(nan.sum())} spots of {counts_path.name} have no position in the tissue positions file, "
            f"e.g. {t.obs_names[nan][:3].tolist()}."
        )
    obs = t.obs.drop(columns=[c for c in ("region", "spot_id") if c in t.obs]).copy()
    adata = ad.AnnData(X=t.X, obs=obs, var=t.var.copy())

    def _loader(name):
        img = sdata.images.get(f"{dataset_id}_{name}_image")
        return None if img is None else (lambda: np.moveaxis(np.asarray(img.data), 0, -1))

    fullres_loader = None if fullres_path is None else (lambda: open_image_file(fullres_path)[0])
    candidates = [  # descriptions relative to the folder (messages without the machine's paths)
        ("fullres", 1.0, fullres_loader, str(fullres_image_file or "no fullres_image_file given")),
        ("hires", scalefactors["tissue_hires_scalef"], _loader("hires"), "spatial/tissue_hires_image.png"),
        ("lowres", scalefactors["tissue_lowres_scalef"], _loader("lowres"), "spatial/tissue_lowres_image.png"),
    ]
    name, image, scalef = choose_image(candidates, img_key, source=f"Visium slide {slide_id!r}")
    return build_slide(
        image,
        adata,
        coords=coords,
        mpp=mpp,
        spot_diameter_um=spot_diameter_um,
        slide_id=slide_id,
        patient_id=patient_id,
        image_scalef=scalef,
        library_id=library or slide_id,
        spatial_uns=space_ranger_uns(
            {n: _loader(n) for n in ("hires", "lowres")}, scalefactors, source=f"Visium slide {slide_id!r}"
        ),
        extra_meta={
            "technology": "Visium",
            "pitch_um": VISIUM_PITCH_UM,
            "image_source": name,
            "mpp_fullres": float(mpp),
        },
    )


def space_ranger_uns(loaders: dict, scalefactors: dict, *, source: str) -> dict:
    """``uns['spatial'][library_id]`` from Space Ranger's PNGs (blank ones left out) and scalefactors."""
    images = {}
    for name, loader in loaders.items():
        if loader is None:
            continue
        img = np.asarray(loader())
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=-1)
        img = img[..., :3]
        if is_blank(img):
            logger.info("%s: the %s image is blank, left out of uns['spatial']", source, name)
            continue
        if img.dtype != np.uint8:
            img = (img * 255 if np.issubdtype(img.dtype, np.floating) and img.max() <= 1 else img)
            img = np.clip(img, 0, 255).astype(np.uint8)
        images[name] = img
    sf = {k: float(v) for k, v in scalefactors.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    if "hires" not in images and "lowres" in images and "tissue_lowres_scalef" in sf:
        # squidpy draws "hires" by default: give it the best image there is, with that image's scalefactor
        images["hires"] = images["lowres"]
        sf["tissue_hires_scalef"] = sf["tissue_lowres_scalef"]
        logger.info("%s: no usable hires image; uns['spatial'] 'hires' holds the lowres image", source)
    return {"images": images, "scalefactors": sf, "metadata": {"source": "Space Ranger"}}
