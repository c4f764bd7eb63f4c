"""Train the text-conditioned diffusion model.

  python -m ddpdiff.train --config jobs/configs/smoke.yaml [--section.field value ...]
  torchrun --nproc_per_node=8 -m ddpdiff.train --config jobs/configs/celeba64.yaml

A run directory that already holds checkpoints is resumed from its newest intact one; SIGTERM or SIGUSR1
makes every rank stop at the same step and save first.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

from . import data, dist, loop
from . import eval as evaluation
from .config import Config, ConfigError
from .diffusion import Diffusion
from .models import build_model, count_params, flops_per_image
from .monitor import Monitor
from .sampling import sample


def uses_tokens(cfg: Config) -> bool:
    """Whether the configured model reads per-token text states (only `unet` has cross-attention)."""
    return cfg.model.name == "unet" and cfg.model.cond != "pooled"


def make_model(cfg: Config, manifest: dict) -> nn.Module:
    clip = manifest["clip"]
    null_tokens = None
    if uses_tokens(cfg):
        null_tokens = torch.tensor(manifest["empty_prompt"]["tokens"], dtype=torch.float32)
    try:
        return build_model(cfg.model, image_size=manifest["image_size"], cond_dim=clip["dim"],
                           token_dim=clip["token_dim"] if uses_tokens(cfg) else None, null_tokens=null_tokens,
                           timesteps=cfg.diffusion.timesteps)
    except ValueError as e:  # the model's own check of its config, e.g. attention at sizes it does not have
        raise ConfigError(str(e)) from None


def condition(batch: dict, cfg: Config, device: torch.device, generator: torch.Generator | None = None) -> dict:
    """The model's conditioning from a batch: pooled CLIP embedding (text, image or a per-example mix)."""
    pooled = batch["clip_text"].to(device)
    if cfg.data.condition == "image":
        pooled = batch["clip_image"].to(device)
    elif cfg.data.condition == "mix":
        use_image = torch.rand(pooled.shape[0], 1, generator=generator, device=device) < 0.5
        pooled = torch.where(use_image, batch["clip_image"].to(device), pooled)
    cond = {"pooled": pooled}
    if uses_tokens(cfg):
        cond["tokens"] = batch["tokens"].to(device)
        cond["mask"] = batch["token_mask"].to(device)
    return cond


class DiffusionTask:
    def __init__(self, cfg: Config, env: dist.Env):
        self.cfg, self.env = cfg, env
        self.diffusion = Diffusion(cfg.diffusion)
        self.manifest = data.load_manifest(cfg.data.shards)
        self.val = None
        self.eval = evaluation.TrainingEval(cfg, self.metadata(), env)

    def loader(self, cfg: Config, env: dist.Env) -> data.Loader:
        return data.Loader(cfg.data.shards, split="train", global_batch=cfg.train.global_batch,
                           rank=env.rank, world_size=env.world_size, seed=cfg.train.seed,
                           workers=cfg.data.workers, tokens=True if uses_tokens(cfg) else False)

    def validate(self, cfg: Config) -> list[str]:
        problems = []
        if uses_tokens(cfg) and not self.manifest["clip"].get("token_dim"):
            problems.append(f"model.cond={cfg.model.cond} needs per-token text states, but the shards in "
                            f"{cfg.data.shards} have none (re-shard without --no-tokens, or set model.cond=pooled)")
        if uses_tokens(cfg) and cfg.data.condition != "text":
            problems.append(f"data.condition={cfg.data.condition} conditions on images, which have no token "
                            "states: use model.cond=pooled")
        if cfg.sample.steps > cfg.diffusion.timesteps:
            problems.append(f"sample.steps {cfg.sample.steps} exceeds diffusion.timesteps {cfg.diffusion.timesteps}")
        return problems + evaluation.problems(cfg, self.env.world_size)

    def build_model(self, cfg: Config) -> nn.Module:
        model = make_model(cfg, self.manifest)
        model.set_grad_checkpointing(cfg.train.grad_checkpointing)
        return model

    def describe(self, model: nn.Module) -> dict:
        size = self.manifest["image_size"]
        return {"model": self.cfg.model.name, "params": count_params(model),
                "gflops_per_image": round(flops_per_image(model, size) / 1e9, 3)}

    def metadata(self) -> dict:
        return {"clip": self.manifest["clip"], "image_size": self.manifest["image_size"],
                "empty_prompt": self.manifest["empty_prompt"]}

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        device = self.env.device
        x0 = batch["image"].to(device, non_blocking=True)
        if self.cfg.train.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        cond = condition(batch, self.cfg, device, generator)
        drop = torch.rand(x0.shape[0], generator=generator, device=device) < self.cfg.train.cond_drop
        loss, per_example, t = self.diffusion.loss(lambda x_t, tt: model(x_t, tt, cond, drop), x0,
                                                   generator=generator)
        quartile = (t * 4) // self.cfg.diffusion.timesteps
        stats = {f"loss_by_t/q{q + 1}": (per_example.detach()[quartile == q].float().sum(),
                                         (quartile == q).sum()) for q in range(4)}
        return loss, stats

    @torch.no_grad()
    def evaluate(self, step: int, model: nn.Module, monitor: Monitor) -> None:
        """Metrics on every rank at `eval.every_steps`; a grid of EMA samples for fixed validation prompts on
        rank 0 at `sample.every_steps` (the other ranks go straight on)."""
        self.eval(step, model, monitor)
        s = self.cfg.sample
        if not dist.is_main() or not s.every_steps or step % s.every_steps:
            return
        if self.val is None:
            self.val = data.read_samples(self.cfg.data.shards, split="val", n=s.num_prompts,
                                         tokens=True if uses_tokens(self.cfg) else False)
            monitor.images("samples/real", step, self.val["image"])
            monitor.text("samples/prompts", step, "\n\n".join(self.val["prompt"]))
        device = self.env.device
        cond = condition(self.val, self.cfg, device)
        gen = torch.Generator(device).manual_seed(self.cfg.train.seed)
        n = len(self.val["prompt"])
        images = sample(model, cond, (n, 3, *self.val["image"].shape[-2:]), self.diffusion, sampler=s.sampler,
                        steps=s.steps, eta=s.eta, guidance=s.guidance, generator=gen)
        monitor.images("samples/ema", step, images)


@record
def main(argv: list[str] | None = None) -> int:
    return loop.launch(DiffusionTask, __doc__, "python -m ddpdiff.train", argv)


if __name__ == "__main__":
    sys.exit(main())
