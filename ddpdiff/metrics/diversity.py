"""diversity: how much the samples of one prompt differ in what the prompt leaves open: the mean pairwise
distance of K samples of each of P val prompts, beside that of K real val images with the same values of the
evaluated `attributes`, and their ratio."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .. import data
from ..celeba import ATTRIBUTES
from .base import Batch, Metric, MetricReport, Setup, Skip, Sums, take
from .spec import EvalError, EvalSpec, Setting

DIVERSITY_SIZE = 16  # images are compared average-pooled to 16x16: layout and colour, not texture


def diversity(images: torch.Tensor, size: int = DIVERSITY_SIZE) -> float:
    """Mean pairwise distance of a set of images [K, 3, H, W] in [-1, 1], K >= 2: the RMS difference of the
    images average-pooled to size x size, in 8-bit levels. Pooling keeps what a prompt leaves open (face
    shape and pose, hair, background, their colours) and drops pixel texture and sampler noise, which would
    add distance without being variety; it needs no network, so the figure is deterministic and exact."""
    x = F.adaptive_avg_pool2d(images.double(), size).flatten(1)
    i, j = torch.triu_indices(len(x), len(x), 1)
    return ((x[i] - x[j]).pow(2).mean(1).sqrt().mean() * 127.5).item()


def diversity_groups(attrs: np.ndarray, columns: list[int], prompts: int, size: int) -> list[list[int]]:
    """Up to `prompts` groups of `size` rows of `attrs` [N, 40] with equal values on `columns`: the first
    `size` rows of each such group, groups in the order of their first row (so common attribute
    combinations come first, as often as the data has them). Rows are the val images' positions."""
    groups: dict[bytes, list[int]] = {}
    for row, values in enumerate(np.asarray(attrs)[:, columns]):
        groups.setdefault(values.tobytes(), []).append(row)
    return [rows[:size] for rows in groups.values() if len(rows) >= size][:prompts]


@dataclass(frozen=True)
class PromptDiversity:
    val_index: int
    prompt: str
    samples: float
    real: float


@dataclass(frozen=True)
class DiversityReport(MetricReport):
    samples: float  # the mean over the prompts
    real: float
    ratio: float
    prompts: int
    samples_per_prompt: int
    size: int
    attributes: list[str]
    per_prompt: list[PromptDiversity]

    def scalars(self) -> tuple[dict[str, float], dict[str, float]]:
        head = {"eval/diversity": self.samples, "eval/diversity_real": self.real, "eval/diversity_ratio": self.ratio}
        return head, {}

    def lines(self) -> list[str]:
        return [f"diversity over {self.prompts} prompts x {self.samples_per_prompt} samples: {self.samples:.2f} "
                f"levels (real val images of the same attributes: {self.real:.2f}), ratio {self.ratio:.3f}"]


class Diversity(Metric):
    name = "diversity"

    @classmethod
    def problems(cls, spec: EvalSpec, shards: Path, manifest: dict) -> list[EvalError]:
        if spec.diversity_prompts < 1 or spec.diversity_samples < 2:
            return [EvalError(Setting("diversity_prompts"), f" {spec.diversity_prompts} and ",
                              Setting("diversity_samples"), f" {spec.diversity_samples}: expected at least 1 prompt "
                              "and 2 samples per prompt")]
        return []

    def __init__(self, setup: Setup):
        """The prompts (the same on every rank), this rank's share of them (rank r: prompts r, r + world size, …)
        as one batch of K rows each, and their groups' real images."""
        super().__init__(setup)
        spec, shards, k = setup.spec, setup.shards, setup.spec.diversity_samples
        columns = [ATTRIBUTES.index(a) for a in spec.attributes]
        groups = diversity_groups(data.split_attributes(shards, "val"), columns, spec.diversity_prompts, k)
        if not groups:
            raise Skip(f"diversity skipped: no {k} val images of {shards} share their values of the "
                       f"{len(columns)} evaluated attributes; evaluate fewer (--attributes, e.g. visible) or lower "
                       "--diversity-samples")
        self.rows = [rows[0] for rows in groups]
        chosen = data.read_samples(shards, "val", rows=self.rows)  # every prompt, read once
        self.prompts = chosen["prompt"]
        self.mine = list(range(setup.rank, len(groups), setup.world_size))
        self.samples = self.real = None
        if self.mine:
            repeat = [p for p in self.mine for _ in range(k)]
            self.samples = {**take(chosen, repeat), "index": [self.rows[p] for p in repeat],
                            "sample": list(range(k)) * len(self.mine)}
            self.real = data.read_samples(shards, "val", rows=[r for p in self.mine for r in groups[p]])

    def sums(self, images: torch.Tensor | None, batch: Batch | None) -> Sums:
        """Diversity of each of this rank's prompts' K images (prompt-major) in its row of a zero [P] buffer:
        each row has one rank's value and zeros, so the sum over ranks is exact on any number of ranks."""
        every = torch.zeros(len(self.rows), dtype=torch.float64)
        if images is not None:
            for p, group in zip(self.mine, images.split(self.setup.spec.diversity_samples)):
                every[p] = diversity(group)
        return (every,)

    def report(self, samples: Sums, real: Sums | None) -> DiversityReport:
        (gen,), (ref,) = samples, real
        return DiversityReport(
            samples=gen.mean().item(), real=ref.mean().item(), ratio=(gen.mean() / ref.mean()).item(),
            prompts=len(gen), samples_per_prompt=self.setup.spec.diversity_samples, size=DIVERSITY_SIZE,
            attributes=list(self.setup.spec.attributes),
            per_prompt=[PromptDiversity(v, text, g, r) for v, text, g, r in
                        zip(self.rows, self.prompts, gen.tolist(), ref.tolist())])
