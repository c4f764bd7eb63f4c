"""Images in [-1, 1] as 8-bit pixels: the one quantisation behind PNG files, PIL images and the metrics, so
an evaluated sample is exactly what a saved one would be."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid

from .atomic import atomic_write


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] floats in [-1, 1] (or uint8 pixels, as the shards' batches hold them) -> uint8
    [..., H, W, 3] on the CPU, rounded as a PNG stores them."""
    if images.dtype == torch.uint8:
        return images.cpu().movedim(-3, -1)
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.movedim(-3, -1)


def as_saved(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] at the 8-bit levels they would have once saved and read back (float32, CPU)."""
    return to_uint8(images).movedim(-1, -3).float() / 127.5 - 1


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[N, 3, H, W] in [-1, 1] as 8-bit PIL images."""
    return [Image.fromarray(p) for p in to_uint8(images).numpy()]


def write_png(path: str | Path, images: torch.Tensor, nrow: int | None = None) -> None:
    """One image [3,H,W], or a grid of [N,3,H,W] with `nrow` per row, as an 8-bit PNG written atomically."""
    if images.dim() == 4:
        images = make_grid(images.float().cpu(), nrow=nrow or len(images), padding=2, normalize=False, pad_value=1.0)
    with atomic_write(path) as f:
        Image.fromarray(to_uint8(images).numpy()).save(f, format="PNG")
