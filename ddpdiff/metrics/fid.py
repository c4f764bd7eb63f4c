"""fid: Fréchet Inception distance and KID between the samples and the reference statistics of a split
(default: all train images, cached beside the shards); needs local Inception weights (ddpdiff/fid)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import data, fid
from ..images import to_uint8
from .base import Batch, Metric, MetricReport, Setup, Skip, Sums
from .spec import EvalError, EvalSpec, Setting


@dataclass(frozen=True)
class Reference:
    split: str
    count: int
    stats: str | None  # the cache file (None for an injected network)


@dataclass(frozen=True)
class FIDReport(MetricReport):
    value: float
    num: int
    kid: float
    kid_std: float
    kid_subsets: int
    kid_subset_size: int
    reference: Reference

    def scalars(self) -> tuple[dict[str, float], dict[str, float]]:
        return {"eval/fid": self.value, "eval/kid": self.kid}, {}

    def lines(self) -> list[str]:
        r = self.reference
        return [f"FID: {self.value:.2f}, KID: {self.kid:.5f} ± {self.kid_std:.5f} ({self.num} samples vs "
                f"{r.count} {r.split} images" + (f", stats {r.stats})" if r.stats else ")")]


class FID(Metric):
    name = "fid"
    ceiling = False  # the reference statistics instead

    @classmethod
    def problems(cls, spec: EvalSpec, shards: Path, manifest: dict) -> list[EvalError]:
        if spec.inception and not Path(spec.inception).is_file():
            return [EvalError(Setting("inception"), f": Inception weights file not found: {spec.inception}")]
        try:
            fid.weights_path(spec.inception)
        except fid.FIDError as e:  # the environment names a missing file
            return [EvalError(str(e))]
        if spec.fid_split not in manifest["splits"]:
            return [EvalError(Setting("fid_split"), f" {spec.fid_split}: {shards} has no such split (it has "
                              f"{', '.join(manifest['splits'])})")]
        n_ref = data.split_count(manifest, spec.fid_split)
        if spec.fid_count is not None and not 2 <= spec.fid_count <= n_ref:
            return [EvalError(Setting("fid_count"), f" {spec.fid_count}: the {spec.fid_split} split of {shards} has "
                              f"{n_ref} images (at least 2 needed)")]
        return []

    def __init__(self, setup: Setup):
        super().__init__(setup)
        self.real, self.weights = None, None
        if setup.inception is not None:
            self.net = setup.inception.to(setup.device).eval()
        elif (path := fid.weights_path(setup.spec.inception)) is None:
            raise Skip(fid.SKIP_MESSAGE)
        else:
            self.net, self.weights = fid.load(path, device=setup.device), path
        self._reference: tuple[fid.Stats, Path | None] | None = None

    def sums(self, images: torch.Tensor | None, batch: Batch | None) -> Sums:
        """Feature sums, and every sample's features (for KID) in its row of a zero buffer."""
        spec = self.setup.spec
        feats = fid.features(self.net, to_uint8(images).movedim(-1, -3), spec.batch_size, self.setup.progress)
        every = torch.zeros(spec.num, feats.shape[1])
        every[batch["index"]] = feats
        return fid.moments(feats), every

    def reference(self) -> tuple[fid.Stats, Path | None]:
        """FID's reference statistics and their cache file (None for an injected network); on every rank."""
        if self._reference is None:
            s, spec = self.setup, self.setup.spec
            if self.weights is None:
                count = spec.fid_count or data.split_count(s.manifest, spec.fid_split)
                self._reference = fid.split_stats(s.shards, spec.fid_split, count, self.net, spec.batch_size), None
            else:
                self._reference = fid.reference_stats(s.shards, spec.fid_split, spec.fid_count, self.net, self.weights,
                                                      spec.batch_size, s.progress, s.log)
        return self._reference

    def report(self, samples: Sums, real: Sums | None) -> FIDReport:
        stats = fid.Stats.of(*samples)
        reference, path = self.reference()
        k = fid.kid(stats, reference)
        return FIDReport(value=fid.frechet_distance(stats, reference), num=stats.num, kid=k["value"],
                         kid_std=k["std"], kid_subsets=k["subsets"], kid_subset_size=k["subset_size"],
                         reference=Reference(self.setup.spec.fid_split, reference.num, str(path) if path else None))
