import math

import pytest
import torch

from ddpdiff.config import ModelConfig
from ddpdiff.models import MODELS, build_model, count_params, flop_counts, flops_per_image
from ddpdiff.models.layers import timestep_embedding
from ddpdiff.models.unet import UNet

from conftest import overfit_losses

SIZE, D, DT, L0 = 16, 10, 12, 3


def tiny(cond="both", **kw):
    cfg = ModelConfig(name="unet", channels=16, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8],
                      cross_attn_resolutions=[16, 8], num_heads=2, cond=cond, **kw)
    torch.manual_seed(0)
    null_tokens = torch.randn(L0, DT) if cond != "pooled" else None
    model = build_model(cfg, SIZE, D, DT if cond != "pooled" else None, null_tokens, timesteps=100)
    with torch.no_grad():  # leave the zero-initialised start so conditioning visibly changes the output
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def inputs(b=4, length=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, SIZE, SIZE, generator=g)
    t = torch.randint(0, 100, (b,), generator=g)
    lengths = torch.arange(b) % length + 1
    mask = torch.arange(length)[None] < lengths[:, None]
    cond = {"pooled": torch.randn(b, D, generator=g), "tokens": torch.randn(b, length, DT, generator=g), "mask": mask}
    return x, t, cond


def no_drop(b=4):
    return torch.zeros(b, dtype=torch.bool)


def test_registry_and_shapes():
    assert MODELS["unet"] is UNet
    model = tiny()
    x, t, cond = inputs()
    y = model(x, t, cond, no_drop())
    assert y.shape == x.shape and y.dtype == torch.float32 and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="unknown model 'dit'"):
        build_model(ModelConfig(name="dit"), SIZE, D)


def test_timestep_embedding_is_sinusoidal():
    emb = timestep_embedding(torch.tensor([0, 3]), 8)
    freqs = [10000 ** (-i / 4) for i in range(4)]
    expected = [[math.cos(3 * f) for f in freqs] + [math.sin(3 * f) for f in freqs]]
    torch.testing.assert_close(emb[1:], torch.tensor(expected))
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_runs_under_autocast(dtype):
    model = tiny()
    x, t, cond = inputs()
    with torch.autocast("cpu", dtype=dtype):
        y = model(x, t, cond, torch.tensor([True, False, False, True]))
    assert y.shape == x.shape and y.dtype == dtype and torch.isfinite(y.float()).all()
    torch.testing.assert_close(y.float(), model(x, t, cond, torch.tensor([True, False, False, True])),
                               atol=0.15, rtol=0.1)


def test_padding_never_changes_the_output():
    model = tiny()
    x, t, cond = inputs()
    ref = model(x, t, cond, no_drop())
    garbage = dict(cond)
    extra = torch.full((4, 6, DT), float("nan"))
    garbage["tokens"] = torch.where(cond["mask"][..., None], cond["tokens"], 1e4)
    garbage["tokens"] = torch.cat([garbage["tokens"], extra], dim=1)  # longer padding, NaN-filled
    garbage["mask"] = torch.cat([cond["mask"], torch.zeros(4, 6, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(model(x, t, garbage, no_drop()), ref)
    changed = dict(cond, tokens=cond["tokens"].clone())
    changed["tokens"][:, 0] += 1  # a real token: the mask must not hide it
    assert not torch.allclose(model(x, t, changed, no_drop()), ref, atol=1e-4)


def test_examples_do_not_see_each_other():
    model = tiny()
    x, t, cond = inputs()
    drop = torch.tensor([False, True, False, True])
    batched = model(x, t, cond, drop)
    for i in range(4):
        one = {k: v[i:i + 1, : int(cond["mask"][i].sum())] if k != "pooled" else v[i:i + 1] for k, v in cond.items()}
        torch.testing.assert_close(model(x[i:i + 1], t[i:i + 1], one, drop[i:i + 1]), batched[i:i + 1],
                                   atol=1e-5, rtol=1e-4)


def test_dropped_examples_see_the_null_pooled_embedding_and_the_empty_prompt():
    model = tiny()
    x, t, cond = inputs()
    drop = torch.tensor([True, False, True, False])
    out = model(x, t, cond, drop)
    null = {"pooled": model.null.detach().expand(4, D), "tokens": model.null_tokens.expand(4, L0, DT),
            "mask": torch.ones(4, L0, dtype=torch.bool)}
    torch.testing.assert_close(out[drop], model(x, t, null, no_drop())[drop])
    other = {k: v + 1 if v.is_floating_point() else v for k, v in cond.items()}
    out2 = model(x, t, other, drop)
    torch.testing.assert_close(out2[drop], out[drop])
    assert not torch.allclose(out2[~drop], out[~drop])


@pytest.mark.parametrize("cond_mode, reads",
                         [("pooled", {"pooled"}), ("tokens", {"tokens"}), ("both", {"pooled", "tokens"})])
def test_cond_modes_read_what_they_say(cond_mode, reads):
    model = tiny(cond_mode)
    x, t, cond = inputs()
    ref = model(x, t, cond, no_drop())
    for key in ("pooled", "tokens"):
        out = model(x, t, dict(cond, **{key: cond[key] + 1}), no_drop())
        assert (not torch.allclose(out, ref)) == (key in reads), key
    assert (model.null is None) == (cond_mode == "tokens")


@pytest.mark.parametrize("drop", [[False] * 4, [True] * 4, [True, False, False, False]])
def test_every_parameter_gets_a_gradient_whatever_is_dropped(drop):
    """DDP without find_unused_parameters needs every parameter in the graph on every step."""
    model = tiny()
    x, t, cond = inputs()
    model(x, t, cond, torch.tensor(drop)).square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny(dropout=0.0)
    x, t, cond = inputs()
    drop = torch.tensor([True, False, False, True])

    def grads(enabled):
        model.zero_grad(set_to_none=True)
        model.set_grad_checkpointing(enabled)
        model(x, t, cond, drop).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert any(b.cross is not None for level in model.down for b in level)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_channels_last_gives_the_same_output():
    model = tiny()
    x, t, cond = inputs()
    ref = model(x, t, cond, no_drop())
    model = model.to(memory_format=torch.channels_last)
    out = model(x.contiguous(memory_format=torch.channels_last), t, cond, no_drop())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_misconfigurations_are_reported():
    cfg = ModelConfig(channels=16, channel_mult=[1, 2], cross_attn_resolutions=[4], num_heads=2)
    with pytest.raises(ValueError, match="none of this network's feature sizes"):
        build_model(cfg, SIZE, D, DT, torch.zeros(L0, DT))
    with pytest.raises(ValueError, match="use model.cond=pooled"):
        build_model(cfg, SIZE, D, None, None)


def test_flops_count_cross_attention_per_resolution():
    model = tiny()
    counts = flop_counts(model, SIZE, num_tokens=7)
    assert counts["Global"] == flops_per_image(model, SIZE, num_tokens=7) > 0
    cross = counts["UNet.down.0.0.cross"]
    c, hw = 16, SIZE * SIZE  # q, out (C x C per position), k/v (Dt -> 2C per token), QK^T and AV
    assert cross == 2 * (2 * hw * c * c + 7 * DT * 2 * c + 2 * hw * 7 * c)
    assert count_params(model) == sum(p.numel() for p in model.parameters())


def test_overfits_one_batch():
    """The diffusion loss on one fixed batch (same t and noise every step) must fall tenfold."""
    model = tiny()
    _, _, cond = inputs()
    losses = overfit_losses(model, cond, SIZE, lr=3e-3, steps=20)
    assert losses[-1] < losses[0] / 10


def test_token_states_come_padded_to_a_bucket_and_the_output_is_that_of_per_batch_padding():
    from ddpdiff import conditioning

    model = tiny()
    x, t, cond = inputs(length=5)
    batch = {"clip_text": cond["pooled"], "tokens": cond["tokens"], "token_mask": cond["mask"]}
    bucketed = conditioning.from_batch(batch, True, "cpu")
    assert bucketed["tokens"].shape[1] == bucketed["mask"].shape[1] == conditioning.TOKEN_BUCKET
    assert not bucketed["mask"][:, 5:].any() and torch.equal(bucketed["mask"][:, :5], cond["mask"])
    full = dict(cond, tokens=torch.nn.functional.pad(cond["tokens"], (0, 0, 0, 72)),
                mask=torch.nn.functional.pad(cond["mask"], (0, 72)))  # CLIP's 77
    ref = model(x, t, cond, no_drop())
    torch.testing.assert_close(model(x, t, bucketed, no_drop()), ref)
    torch.testing.assert_close(model(x, t, full, no_drop()), ref)


def test_group_norm_runs_in_the_autocast_dtype_within_its_tolerance_and_is_the_unets():
    from ddpdiff.models.layers import GroupNorm

    norm = GroupNorm(4, 16)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    reference = torch.nn.GroupNorm(4, 16)
    reference.load_state_dict(norm.state_dict())
    x = 3 + 2 * torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(norm(x), reference(x))  # fp32: nn.GroupNorm itself
    with torch.autocast("cpu", dtype=torch.bfloat16):  # CUDA's autocast would run nn.GroupNorm in float32
        out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(x), atol=0.05, rtol=0.02)  # bf16: 8 bits of mantissa
    norms = [m for m in tiny().modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(isinstance(m, GroupNorm) for m in norms)
