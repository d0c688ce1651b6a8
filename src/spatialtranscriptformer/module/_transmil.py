"""TransMIL: Nyström-attention transformer with the PPEG positional module (slide-level).

References
----------
Shao Z. et al., "TransMIL: Transformer based Correlated Multiple Instance Learning for Whole
Slide Image Classification", *NeurIPS* (2021).
Xiong Y. et al., "Nyströmformer: A Nyström-Based Algorithm for Approximating Self-Attention",
*AAAI* (2021).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._docs import doc_params
from ._baseline_head import OutputHead, check_loss_level, doc_dims, doc_slide_head


def iterative_pinv(x: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of (..., m, m) matrices by the iteration of Razavi et al. (2014).

    The iteration used by Nyströmformer: ``Z_0 = X^T / (max_col_sum * max_row_sum)``, then
    ``Z <- 1/4 Z (13 I - X Z (15 I - X Z (7 I - X Z)))``; the scaling is per matrix.
    """
    abs_x = x.abs()
    col = abs_x.sum(dim=-1).amax(dim=-1)
    row = abs_x.sum(dim=-2).amax(dim=-1)
    z = x.transpose(-1, -2) / (col * row)[..., None, None]
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """Multi-head Nyström self-attention (Xiong et al. 2021) as used by TransMIL.

    The sequence is left-padded to a multiple of ``num_landmarks``; landmarks are segment means of
    the queries/keys over real tokens only, and the padding is masked out of all three softmax
    kernels, so padded positions never contribute. ``out = softmax(Q K~^T) pinv(softmax(Q~ K~^T))
    softmax(Q~ K^T) V`` plus a depthwise convolution of ``V`` along the sequence (kernel 33).

    Parameters
    ----------
    dim
        Token width.
    heads
        Number of heads.
    dim_head
        Width per head.
    num_landmarks
        Number of landmarks m.
    pinv_iterations
        Iterations of :func:`iterative_pinv`.
    residual_kernel
        Kernel of the depthwise value convolution (0 disables it).
    dropout
        Dropout on the output projection.
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int = 8,
        dim_head: int = 64,
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        residual_kernel: int = 33,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if num_landmarks < 1 or heads < 1 or dim_head < 1:
            raise ValueError("heads, dim_head and num_landmarks must be >= 1.")
        self.heads, self.dim_head, self.m, self.iters = heads, dim_head, num_landmarks, pinv_iterations
        self.scale = dim_head**-0.5
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim), nn.Dropout(dropout))
        self.res_conv = None
        if residual_kernel:
            pad = residual_kernel // 2
            self.res_conv = nn.Conv2d(
                heads, heads, (residual_kernel, 1), padding=(pad, 0), groups=heads, bias=False
            )

    def forward(self, x: torch.Tensor, *, return_cls_attention: bool = False):
        """Attend over all tokens of ``x`` (B, n, dim); optionally also return token 0's attention row."""
        b, n, _ = x.shape
        m, h, d = self.m, self.heads, self.dim_head
        seg = math.ceil(n / m)
        pad = m * seg - n
        mask = torch.ones(b, n, dtype=torch.bool, device=x.device)
        if pad:
            x = F.pad(x, (0, 0, pad, 0))
            mask = F.pad(mask, (pad, 0), value=False)
        big_n = x.shape[1]
        q, k, v = self.to_qkv(x).view(b, big_n, 3, h, d).permute(2, 0, 3, 1, 4)  # each (b, h, N, d)
        mq = mask[:, None, :, None]
        q, k, v = q.masked_fill(~mq, 0.0), k.masked_fill(~mq, 0.0), v.masked_fill(~mq, 0.0)
        q = q * self.scale
        counts = mask.view(b, 1, m, seg).sum(dim=-1)  # (b, 1, m)
        land_mask = counts > 0
        div = counts.clamp_min(1)[..., None].to(q.dtype)
        q_l = q.view(b, h, m, seg, d).sum(dim=-2) / div
        k_l = k.view(b, h, m, seg, d).sum(dim=-2) / div
        neg = -torch.finfo(q.dtype).max
        tok, lm = mask[:, None, :], land_mask  # (b, 1, N), (b, 1, m)
        sim1 = (q @ k_l.transpose(-1, -2)).masked_fill(~(tok[..., None] & lm[..., None, :]), neg)
        sim2 = (q_l @ k_l.transpose(-1, -2)).masked_fill(~(lm[..., None] & lm[..., None, :]), neg)
        sim3 = (q_l @ k.transpose(-1, -2)).masked_fill(~(lm[..., None] & tok[..., None, :]), neg)
        a1, a2, a3 = (s.softmax(dim=-1) for s in (sim1, sim2, sim3))
        a2_inv = iterative_pinv(a2, self.iters)
        left = a1 @ a2_inv  # (b, h, N, m)
        out = left @ (a3 @ v)
        if self.res_conv is not None:
            out = out + self.res_conv(v)
        out = out.permute(0, 2, 1, 3).reshape(b, big_n, h * d)
        out = self.to_out(out)[:, -n:]
        if not return_cls_attention:
            return out
        cls_att = (left[:, :, pad : pad + 1] @ a3).squeeze(2)[..., -n:]  # (b, h, n)
        return out, cls_att


class PPEG(nn.Module):
    """Pyramid position encoding generator: depthwise 7/5/3 convolutions on the token grid + identity."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj7 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.proj5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.proj3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, tokens: torch.Tensor, side: int) -> torch.Tensor:
        """``tokens`` (B, 1 + side**2, D) with the class token first; returns the same shape."""
        b, t, c = tokens.shape
        if t != 1 + side * side:
            raise ValueError(f"PPEG expects 1 + {side}**2 tokens, got {t}.")
        cls, feat = tokens[:, :1], tokens[:, 1:]
        grid = feat.transpose(1, 2).reshape(b, c, side, side)
        grid = grid + self.proj7(grid) + self.proj5(grid) + self.proj3(grid)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


def square_grid_index(n: int, device: torch.device | None = None) -> tuple[torch.Tensor, int]:
    """Token indices filling a ``side x side`` grid, ``side = ceil(sqrt(n))``, repeating tokens cyclically.

    TransMIL appends the first ``side**2 - n`` tokens to the end of the sequence; the cyclic
    index is the same and also covers the rare case ``side**2 - n > n`` (it cannot occur for n >= 1,
    but the index never goes out of range).
    """
    if n < 1:
        raise ValueError("A slide needs at least one spot.")
    side = math.isqrt(n - 1) + 1
    return torch.arange(side * side, device=device) % n, side


class TransLayer(nn.Module):
    """Pre-norm residual Nyström attention layer: ``x + attn(LayerNorm(x))``."""

    def __init__(self, dim: int, *, heads: int, num_landmarks: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(
            dim, heads=heads, dim_head=max(dim // heads, 1), num_landmarks=num_landmarks, dropout=dropout
        )

    def forward(self, x: torch.Tensor, *, return_cls_attention: bool = False):
        """Apply the layer; optionally also return the class token's attention row."""
        res = self.attn(self.norm(x), return_cls_attention=return_cls_attention)
        if return_cls_attention:
            return x + res[0], res[1]
        return x + res


@doc_params(dims=doc_dims, slide_head=doc_slide_head)
class TransMIL(nn.Module):
    """TransMIL for slide-level expression regression.

    For each slide: ``h = ReLU(W x)`` over its real spots; the spots are ordered row-major by their
    coordinates (``grid_order="coords"``, so the PPEG grid follows the tissue layout; ``"input"``
    keeps the bag order as in the paper), laid on a ``ceil(sqrt(n))``-sided square grid by repeating
    tokens (:func:`square_grid_index`; any spot count works), prefixed with a class token, then
    TransLayer -> PPEG -> TransLayer -> LayerNorm, and the class token is read out to the genes.
    Each slide is processed on its own real spots, so padding cannot change its prediction.

    Parameters
    ----------
    {dims}
    dim
        Token width (paper: 512).
    heads
        Attention heads (paper: 8).
    num_landmarks
        Nyström landmarks (paper: ``dim // 2``); ``None`` uses ``dim // 2``.
    dropout
        Dropout of the attention output projections (paper: 0.1).
    grid_order
        ``"coords"`` or ``"input"``: token order on the PPEG grid.
    {slide_head}
    """

    def __init__(
        self,
        input_dim: int,
        num_genes: int,
        *,
        dim: int = 512,
        heads: int = 8,
        num_landmarks: int | None = None,
        dropout: float = 0.1,
        grid_order: str = "coords",
        loss: str = "mse",
        level: str = "slide",
        gene_means: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        check_loss_level("transmil", loss, level, ("slide",))
        if grid_order not in ("coords", "input"):
            raise ValueError(f"grid_order must be 'coords' or 'input', got {grid_order!r}.")
        self.level, self.loss, self.grid_order = level, loss, grid_order
        landmarks = dim // 2 if num_landmarks is None else int(num_landmarks)
        self.fc1 = nn.Sequential(nn.Linear(input_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.layer1 = TransLayer(dim, heads=heads, num_landmarks=max(landmarks, 1), dropout=dropout)
        self.ppeg = PPEG(dim)
        self.layer2 = TransLayer(dim, heads=heads, num_landmarks=max(landmarks, 1), dropout=dropout)
        self.norm = nn.LayerNorm(dim)
        self.head = OutputHead(dim, num_genes, loss=loss, gene_means=gene_means)

    def _order(self, coords: torch.Tensor) -> torch.Tensor:
        if self.grid_order == "input":
            return torch.arange(coords.shape[0], device=coords.device)
        by_x = torch.sort(coords[:, 0], stable=True).indices
        return by_x[torch.sort(coords[by_x, 1], stable=True).indices]

    def encode(self, x: torch.Tensor, coords: torch.Tensor, *, return_attention: bool = False):
        """Class-token embedding (D,) of one slide's real spots ``x`` (n, F), ``coords`` (n, 2)."""
        order = self._order(coords)
        idx, side = square_grid_index(x.shape[0], device=x.device)
        grid_idx = order[idx]  # spot index of each grid token
        h = self.fc1(x)[grid_idx][None]  # (1, side**2, D)
        tokens = torch.cat([self.cls_token, h], dim=1)
        atts = []
        if return_attention:
            tokens, a = self.layer1(tokens, return_cls_attention=True)
            atts.append(a)
        else:
            tokens = self.layer1(tokens)
        tokens = self.ppeg(tokens, side)
        if return_attention:
            tokens, a = self.layer2(tokens, return_cls_attention=True)
            atts.append(a)
        else:
            tokens = self.layer2(tokens)
        z = self.norm(tokens)[0, 0]
        # attention of the class token to each spot (repeated grid tokens summed back to their spot)
        spot_atts = []
        for a in atts:
            a = a[0, :, 1:]  # (heads, side**2): drop the class token itself
            s = torch.zeros(a.shape[0], x.shape[0], dtype=a.dtype, device=a.device)
            spot_atts.append(s.index_add(1, grid_idx, a))
        return z, spot_atts

    def forward(
        self, x: torch.Tensor, coords: torch.Tensor, mask: torch.Tensor, *, return_attention: bool = False
    ) -> dict[str, torch.Tensor]:
        """Predict slide-level expression (B, G) from the real spots of each slide."""
        mask = mask.bool()
        zs, atts = [], []
        for b in range(x.shape[0]):
            real = mask[b].nonzero().squeeze(1)
            if real.numel() == 0:
                raise ValueError(f"Slide {b} of the batch has no real spot (mask all False).")
            z, a = self.encode(x[b, real], coords[b, real], return_attention=return_attention)
            zs.append(z)
            if return_attention:
                full = [torch.zeros(ai.shape[0], x.shape[1], dtype=ai.dtype, device=ai.device) for ai in a]
                for f, ai in zip(full, a, strict=True):
                    f[:, real] = ai
                atts.append(full)
        out = self.head(torch.stack(zs))
        if return_attention:
            out["attention"] = [torch.stack([sl[i] for sl in atts]) for i in range(len(atts[0]))]
        return out
