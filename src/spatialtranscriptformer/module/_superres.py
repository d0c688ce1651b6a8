"""Decoders from a frozen encoder's patch-token grid to 2 µm log-rate maps.

``arch="hist2st"`` follows Hist2ST (Zeng et al., *Brief. Bioinform.* 2022) as used by the Virchow2
2 µm super-resolution design: a transformer over the token grid, a graph layer over the 8-neighbour
token grid (plain message passing: mean of the neighbours, GraphSAGE-style, Hamilton et al. 2017), then
convolutional upsampling blocks to ``out_size`` x ``out_size`` and a 1 x 1 convolution to one log rate
(log λ) per gene. ``arch="unet"`` is a plain U-Net-style decoder (Ronneberger et al. 2015): a small
convolutional down/up path with skip connections on the token grid, then the same upsampling blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import register_model


def grid_adjacency(h: int, w: int) -> torch.Tensor:
    """Row-normalised adjacency ``(h*w, h*w)`` of the 8-neighbour grid graph (no self loops)."""
    idx = torch.arange(h * w).view(h, w)
    a = torch.zeros(h * w, h * w)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == 0 and dx == 0:
                continue
            src = idx[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)].reshape(-1)
            dst = idx[max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)].reshape(-1)
            a[src, dst] = 1.0
    return a / a.sum(1, keepdim=True).clamp_min(1.0)


class GridGraphLayer(nn.Module):
    """``h_i + MLP([h_i, mean_{j in N(i)} h_j])`` over the 8-neighbour token grid."""

    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.lin = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU(), nn.Dropout(dropout))
        self.norm = nn.LayerNorm(dim)
        self._adj: dict[tuple[int, int], torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, h, w, C)``."""
        b, h, w, c = x.shape
        key = (h, w)
        if key not in self._adj:
            self._adj[key] = grid_adjacency(h, w)
        adj = self._adj[key].to(device=x.device, dtype=x.dtype)
        flat = x.reshape(b, h * w, c)
        msg = torch.einsum("ij,bjc->bic", adj, flat)
        return self.norm(flat + self.lin(torch.cat([flat, msg], -1))).view(b, h, w, c)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.GroupNorm(min(8, cout), cout),
        nn.GELU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.GroupNorm(min(8, cout), cout),
        nn.GELU(),
    )


def sinusoidal_2d(h: int, w: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine/cosine position encoding ``(h*w, dim)`` (Vaswani et al. 2017, per axis)."""
    d = dim // 4
    freq = torch.exp(-math.log(10000.0) * torch.arange(d) / max(d, 1))
    yy, xx = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    parts = [
        torch.sin(yy.reshape(-1, 1) * freq),
        torch.cos(yy.reshape(-1, 1) * freq),
        torch.sin(xx.reshape(-1, 1) * freq),
        torch.cos(xx.reshape(-1, 1) * freq),
    ]
    pe = torch.cat(parts, -1)
    return F.pad(pe, (0, dim - pe.shape[1]))


class SuperResDecoder(nn.Module):
    """Token grid ``(B, h, w, D)`` -> log λ ``(B, G, out_size, out_size)`` at 2 µm.

    Parameters
    ----------
    in_dim
        Token dimension of the frozen encoder.
    n_genes
        Number of output genes.
    grid
        Edge of the token grid (e.g. 16 for a ViT-H/14 at 224 px); the conv upsampling starts at the
        largest power of two not above it.
    arch
        ``"hist2st"`` (transformer + grid graph + conv upsampling) or ``"unet"``.
    hidden
        Width after the token projection.
    out_size
        Output edge (128 bins of 2 µm for a 256 µm patch).
    n_layers, n_heads
        Transformer depth and heads (``hist2st``).
    dropout
        Dropout in the transformer and graph layers.
    """

    def __init__(
        self,
        in_dim: int,
        n_genes: int,
        *,
        grid: int = 16,
        arch: str = "hist2st",
        hidden: int = 128,
        out_size: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if arch not in ("hist2st", "unet"):
            raise ValueError(f"arch must be 'hist2st' or 'unet', got {arch!r}.")
        if out_size < 8 or out_size & (out_size - 1):
            raise ValueError(f"out_size must be a power of two >= 8, got {out_size}.")
        self.arch, self.hidden, self.out_size, self.n_genes = arch, hidden, out_size, n_genes
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden))
        if arch == "hist2st":
            layer = nn.TransformerEncoderLayer(
                hidden, n_heads, 2 * hidden, dropout, batch_first=True, norm_first=True
            )
            self.transformer = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
            self.graph = GridGraphLayer(hidden, dropout)
        else:
            self.down = _block(hidden, hidden)
            self.bottom = _block(hidden, hidden)
            self.up = _block(2 * hidden, hidden)
        self.start = int(min(2 ** int(math.log2(max(grid, 1))), out_size // 2))
        chans, c = [], hidden
        for _ in range(int(math.log2(out_size // self.start))):
            chans.append((c, max(c // 2, 16)))
            c = max(c // 2, 16)
        self.up_blocks = nn.ModuleList([_block(ci, co) for ci, co in chans])
        self.head = nn.Conv2d(c, n_genes, 1)

    def set_output_bias(self, log_rate: torch.Tensor) -> None:
        """Start at a given per-gene log rate (e.g. the log of the mean count per 2 µm bin)."""
        with torch.no_grad():
            self.head.bias.copy_(torch.as_tensor(log_rate, dtype=self.head.bias.dtype))
            self.head.weight.mul_(0.1)

    @property
    def shared_layer(self) -> torch.Tensor:
        """Weight of the last layer shared by every scale's loss (GradNorm measures gradients here)."""
        return self.head.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Log rates ``(B, G, out_size, out_size)``."""
        b, h, w, _ = tokens.shape
        x = self.proj(tokens)
        if self.arch == "hist2st":
            pe = sinusoidal_2d(h, w, self.hidden).to(x)
            x = self.transformer(x.reshape(b, h * w, -1) + pe).view(b, h, w, -1)
            x = self.graph(x).permute(0, 3, 1, 2)
        else:
            x = x.permute(0, 3, 1, 2)
            d = self.down(x)
            m = self.bottom(F.avg_pool2d(d, 2) if min(h, w) >= 2 else d)
            m = F.interpolate(m, size=(h, w), mode="nearest")
            x = self.up(torch.cat([d, m], 1))
        if (h, w) != (self.start, self.start):  # to the power-of-two grid the upsampling starts from
            x = F.interpolate(x, size=(self.start, self.start), mode="bilinear", align_corners=False)
        for blk in self.up_blocks:
            x = blk(F.interpolate(x, scale_factor=2, mode="nearest"))
        return self.head(x)


@register_model(
    "superres",
    family="superres",
    levels=("bin",),
    losses=("poisson", "mse"),
    description="2 µm super-resolution (Visium HD): a frozen encoder's patch tokens -> Hist2ST-style decoder, "
    "multi-scale Poisson NLL balanced by GradNorm",
    defaults={"model_kwargs": {"backbone": "virchow2", "weights": None, "patch_um": 256}},
)
def build_superres(
    input_dim: int, num_genes: int, *, level: str, loss: str, grid: int, out_size: int, **hparams
) -> SuperResDecoder:
    """Build a :class:`SuperResDecoder` (hparams: ``arch``, ``hidden``, ``n_layers``, ``n_heads``, ``dropout``).

    ``backbone`` (a registered name, a :class:`~spatialtranscriptformer.pp.Backbone` or a module), its
    ``weights`` and ``patch_um`` (patch edge in µm, a multiple of 16) are model options too: they are used by
    :func:`~spatialtranscriptformer.tl.fit_superres` to make the token grids the decoder reads.
    """
    decoder = SuperResDecoder(input_dim, num_genes, grid=grid, out_size=out_size, **hparams)
    decoder.level = level
    return decoder
