"""The SpatialTranscriptFormer: pathway tokens, quadrant attention, cosine scoring, gene reconstruction.

Frozen backbone embeddings of the S spots of a slide are projected to ``token_dim`` (optionally with a
2D positional encoding of their physical position, µm). P learnable pathway tokens (default: one per
MSigDB Hallmark) are prepended and a pre-norm transformer with switchable information flows
(:mod:`~spatialtranscriptformer.module._attention`) processes ``[pathways | patches]``. Pathway scores
are the cosine similarity of processed patch and pathway tokens times a learnable temperature (CLIP,
Radford et al. 2021); a linear gene reconstructor (optionally initialised from the gene-set membership
matrix) maps the P scores to the G genes (``gene_head="pathways"``), or genes are read out linearly from
the processed patch token (the default, ``gene_head="token"``), or both are summed.

The defaults are the recipe measured best on held-out her2st sections
(``benchmarks/bench_her2st_accuracy.py``): a small pathway-bottleneck model (``h2h`` off: spots exchange
information only through the pathway tokens), no absolute positional encoding (on serial sections it
memorises the layout; spatial context comes from the neighbourhood input of
:class:`~spatialtranscriptformer.tl._inputs.InputSpec` instead) and strong dropout.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._attention import QuadrantEncoderLayer, validate_interactions
from ._encoding import DEFAULT_WAVELENGTHS_UM, POSITIONAL_ENCODINGS, build_positional_encoding
from ._losses import get_loss
from ._registry import register_model

LEVELS = ("spot", "slide")
"""Prediction levels: per spot ("dense") or one vector per slide ("global")."""
DEFAULT_NUM_PATHWAYS = 50
DEFAULT_INTERACTIONS = ("p2p", "p2h", "h2p")
"""The pathway bottleneck: spots communicate only through the pathway tokens."""
GENE_HEADS = ("pathways", "token", "both")
"""Where gene predictions come from: the reconstructor of the pathway scores (the design), a linear read-out
of the processed patch token, or their sum."""
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)
_THETA_MIN = 1e-4


def _inv_softplus(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp_min(1e-4)
    return x + torch.log(-torch.expm1(-x))


def _as_float_array(a, name: str) -> np.ndarray:
    arr = np.asarray(a.to_numpy() if hasattr(a, "to_numpy") else a, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN/inf values.")
    return arr


class SpatialTranscriptFormer(nn.Module):
    """Pathway-bottleneck transformer predicting gene expression from spot embeddings.

    Parameters
    ----------
    input_dim
        Dimension F of the frozen backbone embeddings.
    num_genes
        Number G of predicted genes.
    token_dim
        Transformer width D (divisible by ``n_heads`` and by 4 for the 2D encodings).
    n_heads
        Attention heads.
    n_layers
        Transformer layers (>= 2 without ``h2h``).
    num_pathways
        Number P of pathway tokens; defaults to the columns of ``pathway_membership``, else 50.
    pathway_membership
        ``(G, P)`` 0/1 gene-set membership (e.g. from
        :func:`~spatialtranscriptformer.pp._gene_sets.membership_matrix`).
    pathway_init
        Initialise the reconstructor weight ``W[g, k] = membership[g, k] / n_k`` (``n_k`` = members of
        pathway k among the genes), connecting each pathway only to its member genes; needs
        ``pathway_membership``.
    gene_means
        ``(G,)`` mean target per gene; initialises the reconstructor bias so that, for zero pathway
        scores, the prediction is the mean (through the inverse softplus for ``poisson`` / ``zinb``).
    interactions
        Enabled flows among ``"p2p"``, ``"p2h"``, ``"h2p"``, ``"h2h"`` (``"all"`` for all four). Default: the
        pathway bottleneck ``("p2p", "p2h", "h2p")``.
    positional_encoding
        ``"none"`` (default), ``"sinusoidal"`` (fixed 2D sine/cosine; the design's main text) or
        ``"learned"`` (learnable Fourier features + MLP, the design's diagram). Coordinates are centred on
        each slide's real-spot centroid (shift invariant, padding-independent) and kept in µm. An absolute
        encoding lets the model memorise where tissue sits on the array, which flatters it on serial
        sections of one patient and fails on sections mirrored or rotated.
    pe_wavelength_um
        Shortest and longest wavelength (µm) of the encoding.
    dropout
        Dropout on residual branches (no attention-probability dropout; see
        :mod:`~spatialtranscriptformer.module._attention`).
    gene_head
        ``"token"`` (default): a linear read-out of the processed patch token, which has attended to the
        pathway tokens (the reconstructor is unused); ``"pathways"``: genes only from the pathway scores
        (the design's reconstructor); ``"both"``: their sum. On held-out her2st sections the three predict
        genes about equally well, but tying genes to the scores ("both") made the named pathway maps less
        faithful to their activities (mean r 0.43 against 0.54) and more alike (collapse index 0.89
        against 0.79).
    loss
        ``"mse"``, ``"pcc"``, ``"mse_pcc"`` (``"expr"`` output), ``"poisson"`` (``"rate"`` = softplus of the
        reconstruction) or ``"zinb"`` (``"mu"`` = softplus, ``"theta"`` = per-gene learnable inverse
        dispersion, ``"pi"`` = sigmoid of a second linear map of the pathway scores).
    level
        ``"spot"``: per-spot outputs ``(B, S, G)``; ``"slide"``: masked mean of the processed patch tokens,
        then the same scoring and reconstruction, outputs ``(B, G)``.
    activation_checkpointing
        Recompute each transformer layer in the backward pass instead of keeping its activations
        (less training memory, about a third more compute; see
        :mod:`~spatialtranscriptformer.module._attention`).

    Notes
    -----
    ``forward`` returns ``"expr"``, ``"pathway_scores"`` and the loss-specific keys (``"rate"``; ``"mu"``,
    ``"theta"``, ``"pi"``), plus ``"attention"`` (a list of ``(B, heads, P + S, P + S)`` maps, one per
    layer) with ``return_attention=True``. Outputs at padded spots are finite but meaningless; padding
    never changes the outputs of real spots.
    """

    def __init__(
        self,
        input_dim: int,
        num_genes: int,
        *,
        token_dim: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
        num_pathways: int | None = None,
        pathway_membership=None,
        pathway_init: bool = False,
        gene_means=None,
        interactions: Iterable[str] | str = DEFAULT_INTERACTIONS,
        positional_encoding: str = "none",
        pe_wavelength_um: Sequence[float] = DEFAULT_WAVELENGTHS_UM,
        dropout: float = 0.2,
        gene_head: str = "token",
        loss: str = "mse_pcc",
        level: str = "spot",
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        for name, val in (("input_dim", input_dim), ("num_genes", num_genes), ("token_dim", token_dim)):
            if int(val) < 1:
                raise ValueError(f"{name} must be a positive integer, got {val}.")
        if int(n_heads) < 1 or token_dim % n_heads:
            raise ValueError(f"token_dim ({token_dim}) must be divisible by n_heads ({n_heads}).")
        head = get_loss(loss).head  # the loss table decides the output head (unknown loss: ValueError)
        if level not in LEVELS:
            raise ValueError(f"Unknown level {level!r}; valid levels: {list(LEVELS)}.")
        if positional_encoding not in POSITIONAL_ENCODINGS:
            raise ValueError(
                f"Unknown positional_encoding {positional_encoding!r}; valid: {list(POSITIONAL_ENCODINGS)}."
            )
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        if gene_head not in GENE_HEADS:
            raise ValueError(f"Unknown gene_head {gene_head!r}; valid: {list(GENE_HEADS)}.")
        self.interactions = validate_interactions(interactions, n_layers)
        G = int(num_genes)

        membership = None
        if pathway_membership is not None:
            membership = _as_float_array(pathway_membership, "pathway_membership")
            if membership.ndim != 2 or membership.shape[0] != G:
                raise ValueError(
                    f"pathway_membership must be a (genes x pathways) matrix with {G} rows, got shape "
                    f"{membership.shape}."
                )
            if not np.isin(membership, (0.0, 1.0)).all():
                raise ValueError("pathway_membership must contain only 0/1 values.")
            if num_pathways is not None and int(num_pathways) != membership.shape[1]:
                raise ValueError(
                    f"num_pathways={num_pathways} disagrees with pathway_membership ({membership.shape[1]} "
                    "pathways)."
                )
            num_pathways = membership.shape[1]
        elif pathway_init:
            raise ValueError("pathway_init=True needs pathway_membership (a genes x pathways 0/1 matrix).")
        if pathway_init and gene_head == "token":
            raise ValueError(
                "pathway_init initialises the gene reconstructor, which gene_head='token' does not use; pass "
                "gene_head='both' or 'pathways' in model_kwargs."
            )
        P = DEFAULT_NUM_PATHWAYS if num_pathways is None else int(num_pathways)
        if P < 1:
            raise ValueError(f"num_pathways must be >= 1, got {num_pathways}.")

        means = None
        if gene_means is not None:
            means = _as_float_array(gene_means, "gene_means")
            if means.shape != (G,):
                raise ValueError(f"gene_means must have shape ({G},), got {means.shape}.")
            if head != "expr" and (means < 0).any():
                raise ValueError(f"gene_means must be >= 0 for loss {loss!r} (raw counts).")

        self.input_dim, self.num_genes, self.num_pathways = int(input_dim), G, P
        self.token_dim, self.n_heads, self.n_layers = int(token_dim), int(n_heads), int(n_layers)
        self.loss, self.level, self.head = loss, level, head
        self.positional_encoding = positional_encoding
        self.gene_head = gene_head

        self.proj = nn.Linear(self.input_dim, self.token_dim)
        self.pos = build_positional_encoding(
            positional_encoding, self.token_dim, wavelengths_um=pe_wavelength_um
        )
        self.pathway_tokens = nn.Parameter(torch.randn(P, self.token_dim) * 0.02)
        self.layers = nn.ModuleList(
            QuadrantEncoderLayer(
                self.token_dim, self.n_heads, interactions=self.interactions, dropout=dropout,
                activation_checkpointing=activation_checkpointing,
            )
            for _ in range(self.n_layers)
        )
        self.norm = nn.LayerNorm(self.token_dim)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        self.reconstructor = nn.Linear(P, G)
        if gene_head != "pathways":
            self.token_head = nn.Linear(self.token_dim, G, bias=False)
        if membership is not None:
            self.register_buffer("pathway_membership", torch.as_tensor(membership, dtype=torch.float32))
        if pathway_init:  # pathways without a member among the G genes start with zero weights
            counts = membership.sum(axis=0)
            w = membership / np.maximum(counts, 1.0)[None, :]
            with torch.no_grad():
                self.reconstructor.weight.copy_(torch.as_tensor(w, dtype=torch.float32))
        if head == "zinb":
            self.pi_head = nn.Linear(P, G)
            with torch.no_grad():
                self.pi_head.weight.mul_(0.1)
                self.pi_head.bias.fill_(-3.0)  # start with little zero-inflation (pi ~ 0.05)
            self.theta_raw = nn.Parameter(torch.full((G,), float(_inv_softplus(torch.tensor(1.0)))))
        if means is not None:
            m = torch.as_tensor(means, dtype=torch.float32)
            with torch.no_grad():
                self.reconstructor.bias.copy_(m if head == "expr" else _inv_softplus(m))

    @property
    def temperature(self) -> torch.Tensor:
        """The CLIP-style scale ``exp(logit_scale)``, clamped at 100."""
        return self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()

    def _check_inputs(self, x, coords, mask) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.input_dim:
            raise ValueError(f"x must have shape (B, S, {self.input_dim}), got {tuple(x.shape)}.")
        B, S = x.shape[:2]
        if tuple(coords.shape) != (B, S, 2):
            raise ValueError(f"coords must have shape ({B}, {S}, 2), got {tuple(coords.shape)}.")
        if tuple(mask.shape) != (B, S):
            raise ValueError(f"mask must have shape ({B}, {S}), got {tuple(mask.shape)}.")
        return mask if mask.dtype == torch.bool else mask.bool()

    def forward(
        self, x: torch.Tensor, coords: torch.Tensor, mask: torch.Tensor, *, return_attention: bool = False
    ) -> dict[str, torch.Tensor]:
        """Predict expression.

        Parameters
        ----------
        x
            ``(B, S, F)`` embeddings.
        coords
            ``(B, S, 2)`` spot centres in µm.
        mask
            ``(B, S)`` boolean, ``True`` for real spots.
        return_attention
            Also return the per-layer attention maps (explicit, memory O((P+S)^2) path).

        Returns
        -------
        A dict of tensors (see the class notes).
        """
        mask = self._check_inputs(x, coords, mask)
        B = x.shape[0]
        P = self.num_pathways
        h = self.proj(x) + self.pos(coords.to(x.dtype), mask)
        t = torch.cat([self.pathway_tokens.unsqueeze(0).expand(B, -1, -1), h], dim=1)
        maps = []
        for layer in self.layers:
            t, attn = layer(t, P, mask, return_attention=return_attention)
            if return_attention:
                maps.append(attn)
        t = self.norm(t)
        pw, patches = t[:, :P], t[:, P:]
        if self.level == "slide":
            m = mask.to(patches.dtype).unsqueeze(-1)
            patches = (patches * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)  # (B, D)
            scores = torch.einsum("bd,bpd->bp", F.normalize(patches, dim=-1), F.normalize(pw, dim=-1))
        else:
            scores = torch.matmul(F.normalize(patches, dim=-1), F.normalize(pw, dim=-1).transpose(1, 2))
        scores = scores * self.temperature
        out = {"pathway_scores": scores}
        if self.gene_head == "pathways":
            z = self.reconstructor(scores)
        elif self.gene_head == "token":
            z = self.token_head(patches) + self.reconstructor.bias
        else:
            z = self.reconstructor(scores) + self.token_head(patches)
        if self.head == "rate":
            rate = F.softplus(z)
            out.update(expr=rate, rate=rate)
        elif self.head == "zinb":
            mu = F.softplus(z)
            pi = torch.sigmoid(self.pi_head(scores))
            theta = (F.softplus(self.theta_raw) + _THETA_MIN).expand_as(mu)
            out.update(expr=(1 - pi) * mu, mu=mu, theta=theta, pi=pi)
        else:
            out["expr"] = z
        if return_attention:
            out["attention"] = maps
        return out


DEFAULT_CONTEXT_RADIUS = 1.5
"""Neighbourhood radius (grid pitches) of the STF's input context (:class:`~spatialtranscriptformer.tl._inputs.InputSpec`)."""
DEFAULT_OUTPUT_SMOOTHING = 0.3
"""Weight of the neighbours' mean prediction in the STF's spot predictions (``output_smoothing``)."""
DEFAULT_PATHWAY_LOSS_WEIGHT = 0.1
"""Weight of the auxiliary pathway loss when the tokens are named by gene sets."""


@register_model(
    "stf",
    levels=("spot", "slide"),
    description="SpatialTranscriptFormer: pathway tokens + quadrant attention over spot embeddings",
    pathway_tokens=True,
    defaults={"context_radius": DEFAULT_CONTEXT_RADIUS, "output_smoothing": DEFAULT_OUTPUT_SMOOTHING,
              "pathway_loss_weight": DEFAULT_PATHWAY_LOSS_WEIGHT},
)
def build(input_dim: int, num_genes: int, *, level: str, loss: str, **hparams) -> SpatialTranscriptFormer:
    """Build a :class:`SpatialTranscriptFormer` (registry entry ``"stf"``)."""
    return SpatialTranscriptFormer(input_dim, num_genes, level=level, loss=loss, **hparams)
