"""FID (`ddpdiff.fid`): the Fréchet distance against closed forms, moments summed over parts, weights loading."""

import numpy as np
import pytest
import torch
from torch import nn

from ddpdiff import fid


def _random_cov(rng, dim):
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def test_identical_gaussians_are_at_distance_zero():
    rng = np.random.default_rng(0)
    mu, cov = rng.normal(size=16), _random_cov(rng, 16)
    assert fid.frechet_distance(mu, cov, mu, cov) == pytest.approx(0, abs=1e-9)


def test_shifted_means_add_the_squared_shift():
    rng = np.random.default_rng(1)
    mu, cov, shift = rng.normal(size=16), _random_cov(rng, 16), rng.normal(size=16)
    assert fid.frechet_distance(mu, cov, mu + shift, cov) == pytest.approx(np.sum(shift ** 2), rel=1e-9)


def test_diagonal_covariances_match_the_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    d1, d2 = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(d1), mu2, np.diag(d2)) == pytest.approx(expected, rel=1e-9)


def test_non_commuting_covariances_match_the_matrix_square_root_formula():
    rng = np.random.default_rng(3)
    c1, c2 = _random_cov(rng, 6), _random_cov(rng, 6)
    w, v = np.linalg.eig(c1 @ c2)  # tr sqrtm(S1 S2) = sum sqrt(eigenvalues of S1 S2), which are real positive
    expected = np.trace(c1) + np.trace(c2) - 2 * np.sqrt(w.real).sum()
    assert fid.frechet_distance(np.zeros(6), c1, np.zeros(6), c2) == pytest.approx(expected, rel=1e-9)
    assert fid.frechet_distance(np.zeros(6), c1, np.zeros(6), c2) == pytest.approx(
        fid.frechet_distance(np.zeros(6), c2, np.zeros(6), c1), rel=1e-9)  # symmetric


def test_rank_deficient_covariances_stay_finite_and_non_negative():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(5, 32))  # 5 samples in 32 dimensions: covariance of rank 4
    y = rng.normal(size=(5, 32)) + 0.5
    a = fid.mean_cov(fid.moments(torch.from_numpy(x)))
    b = fid.mean_cov(fid.moments(torch.from_numpy(y)))
    d = fid.frechet_distance(*a, *b)
    assert np.isfinite(d) and d > 0
    assert fid.frechet_distance(*a, *a) == pytest.approx(0, abs=1e-8)


def test_moments_of_parts_sum_to_the_moments_of_the_whole():
    feats = torch.randn(30, 5, dtype=torch.float64) * 3 + 2
    whole = fid.moments(feats)
    assert torch.allclose(fid.moments(feats[:11]) + fid.moments(feats[11:]), whole)
    mu, cov = fid.mean_cov(whole)
    np.testing.assert_allclose(mu, feats.mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(feats.numpy(), rowvar=False), rtol=1e-10)
    with pytest.raises(fid.FIDError, match="at least 2 images"):
        fid.mean_cov(fid.moments(feats[:1]))


class Tiny(nn.Module):
    """A small stand-in for Inception: conv, ReLU, global average pool to 8 features."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def test_weights_come_from_the_flag_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(fid.ENV, raising=False)
    assert fid.weights_path(None) is None
    assert "pass --inception PATH or set DDPDIFF_INCEPTION_WEIGHTS" in fid.SKIP_MESSAGE
    path = tmp_path / "w.pt"
    path.write_bytes(b"")
    monkeypatch.setenv(fid.ENV, str(path))
    assert fid.weights_path(None) == path
    assert fid.weights_path(str(path)) == path
    with pytest.raises(fid.FIDError, match=r"--inception: Inception weights file not found: .*nope.pt"):
        fid.weights_path(str(tmp_path / "nope.pt"))
    monkeypatch.setenv(fid.ENV, str(tmp_path / "gone.pt"))
    with pytest.raises(fid.FIDError, match="DDPDIFF_INCEPTION_WEIGHTS: .*gone.pt"):
        fid.weights_path(None)


def test_a_small_random_network_loaded_from_a_file_gives_fid(tmp_path):
    torch.manual_seed(0)
    saved = Tiny()
    path = tmp_path / "tiny.pt"
    torch.save({**saved.state_dict(), "fc.weight": torch.zeros(3, 8)}, path)  # a head to drop
    net = fid.load(path, build=Tiny)
    assert torch.equal(net.conv.weight, saved.conv.weight) and not net.training
    a = torch.rand(12, 3, 16, 16) * 2 - 1
    b = (torch.rand(12, 3, 16, 16) * 2 - 1) * 0.3 + 0.5
    fa, fb = fid.features(net, a, batch_size=5), fid.features(net, b, batch_size=5)
    assert fa.shape == (12, 8) and fa.dtype == torch.float64
    torch.testing.assert_close(fa, saved(a).double())
    same = fid.fid_from_moments(fid.moments(fa), fid.moments(fa))
    apart = fid.fid_from_moments(fid.moments(fa), fid.moments(fb))
    assert same == pytest.approx(0, abs=1e-9) and apart > 1e-3


def test_foreign_weights_are_a_one_line_error(tmp_path):
    wrong = tmp_path / "wrong.pt"
    torch.save({"other.weight": torch.zeros(1)}, wrong)
    with pytest.raises(fid.FIDError, match=r"wrong.pt: not weights of this network"):
        fid.load(wrong, build=Tiny)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(fid.FIDError, match=r"junk.pt: cannot be read as a state dict"):
        fid.load(junk, build=Tiny)


@pytest.mark.slow
def test_inception_v3_weights_file_gives_2048_features(tmp_path):
    """The real architecture, randomly initialised and saved as torchvision's file would be (with its heads)."""
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    full = inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path / "inception.pt"
    torch.save(full.state_dict(), path)
    net = fid.load(path)
    feats = fid.features(net, torch.rand(2, 3, 64, 64) * 2 - 1)
    assert feats.shape == (2, fid.DIM) and torch.isfinite(feats).all()
