"""Noise schedules: the betas and cumulative alphas of the forward process, in float64."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Schedule:
    """`betas[t]` is the variance added at step t; `alphas_cumprod[t]` is the signal fraction left after it."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor

    @property
    def timesteps(self) -> int:
        return len(self.betas)


def _from_betas(betas: torch.Tensor) -> Schedule:
    return Schedule(betas=betas, alphas_cumprod=torch.cumprod(1.0 - betas, dim=0))


def cosine_schedule(T: int, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
    """Improved DDPM (Nichol & Dhariwal 2021, eq. 17): alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2).

    betas are 1 - alpha_bar(t+1)/alpha_bar(t), clipped at max_beta so the last step is not singular.
    """
    def alpha_bar(i: torch.Tensor) -> torch.Tensor:
        return torch.cos((i / T + s) / (1 + s) * math.pi / 2) ** 2

    i = torch.arange(T, dtype=torch.float64)
    betas = (1 - alpha_bar(i + 1) / alpha_bar(i)).clamp(max=max_beta)
    return _from_betas(betas)


def linear_schedule(T: int) -> Schedule:
    """Ho et al. (2020): betas linear from 1e-4 to 0.02 at T=1000, scaled by 1000/T so that any T spans
    about the same SNR range."""
    scale = 1000 / T
    return _from_betas(torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64))


SCHEDULES: dict[str, Callable[[int], Schedule]] = {"cosine": cosine_schedule, "linear": linear_schedule}


def make_schedule(name: str, T: int) -> Schedule:
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r} (known: {', '.join(SCHEDULES)})")
    if T < 1:
        raise ValueError(f"timesteps must be positive, got {T}")
    return SCHEDULES[name](T)
