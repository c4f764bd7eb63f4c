"""The forward process q(x_t | x_0), the prediction targets and the training loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .config import DiffusionConfig
from .schedule import Schedule, make_schedule


def randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str) -> torch.Tensor:
    """Standard normal noise drawn on the generator's own device, then moved: a seed means the same numbers
    whatever device the model runs on (a CPU generator also drives a CUDA model)."""
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source, dtype=torch.float32).to(device)


def posterior(x0: torch.Tensor, x_t: torch.Tensor, ab_t: torch.Tensor, ab_s: torch.Tensor,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_s | x_t, x0) for any s < t, from the cumulative alphas at t and s.

    Ho et al. (2020) eq. 7 with beta_t = 1 - ab_t/ab_s, so it also holds between respaced steps;
    ab_s = 1 (s = -1, the clean image) gives mean x0 and variance 0.
    """
    beta = 1 - ab_t / ab_s
    mean = (ab_s.sqrt() * beta / (1 - ab_t)) * x0 + ((1 - beta).sqrt() * (1 - ab_s) / (1 - ab_t)) * x_t
    return mean, beta * (1 - ab_s) / (1 - ab_t)


@dataclass(frozen=True)
class Target:
    """What a network predicts: how to build it from (x0, noise) and how to read (x0, noise) back from it.

    `x0_gain` is |d target / d x0|^2 at fixed x_t: an error of e in x0 is an error of sqrt(gain) * e in
    the target, which is how min-SNR weights (defined on x0) translate into each target's units.
    """

    make: Callable[[Diffusion, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    to_x0_eps: Callable[[Diffusion, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    x0_gain: Callable[[Diffusion], torch.Tensor]


def _eps_to_x0_eps(d: Diffusion, eps, x_t, t):
    a, s = d.coef("sqrt_ab", t, x_t), d.coef("sqrt_1mab", t, x_t)
    return (x_t - s * eps) / a, eps


def _x0_to_x0_eps(d: Diffusion, x0, x_t, t):
    a, s = d.coef("sqrt_ab", t, x_t), d.coef("sqrt_1mab", t, x_t)
    return x0, (x_t - a * x0) / s


def _v_to_x0_eps(d: Diffusion, v, x_t, t):
    a, s = d.coef("sqrt_ab", t, x_t), d.coef("sqrt_1mab", t, x_t)
    return a * x_t - s * v, s * x_t + a * v


def _prev_to_x0_eps(d: Diffusion, mean, x_t, t):
    c0, ct = d.coef("post_c0", t, x_t), d.coef("post_ct", t, x_t)
    return _x0_to_x0_eps(d, (mean - ct * x_t) / c0, x_t, t)


TARGETS: dict[str, Target] = {
    "eps": Target(make=lambda d, x0, eps, x_t, t: eps, to_x0_eps=_eps_to_x0_eps,
                  x0_gain=lambda d: d.snr),
    "x0": Target(make=lambda d, x0, eps, x_t, t: x0, to_x0_eps=_x0_to_x0_eps,
                 x0_gain=lambda d: torch.ones_like(d.snr)),
    "v": Target(make=lambda d, x0, eps, x_t, t: d.coef("sqrt_ab", t, x0) * eps - d.coef("sqrt_1mab", t, x0) * x0,
                to_x0_eps=_v_to_x0_eps, x0_gain=lambda d: d.snr + 1),
    # The previous, less noisy image: the posterior mean E[x_{t-1} | x_t, x0] (its MSE minimiser is the same
    # as regressing a sampled x_{t-1}, without that sample's noise in the target).
    "prev": Target(make=lambda d, x0, eps, x_t, t: d.coef("post_c0", t, x0) * x0 + d.coef("post_ct", t, x0) * x_t,
                   to_x0_eps=_prev_to_x0_eps, x0_gain=lambda d: d.tables["post_c0"] ** 2),
}


class Diffusion:
    """A schedule plus a prediction target: `q_sample`, the target conversions and the training loss."""

    def __init__(self, cfg: DiffusionConfig, schedule: Schedule | None = None):
        if cfg.target not in TARGETS:
            raise ValueError(f"unknown diffusion target {cfg.target!r} (known: {', '.join(TARGETS)})")
        self.cfg = cfg
        self.schedule = schedule or make_schedule(cfg.schedule, cfg.timesteps)
        self.T = self.schedule.timesteps
        self.target = TARGETS[cfg.target]
        ab = self.schedule.alphas_cumprod
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        # The posterior mean is c0 * x0 + ct * x_t; read both coefficients off the closed form.
        c0 = posterior(torch.ones(()), torch.zeros(()), ab, ab_prev)[0]
        ct = posterior(torch.zeros(()), torch.ones(()), ab, ab_prev)[0]
        self.alphas_cumprod = ab
        self.snr = ab / (1 - ab)
        self.tables = {"ab": ab, "ab_prev": ab_prev, "sqrt_ab": ab.sqrt(), "sqrt_1mab": (1 - ab).sqrt(),
                       "post_c0": c0, "post_ct": ct}
        # min-SNR weights the x0-space error by min(SNR, gamma) (Hang et al. 2023); in the target's units that
        # is min(SNR, gamma) / x0_gain: min(SNR, gamma)/SNR for eps, min(SNR, gamma)/(SNR + 1) for v.
        gamma = cfg.min_snr_gamma
        self.tables["loss_weight"] = (self.snr.clamp(max=gamma) / self.target.x0_gain(self) if gamma > 0
                                      else torch.ones_like(self.snr))
        self._on: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = {}

    def coef(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table `name` at timesteps t, shaped [B,1,...] to broadcast against `like`, in like's float dtype
        (float32 for integer `like`) on t's device."""
        dtype = like.dtype if like.is_floating_point() else torch.float32
        key = (t.device, dtype)
        if key not in self._on:
            self._on[key] = {k: v.to(t.device, dtype) for k, v in self.tables.items()}
        return self._on[key][name][t].view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise."""
        return self.coef("sqrt_ab", t, x0) * x0 + self.coef("sqrt_1mab", t, x0) * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x0) (variance shaped [B,1,1,1])."""
        return posterior(x0, x_t, self.coef("ab", t, x0), self.coef("ab_prev", t, x0))

    def make_target(self, x0: torch.Tensor, noise: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.target.make(self, x0, noise, x_t, t)

    def to_x0_eps(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean image and the noise implied by a prediction of the configured target."""
        return self.target.to_x0_eps(self, pred, x_t, t)

    def loss(self, model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
             generator: torch.Generator | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Weighted MSE between model_fn(x_t, t) and the target, with t ~ U{0..T-1} per example.

        t, then the noise, are drawn from `generator` (on its own device), so a seeded generator gives the
        same draws for the same batch shape. Returns (loss, per-example weighted loss [B], t [B]);
        loss is the mean of the per-example losses.
        """
        b = x0.shape[0]
        source = generator.device if generator is not None else x0.device
        t = torch.randint(0, self.T, (b,), generator=generator, device=source).to(x0.device)
        noise = torch.empty_like(x0, dtype=torch.float32).copy_(randn(tuple(x0.shape), generator, x0.device))
        x0 = x0.float()
        x_t = self.q_sample(x0, t, noise)
        target = self.make_target(x0, noise, x_t, t)
        pred = model_fn(x_t, t).float()
        per_example = (pred - target).square().mean(dim=tuple(range(1, x0.dim()))) * self.coef("loss_weight", t, t)
        return per_example.mean(), per_example, t

