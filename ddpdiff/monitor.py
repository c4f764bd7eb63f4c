"""Rank 0's view of a run: one console line and TensorBoard scalars per log step, image grids."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter


class Monitor:
    """Writes only where `enabled` (rank 0); every other rank gets a silent one."""

    def __init__(self, run_dir: str | Path, enabled: bool, purge_step: int | None = None):
        """`purge_step`: on resume, the first step not in the checkpoint; TensorBoard drops events logged from
        there on by the interrupted run, so steps after the last checkpoint do not appear twice."""
        self.writer = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=purge_step) if enabled else None

    def scalars(self, step: int, values: dict[str, float], console: bool = True, total: int | None = None,
                eta_s: float | None = None) -> None:
        """The values to TensorBoard and, with `console`, one line (with the step total and ETA when given)."""
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        if console:
            line = " ".join(f"{tag.split('/')[-1] if tag.count('/') == 1 else tag}={_fmt(v)}"
                            for tag, v in values.items())
            head = f"step {step}" + (f" of {total}" if total else "")
            tail = f" eta={_duration(eta_s)}" if eta_s is not None else ""
            print(f"{head} {line}{tail}", file=sys.stdout, flush=True)

    def images(self, tag: str, step: int, images: torch.Tensor, nrow: int = 8) -> None:
        """A grid of images in [-1, 1], [N,3,H,W]."""
        if self.writer is None:
            return
        from torchvision.utils import make_grid

        grid = make_grid(images.float().cpu().clamp(-1, 1) * 0.5 + 0.5, nrow=nrow)
        self.writer.add_image(tag, grid, step)

    def text(self, tag: str, step: int, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fmt(v: float) -> str:
    if isinstance(v, int) or float(v).is_integer() and abs(v) >= 1:
        return str(int(v))
    return f"{v:.4g}"


def _duration(seconds: float) -> str:
    """h:mm:ss"""
    s = max(0, round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
