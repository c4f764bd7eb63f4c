"""Train the attribute classifier that judges generated faces (`ddpdiff.eval`'s attr_acc).

  python -m ddpdiff.train_classifier --config jobs/configs/classifier_smoke.yaml [--section.field value ...]
  torchrun --nproc_per_node=8 -m ddpdiff.train_classifier --config jobs/configs/classifier.yaml

A small ResNet (`classifier.width`, `classifier.blocks`) learns all 40 attributes of the shards' images
with a binary cross-entropy per attribute and random horizontal flips. It runs in the same loop as the
diffusion model (DDP, precision, EMA, checkpoints, resume, TensorBoard); every `classifier.eval_every_steps`
the EMA weights are scored on the whole val split (shared over ranks): `eval/acc_mean` and `eval/acc/NAME`,
the ceiling for the attribute accuracy of generated samples. Pass the run directory to
`python -m ddpdiff.eval --classifier RUN`.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

from . import data, dist, loop, models
from .celeba import ATTRIBUTES
from .config import ClassifierTrainerConfig
from .metrics import attribute_hits
from .models import ClassifierMeta
from .monitor import Monitor


class ClassifierTask:
    def __init__(self, cfg: ClassifierTrainerConfig, env: dist.Env):
        self.cfg, self.env = cfg, env
        self.manifest = data.load_manifest(cfg.data.shards)
        self.val: tuple[torch.Tensor, torch.Tensor] | None = None

    def loader(self) -> data.Loader:
        return loop.train_loader(self, tokens=False)

    def validate(self) -> list[str]:
        cfg = self.cfg
        c, problems = cfg.classifier, []
        if c.width < 1 or not c.blocks or min(c.blocks) < 1:
            problems.append(f"classifier.width must be >= 1 and classifier.blocks a non-empty list of counts "
                            f">= 1, got {c.width} and {c.blocks}")
        if c.eval_every_steps < 0:
            problems.append(f"classifier.eval_every_steps must be >= 0, got {c.eval_every_steps}")
        val = data.split_count(self.manifest, "val")
        if c.eval_every_steps and val < self.env.world_size:
            problems.append(f"the val split of {cfg.data.shards} has {val} samples, fewer than the "
                            f"{self.env.world_size} ranks that share its evaluation; set classifier.eval_every_steps 0")
        return problems

    def build_model(self) -> nn.Module:
        return models.build(self.metadata())

    def describe(self, model: nn.Module) -> dict:
        c = self.cfg.classifier
        return {"model": ClassifierMeta.kind, "width": c.width, "blocks": "x".join(map(str, c.blocks)),
                "params": models.count_params(model)}

    def metadata(self) -> ClassifierMeta:
        c = self.cfg.classifier
        return ClassifierMeta(width=c.width, blocks=list(c.blocks), image_size=self.manifest["image_size"],
                              attributes=list(ATTRIBUTES))

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        device = self.env.device
        x = loop.as_input(batch["image"], self)
        flip = torch.rand(x.shape[0], 1, 1, 1, generator=generator, device=device) < 0.5
        x = torch.where(flip, x.flip(-1), x)  # CelebA attributes do not depend on left and right
        attrs = batch["attrs"].to(device, non_blocking=True)
        logits = model(x).float()
        correct = ((logits.detach() > 0) == attrs.bool()).sum()
        return F.binary_cross_entropy_with_logits(logits, attrs), {"train/acc": (correct, torch.tensor(attrs.numel()))}

    def eval_due(self, step: int) -> bool:
        return loop.due(step, self.cfg.classifier.eval_every_steps)

    @torch.no_grad()
    def evaluate(self, step: int, model: nn.Module, monitor: Monitor) -> None:
        """Per-attribute accuracy of the EMA weights on the val split; each rank scores its share, then one sum."""
        if self.val is None:
            val = data.read_samples(self.cfg.data.shards, split="val", n=data.split_count(self.manifest, "val"),
                                    tokens=False)
            share = slice(self.env.rank, None, self.env.world_size)
            self.val = val["image"][share], val["attrs"][share]
        images, attrs = self.val
        agree = attribute_hits(model, images, attrs, loop.micro_size(self))
        total = dist.all_sum(torch.cat([agree.sum(0), torch.tensor([float(len(agree))])]).double())
        acc = total[:-1] / total[-1]
        monitor.scalars(step, {"eval/acc_mean": acc.mean().item()})
        monitor.scalars(step, {f"eval/acc/{name}": a for name, a in zip(ATTRIBUTES, acc.tolist())}, console=False)


@record
def main(argv: list[str] | None = None) -> int:
    return loop.launch(ClassifierTask, ClassifierTrainerConfig, __doc__, "python -m ddpdiff.train_classifier", argv)


if __name__ == "__main__":
    sys.exit(main())
