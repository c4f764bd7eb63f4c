"""Train the text-conditioned diffusion model.

  python -m ddpdiff.train --config jobs/configs/smoke.yaml [--section.field value ...]
  torchrun --nproc_per_node=8 -m ddpdiff.train --config jobs/configs/celeba64.yaml

A run directory that already holds checkpoints is resumed from its newest intact one; SIGTERM or SIGUSR1
makes every rank stop at the same step and save first. Every `sample.every_steps` rank 0 draws EMA samples
for fixed validation prompts (TensorBoard, and RUN/samples/step_S.png); every `eval.every_steps` all ranks
share an evaluation (ddpdiff.metrics) of `eval.num` samples.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

from . import conditioning, data, dist, loop, metrics, models
from .config import Config
from .diffusion import Diffusion
from .images import write_png
from .models import DenoiserMeta
from .monitor import Monitor
from .pipeline import Pipeline
from .sampling import image_seed, interval_problems


def eval_spec(cfg: Config, batch_size: int = 64) -> metrics.EvalSpec:
    """The in-training evaluation's spec: `eval.*`, with the run's seed (the images `python -m ddpdiff.eval
    --seed train.seed` makes)."""
    e = cfg.eval
    return metrics.EvalSpec(metrics=tuple(e.metrics), num=e.num, classifier=e.classifier or None,
                            inception=e.inception or None, sampler=e.sampler, steps=e.steps, guidance=e.guidance,
                            guidance_interval=tuple(e.guidance_interval) or None, eta=e.eta, seed=cfg.train.seed,
                            batch_size=batch_size)


def eval_problems(cfg: Config, world_size: int, manifest: dict) -> list[str]:
    """What is wrong with the `eval` section for in-training evaluation (nothing when it is off)."""
    e, out = cfg.eval, []
    if e.every_steps < 0:
        out.append(f"eval.every_steps must be >= 0, got {e.every_steps}")
    if e.every_steps <= 0:
        return out
    if not 1 <= e.steps <= cfg.diffusion.timesteps:
        out.append(f"eval.steps {e.steps} is outside 1..{cfg.diffusion.timesteps} (diffusion.timesteps)")
    out += interval_problems(e.guidance_interval, "eval.guidance_interval")
    found = metrics.problems(eval_spec(cfg), cfg.data.shards, manifest, world_size)
    return out + [problem.worded(lambda setting: f"eval.{setting}") for problem in found]


class TrainingEval:
    """Evaluation inside diffusion training, every `eval.every_steps`; call it on every rank at every
    evaluation step.

    Each rank generates its share of `eval.num` samples with the EMA model through the same `Pipeline` and
    seeds as `python -m ddpdiff.eval --seed train.seed`, scores them, and one all-reduce per metric gathers
    the sums; rank 0 logs `eval/...` scalars. Resources (classifier, CLIP, Inception, val images) load at the
    first evaluation.
    """

    def __init__(self, cfg: Config, meta: DenoiserMeta, env: dist.Env, batch_size: int):
        self.spec, self.shards, self.meta, self.env = eval_spec(cfg, batch_size), cfg.data.shards, meta, env
        self.evaluator: metrics.Evaluator | None = None

    def __call__(self, step: int, pipe: Pipeline, monitor: Monitor) -> metrics.Report:
        env = self.env
        if self.evaluator is None:
            self.evaluator = metrics.Evaluator(self.shards, self.meta, self.spec, device=env.device, rank=env.rank,
                                               world_size=env.world_size,
                                               log=lambda msg: dist.print0(msg, file=sys.stderr))
        report = self.evaluator.run(metrics.sampler(pipe, self.spec))
        head, detail = report.scalars()
        monitor.scalars(step, head)
        monitor.scalars(step, detail, console=False)
        return report


class DiffusionTask:
    def __init__(self, cfg: Config, env: dist.Env):
        self.cfg, self.env = cfg, env
        self.diffusion = Diffusion(cfg.diffusion)
        self.manifest = data.load_manifest(cfg.data.shards)
        self.tokens = models.uses_tokens(cfg.model)
        self.val: dict | None = None
        self.eval = TrainingEval(cfg, self.metadata(), env, loop.micro_size(self))

    def loader(self) -> data.Loader:
        return loop.train_loader(self, tokens=self.tokens)

    def validate(self) -> list[str]:
        cfg, problems = self.cfg, []
        if self.tokens and not self.manifest["clip"].get("token_dim"):
            problems.append(f"model.cond={cfg.model.cond} needs per-token text states, but the shards in "
                            f"{cfg.data.shards} have none (re-shard without --no-tokens, or set model.cond=pooled)")
        else:
            problems += models.denoiser_problems(cfg.model, cfg.diffusion.timesteps, self.metadata())
        if self.tokens and cfg.data.condition != "text":
            problems.append(f"data.condition={cfg.data.condition} conditions on images, which have no token "
                            "states: use model.cond=pooled")
        if not 0 <= cfg.train.cond_drop <= 1:
            problems.append(f"train.cond_drop must be in [0, 1] (a probability), got {cfg.train.cond_drop}")
        if cfg.sample.steps > cfg.diffusion.timesteps:
            problems.append(f"sample.steps {cfg.sample.steps} exceeds diffusion.timesteps {cfg.diffusion.timesteps}")
        problems += interval_problems(cfg.sample.guidance_interval, "sample.guidance_interval")
        val = data.split_count(self.manifest, "val")
        if cfg.sample.every_steps and not 1 <= cfg.sample.num_prompts <= val:
            problems.append(f"sample.num_prompts {cfg.sample.num_prompts} is outside 1..{val} (the val split of "
                            f"{cfg.data.shards})")
        return problems + eval_problems(cfg, self.env.world_size, self.manifest)

    def build_model(self) -> nn.Module:
        model = models.build_denoiser(self.cfg.model, self.cfg.diffusion.timesteps, self.metadata())
        model.set_grad_checkpointing(self.cfg.train.grad_checkpointing)
        return model

    def describe(self, model: nn.Module) -> dict:
        return {"model": self.cfg.model.name, "params": models.count_params(model),
                "gflops_per_image": round(models.flops_per_image(model, self.manifest["image_size"]) / 1e9, 3)}

    def metadata(self) -> DenoiserMeta:
        m = self.manifest
        return DenoiserMeta(clip=m["clip"], image_size=m["image_size"], empty_prompt=m["empty_prompt"])

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        x0 = loop.as_input(batch["image"], self)
        cond = conditioning.from_batch(batch, self.tokens, self.env.device, self.cfg.data.condition, generator)
        drop = torch.rand(x0.shape[0], generator=generator, device=self.env.device) < self.cfg.train.cond_drop
        loss, per_example, t = self.diffusion.loss(lambda x_t, tt: model(x_t, tt, cond, drop), x0,
                                                   generator=generator)
        # Per-quartile sums by a one-hot product rather than boolean indexing, which would wait for the device.
        quartile = (t * 4) // self.cfg.diffusion.timesteps
        onehot = (quartile[:, None] == torch.arange(4, device=t.device)).float()
        sums, counts = (per_example.detach().float()[:, None] * onehot).sum(0), onehot.sum(0)
        return loss, {f"loss_by_t/q{q + 1}": (sums[q], counts[q]) for q in range(4)}

    def eval_due(self, step: int) -> bool:
        return loop.due(step, self.cfg.sample.every_steps) or loop.due(step, self.cfg.eval.every_steps)

    @torch.no_grad()
    def evaluate(self, step: int, model: nn.Module, monitor: Monitor) -> None:
        """Metrics on every rank at `eval.every_steps`; a grid of EMA samples for fixed validation prompts on
        rank 0 at `sample.every_steps` (the other ranks go straight on); under bf16 autocast on GPUs when
        training is mixed precision."""
        pipe = Pipeline(model, self.diffusion, self.cfg.model, self.metadata())
        with pipe.autocast(self.cfg.train.precision != "fp32"):
            if loop.due(step, self.cfg.eval.every_steps):
                self.eval(step, pipe, monitor)
            if dist.is_main() and loop.due(step, self.cfg.sample.every_steps):
                self.preview(step, pipe, monitor)

    def preview(self, step: int, pipe: Pipeline, monitor: Monitor) -> None:
        s = self.cfg.sample
        if self.val is None:
            self.val = data.read_samples(self.cfg.data.shards, split="val", n=s.num_prompts, tokens=self.tokens)
            monitor.images("samples/real", step, data.to_float(self.val["image"]))
            monitor.text("samples/prompts", step, "\n\n".join(self.val["prompt"]))
        seeds = [image_seed(self.cfg.train.seed, p) for p in range(len(self.val["prompt"]))]
        images = pipe.generate(pipe.condition(self.val), seeds, sampler=s.sampler, steps=s.steps,
                               guidance=s.guidance, eta=s.eta, batch_size=len(seeds),
                               guidance_interval=s.guidance_interval)
        monitor.images("samples/ema", step, images)
        write_png(Path(self.cfg.run.dir) / "samples" / f"step_{step:08d}.png", images, nrow=min(len(images), 8))


@record
def main(argv: list[str] | None = None) -> int:
    return loop.launch(DiffusionTask, Config, __doc__, "python -m ddpdiff.train", argv)


if __name__ == "__main__":
    sys.exit(main())
