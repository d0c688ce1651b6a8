"""CTransPath's convolutional patch-embedding stem (Wang et al. 2022, *Medical Image Analysis* 81:102559)."""

from __future__ import annotations

import torch
from torch import nn


class ConvStem(nn.Module):
    """Two stride-2 3x3 conv/BN/ReLU blocks and a 1x1 projection replacing Swin's 4x4 patch embedding.

    Output is channels-last ``(B, H/4, W/4, embed_dim)`` as timm's Swin Transformer expects.
    """

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None, **kwargs) -> None:
        super().__init__()
        if patch_size != 4:
            raise ValueError("CTransPath's ConvStem only supports patch_size=4.")
        layers, c_in, c_out = [], in_chans, embed_dim // 8
        for _ in range(2):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in, c_out = c_out, c_out * 2
        layers.append(nn.Conv2d(c_in, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()
        size = img_size if isinstance(img_size, tuple | list) else (img_size, img_size)
        self.img_size = tuple(size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (size[0] // patch_size, size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = True
        self.dynamic_img_pad = False
        self.flatten = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.norm(self.proj(x).permute(0, 2, 3, 1))
