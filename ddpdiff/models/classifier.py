"""A small ResNet that predicts the 40 CelebA attributes: the judge of generated faces in evaluation."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """Basic residual block (conv-BN-ReLU-conv-BN plus a projected shortcut when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
        self.skip = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


class AttributeResNet(nn.Module):
    """[B,3,H,W] in [-1,1] -> attribute logits [B,num_attributes] (positive logit = attribute present).

    A 3x3 stem, then one stage per entry of `blocks` with width doubling and resolution halving from the
    second stage on, global average pooling and a linear head; any input size works.
    """

    def __init__(self, width: int = 32, blocks: tuple[int, ...] = (2, 2, 2, 2), num_attributes: int = 40):
        super().__init__()
        if width < 1 or not blocks or min(blocks) < 1:
            raise ValueError(f"width must be >= 1 and blocks a non-empty list of counts >= 1, got {width}, {blocks}")
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        stages, c = [], width
        for i, n in enumerate(blocks):
            c_out = width * 2 ** i
            stages += [Block(c if j == 0 else c_out, c_out, 2 if i > 0 and j == 0 else 1) for j in range(n)]
            c = c_out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c, num_attributes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)).mean(dim=(2, 3)))
