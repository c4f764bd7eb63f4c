import pytest
import torch
import torch.nn.functional as F

from ddpdiff.models import SRResNet


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    return (10 * torch.log10(4 / (a - b).square().mean())).item()


@pytest.mark.parametrize("scale", [4, 8])
def test_upsamples_by_the_factor_into_the_image_range(scale):
    model = SRResNet(scale=scale, channels=8, num_blocks=2)
    y = model(torch.rand(2, 3, 8, 8) * 2 - 1)
    assert y.shape == (2, 3, 8 * scale, 8 * scale)
    assert y.min() >= -1 and y.max() <= 1
    assert sum(isinstance(m, torch.nn.PixelShuffle) for m in model.modules()) == scale.bit_length() - 1


def test_default_is_the_paper_network_at_x8():
    model = SRResNet()
    assert model.scale == 8
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 2 * 16 + 1
    assert sum(isinstance(m, torch.nn.PReLU) for m in model.modules()) == 1 + 16 + 3
    with pytest.raises(ValueError, match="power of two"):
        SRResNet(scale=3)


def hr_patches(n=4, size=32, seed=0):
    """Smooth colour fields with a few hard edges: detail that bicubic upsampling blurs."""
    g = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=size, mode="bicubic", align_corners=False)
    ramp = torch.linspace(-1, 1, size)
    edges = torch.sign(torch.sin(6 * (ramp[None, :] + ramp[:, None] * torch.rand(n, 1, 1, generator=g))))
    return (0.6 * smooth + 0.4 * edges[:, None]).clamp(-1, 1)


@pytest.mark.slow
def test_overfits_a_few_patches_beyond_bicubic():
    torch.manual_seed(0)
    hr = hr_patches()
    lr = F.interpolate(hr, scale_factor=0.25, mode="bicubic", antialias=True, align_corners=False)
    bicubic = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(-1, 1)
    model = SRResNet(scale=4, channels=16, num_blocks=2)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(100):
        loss = F.mse_loss(model(lr), hr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        sr = model.eval()(lr)
    assert psnr(sr, hr) > psnr(bicubic, hr) + 1
