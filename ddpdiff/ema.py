"""Exponential moving average of model weights, kept on every rank so sampling never depends on one."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)  # starts as an exact copy

    def decay_at(self, step: int) -> float:
        """Warm-up: early on, average over few steps, so the random initial weights fade out quickly."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, skip: torch.Tensor | None = None) -> None:
        """Move towards `model`'s weights, unless `skip` (a bool tensor, read on the device: no host sync)."""
        ema = list(self.model.parameters())
        weight = 1.0 - self.decay_at(step)
        if skip is not None:
            weight = torch.where(skip, 0.0, weight).to(ema[0].device)
        torch._foreach_lerp_(ema, [p.detach() for p in model.parameters()], weight)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b if skip is None else torch.where(skip, b_ema, b))

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
