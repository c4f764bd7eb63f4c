import math

import pytest
import torch

from ddpdiff.schedule import cosine_schedule, linear_schedule, make_schedule


def reference_cosine_betas(T, s=0.008, max_beta=0.999):
    """Nichol & Dhariwal (2021) eq. 17 and the clipping of section 3.2, written out in plain Python."""
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    return [min(1 - f(i + 1) / f(i), max_beta) for i in range(T)]


@pytest.mark.parametrize("T", [1, 7, 100, 1000])
def test_cosine_matches_the_paper(T):
    sched = cosine_schedule(T)
    assert sched.betas.dtype == sched.alphas_cumprod.dtype == torch.float64
    assert sched.betas.shape == sched.alphas_cumprod.shape == (T,)
    betas = reference_cosine_betas(T)
    torch.testing.assert_close(sched.betas, torch.tensor(betas, dtype=torch.float64), rtol=1e-12, atol=0)
    alphas_cumprod = [math.prod(1 - b for b in betas[: i + 1]) for i in range(T)]
    torch.testing.assert_close(sched.alphas_cumprod, torch.tensor(alphas_cumprod, dtype=torch.float64),
                               rtol=1e-10, atol=0)


def test_cosine_clips_the_last_beta_and_follows_alpha_bar_before_it():
    sched = cosine_schedule(100)
    assert sched.betas[-1] == 0.999
    assert (sched.betas[:-1] < 0.999).all()
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    assert sched.alphas_cumprod[49].item() == pytest.approx(f(50 / 100) / f(0), rel=1e-12)


@pytest.mark.parametrize("T", [10, 100, 1000])
def test_linear_spans_the_ddpm_range_for_any_T(T):
    sched = linear_schedule(T)
    assert sched.betas.dtype == torch.float64 and sched.betas.shape == (T,)
    assert sched.betas[0].item() == pytest.approx(1e-4 * 1000 / T)
    assert sched.betas[-1].item() == pytest.approx(0.02 * 1000 / T)
    torch.testing.assert_close(sched.alphas_cumprod, torch.cumprod(1 - sched.betas, 0))


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_alphas_cumprod_decrease_inside_the_unit_interval(name):
    ab = make_schedule(name, 100).alphas_cumprod
    assert (ab > 0).all() and (ab < 1).all() and (ab[1:] < ab[:-1]).all()


def test_make_schedule_rejects_unknown_names_and_bad_T():
    with pytest.raises(ValueError, match="unknown schedule 'sigmoid'"):
        make_schedule("sigmoid", 100)
    with pytest.raises(ValueError, match="positive"):
        make_schedule("cosine", 0)
