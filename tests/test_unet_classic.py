import pytest
import torch

from ddpdiff.config import ModelConfig
from ddpdiff.models import build_model, flops_per_image
from ddpdiff.models.unet_classic import UNetClassic

from conftest import overfit_losses

SIZE, D = 16, 10


def tiny(channels=8, channel_mult=(1, 2, 4)):
    cfg = ModelConfig(name="unet_classic", channels=channels, channel_mult=list(channel_mult))
    torch.manual_seed(0)
    model = build_model(cfg, SIZE, D, timesteps=100)
    with torch.no_grad():  # move the zero-initialised FiLM and null off zero so conditioning shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def inputs(b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 3, SIZE, SIZE, generator=g), torch.randint(0, 100, (b,), generator=g),
            {"pooled": torch.randn(b, D, generator=g)})


def test_the_original_shape_64_to_1024():
    model = build_model(ModelConfig(name="unet_classic", channels=64, channel_mult=[1, 2, 4, 8, 16]), 64, 512)
    assert isinstance(model, UNetClassic)
    assert [b.conv1.out_channels for b in model.down] == [64, 128, 256, 512, 1024]
    assert model.down[0].conv1.in_channels == 4  # RGB + the timestep band
    assert [u.kernel_size for u in model.upconv] == [(2, 2)] * 4 and model.out.kernel_size == (1, 1)
    assert [b.conv1.in_channels for b in model.up] == [1024, 512, 256, 128]  # copy-and-concatenate


def test_shapes_and_autocast():
    model = tiny()
    x, t, cond = inputs()
    assert model(x, t, cond, torch.zeros(4, dtype=torch.bool)).shape == x.shape
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            y = model(x, t, cond, torch.tensor([True, False, True, False]))
        assert y.shape == x.shape and y.dtype == dtype and torch.isfinite(y.float()).all()


def test_the_timestep_band_and_the_condition_change_the_output():
    model = tiny()
    x, t, cond = inputs()
    keep = torch.zeros(4, dtype=torch.bool)
    ref = model(x, t, cond, keep)
    assert not torch.allclose(model(x, t + 1, cond, keep), ref)
    assert not torch.allclose(model(x, t, {"pooled": cond["pooled"] + 1}, keep), ref)


def test_dropped_examples_see_the_null_embedding():
    model = tiny()
    x, t, cond = inputs()
    drop = torch.tensor([True, False, True, False])
    out = model(x, t, cond, drop)
    null = {"pooled": model.null.detach().expand(4, D)}
    torch.testing.assert_close(out[drop], model(x, t, null, torch.zeros(4, dtype=torch.bool))[drop])
    torch.testing.assert_close(model(x, t, {"pooled": cond["pooled"] * 5}, drop)[drop], out[drop])


@pytest.mark.parametrize("drop", [[False] * 4, [True] * 4])
def test_every_parameter_gets_a_gradient_whatever_is_dropped(drop):
    model = tiny()
    model(*inputs(), torch.tensor(drop)).square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny()
    x, t, cond = inputs()

    def grads(enabled):
        model.zero_grad(set_to_none=True)
        model.set_grad_checkpointing(enabled)
        model(x, t, cond, torch.tensor([True, False, False, True])).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_channels_last_and_flops():
    model = tiny()
    x, t, cond = inputs()
    ref = model(x, t, cond, torch.zeros(4, dtype=torch.bool))
    out = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last), t, cond,
                                                       torch.zeros(4, dtype=torch.bool))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    first_conv = 2 * SIZE * SIZE * 4 * 8 * 9
    assert flops_per_image(model, SIZE) > first_conv


def test_rejects_token_conditioning():
    with pytest.raises(ValueError, match="pooled embedding only"):
        build_model(ModelConfig(name="unet_classic", cond="tokens"), SIZE, D)


def test_overfits_one_batch():
    """The diffusion loss on one fixed batch (same t and noise every step) must fall tenfold."""
    model = tiny(channels=16)
    _, _, cond = inputs()
    losses = overfit_losses(model, cond, SIZE, lr=1e-3, steps=100)
    assert losses[-1] < losses[0] / 10
