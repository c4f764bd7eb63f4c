"""Train the attribute classifier that judges generated faces (`ddpdiff.eval`'s attr_acc).

  python -m ddpdiff.train_classifier --config jobs/configs/classifier_smoke.yaml [--section.field value ...]
  torchrun --nproc_per_node=8 -m ddpdiff.train_classifier --config jobs/configs/classifier.yaml

A small ResNet (`classifier.width`, `classifier.blocks`) learns all 40 attributes of the shards' images
with a binary cross-entropy per attribute and random horizontal flips. It runs in the same loop as the
diffusion model (DDP, precision, EMA, checkpoints, resume, TensorBoard); every `sample.every_steps` the EMA
weights are scored on the whole val split (shared over ranks): `eval/acc_mean` and `eval/acc/NAME`, the
ceiling for the attribute accuracy of generated samples. Pass the run directory to
`python -m ddpdiff.eval --classifier RUN`. The diffusion sections of the config are unused here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

from . import checkpoint, data, dist, loop
from .celeba import ATTRIBUTES
from .config import Config
from .models import count_params
from .models.classifier import AttributeResNet
from .monitor import Monitor

MODEL = "attr_resnet"  # meta["model"] of classifier checkpoints


class ClassifierError(ValueError):
    """A checkpoint that is not a usable attribute classifier; the message is one line naming the file."""


def build(meta: dict) -> AttributeResNet:
    """The network a checkpoint's `meta` describes (`ClassifierTask.metadata`)."""
    return AttributeResNet(width=meta["width"], blocks=tuple(meta["blocks"]), num_attributes=len(meta["attributes"]))


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[AttributeResNet, dict]:
    """The EMA classifier of a train_classifier run directory or checkpoint file, in eval mode, and its meta."""
    path = checkpoint.resolve(path)
    state = checkpoint.load(path)
    meta = state.get("meta")
    if not isinstance(meta, dict) or meta.get("model") != MODEL:
        raise ClassifierError(f"{path}: not an attribute classifier checkpoint (train one with "
                              "python -m ddpdiff.train_classifier)")
    if list(meta["attributes"]) != list(ATTRIBUTES):
        raise ClassifierError(f"{path}: the classifier predicts other attributes than the 40 CelebA ones")
    model = build(meta)
    model.load_state_dict(state["ema"])
    return model.to(device).eval(), meta


@torch.no_grad()
def hits(model: nn.Module, images: torch.Tensor, attrs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Where the classifier agrees with the 0/1 attributes: [N, 40] float, 1.0 = agrees."""
    device = next(model.parameters()).device
    out = [(model(images[i:i + batch_size].to(device)).float() > 0).cpu()
           for i in range(0, len(images), batch_size)]
    predicted = torch.cat(out) if out else torch.zeros(0, attrs.shape[1], dtype=torch.bool)
    return (predicted == attrs.bool()).float()


class ClassifierTask:
    def __init__(self, cfg: Config, env: dist.Env):
        self.cfg, self.env = cfg, env
        self.manifest = data.load_manifest(cfg.data.shards)
        self.val: tuple[torch.Tensor, torch.Tensor] | None = None

    def loader(self, cfg: Config, env: dist.Env) -> data.Loader:
        return data.Loader(cfg.data.shards, split="train", global_batch=cfg.train.global_batch,
                           rank=env.rank, world_size=env.world_size, seed=cfg.train.seed,
                           workers=cfg.data.workers, tokens=False)

    def validate(self, cfg: Config) -> list[str]:
        c, problems = cfg.classifier, []
        if c.width < 1 or not c.blocks or min(c.blocks) < 1:
            problems.append(f"classifier.width must be >= 1 and classifier.blocks a non-empty list of counts "
                            f">= 1, got {c.width} and {c.blocks}")
        val = self.manifest["splits"].get("val", {}).get("count", 0)
        if cfg.sample.every_steps and val < self.env.world_size:
            problems.append(f"the val split of {cfg.data.shards} has {val} samples, fewer than the "
                            f"{self.env.world_size} ranks that share its evaluation; set sample.every_steps 0")
        return problems

    def build_model(self, cfg: Config) -> nn.Module:
        return build(self.metadata())

    def describe(self, model: nn.Module) -> dict:
        c = self.cfg.classifier
        return {"model": MODEL, "width": c.width, "blocks": "x".join(map(str, c.blocks)),
                "params": count_params(model)}

    def metadata(self) -> dict:
        c = self.cfg.classifier
        return {"model": MODEL, "width": c.width, "blocks": list(c.blocks),
                "image_size": self.manifest["image_size"], "attributes": list(ATTRIBUTES)}

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        device = self.env.device
        x = batch["image"].to(device, non_blocking=True)
        flip = torch.rand(x.shape[0], 1, 1, 1, generator=generator, device=device) < 0.5
        x = torch.where(flip, x.flip(-1), x)  # CelebA attributes do not depend on left and right
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        attrs = batch["attrs"].to(device, non_blocking=True)
        logits = model(x).float()
        correct = ((logits.detach() > 0) == attrs.bool()).sum()
        return F.binary_cross_entropy_with_logits(logits, attrs), {"train/acc": (correct, torch.tensor(attrs.numel()))}

    @torch.no_grad()
    def evaluate(self, step: int, model: nn.Module, monitor: Monitor) -> None:
        """Per-attribute accuracy of the EMA weights on the val split; each rank scores its share, then one sum."""
        if self.val is None:
            count = self.manifest["splits"]["val"]["count"]
            val = data.read_samples(self.cfg.data.shards, split="val", n=count, tokens=False)
            share = slice(self.env.rank, None, self.env.world_size)
            self.val = val["image"][share], val["attrs"][share]
        images, attrs = self.val
        batch = self.cfg.train.micro_batch or self.cfg.train.global_batch // self.env.world_size
        agree = hits(model, images, attrs, batch)
        total = dist.all_sum(torch.cat([agree.sum(0), torch.tensor([float(len(agree))])]).double())
        acc = total[:-1] / total[-1]
        monitor.scalars(step, {"eval/acc_mean": acc.mean().item()})
        monitor.scalars(step, {f"eval/acc/{name}": a for name, a in zip(ATTRIBUTES, acc.tolist())}, console=False)


@record
def main(argv: list[str] | None = None) -> int:
    return loop.launch(ClassifierTask, __doc__, "python -m ddpdiff.train_classifier", argv)


if __name__ == "__main__":
    sys.exit(main())
