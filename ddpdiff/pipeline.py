"""Load once, generate many: a diffusion model with its diffusion, its metadata and (for prompts) its CLIP.

The sampling CLI, the evaluation and the in-training previews and metrics all generate through
`Pipeline.generate`, so the same condition and seeds give the same images in all of them. Every network
loads through `load_weights`, the one place that tells a checkpoint (or run directory) from an exported file
(`python -m ddpdiff.export`), so each accepts both.

  pipe = Pipeline.from_pretrained("celeba64.safetensors")  # or a checkpoint, or a run directory
  images = pipe.sample(["Photo of person smiling.", "Photo of person blond hair."], num=4, seed=0)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torch import nn

from . import checkpoint, clip, conditioning, config, dist, models, weights
from .conditioning import Cond
from .config import ModelConfig
from .diffusion import Diffusion
from .errors import UsageError
from .images import to_pil
from .models import ClassifierMeta, DenoiserMeta, SRMeta
from .sampling import (
    DEFAULT_GUIDANCE,
    DEFAULT_GUIDANCE_INTERVAL,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    check,
    generate,
    image_seed,
)
from .weights import Weights


class SamplingError(UsageError):
    """Sampling settings or prompts that cannot be used; the message is one line naming them."""


@dataclass(frozen=True)
class PipelineOutput:
    """What `Pipeline.__call__` returns, as a diffusers pipeline does."""
    images: list[Image.Image]


@dataclass
class Pipeline:
    model: nn.Module  # the denoiser, in eval mode
    diffusion: Diffusion
    model_cfg: ModelConfig
    meta: DenoiserMeta
    encoder: clip.Encoder | None = None  # for `encode`; None where conditions come from the shards
    source: Path | None = None  # the checkpoint or exported file it was loaded from
    step: int | None = None  # the training step of its weights
    shards: str | None = None  # the shards it was trained on (data.shards)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None, ema: bool = True,
                        encoder: bool = True, clip_pretrained: str | None = None) -> Pipeline:
        """A diffusion checkpoint (or a run directory's newest, or an exported file) with its EMA (or raw)
        weights, and unless `encoder` is False the CLIP that made its training embeddings (`clip_pretrained`
        relocates it)."""
        w = load_weights(path, DenoiserMeta, ema)
        cfg = config.from_dict(w.config)
        device = dist.default_device(device)
        enc = (clip.load_matching(w.meta.clip, w.meta.empty_prompt, str(device), clip_pretrained, where=str(w.path))
               if encoder else None)  # before the model: a mismatch is the clearer error
        model = _loaded(models.build_denoiser(cfg.model, cfg.diffusion.timesteps, w.meta), w)
        return cls(model.to(device).eval(), Diffusion(cfg.diffusion), cfg.model, w.meta, enc, w.path, w.step,
                   cfg.data.shards)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None, encoder: bool = True,
                        clip_pretrained: str | None = None) -> Pipeline:
        """The notebook's entry: an exported file (or, alike, a checkpoint or run directory's EMA weights)."""
        return cls.from_checkpoint(path, device, True, encoder, clip_pretrained)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> Pipeline:
        """Move the denoiser and its CLIP to `device` (diffusers' `pipe.to("cuda")`); returns self."""
        self.model.to(device)
        if self.encoder is not None:
            self.encoder.to(device)
        return self

    def __call__(self, prompt: str | Sequence[str], num_images_per_prompt: int = 1,
                 num_inference_steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE,
                 generator: torch.Generator | None = None, **settings) -> PipelineOutput:
        """diffusers' call: PIL images for a prompt or a list of them (`.images`, prompt-major). A `generator`
        gives its seed (`initial_seed()`), so the same generator gives the same images, those `sample` gives
        for that seed; `settings` as `generate` (sampler, eta, guidance_interval, batch_size)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        seed = generator.initial_seed() if generator is not None else 0
        images = self.sample(prompts, num_images_per_prompt, seed, steps=num_inference_steps,
                             guidance=guidance_scale, **settings)
        return PipelineOutput(to_pil(images))

    @property
    def tokens(self) -> bool:
        return models.uses_tokens(self.model_cfg)

    def encode(self, prompts: Sequence[str]) -> Cond:
        """The condition of each prompt, through the checkpoint's CLIP."""
        if not prompts:
            raise SamplingError("no prompts (pass --prompt TEXT or --prompts-file FILE)")
        if self.encoder is None:
            raise SamplingError("this pipeline was loaded without its CLIP encoder (encoder=False)")
        return conditioning.from_prompts(self.encoder, prompts, self.tokens, self.device)

    def condition(self, batch: dict) -> Cond:
        """The condition of a batch of shard samples: their stored text embeddings, whatever `data.condition`
        the model was trained with."""
        return conditioning.from_batch(batch, self.tokens, self.device)

    def autocast(self, enabled: bool = True) -> torch.autocast:
        """bf16 autocast on a GPU (samples differ by a level or two of 255 from float32, at about half the
        time); a no-op on the CPU."""
        return torch.autocast("cuda", torch.bfloat16, enabled=enabled and self.device.type == "cuda")

    def check(self, sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS, eta: float = 0.0,
              guidance_interval: Sequence[float] | None = None) -> None:
        problems = check(sampler, steps, eta, self.diffusion.T, guidance_interval)
        if problems:
            raise SamplingError("; ".join(problems))

    def generate(self, cond: Cond, seeds: Sequence[int], sampler: str = DEFAULT_SAMPLER, steps: int = DEFAULT_STEPS,
                 guidance: float = DEFAULT_GUIDANCE, eta: float = 0.0, batch_size: int = 64, progress: bool = False,
                 guidance_interval: Sequence[float] | None = DEFAULT_GUIDANCE_INTERVAL) -> torch.Tensor:
        """Image i for row i of `cond` from seeds[i]: [len(seeds), 3, H, W] in [-1, 1] on the CPU; guidance
        only for t/T in `guidance_interval` (LO, HI) when it is given (`sampling.guided`)."""
        self.check(sampler, steps, eta, guidance_interval)
        if batch_size < 1:
            raise SamplingError("--batch-size must be >= 1")
        size = self.meta.image_size
        return generate(self.model, self.diffusion, cond, seeds, (3, size, size), sampler=sampler, steps=steps,
                        eta=eta, guidance=guidance, batch_size=batch_size, progress=progress,
                        guidance_interval=guidance_interval)

    def sample(self, prompts: Sequence[str], num: int = 1, seed: int = 0, **settings) -> torch.Tensor:
        """`num` images per prompt, prompt-major: [len(prompts) * num, 3, H, W] in [-1, 1]. Image s of prompt p
        comes from `image_seed(seed, p, s)`, so a seed gives the same images again. `settings` as `generate`."""
        if num < 1:
            raise SamplingError("--num must be >= 1")
        rows = torch.arange(len(prompts), device=self.device).repeat_interleave(num)
        seeds = [image_seed(seed, p, s) for p in range(len(prompts)) for s in range(num)]
        return self.generate(conditioning.take(self.encode(prompts), rows), seeds, **settings)

    def generate_for(self, batch: dict, seed: int, **settings) -> torch.Tensor:
        """Images for shard samples (evaluation): row i of a run seeded by `seed` gets
        `image_seed(seed, index, sample)` from `batch["index"][i]` and `batch["sample"][i]` (0 without it), the
        seed the sampling CLI gives image `sample` of prompt `index`."""
        samples = batch.get("sample", [0] * len(batch["index"]))
        seeds = [image_seed(seed, i, s) for i, s in zip(batch["index"], samples)]
        return self.generate(self.condition(batch), seeds, **settings)


def load_weights(path: str | Path, kind: type, ema: bool = True) -> Weights:
    """The weights of `kind` (a `ddpdiff.models` meta class) in an exported file, or the EMA (or raw) weights of
    a checkpoint or a run directory's newest complete one: the one place that tells them apart."""
    if weights.is_exported(path):
        if not ema:
            raise SamplingError(f"{path}: an exported file holds the EMA weights only (use its checkpoint for raw)")
        return weights.read(path, kind)
    state, meta, path = checkpoint.read(path, kind)
    return Weights(state["ema" if ema else "model"], meta, state["config"], state["step"], path)


def _loaded(model: nn.Module, w: Weights) -> nn.Module:
    """`model` with `w`'s tensors (cast to its dtypes), after checking they are the tensors its meta and config
    describe: one line naming the file and the first differences, not a page of load_state_dict errors."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in w.tensors.items()}
    wrong = ([f"{n} missing" for n in expected.keys() - found.keys()]
             + [f"{n} unexpected" for n in found.keys() - expected.keys()]
             + [f"{n} is {list(found[n])}, expected {list(expected[n])}"
                for n in expected.keys() & found.keys() if found[n] != expected[n]])
    if wrong:
        raise weights.WeightsError(f"{w.path}: its tensors do not match the model its metadata describes "
                                   f"({len(wrong)} differences: {'; '.join(sorted(wrong)[:3])})")
    model.load_state_dict(w.tensors)
    return model


def load_network(path: str | Path, kind: type[SRMeta] | type[ClassifierMeta],
                 device: str | torch.device | None = None) -> tuple[nn.Module, SRMeta | ClassifierMeta, Path]:
    """The EMA weights of an SRResNet or attribute-classifier checkpoint (or run directory, or exported file),
    in eval mode, its metadata and the file."""
    w = load_weights(path, kind)
    return _loaded(models.build(w.meta), w).to(dist.default_device(device)).eval(), w.meta, w.path


@torch.no_grad()
def upsample(model: nn.Module, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Images in [-1, 1] upsampled by an SRResNet, batch by batch, returned on the CPU."""
    device = next(model.parameters()).device
    return torch.cat([model(images[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(images), batch_size)])
