"""2D positional encodings of physical spot coordinates (µm) for the patch tokens.

Coordinates are first *centred per slide on the centroid of its real spots* (padding excluded), so the
encoding is invariant to where the tissue sits on the glass and a slide's encoding never depends on the
slides it is batched with. Distances stay in physical units (no per-slide rescaling), so the same
frequency means the same tissue scale on every slide.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

POSITIONAL_ENCODINGS = ("sinusoidal", "learned", "none")
"""Valid values of ``positional_encoding``."""

DEFAULT_WAVELENGTHS_UM = (20.0, 20_000.0)
"""Shortest and longest wavelength (µm) of the sinusoidal encoding: from Visium HD 16 µm bins / the
55 µm Visium spot to a whole 2 cm slide."""


def centre_coords(coords: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Subtract each slide's centroid computed over its real spots only.

    Parameters
    ----------
    coords
        ``(B, S, 2)`` spot centres in µm.
    mask
        ``(B, S)`` boolean, ``True`` for real spots.

    Returns
    -------
    ``(B, S, 2)`` centred coordinates (padding rows are shifted too but carry no meaning).
    """
    m = mask.to(coords.dtype).unsqueeze(-1)
    n = m.sum(dim=1, keepdim=True).clamp_min(1.0)
    centroid = (coords * m).sum(dim=1, keepdim=True) / n
    return coords - centroid


def _geometric_frequencies(n: int, wavelengths_um: Sequence[float]) -> torch.Tensor:
    lo, hi = (float(w) for w in wavelengths_um)
    if n == 1:
        wl = torch.tensor([lo], dtype=torch.float64)
    else:
        wl = torch.exp(torch.linspace(math.log(lo), math.log(hi), n, dtype=torch.float64))
    return (2 * math.pi / wl).to(torch.float32)


def _check_wavelengths(wavelengths_um: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(w) for w in wavelengths_um)
    except (TypeError, ValueError):
        raise ValueError(
            f"pe_wavelength_um must be a pair (shortest, longest) in µm, got {wavelengths_um!r}."
        ) from None
    if not (0 < lo <= hi) or not math.isfinite(hi):
        raise ValueError(f"pe_wavelength_um must satisfy 0 < shortest <= longest < inf, got ({lo}, {hi}).")
    return lo, hi


class SinusoidalEncoding2D(nn.Module):
    """Fixed 2D sinusoidal encoding (Vaswani et al. 2017, extended to 2D as in MAE / Carion et al. 2020).

    Half of the ``dim`` channels encode x, half encode y; each half holds ``dim / 4`` sine/cosine pairs
    with wavelengths spaced geometrically between ``wavelengths_um[0]`` and ``wavelengths_um[1]``.

    Parameters
    ----------
    dim
        Output channels (a multiple of 4).
    wavelengths_um
        Shortest and longest wavelength in µm.
    """

    def __init__(self, dim: int, *, wavelengths_um: Sequence[float] = DEFAULT_WAVELENGTHS_UM):
        super().__init__()
        if dim % 4:
            raise ValueError(f"The sinusoidal 2D encoding needs token_dim divisible by 4, got {dim}.")
        self.wavelengths_um = _check_wavelengths(wavelengths_um)
        self.register_buffer("freqs", _geometric_frequencies(dim // 4, self.wavelengths_um), persistent=False)

    def forward(self, coords: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encode ``(B, S, 2)`` coordinates (µm) as ``(B, S, dim)``."""
        c = centre_coords(coords, mask)
        ax = c[..., 0:1] * self.freqs
        ay = c[..., 1:2] * self.freqs
        return torch.cat([ax.sin(), ax.cos(), ay.sin(), ay.cos()], dim=-1)


class LearnedFourierEncoding2D(nn.Module):
    """Learnable Fourier features followed by an MLP.

    Li et al., NeurIPS 2021, "Learnable Fourier Features for Multi-Dimensional Spatial Positional
    Encoding"; Tancik et al., NeurIPS 2020.

    ``PE(c) = MLP([sin(c W), cos(c W)])`` with a learnable ``(2, dim / 2)`` frequency matrix ``W``
    initialised to the axis-aligned geometric frequencies of :class:`SinusoidalEncoding2D` (so training
    starts from the sinusoidal encoding rather than from noise) and a GELU MLP ``dim -> dim -> dim``.

    Parameters
    ----------
    dim
        Output channels (a multiple of 4).
    wavelengths_um
        Wavelength range used to initialise the frequencies.
    """

    def __init__(self, dim: int, *, wavelengths_um: Sequence[float] = DEFAULT_WAVELENGTHS_UM):
        super().__init__()
        if dim % 4:
            raise ValueError(f"The learned 2D encoding needs token_dim divisible by 4, got {dim}.")
        self.wavelengths_um = _check_wavelengths(wavelengths_um)
        f = _geometric_frequencies(dim // 4, self.wavelengths_um)
        w = torch.zeros(2, dim // 2)
        w[0, : dim // 4] = f
        w[1, dim // 4 :] = f
        self.freqs = nn.Parameter(w)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, coords: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encode ``(B, S, 2)`` coordinates (µm) as ``(B, S, dim)``."""
        a = centre_coords(coords, mask) @ self.freqs
        return self.mlp(torch.cat([a.sin(), a.cos()], dim=-1))


class NoEncoding(nn.Module):
    """No positional information (a bag of patches)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, coords: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Zeros of shape ``(B, S, dim)``."""
        return coords.new_zeros((*coords.shape[:-1], self.dim))


def build_positional_encoding(
    kind: str, dim: int, *, wavelengths_um: Sequence[float] = DEFAULT_WAVELENGTHS_UM
) -> nn.Module:
    """Build the encoding module for ``kind`` (one of :data:`POSITIONAL_ENCODINGS`)."""
    if kind == "sinusoidal":
        return SinusoidalEncoding2D(dim, wavelengths_um=wavelengths_um)
    if kind == "learned":
        return LearnedFourierEncoding2D(dim, wavelengths_um=wavelengths_um)
    if kind == "none":
        return NoEncoding(dim)
    raise ValueError(f"Unknown positional_encoding {kind!r}; valid: {list(POSITIONAL_ENCODINGS)}.")
