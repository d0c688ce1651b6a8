"""Default keys and names shared across the library.

Every key a function writes by default is defined here, once.
"""

from __future__ import annotations

# --- SpatialData element names written by the readers -------------------------------------------
IMAGE_KEY = "he"
"""Name of the H&E image element."""
SHAPES_KEY = "spots"
"""Name of the spot / bin shapes element (circles for spots, squares for bins)."""
TABLE_KEY = "table"
"""Name of the expression table."""
COORDINATE_SYSTEM = "global"
"""Coordinate system of a slide: the units of ``obsm['spatial']`` (full-resolution pixels of the scan)."""
MICRON_COORDINATE_SYSTEM = "micron"
"""Second coordinate system of every element a reader writes: micrometres (``global`` x µm per unit)."""

# --- obs columns ------------------------------------------------------------------------------------
SLIDE_KEY = "slide_id"
"""``obs`` column with the slide (section) identifier."""
PATIENT_KEY = "patient_id"
"""``obs`` column with the patient identifier."""
REGION_KEY = "region"
"""``obs`` column linking table rows to a shapes element (SpatialData region key)."""
INSTANCE_KEY = "spot_id"
"""``obs`` column with the spot identifier inside its shapes element (SpatialData instance key)."""

# --- obsm / layers / uns ---------------------------------------------------------------------------
SPATIAL_KEY = "spatial"
"""``obsm`` key of spot centres in full-resolution image pixels (x, y), as in scanpy."""
COUNTS_LAYER = "counts"
"""Layer with the raw integer counts."""
UNS_SPATIAL_KEY = "spatial"
"""``uns`` key of the scanpy/squidpy image store: ``uns['spatial'][library_id]`` = ``{'images': {'hires',
'lowres'}, 'scalefactors': {...}}``, read by :func:`scanpy.pl.spatial` and :func:`squidpy.pl.spatial_scatter`."""
SLIDE_META_KEY = "stf_slide"
"""``uns`` key with per-slide metadata: microns per pixel, spot diameter, element names."""
EMBEDDING_PREFIX = "X_"
"""Prefix of embedding keys in ``obsm``: ``X_<backbone>``."""
PATHWAY_KEY = "pathway_activity"
"""``obsm`` key of pathway activity targets (z-scored member-gene means)."""
PRED_KEY = "stf_pred"
"""Predicted expression of the model's genes: a table ``tables['stf_pred']`` of a SpatialData (spots x genes,
values in ``X``, linked to the spots like the expression table), or ``obsm['stf_pred']`` (a DataFrame) of an
AnnData; the record is ``uns['stf_pred']`` of that table (AnnData: of the AnnData)."""
PRED_PATHWAY_KEY = "stf_pathways"
"""Predicted pathway scores (one column per pathway): a table ``tables['stf_pathways']`` of a SpatialData, or
``obsm['stf_pathways']`` (a DataFrame) of an AnnData; laid out like :data:`PRED_KEY`."""
PRED_KINDS = ("expression", "pathways")
"""Values of ``uns[<prediction key>]['kind']``: what a prediction output holds."""
PRED_STORED_IN = ("X", "obsm", "uns")
"""Values of ``uns[<prediction key>]['stored_in']``: a prediction table's ``X``, a DataFrame ``obsm[key]`` of the
AnnData that was predicted, or (slide-level models) DataFrames in ``uns[key]`` of the expression table."""
HVG_KEY = "highly_variable"
"""``var`` column marking selected genes."""
TILES_KEY = "tiles"
"""``uns`` key with the tile parameters."""
SUPERRES_KEY = "stf_superres"
"""Name of the super-resolution image element written by :func:`spatialtranscriptformer.tl.predict`."""
ATTENTION_KEY = "stf_attention"
"""``obsm`` key of the pathway tokens' attention over the spots written by ``stf predict --return-attention``."""

# --- defaults ------------------------------------------------------------------------------------
DEFAULT_TILE_SIZE = 224
"""Tile edge in pixels (HEST-Benchmark)."""
DEFAULT_TILE_MPP = 0.5
"""Tile resolution in microns per pixel (HEST-Benchmark)."""
UPSAMPLING_WARN = 2.0
"""Tiles that need more than this upsampling of the slide image (tile px per image px) give a warning."""
UPSAMPLING_MAX = 4.0
"""Tiles that need more than this upsampling are refused unless ``allow_upsampling=True``."""
