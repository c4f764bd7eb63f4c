import pytest
import torch

from ddpdiff.config import DiffusionConfig
from ddpdiff.diffusion import TARGETS, Diffusion

T = 100
TARGET_NAMES = sorted(TARGETS)


def make(target="eps", gamma=0.0, schedule="cosine"):
    return Diffusion(DiffusionConfig(timesteps=T, schedule=schedule, target=target, min_snr_gamma=gamma))


def paper_terms(diff, t):
    """alpha_bar_t, alpha_bar_{t-1}, beta_t straight from the schedule, shaped to broadcast."""
    ab = diff.schedule.alphas_cumprod
    ab_t = ab[t]
    ab_prev = torch.where(t > 0, ab[(t - 1).clamp(min=0)], torch.ones_like(ab_t))
    beta = diff.schedule.betas[t]
    return [v.view(-1, 1, 1, 1) for v in (ab_t, ab_prev, beta)]


def batch(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(b, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(b, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 17, 50, 98, 99])[:b]
    return x0, eps, t


def test_q_sample_is_the_closed_form_marginal():
    diff = make()
    x0, eps, t = batch()
    ab_t, _, _ = paper_terms(diff, t)
    torch.testing.assert_close(diff.q_sample(x0, t, eps), ab_t.sqrt() * x0 + (1 - ab_t).sqrt() * eps)


def test_targets_follow_their_definitions():
    x0, eps, t = batch()
    diff = make()
    x_t = diff.q_sample(x0, t, eps)
    ab_t, ab_prev, beta = paper_terms(diff, t)
    mu = ab_prev.sqrt() * beta / (1 - ab_t) * x0 + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab_t) * x_t  # Ho eq. 7
    expected = {"eps": eps, "x0": x0, "v": ab_t.sqrt() * eps - (1 - ab_t).sqrt() * x0, "prev": mu}
    for name in TARGET_NAMES:
        torch.testing.assert_close(make(name).make_target(x0, eps, x_t, t), expected[name], msg=name)


def test_prev_target_at_t0_is_the_clean_image():
    x0, eps, _ = batch()
    t = torch.zeros(6, dtype=torch.long)
    diff = make("prev")
    torch.testing.assert_close(diff.make_target(x0, eps, diff.q_sample(x0, t, eps), t), x0)


@pytest.mark.parametrize("target", TARGET_NAMES)
def test_every_target_converts_back_to_x0_and_eps(target):
    diff = make(target)
    x0, eps, t = batch()
    x_t = diff.q_sample(x0, t, eps)
    x0_back, eps_back = diff.to_x0_eps(diff.make_target(x0, eps, x_t, t), x_t, t)
    torch.testing.assert_close(x0_back, x0, atol=1e-9, rtol=0)
    torch.testing.assert_close(eps_back, eps, atol=1e-9, rtol=0)


def test_posterior_mean_and_variance_match_ho_et_al():
    diff = make()
    x0, eps, t = batch()
    x_t = diff.q_sample(x0, t, eps)
    ab_t, ab_prev, beta = paper_terms(diff, t)
    mean, var = diff.q_posterior(x0, x_t, t)
    torch.testing.assert_close(mean, ab_prev.sqrt() * beta / (1 - ab_t) * x0
                               + (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab_t) * x_t)
    torch.testing.assert_close(var, (1 - ab_prev) / (1 - ab_t) * beta)
    assert var[0].item() == 0  # the step to the clean image adds no noise


@pytest.mark.parametrize("target", TARGET_NAMES)
def test_min_snr_weights_are_min_snr_gamma_in_x0_units(target):
    """An x0 error e is a target error sqrt(gain) e; the weight must make weight * gain = min(SNR, gamma)."""
    gamma = 5.0
    diff = make(target, gamma)
    x0, eps, t = batch()
    x_t = diff.q_sample(x0, t, eps)
    pred = diff.make_target(x0, eps, x_t, t)
    delta = 1e-3 * torch.randn_like(pred)
    x0_err = diff.to_x0_eps(pred + delta, x_t, t)[0] - diff.to_x0_eps(pred, x_t, t)[0]
    gain = delta.square().sum((1, 2, 3)) / x0_err.square().sum((1, 2, 3))
    ab = diff.schedule.alphas_cumprod[t]
    snr = ab / (1 - ab)
    weight = diff.coef("loss_weight", t, t).double()
    torch.testing.assert_close(weight * gain, snr.clamp(max=gamma), rtol=1e-6, atol=0)


def test_min_snr_weights_have_their_published_forms():
    _, _, t = batch()
    ab = make().schedule.alphas_cumprod[t]
    snr = (ab / (1 - ab)).float()
    m = snr.clamp(max=5.0)
    expected = {"eps": m / snr, "x0": m, "v": m / (snr + 1)}
    for name, w in expected.items():
        torch.testing.assert_close(make(name, 5.0).coef("loss_weight", t, t), w, msg=name)
    torch.testing.assert_close(make("v").coef("loss_weight", t, t), torch.ones(6))


def oracle(diff, x0):
    """A perfect network for a known x0: recovers the noise from x_t and returns the exact target."""
    def model_fn(x_t, t):
        ab = diff.schedule.alphas_cumprod[t].to(x_t.dtype).view(-1, 1, 1, 1)
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        return diff.make_target(x0, eps, x_t, t)
    return model_fn


@pytest.mark.parametrize("target", TARGET_NAMES)
def test_loss_is_zero_for_a_perfect_network(target):
    diff = make(target)
    x0 = batch()[0].float()
    loss, _, _ = diff.loss(oracle(diff, x0), x0, generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8


def test_eps_loss_of_predicting_zero_is_the_noise_power():
    loss, _, _ = make("eps").loss(lambda x_t, t: torch.zeros_like(x_t), torch.zeros(256, 3, 8, 8),
                                  generator=torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(1.0, abs=0.02)


def test_loss_weights_per_example_and_averages_them():
    diff = make("eps", gamma=1.0)
    x0 = torch.rand(64, 3, 4, 4) * 2 - 1
    zero = lambda x_t, t: torch.zeros_like(x_t)
    loss, per_example, t = diff.loss(zero, x0, generator=torch.Generator().manual_seed(1))
    assert per_example.shape == t.shape == (64,)
    assert loss.item() == pytest.approx(per_example.mean().item())
    weighted = make("eps", gamma=0.0).loss(zero, x0, generator=torch.Generator().manual_seed(1))[1]
    torch.testing.assert_close(per_example, weighted * diff.coef("loss_weight", t, t))
    assert not torch.allclose(per_example, weighted)


def test_timesteps_are_uniform_per_example():
    diff = make()
    _, _, t = diff.loss(lambda x_t, t: x_t, torch.zeros(20000, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(t, minlength=T).float()
    assert t.min() == 0 and t.max() == T - 1
    assert (counts - 200).abs().max() < 70  # ~5 standard deviations of Binomial(20000, 1/100)
    assert len(set(t[:50].tolist())) > 30


def test_draws_come_from_the_generator_and_ignore_the_batch_contents():
    diff = make()
    seen = []

    def model_fn(x_t, t):
        seen.append((x_t, t))
        return x_t

    for x0 in (torch.zeros(4, 3, 8, 8), torch.ones(4, 3, 8, 8)):
        diff.loss(model_fn, x0, generator=torch.Generator().manual_seed(7))
    (xa, ta), (xb, tb) = seen
    assert torch.equal(ta, tb)
    ab = diff.schedule.alphas_cumprod[ta].float().view(-1, 1, 1, 1)
    torch.testing.assert_close((xa - 0) / (1 - ab).sqrt(), (xb - ab.sqrt()) / (1 - ab).sqrt())
    diff.loss(model_fn, torch.zeros(4, 3, 8, 8), generator=torch.Generator().manual_seed(8))
    assert not torch.equal(seen[-1][0], xa)


def test_channels_last_batches_stay_channels_last():
    diff = make()
    x0 = torch.zeros(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    formats = []
    diff.loss(lambda x_t, t: formats.append(x_t.is_contiguous(memory_format=torch.channels_last)) or x_t, x0,
              generator=torch.Generator().manual_seed(0))
    assert formats == [True]
