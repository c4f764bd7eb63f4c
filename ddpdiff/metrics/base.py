"""The interface every metric implements (`Metric`, `MetricReport`) and what a metric is built from (`Setup`).

A metric says what it needs (its checks, the networks it loads, the samples and real images it scores), its
sums over this rank's images, and its report from those sums added over ranks; the Evaluator does the rest.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..models import DenoiserMeta
from .attributes import load_classifier
from .spec import EvalError, EvalSpec

# Rows of shard samples as `data.read_samples` gives them (tensors and lists by key: `image`, `prompt`,
# `attrs`, `clip_text`, …), plus `index` (each sample's number, its seed) and, where a metric adds them,
# `sample` (0..K-1 per prompt) or `pair`: what `Pipeline.generate_for` reads.
Batch = dict[str, Any]
Sums = tuple[torch.Tensor, ...]  # a metric's sums over one rank's images; the Evaluator adds them over ranks


class Skip(Exception):
    """A metric whose inputs are missing; the message says how to provide them."""


@dataclass(frozen=True)
class Versus:
    """A figure of the samples beside the same figure of real images (the ceiling)."""

    samples: float
    real: float


class MetricReport(ABC):
    """A metric's part of the report: a frozen dataclass whose fields are its JSON."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @abstractmethod
    def scalars(self) -> tuple[dict[str, float], dict[str, float]]:
        """TensorBoard scalars: the headline ones, and details (logged, not printed)."""

    @abstractmethod
    def lines(self) -> list[str]:
        """The summary's lines."""


@dataclass
class Setup:
    """What every metric of one evaluation is built from: the spec, the shards, this rank's share of the val
    prompts and images, and the networks metrics share (loaded on first use)."""

    spec: EvalSpec
    shards: Path
    manifest: dict
    meta: DenoiserMeta
    device: torch.device
    rank: int
    world_size: int
    samples: Batch  # this rank's samples: r, r + world_size, … of `num`, sample i for val prompt i mod len(val)
    real: Batch  # this rank's share of the first min(num, len(val)) val images
    clip_pretrained: str | None = None  # where the checkpoint's CLIP weights are (None: as recorded)
    inception: nn.Module | None = None  # a ready feature network for fid (its reference is then not cached)
    progress: bool = False
    log: Callable[[str], None] = lambda msg: None

    @cached_property
    def classifier(self) -> nn.Module:
        """The attribute classifier of `spec.classifier` (attr_acc, held_out)."""
        return load_classifier(self.spec.classifier, self.device)[0]


class Metric(ABC):
    """One metric. Built once per evaluation setup (raising `Skip` when its inputs are missing); then, at
    every evaluation, sums over this rank's images and a report from the sums of all ranks.

    By default it scores the shared samples (`Setup.samples`) beside the shared real images (`Setup.real`); a
    metric with samples of its own sets `samples` (None where this rank has none), and `real` None where it
    has no real images (`ceiling` False: none on any rank).
    """

    name: ClassVar[str]
    ceiling: ClassVar[bool] = True  # scored on real images too (once per setup)
    named: ClassVar[bool] = True  # chosen by name in `metrics`; False: by a setting of its own (`turned_on`)

    def __init__(self, setup: Setup):
        self.setup = setup
        self.samples: Batch | None = setup.samples
        self.real: Batch | None = setup.real

    @classmethod
    def turned_on(cls, spec: EvalSpec) -> bool:
        """Whether a setting other than `metrics` asks for it."""
        return False

    @classmethod
    def problems(cls, spec: EvalSpec, shards: Path, manifest: dict) -> list[EvalError]:
        """What is wrong with the spec for this metric, before anything loads (both front ends ask)."""
        return []

    @abstractmethod
    def sums(self, images: torch.Tensor | None, batch: Batch | None) -> Sums:
        """Sums over this rank's images [N, 3, H, W] in [-1, 1] at 8-bit levels, generated for `batch` or real
        (None: this rank has none; the sums are then zeros of the same shapes)."""

    @abstractmethod
    def report(self, samples: Sums, real: Sums | None) -> MetricReport:
        """The report from the sums over all ranks of the samples and (with a ceiling) the real images."""


def take(batch: Batch, rows: list[int]) -> Batch:
    """Rows of a batch (tensors and lists alike)."""
    index = torch.tensor(rows, dtype=torch.long)
    return {k: v[index] if isinstance(v, torch.Tensor) else [v[i] for i in rows] for k, v in batch.items()}
