"""held_out (issue #19): attribute pairs never shown together in training, asked for together in val prompts
that have both; the classifier says whether a sample shows both, and where one attribute is a hair colour, the
other's region (located from real images) says whether its own colour survived or the hair colour leaked into
it (`binding`). Turned on by `held_out` pairs; needs attr_acc's classifier."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .. import data
from ..celeba import ATTRIBUTES, HAIR_COLOURS
from ..images import to_uint8
from .attributes import predict
from .base import Batch, Metric, MetricReport, Setup, Skip, Sums
from .spec import EvalError, EvalSpec, Pair, Setting

REGION_IMAGES = 2000  # the first train images, which locate an attribute and give its colours
REGION_FRACTION = 0.5  # an attribute's region: where its colour change is at least this part of the largest
HELD_OUT_FIGURES = ("attr_acc", "both", "own_colour", "binding")  # the columns of `pair_sums`, then the count
HELD_OUT_SKIP = "held_out skipped: it needs attr_acc's attribute classifier (--classifier)"
# Below this share of real images with a pair seen as having both, the classifier cannot judge the pair
# (typically: it was trained on the same held-out train split and never saw the two together).
BLIND_JUDGE = 0.8


def colour_pair(pair: Pair) -> tuple[str, str] | None:
    """(the colour attribute, the other) when exactly one attribute of the pair is a hair colour, else None."""
    a, b = pair
    if (a in HAIR_COLOURS) == (b in HAIR_COLOURS):
        return None
    return (a, b) if a in HAIR_COLOURS else (b, a)


@dataclass(frozen=True)
class ColourReport:
    """A `ColourCheck` as the report gives it."""

    colour: str
    other: str
    pixels: int  # the region's size
    own: list[float]
    leak: list[float]


@dataclass(frozen=True)
class ColourCheck:
    """Where the colourless attribute of a pair shows, its own colour there, and the colour attribute's colour
    that could leak into it; all measured on real images (`colour_check`)."""

    colour: str  # the colour attribute, e.g. Blond_Hair
    other: str  # the other attribute, e.g. Mustache
    region: torch.Tensor  # bool [H, W]: where `other` shows
    own: torch.Tensor  # float64 [3]: `other`'s mean colour in `region` on real images without `colour`
    leak: torch.Tensor  # float64 [3]: `colour`'s mean colour in its own region on real images with it

    def summary(self) -> ColourReport:
        return ColourReport(self.colour, self.other, int(self.region.sum()),
                            [round(c, 1) for c in self.own.tolist()], [round(c, 1) for c in self.leak.tolist()])


def attribute_region(pixels: torch.Tensor, has: torch.Tensor, fraction: float = REGION_FRACTION) -> torch.Tensor:
    """Where an attribute shows, bool [H, W]: the pixels where the mean of the images (uint8 [N, H, W, 3]) with
    it (`has`, bool [N]) differs in colour from the mean of those without it by at least `fraction` of the
    largest such difference. Data-driven, so it finds a mustache or a hair line wherever the data draws it."""
    change = (pixels[has].double().mean(0) - pixels[~has].double().mean(0)).norm(dim=-1)
    return change >= fraction * change.max()


def region_colours(pixels: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Each image's mean colour in a region: float64 [N, 3] from uint8 [N, H, W, 3] and bool [H, W]."""
    return pixels[:, region].double().mean(1)


def colour_check(pixels: torch.Tensor, attrs: torch.Tensor, colour: str, other: str,
                 fraction: float = REGION_FRACTION) -> ColourCheck:
    """The `ColourCheck` of a pair from real images (uint8 [N, H, W, 3]) and their 0/1 attributes [N, 40].

    `other`'s region is located among the images without `colour` (so a correlation between the two does not
    move it); a ValueError names what the images lack to locate either attribute.
    """
    has_colour, has_other = (attrs[:, ATTRIBUTES.index(name)].bool() for name in (colour, other))
    plain = ~has_colour
    needed = {colour: has_colour, f"no {colour}": plain, f"{other} without {colour}": has_other & plain,
              f"neither {other} nor {colour}": ~has_other & plain}
    missing = [what for what, rows in needed.items() if not rows.any()]
    if missing:
        raise ValueError(f"no real image with {' or with '.join(missing)}")
    region = attribute_region(pixels[plain], has_other[plain], fraction)
    return ColourCheck(colour, other, region, own=region_colours(pixels[has_other & plain], region).mean(0),
                       leak=region_colours(pixels[has_colour], attribute_region(pixels, has_colour, fraction)).mean(0))


def shows_own_colour(pixels: torch.Tensor, check: ColourCheck) -> torch.Tensor:
    """Per image (uint8 [N, H, W, 3]), bool [N]: whether its mean colour in the check's region is closer to the
    attribute's own colour than to the colour attribute's (False: the colour leaked, or the attribute is not
    there)."""
    colours = region_colours(pixels, check.region)
    return (colours - check.own).norm(dim=1) < (colours - check.leak).norm(dim=1)


def pair_sums(predicted: torch.Tensor, attrs: torch.Tensor, pair: Pair, chosen: Sequence[int],
              own: torch.Tensor | None) -> torch.Tensor:
    """Sums over the images of one pair, float64 [5], in the order of HELD_OUT_FIGURES then the count:
    attribute accuracy (each image's mean over the `chosen` columns), both attributes of the pair shown,
    own colour, binding (both shown and own colour), images.

    `predicted`: the classifier's bool [N, 40]; `attrs`: the prompts' 0/1 [N, 40]; `own`: `shows_own_colour`,
    or None where no colour check applies (then binding is both)."""
    a, b = (ATTRIBUTES.index(name) for name in pair)
    accuracy = (predicted == attrs.bool())[:, list(chosen)].double().mean(1)
    both = predicted[:, a] & predicted[:, b]
    own = torch.ones_like(both) if own is None else own
    return torch.tensor([accuracy.sum().item(), both.sum().item(), own.sum().item(), (both & own).sum().item(),
                         len(both)], dtype=torch.float64)


@dataclass(frozen=True)
class PairReport:
    samples: dict[str, float]  # the figures of HELD_OUT_FIGURES (own_colour only with a colour check)
    real: dict[str, float]  # the same for the val images with the pair (the first `held_out_num`)
    num: int
    num_real: int
    colour_check: ColourReport | None


@dataclass(frozen=True)
class HeldOutReport(MetricReport):
    num: int  # samples per pair
    attributes: list[str]
    pairs: dict[str, PairReport]  # by "A+B"

    def scalars(self) -> tuple[dict[str, float], dict[str, float]]:
        """eval/held_out/A+B/FIGURE and FIGURE_real for each pair."""
        return {f"eval/held_out/{pair}/{name}{suffix}": figures[name] for pair, v in self.pairs.items()
                for figures, suffix in ((v.samples, ""), (v.real, "_real")) for name in figures}, {}

    def lines(self) -> list[str]:
        """Each figure beside its real-image ceiling."""
        lines = [f"held-out pairs ({self.num} samples each for val prompts with both; real: the val images "
                 "with the pair):"]
        for pair, v in self.pairs.items():
            figures = "  ".join(f"{name} {v.samples[name]:.3f} (real {v.real[name]:.3f})" for name in v.samples)
            lines.append(f"  {pair:<24} {figures}")
            if v.real["both"] < BLIND_JUDGE:
                lines.append(f"  {'':<24} the classifier sees both in only {v.real['both']:.0%} of the real val "
                             "images with the pair, so it cannot judge it: train it on data that has the pair")
        return lines


def pair_rows(shards: str | Path, pairs: Sequence[Pair]) -> list[list[int]]:
    """The val images having both attributes of each pair."""
    val = torch.from_numpy(data.split_attributes(shards, "val")).bool()
    return [torch.nonzero(val[:, ATTRIBUTES.index(a)] & val[:, ATTRIBUTES.index(b)]).flatten().tolist()
            for a, b in pairs]


class HeldOut(Metric):
    name = "held_out"
    named = False

    @classmethod
    def turned_on(cls, spec: EvalSpec) -> bool:
        return bool(spec.held_out)

    @classmethod
    def problems(cls, spec: EvalSpec, shards: Path, manifest: dict) -> list[EvalError]:
        if not spec.held_out:
            return []
        if spec.held_out_num < 1:
            return [EvalError(Setting("held_out_num"), f" {spec.held_out_num}: expected at least 1 sample per pair")]
        if "attr_acc" not in spec.metrics:
            return [EvalError(Setting("held_out"), " needs attr_acc in ", Setting("metrics"),
                              ": its classifier judges the pairs")]
        return [EvalError(Setting("held_out"), f" {a}+{b}: no val image of {shards} has both attributes, so no "
                          "val prompt asks for the pair")
                for (a, b), found in zip(spec.held_out, pair_rows(shards, spec.held_out)) if not found]

    def __init__(self, setup: Setup):
        """This rank's share of the pairs' samples (numbered after the `num` ordinary ones, cycling over the
        val prompts with the pair) and real images, and the pairs' colour checks."""
        if setup.spec.classifier is None:
            raise Skip(HELD_OUT_SKIP)
        super().__init__(setup)
        spec, shards, n = setup.spec, setup.shards, setup.spec.held_out_num
        self.classifier, self.pairs = setup.classifier, spec.held_out
        rows = pair_rows(shards, self.pairs)
        samples = [(k, found[j % len(found)], spec.num + k * n + j) for k, found in enumerate(rows)
                   for j in range(n)][setup.rank::setup.world_size]
        real = [(k, row) for k, found in enumerate(rows) for row in found[:n]][setup.rank::setup.world_size]
        self.samples = self.real = None
        if samples:
            self.samples = {**data.read_samples(shards, "val", rows=[r for _, r, _ in samples]),
                            "index": [i for _, _, i in samples], "pair": [k for k, _, _ in samples]}
        if real:
            self.real = {**data.read_samples(shards, "val", rows=[r for _, r in real], tokens=False),
                         "pair": [k for k, _ in real]}
        self.colour_checks = self._colour_checks()

    def _colour_checks(self) -> dict[Pair, ColourCheck]:
        """The colour check of each pair with one hair colour, from the first REGION_IMAGES train images."""
        coloured = {pair: c for pair in self.pairs if (c := colour_pair(pair))}
        if not coloured:
            return {}
        shards = self.setup.shards
        n = min(REGION_IMAGES, data.split_count(self.setup.manifest, "train"))
        reference = data.read_samples(shards, "train", n=n, tokens=False)
        pixels, checks = to_uint8(reference["image"]), {}
        for pair, (colour, other) in coloured.items():
            try:
                checks[pair] = colour_check(pixels, reference["attrs"], colour, other)
            except ValueError as e:
                raise EvalError(Setting("held_out"), f" {'+'.join(pair)}: the first {n} train images of {shards} "
                                f"cannot locate {other} and its colour: {e}") from None
        return checks

    def sums(self, images: torch.Tensor | None, batch: Batch | None) -> Sums:
        """`pair_sums` per pair: float64 [pairs, 5]."""
        sums = torch.zeros(len(self.pairs), len(HELD_OUT_FIGURES) + 1, dtype=torch.float64)
        if batch is not None:
            predicted, pixels = predict(self.classifier, images, self.setup.spec.batch_size), to_uint8(images)
            chosen = [ATTRIBUTES.index(a) for a in self.setup.spec.attributes]
            pair_of = torch.tensor(batch["pair"])
            for k, pair in enumerate(self.pairs):
                mine = pair_of == k
                check = self.colour_checks.get(pair)
                sums[k] = pair_sums(predicted[mine], batch["attrs"][mine], pair, chosen,
                                    shows_own_colour(pixels[mine], check) if check else None)
        return (sums,)

    def report(self, samples: Sums, real: Sums | None) -> HeldOutReport:
        pairs = {}
        for pair, g, r in zip(self.pairs, samples[0], real[0]):
            check = self.colour_checks.get(pair)
            names = [name for name in HELD_OUT_FIGURES if check or name != "own_colour"]
            pairs["+".join(pair)] = PairReport(
                samples={name: g[HELD_OUT_FIGURES.index(name)].item() / g[-1].item() for name in names},
                real={name: r[HELD_OUT_FIGURES.index(name)].item() / r[-1].item() for name in names},
                num=int(g[-1]), num_real=int(r[-1]), colour_check=check.summary() if check else None)
        return HeldOutReport(num=self.setup.spec.held_out_num, attributes=list(self.setup.spec.attributes),
                             pairs=pairs)

