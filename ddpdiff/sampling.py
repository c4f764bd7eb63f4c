"""DDPM ancestral and DDIM samplers over respaced timesteps, and classifier-free guidance."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from .diffusion import Diffusion, posterior, randn

# denoise(x_t, t, cond) -> the network's prediction of the diffusion's target at x_t.
Denoise = Callable[[torch.Tensor, torch.Tensor, dict | None], torch.Tensor]
# step(x_t, x0, ab_t, ab_s) -> mean and variance of x_s, for the next (smaller) timestep s.
Step = Callable[[torch.Tensor, torch.Tensor, float, float], tuple[torch.Tensor, float]]


def respaced(T: int, steps: int | None) -> list[int]:
    """`steps` timesteps from T-1 down to 0, evenly spaced (all T when steps is None)."""
    steps = T if steps is None else steps
    if not 1 <= steps <= T:
        raise ValueError(f"sampling steps must be in 1..{T}, got {steps}")
    return torch.linspace(T - 1, 0, steps, dtype=torch.float64).round().long().tolist()


def ddpm_step(x_t: torch.Tensor, x0: torch.Tensor, ab_t: float, ab_s: float) -> tuple[torch.Tensor, float]:
    """Ancestral step: the posterior q(x_s | x_t, x0) with the predicted x0 (Ho et al. 2020, eqs. 6-7)."""
    mean, var = posterior(x0, x_t, torch.tensor(ab_t, dtype=torch.float64), torch.tensor(ab_s, dtype=torch.float64))
    return mean, var.item()


def ddim_step(x_t: torch.Tensor, x0: torch.Tensor, ab_t: float, ab_s: float, eta: float) -> tuple[torch.Tensor, float]:
    """Song et al. (2021) eq. 12: x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - ab_s)/(1 - ab_t)) sqrt(1 - ab_t/ab_s), eps read back from x_t and x0."""
    eps = (x_t - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
    var = eta ** 2 * (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)
    return math.sqrt(ab_s) * x0 + math.sqrt(max(1 - ab_s - var, 0.0)) * eps, var


def _run(denoise: Denoise, diff: Diffusion, x: torch.Tensor, cond: dict | None, steps: int | None, step: Step,
         generator: torch.Generator | None, clip_x0: bool, progress: bool) -> torch.Tensor:
    """The shared sampling loop: predict x0 at each respaced t, then take `step` to the next one.

    Runs in x's dtype (float64 lets the oracle tests check the algebra to 1e-9)."""
    ts = respaced(diff.T, steps)
    ab = diff.alphas_cumprod.tolist()
    for i, t in enumerate(tqdm(ts, desc="sampling", disable=not progress)):
        ab_s = ab[ts[i + 1]] if i + 1 < len(ts) else 1.0
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0 = diff.to_x0_eps(denoise(x, tt, cond).to(x.dtype), x, tt)[0]
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        mean, var = step(x, x0, ab[t], ab_s)
        x = mean + math.sqrt(var) * randn(tuple(x.shape), generator, x.device).to(x.dtype) if var > 0 else mean
    return x


def ddpm_sample(denoise: Denoise, diff: Diffusion, x_T: torch.Tensor, cond: dict | None = None,
                steps: int | None = None, generator: torch.Generator | None = None, clip_x0: bool = True,
                progress: bool = False) -> torch.Tensor:
    """Ancestral sampling from noise x_T; with steps < T the posterior spans the respaced gaps."""
    return _run(denoise, diff, x_T, cond, steps, ddpm_step, generator, clip_x0, progress)


def ddim_sample(denoise: Denoise, diff: Diffusion, x_T: torch.Tensor, cond: dict | None = None,
                steps: int | None = None, eta: float = 0.0, generator: torch.Generator | None = None,
                clip_x0: bool = True, progress: bool = False) -> torch.Tensor:
    """DDIM from noise x_T: eta = 0 is deterministic, eta = 1 is ancestral DDPM."""
    def step(x_t, x0, ab_t, ab_s):
        return ddim_step(x_t, x0, ab_t, ab_s, eta)
    return _run(denoise, diff, x_T, cond, steps, step, generator, clip_x0, progress)


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"ddpm": ddpm_sample, "ddim": ddim_sample}


def guided(model: nn.Module, guidance: float) -> Denoise:
    """Classifier-free guidance: pred_u + w (pred_c - pred_u), both halves in one batched forward.

    Every target is affine in eps at fixed x_t, so mixing predictions equals mixing the noise estimates.
    w = 1 is the conditional model alone and w = 0 the unconditional one: a single forward each.
    """
    def denoise(x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        keep = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        if guidance == 1:
            return model(x, t, cond, keep)
        if guidance == 0:
            return model(x, t, cond, ~keep)
        pair = {k: torch.cat([v, v]) for k, v in cond.items()}
        c, u = model(torch.cat([x, x]), torch.cat([t, t]), pair, torch.cat([keep, ~keep])).float().chunk(2)
        return u + guidance * (c - u)
    return denoise


@torch.no_grad()
def sample(model: nn.Module, cond: dict, shape: tuple[int, ...], diff: Diffusion, sampler: str = "ddim",
           steps: int | None = None, eta: float = 0.0, guidance: float = 1.0,
           generator: torch.Generator | None = None, progress: bool = False, clip_x0: bool = True,
           ) -> torch.Tensor:
    """Images in [-1, 1] from `model(x_t, t, cond, drop)` (put it in eval mode first).

    x_T and every later noise draw come from `generator`, so a seed gives the same images on the same device.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} (known: {', '.join(SAMPLERS)})")
    if sampler == "ddpm" and eta != 0:
        raise ValueError("eta applies to the ddim sampler only")
    device = next(model.parameters()).device
    x_T = randn(tuple(shape), generator, device)
    options = {"eta": eta} if sampler == "ddim" else {}
    x0 = SAMPLERS[sampler](guided(model, guidance), diff, x_T, cond, steps=steps, generator=generator,
                           clip_x0=clip_x0, progress=progress, **options)
    return x0.clamp(-1, 1)
