"""Every network ddpdiff trains, built from its config or from a checkpoint's typed metadata; the denoiser
registry; the helpers that size a model (parameter count, FLOPs per image)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ..config import ModelConfig
from .classifier import AttributeResNet
from .meta import ClassifierMeta, DenoiserMeta, Meta, MetaError, SRMeta
from .srresnet import SRResNet
from .unet import UNet
from .unet_classic import UNetClassic

MODELS: dict[str, type[nn.Module]] = {"unet": UNet, "unet_classic": UNetClassic}

__all__ = ["MODELS", "AttributeResNet", "ClassifierMeta", "DenoiserMeta", "Meta", "MetaError", "SRMeta", "SRResNet",
           "build", "build_denoiser", "build_model", "count_params", "denoiser_problems", "example_inputs",
           "flop_counts", "flops_per_image", "uses_tokens"]


def uses_tokens(model_cfg: ModelConfig) -> bool:
    """Whether the configured denoiser reads per-token text states (only `unet` has cross-attention)."""
    return model_cfg.name == "unet" and model_cfg.cond != "pooled"


def build_model(model_cfg: ModelConfig, image_size: int, cond_dim: int, token_dim: int | None = None,
                null_tokens: torch.Tensor | None = None, timesteps: int = 1000) -> nn.Module:
    """The denoiser named by model_cfg.name.

    Args:
        token_dim, null_tokens: per-token text state width and the empty prompt's states [L0, Dt]
            (token-conditioned `unet` only; None otherwise).
        timesteps: the diffusion's T, so both models see the timestep on a T-independent scale
            (pass cfg.diffusion.timesteps; 1000 is the DDPM convention).
    """
    if model_cfg.name not in MODELS:
        raise ValueError(f"unknown model {model_cfg.name!r} (known: {', '.join(MODELS)})")
    return MODELS[model_cfg.name](model_cfg, image_size=image_size, cond_dim=cond_dim, token_dim=token_dim,
                                  null_tokens=null_tokens, timesteps=timesteps)


def build_denoiser(model_cfg: ModelConfig, timesteps: int, meta: DenoiserMeta) -> nn.Module:
    """The denoiser `model_cfg` names, sized for the shards `meta` describes (CLIP widths, image size, the empty
    prompt's token states as the null context)."""
    tokens = uses_tokens(model_cfg)
    null_tokens = torch.tensor(meta.empty_prompt["tokens"], dtype=torch.float32) if tokens else None
    return build_model(model_cfg, image_size=meta.image_size, cond_dim=meta.clip["dim"],
                       token_dim=meta.clip["token_dim"] if tokens else None, null_tokens=null_tokens,
                       timesteps=timesteps)


def denoiser_problems(model_cfg: ModelConfig, timesteps: int, meta: DenoiserMeta) -> list[str]:
    """The model's own checks of its config (attention at sizes it does not have, heads that do not divide the
    width, …), run by building it on the meta device: no memory, no time, the same rules."""
    try:
        with torch.device("meta"):
            build_denoiser(model_cfg, timesteps, meta)
    except ValueError as e:
        return [str(e)]
    return []


def build(meta: SRMeta | ClassifierMeta) -> nn.Module:
    """The upsampler or attribute classifier a checkpoint's meta describes."""
    if isinstance(meta, SRMeta):
        return SRResNet(scale=meta.scale, channels=meta.channels, num_blocks=meta.num_blocks)
    return AttributeResNet(width=meta.width, blocks=tuple(meta.blocks), num_attributes=len(meta.attributes))


def count_params(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def example_inputs(model: nn.Module, batch: int, image_size: int, num_tokens: int = 77,
                   ) -> tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor]:
    """Random (x_t, t, cond, drop) of the shapes `model` expects, on its device; nothing dropped."""
    device = next(model.parameters()).device
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    t = torch.zeros(batch, dtype=torch.long, device=device)
    cond = {"pooled": torch.randn(batch, model.cond_dim, device=device)}
    if model.token_dim is not None:
        cond["tokens"] = torch.randn(batch, num_tokens, model.token_dim, device=device)
        cond["mask"] = torch.ones(batch, num_tokens, dtype=torch.bool, device=device)
    return x, t, cond, torch.zeros(batch, dtype=torch.bool, device=device)


@torch.no_grad()
def flop_counts(model: nn.Module, image_size: int, num_tokens: int = 77) -> dict[str, int]:
    """Forward FLOPs for one image per module (FlopCounterMode's names: "Global", then module paths).

    Attention runs on the math backend here so its matmuls are counted on every device (the fused CPU
    kernel has no FLOP formula); the count is the same as for the fused GPU kernels.
    """
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        model(*example_inputs(model, 1, image_size, num_tokens))
    return {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}


def flops_per_image(model: nn.Module, image_size: int, num_tokens: int = 77) -> int:
    """Forward FLOPs (multiply-add = 2) for one image; token-conditioned models read `num_tokens` tokens."""
    return flop_counts(model, image_size, num_tokens)["Global"]
