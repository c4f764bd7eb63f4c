"""The modern denoiser: an ADM-style U-Net conditioned on the timestep, the pooled CLIP embedding and the
CLIP token states (cross-attention)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import (Attention, ResBlock, maybe_checkpoint, norm, timestep_embedding, with_null, with_null_tokens,
                     zero_init)


class Block(nn.Module):
    """One U-Net stage and one checkpointing unit: a residual block, then self- and cross-attention where set."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, heads: int,
                 self_attn: bool, context_dim: int | None):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, dropout)
        self.attn = Attention(out_ch, heads) if self_attn else None
        self.cross = Attention(out_ch, heads, context_dim) if context_dim else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        x = self.res(x, emb)
        if self.attn is not None:
            x = self.attn(x)
        if self.cross is not None:
            x = self.cross(x, context, mask)
        return x


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """`model(x_t, t, cond, drop)` -> prediction [B,3,H,W] (see docs/architecture.md).

    The timestep (sinusoidal, rescaled to a 0..1000 range) and the pooled embedding (model.cond pooled|both)
    are summed into one vector that every residual block applies as scale-shift; the token states
    (model.cond tokens|both) are read by cross-attention at `cross_attn_resolutions`. Dropped examples get
    the learned `null` pooled embedding and the empty prompt's token states. Gradient checkpointing is
    switched with `set_grad_checkpointing`.
    """

    def __init__(self, cfg: ModelConfig, image_size: int, cond_dim: int, token_dim: int | None = None,
                 null_tokens: torch.Tensor | None = None, timesteps: int = 1000):
        super().__init__()
        ch, heads = cfg.channels, cfg.num_heads
        emb_dim = 4 * ch
        uses_tokens = cfg.cond in ("tokens", "both")
        if uses_tokens and (token_dim is None or null_tokens is None):
            raise ValueError(f"model.cond={cfg.cond} needs per-token text states (token_dim and the empty prompt's "
                             "null_tokens); use model.cond=pooled without them")
        self.cond_dim = cond_dim
        self.token_dim = token_dim if uses_tokens else None
        self.time_scale = 1000 / timesteps
        self.grad_checkpointing = False
        sizes = [image_size // 2 ** i for i in range(len(cfg.channel_mult))]
        if self.token_dim is not None and not set(cfg.cross_attn_resolutions) & set(sizes):
            raise ValueError(f"model.cross_attn_resolutions {cfg.cross_attn_resolutions} has none of this "
                             f"network's feature sizes {sizes}, so the token states would be ignored")

        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.cond_mlp = self.null = None
        if cfg.cond in ("pooled", "both"):
            self.cond_mlp = nn.Sequential(nn.Linear(cond_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            self.null = nn.Parameter(torch.zeros(cond_dim))
        if self.token_dim is not None:
            self.register_buffer("null_tokens", null_tokens.detach().float().clone())

        def block(in_ch: int, out_ch: int, size: int) -> Block:
            cross = self.token_dim if size in cfg.cross_attn_resolutions else None
            return Block(in_ch, out_ch, emb_dim, cfg.dropout, heads, size in cfg.attn_resolutions, cross)

        self.input = nn.Conv2d(3, ch, 3, padding=1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        skips, width = [ch], ch
        for level, (mult, size) in enumerate(zip(cfg.channel_mult, sizes)):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(block(width, ch * mult, size))
                width = ch * mult
                skips.append(width)
            self.down.append(blocks)
            if level < len(sizes) - 1:
                self.downsample.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
                skips.append(width)
        self.middle = nn.ModuleList([block(width, width, sizes[-1]),
                                     Block(width, width, emb_dim, cfg.dropout, heads, False, None)])
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(sizes))):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(block(width + skips.pop(), ch * cfg.channel_mult[level], sizes[level]))
                width = ch * cfg.channel_mult[level]
            self.up.append(blocks)
            if level > 0:
                self.upsample.append(Upsample(width))
        self.out = nn.Sequential(norm(width), nn.SiLU(), zero_init(nn.Conv2d(width, 3, 3, padding=1)))

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.grad_checkpointing = enabled

    def condition(self, t: torch.Tensor, cond: dict, drop: torch.Tensor,
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The block embedding [B, 4C] and the (context, mask) for cross-attention, nulls swapped in."""
        emb = self.time_mlp(timestep_embedding(t * self.time_scale, self.input.out_channels))
        if self.cond_mlp is not None:
            emb = emb + self.cond_mlp(with_null(cond["pooled"], self.null, drop))
        if self.token_dim is None:
            return emb, None, None
        context, mask = with_null_tokens(cond["tokens"], cond["mask"], self.null_tokens, drop)
        return emb, context, mask

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: dict, drop: torch.Tensor) -> torch.Tensor:
        emb, context, mask = self.condition(t, cond, drop)

        def run(block: Block, h: torch.Tensor) -> torch.Tensor:
            return maybe_checkpoint(block, self.grad_checkpointing, h, emb, context, mask)

        h = self.input(x)
        skips = [h]
        for level, blocks in enumerate(self.down):
            for blk in blocks:
                h = run(blk, h)
                skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
                skips.append(h)
        for blk in self.middle:
            h = run(blk, h)
        for level, blocks in enumerate(self.up):
            for blk in blocks:
                h = run(blk, torch.cat([h, skips.pop()], dim=1))
            if level < len(self.upsample):
                h = self.upsample[level](h)
        return self.out(h)
