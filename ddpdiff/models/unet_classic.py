"""The original design as a baseline: Ronneberger et al.'s U-Net with the timestep as an extra input band."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import maybe_checkpoint, with_null, zero_init


class DoubleConv(nn.Module):
    """conv3x3-ReLU twice; the pooled CLIP embedding scales and shifts the first conv's output (FiLM)."""

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.film = zero_init(nn.Linear(cond_dim, 2 * out_ch))
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(cond)[:, :, None, None].chunk(2, dim=1)
        h = F.relu(self.conv1(x) * (1 + scale) + shift)
        return F.relu(self.conv2(h))


class UNetClassic(nn.Module):
    """`model(x_t, t, cond, drop)` -> prediction [B,3,H,W]: 2x2 max-pool down, 2x2 up-convolution up,
    copy-and-concatenate skips, 1x1 output conv; widths model.channels x channel_mult (64 x [1,2,4,8,16] is
    the original 64 -> 1024).

    The input is RGB plus a band holding t / timesteps; the pooled CLIP embedding (the learned `null` for
    dropped examples) conditions every DoubleConv. Token states are not used. Gradient checkpointing is
    switched with `set_grad_checkpointing`.
    """

    def __init__(self, cfg: ModelConfig, image_size: int, cond_dim: int, token_dim: int | None = None,
                 null_tokens: torch.Tensor | None = None, timesteps: int = 1000):
        super().__init__()
        if cfg.cond == "tokens" or token_dim is not None or null_tokens is not None:
            raise ValueError("unet_classic conditions on the pooled embedding only (model.cond=pooled|both, no tokens)")
        if image_size % 2 ** (len(cfg.channel_mult) - 1):
            raise ValueError(f"image size {image_size} does not halve {len(cfg.channel_mult) - 1} times")
        widths = [cfg.channels * m for m in cfg.channel_mult]
        self.cond_dim, self.token_dim = cond_dim, None
        self.timesteps = timesteps
        self.grad_checkpointing = False
        self.null = nn.Parameter(torch.zeros(cond_dim))
        self.down = nn.ModuleList(DoubleConv(a, b, cond_dim) for a, b in zip([4] + widths[:-1], widths))
        decoder = widths[-2::-1]  # deepest first; each level upsamples from the one below it
        self.upconv = nn.ModuleList(nn.ConvTranspose2d(b, a, 2, stride=2) for a, b in zip(decoder, widths[:0:-1]))
        self.up = nn.ModuleList(DoubleConv(2 * a, a, cond_dim) for a in decoder)
        self.out = nn.Conv2d(widths[0], 3, 1)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.grad_checkpointing = enabled

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict, drop: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        band = (t.to(x.dtype) / self.timesteps).view(b, 1, 1, 1).expand(b, 1, h, w)
        c = with_null(cond["pooled"], self.null, drop)
        hidden = torch.cat([x, band], dim=1)
        skips = []
        for level, block in enumerate(self.down):
            if level:
                hidden = F.max_pool2d(hidden, 2)
            hidden = maybe_checkpoint(block, self.grad_checkpointing, hidden, c)
            skips.append(hidden)
        skips.pop()
        for upconv, block in zip(self.upconv, self.up):
            hidden = torch.cat([skips.pop(), upconv(hidden)], dim=1)  # copy and concatenate
            hidden = maybe_checkpoint(block, self.grad_checkpointing, hidden, c)
        return self.out(hidden)
