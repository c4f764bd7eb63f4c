"""SRResNet (Ledig et al. 2017): the super-resolution network that upsamples generated 64x64 samples."""

from __future__ import annotations

import math

import torch
from torch import nn


class Residual(nn.Module):
    """conv-BN-PReLU-conv-BN plus identity."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.PReLU(channels),
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SRResNet(nn.Module):
    """[B,3,h,w] in [-1,1] -> [B,3,h*scale,w*scale] in [-1,1] (tanh output).

    9x9 conv + PReLU, `num_blocks` residual blocks, conv + BN with a global skip, one conv-PixelShuffle(2)-PReLU
    stage per factor of two, 9x9 conv out. The paper uses 64 channels, 16 blocks and x4; x8 is three stages.
    """

    def __init__(self, scale: int = 8, channels: int = 64, num_blocks: int = 16):
        super().__init__()
        stages = int(math.log2(scale))
        if scale < 2 or 2 ** stages != scale:
            raise ValueError(f"scale must be a power of two >= 2, got {scale}")
        self.scale = scale
        self.head = nn.Sequential(nn.Conv2d(3, channels, 9, padding=4), nn.PReLU(channels))
        self.body = nn.Sequential(*(Residual(channels) for _ in range(num_blocks)),
                                  nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels))
        self.upsample = nn.Sequential(*(nn.Sequential(nn.Conv2d(channels, 4 * channels, 3, padding=1),
                                                      nn.PixelShuffle(2), nn.PReLU(channels))
                                        for _ in range(stages)))
        self.tail = nn.Conv2d(channels, 3, 9, padding=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        h = h + self.body(h)
        return torch.tanh(self.tail(self.upsample(h)))
