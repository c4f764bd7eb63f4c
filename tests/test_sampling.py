import math

import pytest
import torch

from ddpdiff.config import DiffusionConfig
from ddpdiff.diffusion import TARGETS, Diffusion
from ddpdiff.sampling import (check, ddim_sample, ddim_step, ddpm_sample, ddpm_step, dpmpp2m_sample, gaussian,
                              generate, guidance_interval, guided, image_seed, per_image, respaced)

T = 100


def make(target="eps", schedule="cosine"):
    return Diffusion(DiffusionConfig(timesteps=T, schedule=schedule, target=target))


def clean_images(b=4, seed=0, dtype=torch.float32):
    return torch.rand(b, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 1.8 - 0.9


def oracle(diff, x0):
    """A perfect denoiser for a known x0: reads the true noise off x_t and returns the configured target."""
    def denoise(x_t, t, cond):
        ab = diff.schedule.alphas_cumprod[t].to(x_t.dtype).view(-1, 1, 1, 1)
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        return diff.make_target(x0, eps, x_t, t)
    return denoise


def test_respaced_timesteps_run_from_T_minus_1_to_0_without_repeats():
    for steps in (1, 2, 7, 50, T):
        ts = respaced(T, steps)
        assert len(ts) == len(set(ts)) == steps and ts[0] == T - 1 and ts == sorted(ts, reverse=True)
        assert steps == 1 or ts[-1] == 0
    assert respaced(T, None) == list(range(T - 1, -1, -1))
    with pytest.raises(ValueError, match="1..100"):
        respaced(T, T + 1)


@pytest.mark.parametrize("sample", [ddim_sample, dpmpp2m_sample])
@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("steps", [T, 10, 1])
def test_deterministic_samplers_with_an_oracle_recover_x0(sample, target, steps):
    """DDIM (eta 0) and DPM-Solver++(2M): a perfect denoiser predicts the same x0 at every step, so both are
    exact (the solver's extrapolation from the previous x0 included)."""
    diff = make(target)
    x0 = clean_images(dtype=torch.float64)
    x_T = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = sample(oracle(diff, x0), diff, x_T, steps=steps)
    torch.testing.assert_close(out, x0, atol=1e-9, rtol=0)
    x0, x_T = x0.float(), x_T.float()  # float32: the last step divides by sqrt(ab_T) ~ 5e-4 for eps
    torch.testing.assert_close(sample(oracle(diff, x0), diff, x_T, steps=steps), x0, atol=1e-3, rtol=0)


def test_deterministic_ddim_keeps_the_oracle_on_one_noise_trajectory():
    """With eta = 0 and a perfect denoiser every visited x_t is sqrt(ab_t) x0 + sqrt(1 - ab_t) eps for one eps."""
    diff = make()
    ab = diff.schedule.alphas_cumprod
    x0 = clean_images(dtype=torch.float64)
    eps = torch.randn(x0.shape, dtype=torch.float64)
    visited, perfect = [], oracle(diff, x0)

    def denoise(x_t, t, cond):
        visited.append((x_t, t[0].item()))
        return perfect(x_t, t, cond)

    ddim_sample(denoise, diff, ab[-1].sqrt() * x0 + (1 - ab[-1]).sqrt() * eps, steps=7)
    assert [t for _, t in visited] == respaced(T, 7)
    for x_t, t in visited:
        torch.testing.assert_close(x_t, ab[t].sqrt() * x0 + (1 - ab[t]).sqrt() * eps, atol=1e-9, rtol=0)


@pytest.mark.parametrize("steps", [T, 10])
def test_ddpm_with_an_oracle_recovers_x0(steps):
    diff = make()
    x0 = clean_images(dtype=torch.float64)
    x_T = torch.randn(x0.shape, dtype=torch.float64)
    out = ddpm_sample(oracle(diff, x0), diff, x_T, steps=steps, noise=gaussian(torch.Generator().manual_seed(0)))
    torch.testing.assert_close(out, x0, atol=1e-9, rtol=0)


def test_ddpm_step_is_the_posterior_of_ho_et_al():
    """Eq. 7 of Ho et al. (2020), with beta_t for adjacent steps and 1 - ab_t/ab_s across respaced gaps."""
    ab = make().schedule.alphas_cumprod.tolist()
    x0, x_t = clean_images(seed=1), torch.randn(4, 3, 8, 8)
    for t, s in [(50, 49), (1, 0), (99, 98), (60, 40)]:
        beta = 1 - ab[t] / ab[s]
        mean, var = ddpm_step(x_t, x0, ab[t], ab[s])
        expected = (math.sqrt(ab[s]) * beta / (1 - ab[t]) * x0
                    + math.sqrt(1 - beta) * (1 - ab[s]) / (1 - ab[t]) * x_t)
        torch.testing.assert_close(mean, expected)
        assert var == pytest.approx((1 - ab[s]) / (1 - ab[t]) * beta, rel=1e-12)
    mean, var = ddpm_step(x_t, x0, ab[0], 1.0)
    assert torch.equal(mean, x0) and var == 0


def reference_ddim_step(x_t, eps, ab_t, ab_prev, eta, z):
    """Song et al. (2021) eq. 12 with sigma from eq. 16, in its own (eps) form."""
    sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab_t)) * math.sqrt(1 - ab_t / ab_prev)
    pred_x0 = (x_t - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
    return math.sqrt(ab_prev) * pred_x0 + math.sqrt(1 - ab_prev - sigma ** 2) * eps + sigma * z


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_one_ddim_step_matches_the_paper(eta):
    ab = make().schedule.alphas_cumprod.tolist()
    g = torch.Generator().manual_seed(3)
    x_t, eps, z = (torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for t, s in [(99, 89), (50, 49), (10, 0)]:
        x0 = (x_t - math.sqrt(1 - ab[t]) * eps) / math.sqrt(ab[t])
        mean, var = ddim_step(x_t, x0, ab[t], ab[s], eta)
        torch.testing.assert_close(mean + math.sqrt(var) * z, reference_ddim_step(x_t, eps, ab[t], ab[s], eta, z))


def affine_denoiser(x_t, t, cond):
    """A deterministic stand-in network, so samplers can be compared without training anything."""
    return 0.5 * x_t + 0.01 * t.float().view(-1, 1, 1, 1) / T


@pytest.mark.parametrize("steps", [T, 13])
def test_ddim_with_eta_one_is_ancestral_ddpm(steps):
    diff = make()
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    a = ddpm_sample(affine_denoiser, diff, x_T, steps=steps, noise=gaussian(torch.Generator().manual_seed(5)))
    b = ddim_sample(affine_denoiser, diff, x_T, steps=steps, eta=1.0, noise=gaussian(torch.Generator().manual_seed(5)))
    torch.testing.assert_close(a, b)
    c = ddim_sample(affine_denoiser, diff, x_T, steps=steps, eta=0.0, noise=gaussian(torch.Generator().manual_seed(5)))
    assert not torch.allclose(a, c)


class RecordingModel(torch.nn.Module):
    """model(x_t, t, cond, drop): a fixed function of x_t and the (possibly dropped) condition; logs calls."""

    def __init__(self):
        super().__init__()
        self.null = torch.nn.Parameter(torch.full((3,), -0.3))
        self.calls = []

    def forward(self, x, t, cond, drop):
        self.calls.append((x.shape[0], drop.clone()))
        c = torch.where(drop[:, None], self.null, cond["pooled"])
        return 0.3 * x + c[:, :, None, None]


def test_guidance_mixes_both_predictions_in_one_batched_forward():
    diff = make()
    cond = {"pooled": torch.tensor([[0.2, -0.1, 0.4], [0.0, 0.3, -0.2]])}
    model = RecordingModel()
    x_T = per_image([0, 1])((2, 3, 8, 8))

    def reference(x, t, c):
        u = model(x, t, c, torch.ones(2, dtype=torch.bool))
        return u + 3.0 * (model(x, t, c, torch.zeros(2, dtype=torch.bool)) - u)

    expected = ddim_sample(reference, diff, x_T, cond, steps=5)
    model.calls.clear()
    got = generate(model, diff, cond, [0, 1], (3, 8, 8), steps=5, guidance=3.0, sampler="ddim")
    torch.testing.assert_close(got, expected.clamp(-1, 1))
    assert len(model.calls) == 5
    assert all(n == 4 and drop.tolist() == [False, False, True, True] for n, drop in model.calls)


@pytest.mark.parametrize("guidance, dropped", [(1.0, False), (0.0, True)])
def test_guidance_one_and_zero_take_a_single_plain_forward(guidance, dropped):
    model = RecordingModel()
    generate(model, make(), {"pooled": torch.zeros(2, 3)}, [0, 1], (3, 8, 8), steps=3, guidance=guidance)
    assert len(model.calls) == 3
    assert all(n == 2 and drop.tolist() == [dropped, dropped] for n, drop in model.calls)


def test_guidance_interval_guides_inside_and_is_the_conditional_model_outside():
    """Inside LO <= t/T < HI the prediction is plain guidance's, outside it guidance 1's, bit for bit, from one
    plain forward; a batch whose rows straddle the edge gets each row's own."""
    model = RecordingModel()
    cond = {"pooled": torch.tensor([[0.2, -0.1, 0.4], [0.0, 0.3, -0.2]])}
    x = per_image([0, 1])((2, 3, 8, 8))
    interval = guided(model, 3.0, (0.2, 0.6), T)
    for t, inside in [(19, False), (20, True), (45, True), (59, True), (60, False), (99, False)]:
        tt = torch.full((2,), t)
        model.calls.clear()
        got = interval(x, tt, cond)
        assert [n for n, _ in model.calls] == ([4] if inside else [2])
        assert torch.equal(got, guided(model, 3.0 if inside else 1.0)(x, tt, cond))
    mixed = interval(x, torch.tensor([45, 80]), cond)
    assert torch.equal(mixed[0], guided(model, 3.0)(x, torch.full((2,), 45), cond)[0])
    assert torch.equal(mixed[1], guided(model, 1.0)(x, torch.full((2,), 80), cond)[1])
    assert torch.equal(guided(model, 3.0, [], T)(x, tt, cond), guided(model, 3.0)(x, tt, cond))  # empty: everywhere


def test_sampling_with_a_guidance_interval_guides_only_its_steps():
    model, diff = RecordingModel(), make()
    cond = {"pooled": torch.tensor([[0.2, -0.1, 0.4], [0.0, 0.3, -0.2]])}

    def run(**kw):
        model.calls.clear()
        return generate(model, diff, cond, [0, 1], (3, 8, 8), sampler="ddpm", steps=10, **kw), len(model.calls)

    (full, _), (plain, _) = run(guidance=3.0), run(guidance=1.0)
    within, calls = run(guidance=3.0, guidance_interval=(0.2, 0.6))
    guided_steps = [t for t in respaced(T, 10) if 20 <= t < 60]
    assert calls == 10 and sum(n == 4 for n, _ in model.calls) == len(guided_steps) == 4
    assert not torch.allclose(within, full) and not torch.allclose(within, plain)
    whole, _ = run(guidance=3.0, guidance_interval=(0.0, 1.0))
    assert torch.equal(whole, full)


def test_guidance_intervals_are_checked():
    assert guidance_interval("0.2,0.8") == (0.2, 0.8)
    with pytest.raises(ValueError):
        guidance_interval("0.2")
    assert check("ddim", 10, 0.0, T, (0.0, 1.0)) == [] and check("ddim", 10, 0.0, T, []) == []
    for bad in [(0.6, 0.2), (-0.1, 0.5), (0.3, 1.5), (0.5, 0.5), (0.1, 0.2, 0.3)]:
        (problem,) = check("ddim", 10, 0.0, T, bad)
        assert problem.startswith("--guidance-interval ") and "0 <= LO < HI <= 1" in problem
    with pytest.raises(ValueError, match="--guidance-interval 0.6,0.2: expected LO,HI"):
        generate(RecordingModel(), make(), {"pooled": torch.zeros(1, 3)}, [0], (3, 4, 4), guidance_interval=(0.6, 0.2))


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.7), ("dpmpp2m", 0.0)])
def test_the_same_seed_gives_the_same_images(sampler, eta):
    model, diff, cond = RecordingModel(), make(), {"pooled": torch.zeros(2, 3)}

    def run(seeds, batch_size=2):
        return generate(model, diff, cond, seeds, (3, 8, 8), sampler=sampler, steps=6, eta=eta, guidance=2.0,
                        batch_size=batch_size)
    a, b, c = run([0, 1]), run([0, 1]), run([1, 2])
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (2, 3, 8, 8) and a.min() >= -1 and a.max() <= 1
    # An image's noise, initial and later, is its seed's alone: not its batch's, not its neighbour's.
    torch.testing.assert_close(run([0, 1], batch_size=1), a, atol=1e-6, rtol=0)
    torch.testing.assert_close(run([5, 1])[1], a[1], atol=1e-6, rtol=0)


def test_image_seeds_differ_by_seed_prompt_and_sample():
    seeds = {image_seed(s, p, i) for s in range(3) for p in range(4) for i in range(5)}
    assert len(seeds) == 60 and image_seed(1, 2, 3) == image_seed(1, 2, 3)


def test_sample_rejects_unknown_samplers_and_eta_for_ddpm():
    model, diff, cond = RecordingModel(), make(), {"pooled": torch.zeros(1, 3)}
    with pytest.raises(ValueError, match="--sampler 'euler' is not one of ddpm, ddim"):
        generate(model, diff, cond, [0], (3, 4, 4), sampler="euler")
    with pytest.raises(ValueError, match="ddim sampler only"):
        generate(model, diff, cond, [0], (3, 4, 4), sampler="ddpm", eta=0.5)


def bounded_denoiser(diff):
    """A fake network for any target: it claims x0 = tanh(x_t) (1/2 + t/T), nonlinear in x_t and t and bounded,
    so the samplers' x0 never needs clipping, expressed in the diffusion's target."""
    def denoise(x_t, t, cond):
        ab = diff.schedule.alphas_cumprod[t].to(x_t.dtype).view(-1, 1, 1, 1)
        x0 = torch.tanh(x_t) * (0.5 + t.to(x_t.dtype).view(-1, 1, 1, 1) / T)
        return diff.make_target(x0, (x_t - ab.sqrt() * x0) / (1 - ab).sqrt(), x_t, t)
    return denoise


@pytest.mark.parametrize("target, prediction_type", [("eps", "epsilon"), ("x0", "sample"), ("v", "v_prediction")])
@pytest.mark.parametrize("steps", [1, 2, 5, 10, 20, 50])
def test_dpmpp2m_matches_diffusers_step_by_step(target, prediction_type, steps):
    """Each visited x_t and the result equal diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2) on
    our betas and respaced timesteps; its final_sigmas_type="zero" makes the last step first order to x0,
    as ours is.

    diffusers steps in float32; at t = 99, ab = 2.4e-7, reading x0 off an eps prediction divides by
    sqrt(ab) ~ 5e-4, which turns float32 rounding into ~5e-4 in x: that, not the algorithm, sets eps's
    tolerance (first-order steps in place of the second-order ones are off by up to 6e-3 here).
    """
    diffusers = pytest.importorskip("diffusers")
    atol = 1e-3 if target == "eps" else 2e-5
    diff = make(target)
    denoise = bounded_denoiser(diff)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    visited = []

    def recording(x_t, t, cond):
        visited.append(x_t)
        return denoise(x_t, t, cond)
    ours = dpmpp2m_sample(recording, diff, x_T, steps=steps, clip_x0=False)

    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=T, trained_betas=diff.schedule.betas.tolist(), prediction_type=prediction_type,
        algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")
    scheduler.set_timesteps(timesteps=respaced(T, steps))
    assert scheduler.timesteps.tolist() == respaced(T, steps)
    x, theirs = x_T, []
    for t in scheduler.timesteps:
        theirs.append(x)
        x = scheduler.step(denoise(x, t.view(1).expand(x.shape[0]), None), t, x).prev_sample
    assert len(visited) == len(theirs) == steps
    for ours_t, theirs_t in zip(visited + [ours], theirs + [x]):
        torch.testing.assert_close(ours_t, theirs_t, atol=atol, rtol=1e-5)


def test_dpmpp2m_differs_from_ddim_after_its_first_step():
    """The second-order correction is live: one step is DDIM, more steps are not."""
    diff = make("v")
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    denoise = bounded_denoiser(diff)
    assert torch.equal(dpmpp2m_sample(denoise, diff, x_T, steps=1), ddim_sample(denoise, diff, x_T, steps=1))
    assert not torch.allclose(dpmpp2m_sample(denoise, diff, x_T, steps=5), ddim_sample(denoise, diff, x_T, steps=5),
                              atol=1e-3)
