"""The Evaluator: one evaluation setup, run at many steps. It splits the samples over the ranks, builds the
metrics the spec asks for, holds their real-image ceilings and adds every metric's sums over the ranks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import clip, data, dist
from ..images import as_saved
from ..models import DenoiserMeta
from ..pipeline import Pipeline
from .base import Batch, Metric, MetricReport, Setup, Skip, Sums, take
from .registry import ALIASES, METRICS, parse_metrics
from .spec import EvalError, EvalSpec, Setting

Generate = Callable[[Batch], torch.Tensor]  # images [len(batch), 3, H, W] in [-1, 1] for a batch's prompts


def chosen(spec: EvalSpec) -> list[type[Metric]]:
    """The metrics a spec asks for, in the registry's order."""
    named = {ALIASES.get(m, m) for m in spec.metrics}
    return [metric for name, metric in METRICS.items() if name in named or metric.turned_on(spec)]


def problems(spec: EvalSpec, shards: str | Path, manifest: dict, world_size: int) -> list[EvalError]:
    """Every problem of a spec with these shards and ranks, found before anything loads (both front ends ask).
    Each metric checks the settings it reads whether or not it is asked for: a setting given is meant."""
    found = []
    if spec.metrics:  # none is allowed: the val prompts and seeds alone (tools/bench_sample.py)
        try:
            parse_metrics(spec.metrics)
        except EvalError as e:
            found.append(e)
    if spec.num < world_size:
        found.append(EvalError(Setting("num"), f" {spec.num} is less than the world size {world_size} (every rank "
                               "makes samples)"))
    n_val = data.split_count(manifest, "val")
    if n_val < world_size:
        found.append(EvalError(f"the val split of {shards} has {n_val} images, fewer than the {world_size} ranks"))
    for metric in METRICS.values():
        found += metric.problems(spec, Path(shards), manifest)
    return found


@dataclass(frozen=True)
class Report:
    """One evaluation's figures: read as typed values, serialised once (`to_dict`, the JSON report)."""

    metrics: list[str]  # the metrics asked for by name and not skipped
    skipped: dict[str, str]  # metric: the message saying how to provide its inputs
    num: int
    results: dict[str, MetricReport]  # by metric, in the registry's order

    def __getitem__(self, name: str) -> MetricReport:
        return self.results[name]

    def __contains__(self, name: str) -> bool:
        return name in self.results

    def to_dict(self) -> dict:
        return {"metrics": list(self.metrics), "skipped": dict(self.skipped), "num": self.num,
                **{name: result.to_dict() for name, result in self.results.items()}}

    def scalars(self) -> tuple[dict[str, float], dict[str, float]]:
        """TensorBoard scalars: the headline ones, and the details (per-attribute accuracies)."""
        head, detail = {}, {}
        for result in self.results.values():
            h, d = result.scalars()
            head.update(h)
            detail.update(d)
        return head, detail

    def summary(self) -> str:
        """Human-readable lines of the metrics that ran (the CLI prints them; a skipped metric's message was
        logged once, when it was skipped)."""
        return "\n".join(line for result in self.results.values() for line in result.lines())


class Evaluator:
    """One evaluation setup, loaded once and run at many steps: this rank's share of the val prompts and real
    images, the metrics (their networks and inputs), and their real-image ceilings (computed on first use, by
    all ranks).

    Rank r makes samples r, r + world_size, … (`samples["index"]`); sums over ranks give the results, so every
    rank returns the same report. A metric whose inputs are missing is skipped with a message to `log`.

    Args:
        meta: the diffusion checkpoint's metadata; the shards' embeddings must come from the same CLIP.
        clip_pretrained: where the checkpoint's CLIP weights are on an offline node (None: as recorded).
        inception: a ready feature network for fid, uint8 [B,3,H,W] -> [B,D], instead of `spec.inception`
            (its reference statistics are then not cached).
    """

    def __init__(self, shards: str | Path, meta: DenoiserMeta, spec: EvalSpec, *, clip_pretrained: str | None = None,
                 inception: nn.Module | None = None, device: str | torch.device | None = None, rank: int = 0,
                 world_size: int = 1, progress: bool = False, log: Callable[[str], None] = lambda msg: None):
        manifest = data.load_manifest(shards)
        problem = clip.mismatch(meta.clip, meta.empty_prompt, manifest["clip"], manifest["empty_prompt"])
        if problem:
            raise EvalError(f"{shards}: its embeddings do not come from the checkpoint's CLIP ({problem})")
        if found := problems(spec, shards, manifest, world_size):
            raise EvalError.joined(found)
        n_val = data.split_count(manifest, "val")
        val = data.read_samples(shards, split="val", n=min(spec.num, n_val))
        mine = list(range(rank, spec.num, world_size))
        self.samples = {**take(val, [i % n_val for i in mine]), "index": mine}
        self.setup = Setup(spec, Path(shards), manifest, meta, dist.default_device(device), rank, world_size,
                           self.samples, take(val, list(range(rank, min(spec.num, n_val), world_size))),
                           clip_pretrained, inception, progress, log)
        self.metrics: list[Metric] = []
        self.skipped: dict[str, str] = {}
        for metric in chosen(spec):
            try:
                self.metrics.append(metric(self.setup))
            except Skip as skip:
                self.skipped[metric.name] = str(skip)
                log(str(skip))
        self.names = [name for name in dict.fromkeys(ALIASES.get(m, m) for m in spec.metrics)
                      if name not in self.skipped]
        self._ceilings: dict[str, Sums] = {}

    def metric(self, name: str) -> Metric:
        return next(m for m in self.metrics if m.name == name)

    @torch.no_grad()
    def run(self, generate: Generate) -> Report:
        """The report for the images `generate(batch)` makes for this rank's samples.

        `batch` holds `index` (each sample's number), `prompt`, `attrs`, `clip_text` (and `tokens`, `token_mask`
        when the shards have them): what `Pipeline.generate_for` reads. Diversity's batch also has `sample`
        (0..K-1 per prompt, `index` the prompt's val position): K images per prompt from distinct seeds. Each
        batch is generated once however many metrics score it, and scored at 8-bit levels, as saved.
        """
        made: dict[int, torch.Tensor] = {}
        results = {}
        for metric in self.metrics:
            batch, images = metric.samples, None
            if batch is not None:
                if id(batch) not in made:
                    made[id(batch)] = as_saved(_generated(generate, batch))
                images = made[id(batch)]
            results[metric.name] = metric.report(_all_sum(metric.sums(images, batch)), self._ceiling(metric))
        return Report(list(self.names), dict(self.skipped), self.setup.spec.num, results)

    def _ceiling(self, metric: Metric) -> Sums | None:
        """The metric's sums over the real images of all ranks, computed at its first report."""
        if not metric.ceiling:
            return None
        if metric.name not in self._ceilings:
            real = metric.real
            images = None if real is None else data.to_float(real["image"])
            self._ceilings[metric.name] = _all_sum(metric.sums(images, real))
        return self._ceilings[metric.name]


def _all_sum(sums: Sums) -> Sums:
    return tuple(dist.all_sum(s) for s in sums)


def _generated(generate: Generate, batch: Batch) -> torch.Tensor:
    """`generate(batch)`, checked to be one image per prompt."""
    images = generate(batch)
    if len(images) != len(batch["prompt"]):
        raise EvalError(f"generate returned {len(images)} images for {len(batch['prompt'])} prompts")
    return images


def sampler(pipe: Pipeline, spec: EvalSpec, progress: bool = False) -> Generate:
    """The images of a batch as both front ends make them: the spec's sampler, steps, guidance and seed."""
    return lambda batch: pipe.generate_for(batch, spec.seed, sampler=spec.sampler, steps=spec.steps,
                                           guidance=spec.guidance, eta=spec.eta, batch_size=spec.batch_size,
                                           progress=progress, guidance_interval=spec.guidance_interval)
