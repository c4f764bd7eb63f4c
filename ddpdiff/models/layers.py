"""Building blocks shared by the denoisers: embeddings, residual blocks, attention, the null condition."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class GroupNorm(nn.GroupNorm):
    """GroupNorm that runs in the autocast dtype (as timm's fast norm does) instead of the float32 that autocast
    gives `group_norm`: half the activation memory and traffic; the kernels keep float32 statistics. Outside
    autocast it is nn.GroupNorm, with the same parameters (checkpoints are unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x.to(dtype), self.num_groups, self.weight.to(dtype), self.bias.to(dtype), self.eps)


def norm(channels: int) -> GroupNorm:
    """GroupNorm with up to 32 groups (fewer for narrow test models)."""
    return GroupNorm(math.gcd(32, channels), channels)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a residual branch's last layer so every block starts as the identity (ADM, DiT)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, [B] -> [B, dim] float32 (Vaswani et al.)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def maybe_checkpoint(block: nn.Module, enabled: bool, *args) -> torch.Tensor:
    """block(*args), with its activations recomputed in backward when enabled (and a graph is being built)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def with_null(value: torch.Tensor, null: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Per-example `null` where drop is True, via torch.where so `null` is always in the graph (DDP-safe)."""
    return torch.where(drop.view(-1, *([1] * (value.dim() - 1))), null.to(value.dtype), value)


def with_null_tokens(tokens: torch.Tensor, mask: torch.Tensor, null: torch.Tensor, drop: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token states [B, L, Dt] and mask [B, L] with the empty prompt's (`null` [L0, Dt]) where drop is True.

    Both sides are padded to max(L, L0); padded positions are zeroed (so even NaN garbage there cannot leak
    through attention) and masked out.
    """
    length = max(tokens.shape[1], null.shape[0])
    mask = F.pad(mask.bool(), (0, length - mask.shape[1]))
    tokens = F.pad(tokens, (0, 0, 0, length - tokens.shape[1]))
    null_mask = torch.arange(length, device=tokens.device) < null.shape[0]
    null = F.pad(null.to(tokens.dtype), (0, 0, 0, length - null.shape[0]))
    mask = torch.where(drop[:, None], null_mask, mask)
    tokens = torch.where(drop[:, None, None], null, tokens)
    return torch.where(mask[..., None], tokens, 0.0), mask


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the embedding applied as scale-shift (FiLM) on the second norm (ADM)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, C] -> [B, heads, N, C/heads]."""
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)


class Attention(nn.Module):
    """Pre-norm multi-head attention of image positions over themselves or over text tokens, plus residual.

    Queries are the GroupNorm'd image features; keys and values come from the same features (self-attention,
    context_dim None) or from projected token states (cross-attention), where `mask` [B, L] (True = real
    token) hides padding. Works on [B, HW, C] views, which are free for channels_last inputs.
    """

    def __init__(self, channels: int, heads: int, context_dim: int | None = None):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels do not split into {heads} heads")
        self.heads = heads
        self.norm = norm(channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim or channels, 2 * channels)
        self.out = zero_init(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        seq = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        k, v = self.kv(seq if context is None else context).chunk(2, dim=-1)
        attn_mask = None if mask is None else mask[:, None, None, :]
        y = F.scaled_dot_product_attention(_heads(self.q(seq), self.heads), _heads(k, self.heads),
                                           _heads(v, self.heads), attn_mask=attn_mask)
        y = self.out(y.transpose(1, 2).reshape(b, h * w, c))
        return x + y.transpose(1, 2).view(b, c, h, w)
