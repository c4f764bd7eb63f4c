"""DDPM ancestral, DDIM and DPM-Solver++(2M) samplers over respaced timesteps, classifier-free guidance, and
`generate`: images from per-image seeds, the one generation path (through `ddpdiff.pipeline.Pipeline`) of
the sampling CLI, the evaluation and the in-training previews and metrics."""

from __future__ import annotations

import argparse
import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .diffusion import Diffusion, posterior, randn

# denoise(x_t, t, cond) -> the network's prediction of the diffusion's target at x_t.
Denoise = Callable[[torch.Tensor, torch.Tensor, dict | None], torch.Tensor]
# step(x_t, x0, ab_t, ab_s) -> mean and variance of x_s, for the next (smaller) timestep s.
Step = Callable[[torch.Tensor, torch.Tensor, float, float], tuple[torch.Tensor, float]]
# noise(shape) -> standard normal noise of that shape for a sampler's later draws.
Noise = Callable[[tuple[int, ...]], torch.Tensor]


def gaussian(generator: torch.Generator | None, device: torch.device | str = "cpu") -> Noise:
    """Noise from one generator (drawn on the generator's device, then moved)."""
    return lambda shape: randn(shape, generator, device)


def per_image(seeds: Sequence[int], device: torch.device | str = "cpu") -> Noise:
    """Noise whose row i comes from its own CPU generator seeded by seeds[i]: an image's noise, the initial
    one and every later draw, depends on its seed alone, not on the batch it is in or the device."""
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def noise(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.stack([torch.randn(shape[1:], generator=g) for g in generators]).to(device)
    return noise


def image_seed(seed: int, index: int, sample: int = 0) -> int:
    """The seed of image `sample` for prompt `index` of a run seeded by `seed`."""
    return int(np.random.SeedSequence([seed, index, sample, 0]).generate_state(1)[0])


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
         noise: Noise | None, clip_x0: bool, progress: bool) -> torch.Tensor:
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
        if var > 0:
            x = mean + math.sqrt(var) * (noise or gaussian(None, x.device))(tuple(x.shape)).to(x.device, x.dtype)
        else:
            x = mean
    return x


def ddpm_sample(denoise: Denoise, diff: Diffusion, x_T: torch.Tensor, cond: dict | None = None,
                steps: int | None = None, noise: Noise | None = None, clip_x0: bool = True,
                progress: bool = False) -> torch.Tensor:
    """Ancestral sampling from noise x_T; with steps < T the posterior spans the respaced gaps."""
    return _run(denoise, diff, x_T, cond, steps, ddpm_step, noise, clip_x0, progress)


def ddim_sample(denoise: Denoise, diff: Diffusion, x_T: torch.Tensor, cond: dict | None = None,
                steps: int | None = None, eta: float = 0.0, noise: Noise | None = None,
                clip_x0: bool = True, progress: bool = False) -> torch.Tensor:
    """DDIM from noise x_T: eta = 0 is deterministic, eta = 1 is ancestral DDPM."""
    def step(x_t, x0, ab_t, ab_s):
        return ddim_step(x_t, x0, ab_t, ab_s, eta)
    return _run(denoise, diff, x_T, cond, steps, step, noise, clip_x0, progress)


def dpmpp2m_steps() -> Step:
    """A fresh DPM-Solver++(2M) stepper (Lu et al. 2022, "DPM-Solver++", Alg. 2): a second-order multistep
    solver of the probability-flow ODE in data prediction, so it needs no noise and takes the (clipped,
    guided) x0 whatever the network's target.

    With lambda = log(sqrt(ab) / sqrt(1 - ab)) and h = lambda_s - lambda_t, the step is
    x_s = sigma_s/sigma_t x_t - alpha_s expm1(-h) D, where D = x0 on the first step (DDIM) and afterwards
    D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev, r = h_prev / h: the previous x0 extrapolates the current one.
    The last step (to ab_s = 1, the clean image) is first order and returns x0, as diffusers does with
    `final_sigmas_type="zero"`. Holds the previous x0, so one stepper serves one sampling run.
    """
    previous: list[tuple[torch.Tensor, float]] = []

    def step(x_t: torch.Tensor, x0: torch.Tensor, ab_t: float, ab_s: float) -> tuple[torch.Tensor, float]:
        if ab_s == 1.0:
            return x0, 0.0
        lam_t = 0.5 * math.log(ab_t / (1 - ab_t))
        h = 0.5 * math.log(ab_s / (1 - ab_s)) - lam_t
        d = x0
        if previous:
            x0_prev, lam_prev = previous.pop()
            half_inv_r = 0.5 * h / (lam_t - lam_prev)
            d = (1 + half_inv_r) * x0 - half_inv_r * x0_prev
        previous.append((x0, lam_t))
        return math.sqrt((1 - ab_s) / (1 - ab_t)) * x_t - math.sqrt(ab_s) * math.expm1(-h) * d, 0.0
    return step


def dpmpp2m_sample(denoise: Denoise, diff: Diffusion, x_T: torch.Tensor, cond: dict | None = None,
                   steps: int | None = None, noise: Noise | None = None, clip_x0: bool = True,
                   progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) from noise x_T (deterministic; `noise` is unused and accepted for a uniform call)."""
    return _run(denoise, diff, x_T, cond, steps, dpmpp2m_steps(), noise, clip_x0, progress)


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"ddpm": ddpm_sample, "ddim": ddim_sample,
                                                    "dpmpp2m": dpmpp2m_sample}
# The default everywhere (CLIs, configs, Pipeline): DPM-Solver++(2M) at 20 steps is as close to the converged
# samples as DDIM at about 50, for 2.5x less work (docs/diffusion.md, "Which sampler").
DEFAULT_SAMPLER, DEFAULT_STEPS = "dpmpp2m", 20
# Guidance 2 where 0.17 <= t/T < 0.88, the conditional prediction elsewhere: on the demo checkpoint the same
# attribute accuracy as guidance 3 at every step (1.000) with samples 0.81 as varied as real faces, not 0.70
# (docs/diffusion.md, "Guidance"; re-measure on other data with tools/bench_sample.py --diversity).
DEFAULT_GUIDANCE, DEFAULT_GUIDANCE_INTERVAL = 2.0, (0.17, 0.88)
# The --sampler help of the CLIs that sample.
SAMPLER_HELP = ("ddim (deterministic with --eta 0), ddpm (ancestral) or dpmpp2m (DPM-Solver++(2M): "
                "second order, for 10-20 steps; docs/diffusion.md)")


def guided(model: nn.Module, guidance: float, interval: Sequence[float] | None = None, timesteps: int = 0) -> Denoise:
    """Classifier-free guidance: pred_u + w (pred_c - pred_u), both halves in one batched forward.

    Every target is affine in eps at fixed x_t, so mixing predictions equals mixing the noise estimates.
    w = 1 is the conditional model alone and w = 0 the unconditional one: a single forward each.

    `interval` (LO, HI), fractions of the `timesteps` T (None or empty: every step): guidance only where
    LO <= t/T < HI, the conditional prediction (w = 1, one forward) elsewhere (Kynkäänniemi et al. 2024,
    "Applying guidance in a limited interval improves sample and distribution quality"): guidance at the
    highest noise levels decides the composition and pulls the samples of one prompt onto a few, and at the
    lowest it changes little.
    """
    def forward(x: torch.Tensor, t: torch.Tensor, cond: dict, w: float) -> torch.Tensor:
        keep = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        if w == 1:
            return model(x, t, cond, keep)
        if w == 0:
            return model(x, t, cond, ~keep)
        pair = {k: torch.cat([v, v]) for k, v in cond.items()}
        c, u = model(torch.cat([x, x]), torch.cat([t, t]), pair, torch.cat([keep, ~keep])).float().chunk(2)
        return u + w * (c - u)

    if not interval:
        return lambda x, t, cond: forward(x, t, cond, guidance)
    lo, hi = (f * timesteps for f in interval)

    def denoise(x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        inside = (t >= lo) & (t < hi)
        if inside.all():
            return forward(x, t, cond, guidance)
        if not inside.any():
            return forward(x, t, cond, 1.0)
        both = forward(x, t, cond, guidance).float(), forward(x, t, cond, 1.0).float()  # rows at other t
        return torch.where(inside.view(-1, *[1] * (x.dim() - 1)), *both)
    return denoise


def guidance_interval(text: str) -> tuple[float, float]:
    """LO,HI as `--guidance-interval` takes it (argparse's type; `check` checks the range)."""
    lo, hi = (float(v) for v in text.split(","))  # not two numbers: ValueError, argparse names the flag
    return lo, hi


def add_guidance_arguments(p: argparse.ArgumentParser) -> None:
    """--guidance and --guidance-interval, the same in every CLI that samples."""
    lo, hi = DEFAULT_GUIDANCE_INTERVAL
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help=f"classifier-free guidance: 0 unconditional, 1 conditional, >1 stronger (default "
                        f"{DEFAULT_GUIDANCE:g})")
    p.add_argument("--guidance-interval", type=guidance_interval, metavar="LO,HI", default=DEFAULT_GUIDANCE_INTERVAL,
                   help=f"guidance only where LO <= t/T < HI (fractions of the timesteps, 1 = pure noise), the "
                        f"conditional prediction elsewhere: more varied samples (default {lo:g},{hi:g}; 0,1 guides "
                        "every step; docs/diffusion.md)")


def check(sampler: str, steps: int, eta: float, timesteps: int,
          interval: Sequence[float] | None = None) -> list[str]:
    """Problems with sampling settings, named by their command-line flags."""
    problems = []
    if sampler not in SAMPLERS:
        problems.append(f"--sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
    if not 1 <= steps <= timesteps:
        problems.append(f"--steps {steps} is outside 1..{timesteps} (the checkpoint's diffusion.timesteps)")
    if eta < 0 or (eta and sampler != "ddim"):
        problems.append("--eta must be >= 0 and applies to the ddim sampler only")
    return problems + interval_problems(interval)


def interval_problems(interval: Sequence[float] | None, name: str = "--guidance-interval") -> list[str]:
    """What is wrong with a guidance interval (None or empty: none, guidance at every step)."""
    if interval and (len(interval) != 2 or not 0 <= interval[0] < interval[1] <= 1):
        values = ",".join(f"{v:g}" for v in interval)
        return [(f"{name} {values}: expected LO,HI with 0 <= LO < HI <= 1 (fractions of the diffusion's "
                 "timesteps, 1 = pure noise)")]
    return []


@torch.no_grad()
def generate(model: nn.Module, diff: Diffusion, cond: dict, seeds: Sequence[int], image_shape: tuple[int, ...],
             sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS, eta: float = 0.0, guidance: float = 1.0,
             batch_size: int = 64, clip_x0: bool = True, progress: bool = False,
             guidance_interval: Sequence[float] | None = None) -> torch.Tensor:
    """Image i from `model(x_t, t, cond, drop)` (in eval mode) for row i of `cond`, all its noise from
    seeds[i] (`per_image`): [len(seeds), *image_shape] in [-1, 1], on the CPU.

    The same seeds and condition give the same images whatever the batch size (up to the kernels' own
    batch-size dependence, ~1e-6), on any device up to its arithmetic. `guidance_interval`: see `guided`.
    """
    problems = check(sampler, steps, eta, diff.T, guidance_interval)
    if problems:
        raise ValueError("; ".join(problems))
    device = next(model.parameters()).device
    options = {"eta": eta} if sampler == "ddim" else {}
    denoise, out = guided(model, guidance, guidance_interval, diff.T), []
    for start in range(0, len(seeds), batch_size):
        rows = slice(start, start + batch_size)
        noise = per_image(seeds[rows], device)
        x_T = noise((len(seeds[rows]), *image_shape))
        x0 = SAMPLERS[sampler](denoise, diff, x_T, {k: v[rows] for k, v in cond.items()},
                               steps=steps, noise=noise, clip_x0=clip_x0, progress=progress, **options)
        out.append(x0.clamp(-1, 1).cpu())
    return torch.cat(out) if out else torch.zeros(0, *image_shape)
