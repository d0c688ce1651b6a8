"""Parameter descriptions shared by several docstrings (defined once, substituted in)."""

from __future__ import annotations

import inspect

doc_data = """\
data
    A :class:`~spatialdata.SpatialData` with an expression/spot table, or an
    :class:`~anndata.AnnData` (one slide)."""

doc_slides = """\
data
    One slide or a list of slides: :class:`~spatialdata.SpatialData` objects (or
    :class:`~anndata.AnnData` tables carrying embeddings and ``obsm['spatial']``)."""

doc_image_slides = """\
data
    One slide or a list of slides: :class:`~spatialdata.SpatialData` objects holding the H&E image (an
    :class:`~anndata.AnnData` has no image element; make one with
    :func:`spatialtranscriptformer.io.from_anndata`)."""

doc_upsampling = """\
allow_upsampling
    Cut tiles even when they need more than 4x upsampling of the slide image (e.g. Space Ranger's
    hires/lowres PNGs for 0.5 µm/px tiles), which is refused by default; above 2x a warning says how
    blurred they are."""

doc_table_key = """\
table_key
    Name of the table inside a :class:`~spatialdata.SpatialData`. ``None`` picks the only table,
    or ``"table"``, or the only table that is not a prediction table of
    :func:`~spatialtranscriptformer.tl.predict`; the error lists the available tables otherwise. Ignored
    for AnnData input."""

doc_copy = """\
copy
    Return a modified copy instead of writing into ``data``."""

doc_progress = """\
progress
    Show a progress bar; ``None`` follows ``stf.settings.progress``."""


doc_show_save = """\
show
    Show the figure; ``None``: show unless ``return_fig`` or ``ax`` is given.
save
    File to write the figure to (format from the extension).
return_fig
    Return the :class:`~matplotlib.figure.Figure`."""


doc_slide_view = """\
image_key
    Image element to draw under the spots; default: the slide's H&E (``uns['stf_slide']``).
level
    Pyramid level of the image (0 = full resolution); ``None`` picks the coarsest level whose
    crop still has ``max_side`` px.
max_side
    Target longest side (px) of the displayed image crop.
crop
    Crop the image to the spots.
show_image
    Draw the H&E under the spots.
spot_scale
    Multiplier of the physical spot radius."""

doc_spot_panels = """\
alpha
    Opacity of the spots.
panel_size
    Width and height (inches) of one panel.
ax
    Axes to draw into, one per panel (row-major)."""

doc_embed_tiles = """\
weights
    Weight file or folder; ``None`` reads the local Hugging Face cache; ``"random"`` explicitly uses
    random weights (tests only). Missing weights raise :class:`FileNotFoundError`.
tile_size
    Tile edge in pixels; default the backbone's input size.
mpp
    Tile resolution in µm/px; default the backbone's native resolution."""

doc_embed_key = """\
key_added
    ``obsm`` key; default ``"X_<backbone>"``.
overwrite
    Recompute embeddings already present.
image_key
    Image element; defaults to the one recorded by the reader."""

doc_train = """\
max_epochs
    Training epochs.
lr
    AdamW learning rate; ``None``: the model's default.
batch_size
    Slides (spot models) or patches (super-resolution) per step; ``None``: the model's default.
early_stopping_patience
    Epochs without improvement of the validation metric before stopping (``None``: never); ``"auto"``:
    the model's default. Without validation data training runs all ``max_epochs``.
seed
    Seed of the split, the initialisation, the data order and dropout (runs on CPU are reproducible).
model_kwargs
    The model's hyperparameters (for the registered models and their defaults:
    ``stf.module.available_models(details=True)``).
plan_kwargs
    Training-plan options (loss weights, weight decay, warm-up; see below).
data_kwargs
    How inputs and targets are made from the slides (see below).
accelerator, devices
    Lightning ``Trainer`` settings (``"auto"``: a GPU when there is one).
checkpoint_dir
    Folder for Lightning's ``best.ckpt`` / ``last.ckpt`` (kept). ``None``: nothing is written; the best
    weights are kept in memory."""

doc_trainer_kwargs = """\
**trainer_kwargs
    More :class:`lightning.pytorch.Trainer` arguments (e.g. ``precision``, ``callbacks``, which are added
    to ours, ``gradient_clip_val``, ``accumulate_grad_batches``, ``strategy="ddp"``)."""


def doc_params(**kwds: str):
    """Substitute shared parameter text into a docstring (``{name}`` placeholders)."""

    def dec(obj):
        obj.__doc__ = inspect.cleandoc(obj.__doc__).format_map(kwds)
        return obj

    return dec
