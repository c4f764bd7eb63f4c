"""FID and KID (`ddpdiff.fid`, `python -m ddpdiff.fid`): moments, weights loading, folders, cached reference
statistics, and agreement with torch-fidelity's own runner."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ddpdiff import fid
from ddpdiff.fid import __main__ as fid_cli


def _stats(mu, cov):
    return fid.Stats(np.asarray(mu, np.float64), np.asarray(cov, np.float64), 10)


def test_identical_gaussians_are_at_distance_zero_and_shifted_means_add_the_squared_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(16, 16))
    mu, cov, shift = rng.normal(size=16), a @ a.T / 16 + 0.1 * np.eye(16), rng.normal(size=16)
    assert fid.frechet_distance(_stats(mu, cov), _stats(mu, cov)) == pytest.approx(0, abs=1e-8)
    assert fid.frechet_distance(_stats(mu, cov), _stats(mu + shift, cov)) == pytest.approx(np.sum(shift ** 2), rel=1e-7)


def test_diagonal_covariances_match_the_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    d1, d2 = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    assert fid.frechet_distance(_stats(mu1, np.diag(d1)), _stats(mu2, np.diag(d2))) == pytest.approx(expected, rel=1e-9)


def test_rank_deficient_covariances_stay_finite_and_non_negative():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(5, 32))  # 5 samples in 32 dimensions: covariance of rank 4
    y = rng.normal(size=(5, 32)) + 0.5
    a = fid.Stats.of(fid.moments(torch.from_numpy(x)))
    b = fid.Stats.of(fid.moments(torch.from_numpy(y)))
    d = fid.frechet_distance(a, b)
    assert np.isfinite(d) and d > 0
    assert fid.frechet_distance(a, a) == pytest.approx(0, abs=1e-5)  # the reference formula's rounding


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
    """A small stand-in for Inception: uint8 images -> conv, ReLU, global average pool to 8 features."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x):
        return torch.relu(self.conv(x.float() / 127.5 - 1)).mean(dim=(2, 3))


def random_inception(path):
    """torch-fidelity's Inception architecture with random (Kaiming, so finite) weights, saved in its format:
    torchvision's inception_v3 with 1008 classes has the same state-dict names and shapes."""
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    net = inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)
    torch.save(net.state_dict(), path)
    return path


def write_images(folder, n, shift, seed, size=64):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = np.clip(rng.integers(0, 200, (size, size, 3)) + shift, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return folder


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


class Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_weights_in_another_format_are_a_one_line_error(tmp_path):
    wrong = tmp_path / "wrong.pt"
    torch.save(Tiny().state_dict(), wrong)
    with pytest.raises(fid.FIDError, match=r"wrong.pt: not Inception weights in torch-fidelity's format "
                                           r"\(weights-inception-2015-12-05-6726825d.pth\): .*Missing key"):
        fid.load(wrong)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(fid.FIDError, match=r"junk.pt: cannot be read as a state dict"):
        fid.load(junk)
    code = tmp_path / "code.pt"
    torch.save({"x": Payload()}, code)
    with pytest.raises(fid.FIDError, match=r"code.pt: cannot be read as a state dict \(UnpicklingError"):
        fid.load(code)


def test_folders_are_read_as_torch_fidelity_reads_them(tmp_path):
    write_images(tmp_path / "a", 3, 0, 0)
    (tmp_path / "a" / "notes.txt").write_text("skipped")
    (tmp_path / "a" / "sub").mkdir()
    write_images(tmp_path / "a" / "sub", 2, 0, 1)  # not recursive
    Image.new("RGB", (32, 32)).save(tmp_path / "a" / "Z.JPG")
    files = fid.folder_images(tmp_path / "a")
    assert [f.name for f in files] == ["000.png", "001.png", "002.png", "Z.JPG"]
    net = Tiny()
    stats = fid.folder_stats(files, net, batch_size=3)  # a batch of mixed sizes goes image by image
    expected = torch.cat([net(torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)[None])
                          for f in files])
    assert stats.num == 4
    np.testing.assert_allclose(stats.features, expected.detach().numpy(), rtol=1e-6)


def test_unreadable_missing_and_empty_inputs_are_one_line_errors(tmp_path):
    folder = write_images(tmp_path / "a", 2, 0, 0)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(fid.FIDError, match=r"broken.png: not a readable image"):
        fid.folder_stats(fid.folder_images(folder), Tiny())
    (tmp_path / "empty").mkdir()
    with pytest.raises(fid.FIDError, match=r"empty: no images \(.png, .jpg, .jpeg\) in this folder"):
        fid.folder_images(tmp_path / "empty")
    with pytest.raises(fid.FIDError, match=r"nowhere: no such folder"):
        fid.folder_images(tmp_path / "nowhere")


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(fid.ENV, raising=False)
    weights = tmp_path / "w.pth"
    torch.save(Tiny().state_dict(), weights)
    a = write_images(tmp_path / "a", 2, 0, 0)
    cases = [([str(a), str(tmp_path / "nowhere"), "--inception", str(weights)], "nowhere: no such folder"),
             ([str(a), str(tmp_path / "x.npz"), "--inception", str(weights)], "x.npz: no such stats file"),
             ([str(a), str(a), "--inception", str(weights)], "w.pth: not Inception weights"),
             ([str(a), str(a)], "no Inception weights")]
    for argv, message in cases:
        assert fid_cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ddpdiff.fid: error: ") and message in err[0], err


def test_stats_files_round_trip_without_pickle_and_foreign_ones_are_errors(tmp_path):
    feats = torch.rand(6, 4)
    stats = fid.Stats.of(fid.moments(feats), feats, {"split": "train"})
    stats.save(tmp_path / "s.npz")
    back = fid.Stats.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    np.testing.assert_array_equal(back.features, feats.numpy())
    assert back.num == 6 and back.key == {"split": "train"}
    np.savez(tmp_path / "pytorch_fid.npz", mu=stats.mu, sigma=stats.sigma)  # pytorch-fid's layout: FID only
    only = fid.Stats.load(tmp_path / "pytorch_fid.npz")
    assert fid.frechet_distance(only, stats) == pytest.approx(0, abs=1e-9) and fid.kid(only, stats) is None
    np.savez(tmp_path / "obj.npz", mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(1))
    with pytest.raises(fid.FIDError, match=r"obj.npz: not a stats file with mu and sigma \(ValueError"):
        fid.Stats.load(tmp_path / "obj.npz")


def test_reference_stats_are_computed_once_cached_beside_the_shards_and_keyed(shards_copy, tmp_path, monkeypatch):
    from ddpdiff import data

    weights = tmp_path / "w.pth"
    weights.write_bytes(b"weights one")
    net, calls = Tiny(), []
    compute = fid.split_stats
    monkeypatch.setattr(fid, "split_stats", lambda *a, **k: calls.append(a[1:3]) or compute(*a, **k))
    stats, path = fid.reference_stats(shards_copy, "train", None, net, weights, batch_size=5)
    n_train = data.split_count(data.load_manifest(shards_copy), "train")
    assert calls == [("train", n_train)] and path.parent == shards_copy and path.is_file()
    images = data.read_samples(shards_copy, "train", n=n_train)["image"]
    with torch.no_grad():
        expected = fid.Stats.of(fid.moments(net(images)))  # uint8, as the shards hold them
    np.testing.assert_allclose(stats.mu, expected.mu, rtol=1e-5)
    np.testing.assert_allclose(stats.sigma, expected.sigma, rtol=1e-4, atol=1e-9)
    assert stats.num == n_train and stats.features.shape == (n_train, 8)
    assert stats.key["weights_sha256"] == fid.sha256_file(weights) and stats.key["size"] == 64

    again, same = fid.reference_stats(shards_copy, "train", None, net, weights)
    assert same == path and len(calls) == 1  # reused, not recomputed
    np.testing.assert_array_equal(again.sigma, stats.sigma)

    fewer, other = fid.reference_stats(shards_copy, "train", 10, net, weights)
    assert calls[-1] == ("train", 10) and other != path and fewer.num == 10
    weights.write_bytes(b"weights two")  # other weights: another file, computed anew
    _, third = fid.reference_stats(shards_copy, "train", None, net, weights)
    assert len(calls) == 3 and third not in (path, other)
    tampered = fid.Stats.load(third)
    tampered.key["count"] = 1
    tampered.save(third)  # a file under the right name with another key inside is not trusted
    fid.reference_stats(shards_copy, "train", None, net, weights)
    assert len(calls) == 4
    with pytest.raises(fid.FIDError, match=r"--fid-count 100000: split 'train' of .* has \d+ images"):
        fid.reference_stats(shards_copy, "train", 100_000, net, weights)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    return random_inception(tmp_path_factory.mktemp("inception") / "weights-inception-random.pth")


@pytest.mark.slow
def test_cli_equals_torch_fidelity_on_the_same_folders_and_weights(inception_file, tmp_path, capsys):
    """FID and KID of two differing folders, from our command line and from torch-fidelity's own runner."""
    import torch_fidelity

    a, b = write_images(tmp_path / "a", 6, 0, 0), write_images(tmp_path / "b", 6, 60, 1)
    assert fid_cli.main([str(a), str(b), "--inception", str(inception_file), "--kid-subsets", "5", "--no-progress",
                     "--save-stats", str(tmp_path / "a.npz")]) == 0
    lines = capsys.readouterr().out.splitlines()
    ours_fid, ours_kid = float(lines[0].split()[1]), float(lines[1].split()[1])
    theirs = torch_fidelity.calculate_metrics(input1=str(a), input2=str(b), fid=True, kid=True, cuda=False,
                                              feature_extractor_weights_path=str(inception_file), kid_subsets=5,
                                              kid_subset_size=6, save_cpu_ram=True, cache=False, verbose=False)
    assert theirs["frechet_inception_distance"] > 1
    assert ours_fid == pytest.approx(theirs["frechet_inception_distance"], rel=1e-5)
    assert ours_kid == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-4)
    assert "(5 subsets of 6)" in lines[1]

    assert fid_cli.main([str(tmp_path / "a.npz"), str(b), "--inception", str(inception_file), "--kid-subsets", "5",
                     "--no-progress"]) == 0  # the saved stats in place of the folder: the same figures
    assert capsys.readouterr().out.splitlines() == lines
