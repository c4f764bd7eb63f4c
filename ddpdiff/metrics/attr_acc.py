"""attr_acc: how often the attribute classifier agrees with the attributes each prompt names or leaves out, per
attribute and the mean over the evaluated `attributes`, beside the classifier on the real val images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..celeba import ATTRIBUTES
from ..errors import UsageError
from .attributes import attribute_hits, load_classifier
from .base import Batch, Metric, MetricReport, Setup, Skip, Sums, Versus
from .spec import EvalError, EvalSpec, Setting

TRAIN_CLASSIFIER_HINT = ("attr_acc skipped: no attribute classifier; train one with `torchrun -m "
                         "ddpdiff.train_classifier --config jobs/configs/classifier.yaml` and pass its run "
                         "directory as --classifier (eval.classifier during training)")


@dataclass(frozen=True)
class AttrAccReport(MetricReport):
    mean: float  # over `attributes`
    real_mean: float
    attributes: list[str]
    num: int
    num_real: int
    per_attribute: dict[str, Versus]  # all 40

    def scalars(self) -> tuple[dict[str, float], dict[str, float]]:
        return ({"eval/attr_acc": self.mean, "eval/attr_acc_real": self.real_mean},
                {f"eval/attr_acc/{name}": v.samples for name, v in self.per_attribute.items()})

    def lines(self) -> list[str]:
        per = self.per_attribute
        return [f"attribute accuracy over {len(self.attributes)} attributes, {self.num} samples: {self.mean:.3f} "
                f"(classifier on {self.num_real} real val images: {self.real_mean:.3f})",
                *(f"  {name:<20} {per[name].samples:.3f} (real {per[name].real:.3f})" for name in self.attributes)]


class AttrAcc(Metric):
    name = "attr_acc"

    @classmethod
    def problems(cls, spec: EvalSpec, shards: Path, manifest: dict) -> list[EvalError]:
        if spec.classifier is None:
            return []
        try:
            _, meta = load_classifier(spec.classifier)
        except UsageError as e:
            return [EvalError(Setting("classifier"), f": {e}")]
        if meta.image_size != manifest["image_size"]:
            return [EvalError(Setting("classifier"), f" {spec.classifier}: trained on {meta.image_size}px images, "
                              f"but the shards hold {manifest['image_size']}px ones")]
        return []

    def __init__(self, setup: Setup):
        if setup.spec.classifier is None:
            raise Skip(TRAIN_CLASSIFIER_HINT)
        super().__init__(setup)
        self.classifier = setup.classifier

    def sums(self, images: torch.Tensor | None, batch: Batch | None) -> Sums:
        agree = attribute_hits(self.classifier, images, batch["attrs"], self.setup.spec.batch_size)
        return (torch.cat([agree.sum(0).double(), torch.tensor([float(len(agree))], dtype=torch.float64)]),)

    def report(self, samples: Sums, real: Sums | None) -> AttrAccReport:
        (gen,), (ref,) = samples, real
        g, r = gen[:-1] / gen[-1], ref[:-1] / ref[-1]
        chosen = [ATTRIBUTES.index(a) for a in self.setup.spec.attributes]
        return AttrAccReport(
            mean=g[chosen].mean().item(), real_mean=r[chosen].mean().item(),
            attributes=list(self.setup.spec.attributes), num=int(gen[-1]), num_real=int(ref[-1]),
            per_attribute={name: Versus(g[i].item(), r[i].item()) for i, name in enumerate(ATTRIBUTES)})
