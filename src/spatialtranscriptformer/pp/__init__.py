"""Preprocessing: tiles, backbone embeddings, gene selection and pathway targets."""

from ._backbones import Backbone, get_backbone
from ._embed import embed
from ._embed_distributed import embed_distributed
from ._gene_sets import load_gene_sets, membership_matrix
from ._hvg import highly_variable_genes
from ._normalize import normalize
from ._pathways import pathway_activity
from ._registry import BackboneSpec, list_backbones, register_backbone
from ._tiles import iter_tiles, tiles

__all__ = [
    "Backbone",
    "BackboneSpec",
    "embed",
    "embed_distributed",
    "get_backbone",
    "highly_variable_genes",
    "iter_tiles",
    "list_backbones",
    "load_gene_sets",
    "membership_matrix",
    "normalize",
    "pathway_activity",
    "register_backbone",
    "tiles",
]
