"""Does the text condition work? Attribute accuracy, CLIP score and FID of generated images, each beside the
same figure for real val images (the ceiling a perfect model would reach), summed over ranks.

Sample i (of `num`) has the prompt, stored embeddings and attributes of val image i mod len(val):
  attr_acc    agreement of an attribute classifier (python -m ddpdiff.train_classifier) with the
              attributes each prompt names or leaves out, per attribute and the mean over `attributes`;
  clip_score  cosine between the CLIP image embedding of each image (through CLIP's own preprocessing)
              and its prompt's text embedding, with the CLIP model the checkpoint names;
  fid         Fréchet Inception distance (and KID) between the samples and the reference statistics of a
              split (default: all train images, cached beside the shards); needs local Inception weights
              (see ddpdiff/fid.py).
  diversity   how much the samples of one prompt differ in what the prompt leaves open: the mean pairwise
              distance (`diversity`) of K samples of each of P val prompts, beside that of K real val images
              with the same values of the evaluated `attributes` (`diversity_groups`), and their ratio.
A metric whose inputs are missing is skipped with a message saying how to provide them.

Held-out pairs (`held_out`, issue #19): attribute pairs never shown together in training, asked for together
in val prompts that have both; the classifier says whether a sample shows both, and where one attribute is a
hair colour, the other's region (located from real images) says whether its own colour survived or the hair
colour leaked into it (`binding`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from . import clip, data, dist, fid, synthetic
from .celeba import ATTRIBUTES, HAIR_COLOURS
from .errors import UsageError
from .images import as_saved, to_pil, to_uint8
from .models import ClassifierMeta, DenoiserMeta
from .pipeline import load_network

METRICS = ("attr_acc", "clip_score", "fid", "diversity")
TRAIN_CLASSIFIER_HINT = ("attr_acc skipped: no attribute classifier; train one with `torchrun -m "
                         "ddpdiff.train_classifier --config jobs/configs/classifier.yaml` and pass its run "
                         "directory as --classifier (eval.classifier during training)")


class EvalError(UsageError):
    """An argument or input evaluation cannot use; the message is one line naming it."""


def parse_metrics(metrics: str | Iterable[str]) -> list[str]:
    """Metric names from a list or a comma-separated string, checked against METRICS."""
    names = [m.strip() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise EvalError(f"--metrics: unknown or no metrics {unknown or names} (known: {', '.join(METRICS)})")
    return list(dict.fromkeys(names))


def parse_attributes(attributes: str | Iterable[str] | None) -> list[str]:
    """Attribute names from a list or comma-separated string; None means all 40, 'visible' synthetic.VISIBLE."""
    if attributes is None:
        return list(ATTRIBUTES)
    if isinstance(attributes, str):
        attributes = list(synthetic.VISIBLE) if attributes == "visible" else attributes.split(",")
    names = [a.strip() for a in attributes if a.strip()]
    unknown = [a for a in names if a not in ATTRIBUTES]
    if unknown or not names:
        raise EvalError(f"--attributes: unknown or no attribute names {unknown or names} (CelebA names such as "
                        "Smiling,Eyeglasses, or 'visible' for the synthetic data's drawn ones)")
    return list(dict.fromkeys(names))


def load_classifier(path: str | Path, device: str | torch.device | None = None) -> tuple[nn.Module, ClassifierMeta]:
    """The EMA attribute classifier of a train_classifier run directory or checkpoint, and its meta."""
    model, meta, _ = load_network(path, ClassifierMeta, device)
    if list(meta.attributes) != list(ATTRIBUTES):
        raise EvalError(f"{path}: the classifier predicts other attributes than the 40 CelebA ones")
    return model, meta


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The classifier's verdict on each image and attribute: bool [N, 40], True = present. Images in [-1, 1],
    or uint8 ones from the shards (converted on the device, `data.to_float`)."""
    device = next(model.parameters()).device
    out = [(model(data.to_float(images[i:i + batch_size], device)).float() > 0).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, len(ATTRIBUTES), dtype=torch.bool)


def attribute_hits(model: nn.Module, images: torch.Tensor, attrs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Where the classifier agrees with the 0/1 attributes: [N, 40] float, 1.0 = agrees."""
    return (predict(model, images, batch_size) == attrs.bool()).float()


def clip_scores(encoder: clip.Encoder, images: torch.Tensor, text_emb: np.ndarray, batch_size: int = 64,
                progress: bool = False) -> torch.Tensor:
    """Cosine between each image's CLIP embedding and its row of L2-normalised `text_emb`: float64 [N]."""
    chunks = [encoder.encode_images(to_pil(images[i:i + batch_size]))
              for i in tqdm(range(0, len(images), batch_size), desc="clip", disable=not progress)]
    image_emb = np.concatenate(chunks) if chunks else np.zeros((0, encoder.dim), np.float32)
    return torch.from_numpy((image_emb.astype(np.float64) * np.asarray(text_emb, np.float64)).sum(1))


# Held-out pairs: composition (both attributes shown) and binding (each keeps its own colour).

Pair = synthetic.Pair
REGION_IMAGES = 2000  # the first train images, which locate an attribute and give its colours
REGION_FRACTION = 0.5  # an attribute's region: where its colour change is at least this part of the largest
HELD_OUT_FIGURES = ("attr_acc", "both", "own_colour", "binding")  # the columns of `pair_sums`, then the count
HELD_OUT_SKIP = "held_out skipped: it needs attr_acc's attribute classifier (--classifier)"


def parse_held_out(pairs: str | Iterable[Sequence[str]]) -> list[Pair]:
    """Attribute pairs from "A+B,C+D" or a list of pairs (as `synthetic.parse_pairs` reads them)."""
    text = pairs if isinstance(pairs, str) else ",".join("+".join(pair) for pair in pairs)
    try:
        return list(dict.fromkeys(synthetic.parse_pairs(text)))
    except ValueError as e:
        raise EvalError(f"--held-out: {e}") from None


def colour_pair(pair: Pair) -> tuple[str, str] | None:
    """(the colour attribute, the other) when exactly one attribute of the pair is a hair colour, else None."""
    a, b = pair
    if (a in HAIR_COLOURS) == (b in HAIR_COLOURS):
        return None
    return (a, b) if a in HAIR_COLOURS else (b, a)


@dataclass(frozen=True)
class ColourCheck:
    """Where the colourless attribute of a pair shows, its own colour there, and the colour attribute's colour
    that could leak into it; all measured on real images (`colour_check`)."""

    colour: str  # the colour attribute, e.g. Blond_Hair
    other: str  # the other attribute, e.g. Mustache
    region: torch.Tensor  # bool [H, W]: where `other` shows
    own: torch.Tensor  # float64 [3]: `other`'s mean colour in `region` on real images without `colour`
    leak: torch.Tensor  # float64 [3]: `colour`'s mean colour in its own region on real images with it

    def to_dict(self) -> dict:
        return {"colour": self.colour, "other": self.other, "pixels": int(self.region.sum()),
                "own": [round(c, 1) for c in self.own.tolist()], "leak": [round(c, 1) for c in self.leak.tolist()]}


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


def _take(batch: dict, rows: list[int]) -> dict:
    """Rows of a batch from `data.read_samples` (tensors and lists alike)."""
    index = torch.tensor(rows, dtype=torch.long)
    return {k: v[index] if isinstance(v, torch.Tensor) else [v[i] for i in rows] for k, v in batch.items()}


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


class Evaluator:
    """One evaluation setup, loaded once and run at many steps: this rank's share of the val prompts and
    real images, the classifier, CLIP and Inception, the real-image ceilings and FID's reference statistics
    (computed on first use, by all ranks).

    Rank r makes samples r, r + world_size, … (`samples["index"]`); sums over ranks give the results, so every
    rank returns the same report.

    Args:
        meta: the diffusion checkpoint's metadata; the shards' embeddings must come from the same CLIP.
        classifier: train_classifier run directory or checkpoint; None skips attr_acc with a message.
        inception: Inception weights file (None: DDPDIFF_INCEPTION_WEIGHTS or skip fid), or a ready
            feature network, uint8 [B,3,H,W] -> [B,D] (its reference statistics are then not cached).
        fid_split, fid_count: FID's reference: the first `fid_count` images of `fid_split` (None: all).
        diversity_prompts, diversity_samples: diversity's P prompts and K samples (and real images) each.
        encoder: the CLIP encoder for clip_score when the caller has it loaded already.
        held_out: attribute pairs ("A+B,C+D" or a list) to test for composition and binding: `held_out_num`
            samples per pair for the val prompts having both (cycling), numbered after the `num` ordinary
            ones (so their seeds differ), rank r taking r, r + world_size, … of all pairs' samples in turn;
            their ceiling is the val images with the pair. Needs attr_acc's classifier.
        log: where skip messages go (the CLI keeps stdout for the JSON report).
    """

    def __init__(self, shards: str | Path, meta: DenoiserMeta, metrics: Iterable[str], num: int, *,
                 classifier: str | Path | None = None, attributes: Iterable[str] | str | None = None,
                 inception: str | Path | nn.Module | None = None, device: str | torch.device | None = None,
                 batch_size: int = 64, clip_pretrained: str | None = None, encoder: clip.Encoder | None = None,
                 fid_split: str = "train", fid_count: int | None = None,
                 held_out: str | Iterable[Sequence[str]] | None = None, held_out_num: int = 32,
                 diversity_prompts: int = 8, diversity_samples: int = 8,
                 rank: int = 0, world_size: int = 1, progress: bool = False,
                 log: Callable[[str], None] = lambda msg: None):
        # No metrics is allowed here (the val prompts and seeds alone, as tools/bench_sample.py times them);
        # command lines ask for at least one through parse_metrics.
        metrics = list(metrics)
        self.metrics, self.attributes = parse_metrics(metrics) if metrics else [], parse_attributes(attributes)
        self.device = dist.default_device(device)
        self.batch_size, self.progress, self.num, self.skipped = batch_size, progress, num, {}
        self.shards, self.fid_split, self.fid_count, self.log = shards, fid_split, fid_count, log
        self.inception_file: Path | None = None
        manifest = data.load_manifest(shards)
        problem = clip.mismatch(meta.clip, meta.empty_prompt, manifest["clip"], manifest["empty_prompt"])
        if problem:
            raise EvalError(f"{shards}: its embeddings do not come from the checkpoint's CLIP ({problem})")
        n_val = data.split_count(manifest, "val")
        if "fid" in self.metrics:
            if fid_split not in manifest["splits"]:
                raise EvalError(f"--fid-split {fid_split}: {shards} has no such split (it has "
                                f"{', '.join(manifest['splits'])})")
            n_ref = data.split_count(manifest, fid_split)
            if fid_count is not None and not 2 <= fid_count <= n_ref:
                raise EvalError(f"--fid-count {fid_count}: the {fid_split} split of {shards} has {n_ref} images "
                                "(at least 2 needed)")
        if not world_size <= num or not world_size <= n_val:
            raise EvalError(f"--num {num} and the val split of {shards} ({n_val} images) must both be at least "
                            f"the number of ranks ({world_size})")
        val = data.read_samples(shards, split="val", n=min(num, n_val))
        mine = list(range(rank, num, world_size))
        self.samples = {**_take(val, [i % n_val for i in mine]), "index": mine}
        self.real = _take(val, list(range(rank, min(num, n_val), world_size)))

        if "attr_acc" in self.metrics and classifier is None:
            self._skip("attr_acc", TRAIN_CLASSIFIER_HINT, log)
        elif "attr_acc" in self.metrics:
            self.classifier, cmeta = load_classifier(classifier, self.device)
            if cmeta.image_size != meta.image_size:
                raise EvalError(f"--classifier {classifier}: trained on {cmeta.image_size}px images, but the "
                                f"checkpoint makes {meta.image_size}px samples")
        if "clip_score" in self.metrics:
            self.encoder = encoder or clip.load_matching(meta.clip, meta.empty_prompt, str(self.device),
                                                         clip_pretrained)
            self.samples["text_emb"] = self.encoder.encode_texts(self.samples["prompt"])
            self.real["text_emb"] = self.encoder.encode_texts(self.real["prompt"])
        if "fid" in self.metrics:
            if isinstance(inception, nn.Module):
                self.inception = inception.to(self.device).eval()
            elif (path := fid.weights_path(inception)) is None:
                self._skip("fid", fid.SKIP_MESSAGE, log)
            else:
                self.inception, self.inception_file = fid.load(path, device=self.device), path
        self._held_out_setup(shards, manifest, held_out, held_out_num, rank, world_size, log)
        if "diversity" in self.metrics:
            self._diversity_setup(diversity_prompts, diversity_samples, rank, world_size)
        self._real_sums: dict[str, torch.Tensor] | None = None
        self._reference: tuple[fid.Stats, Path | None] | None = None

    def _held_out_setup(self, shards: str | Path, manifest: dict, held_out: str | Iterable[Sequence[str]] | None,
                        num: int, rank: int, world_size: int, log: Callable[[str], None]) -> None:
        """This rank's share of the held-out pairs' samples and real images, and the pairs' colour checks."""
        self.held_out, self.held_out_num = (parse_held_out(held_out) if held_out is not None else []), num
        self.held_out_samples = self.held_out_real = None
        self.colour_checks: dict[Pair, ColourCheck] = {}
        self._held_out_real_sums: torch.Tensor | None = None
        if not self.held_out:
            return
        if num < 1:
            raise EvalError(f"--held-out-num {num}: expected at least 1 sample per pair")
        if "attr_acc" not in self.metrics:
            if "attr_acc" not in self.skipped:
                raise EvalError("--held-out needs attr_acc in --metrics: its classifier judges the pairs")
            self.held_out = []
            self.skipped["held_out"] = HELD_OUT_SKIP
            log(HELD_OUT_SKIP)
            return
        val = torch.from_numpy(data.split_attributes(shards, "val")).bool()
        rows = [torch.nonzero(val[:, ATTRIBUTES.index(a)] & val[:, ATTRIBUTES.index(b)]).flatten().tolist()
                for a, b in self.held_out]
        for (a, b), found in zip(self.held_out, rows):
            if not found:
                raise EvalError(f"--held-out {a}+{b}: no val image of {shards} has both attributes, so no val prompt "
                                "asks for the pair")
        samples = [(k, found[j % len(found)], self.num + k * num + j) for k, found in enumerate(rows)
                   for j in range(num)][rank::world_size]
        real = [(k, row) for k, found in enumerate(rows) for row in found[:num]][rank::world_size]
        if samples:
            self.held_out_samples = {**data.read_samples(shards, "val", rows=[r for _, r, _ in samples]),
                                     "index": [i for _, _, i in samples], "pair": [k for k, _, _ in samples]}
        if real:
            self.held_out_real = {**data.read_samples(shards, "val", rows=[r for _, r in real], tokens=False),
                                  "pair": [k for k, _ in real]}
        coloured = {pair: c for pair in self.held_out if (c := colour_pair(pair))}
        if coloured:
            n = min(REGION_IMAGES, data.split_count(manifest, "train"))
            reference = data.read_samples(shards, "train", n=n, tokens=False)
            pixels = to_uint8(reference["image"])
            for pair, (colour, other) in coloured.items():
                try:
                    self.colour_checks[pair] = colour_check(pixels, reference["attrs"], colour, other)
                except ValueError as e:
                    raise EvalError(f"--held-out {'+'.join(pair)}: the first {n} train images of {shards} cannot "
                                    f"locate {other} and its colour: {e}") from None

    def _held_out_sums(self, images: torch.Tensor | None, batch: dict | None) -> torch.Tensor:
        """`pair_sums` per held-out pair of this rank's images (None: it has none), reduced over all ranks:
        float64 [pairs, 5]."""
        sums = torch.zeros(len(self.held_out), len(HELD_OUT_FIGURES) + 1, dtype=torch.float64)
        if batch is not None:
            predicted, pixels = predict(self.classifier, images, self.batch_size), to_uint8(images)
            chosen = [ATTRIBUTES.index(a) for a in self.attributes]
            pair_of = torch.tensor(batch["pair"])
            for k, pair in enumerate(self.held_out):
                mine = pair_of == k
                check = self.colour_checks.get(pair)
                sums[k] = pair_sums(predicted[mine], batch["attrs"][mine], pair, chosen,
                                    shows_own_colour(pixels[mine], check) if check else None)
        return dist.all_sum(sums)

    def _held_out_report(self, generate: Callable[[dict], torch.Tensor]) -> dict:
        batch = self.held_out_samples
        images = None if batch is None else as_saved(_generated(generate, batch))
        gen = self._held_out_sums(images, batch)
        if self._held_out_real_sums is None:
            real = self.held_out_real
            self._held_out_real_sums = self._held_out_sums(None if real is None else real["image"], real)
        pairs = {}
        for pair, g, r in zip(self.held_out, gen, self._held_out_real_sums):
            check = self.colour_checks.get(pair)
            names = [name for name in HELD_OUT_FIGURES if check or name != "own_colour"]
            pairs["+".join(pair)] = {
                "samples": {name: g[HELD_OUT_FIGURES.index(name)].item() / g[-1].item() for name in names},
                "real": {name: r[HELD_OUT_FIGURES.index(name)].item() / r[-1].item() for name in names},
                "num": int(g[-1]), "num_real": int(r[-1]), "colour_check": check.to_dict() if check else None}
        return {"num": self.held_out_num, "attributes": self.attributes, "pairs": pairs}

    def _diversity_setup(self, prompts: int, samples: int, rank: int, world_size: int) -> None:
        """Diversity's prompts (the same on every rank), this rank's share of them (rank r: prompts r,
        r + world size, …) as one batch of K rows each, and their groups' real images."""
        if prompts < 1 or samples < 2:
            raise EvalError(f"--diversity-prompts {prompts} and --diversity-samples {samples}: expected at least "
                            "1 prompt and 2 samples per prompt")
        columns = [ATTRIBUTES.index(a) for a in self.attributes]
        groups = diversity_groups(data.split_attributes(self.shards, "val"), columns, prompts, samples)
        if not groups:
            self._skip("diversity", f"diversity skipped: no {samples} val images of {self.shards} share their values "
                       f"of the {len(columns)} evaluated attributes; evaluate fewer (--attributes, e.g. visible) or "
                       "lower --diversity-samples", self.log)
            return
        self.diversity_size, self.diversity_rows = samples, [rows[0] for rows in groups]
        chosen = data.read_samples(self.shards, "val", rows=self.diversity_rows)  # every prompt, read once
        self.diversity_prompts = chosen["prompt"]
        self.diversity_mine = list(range(rank, len(groups), world_size))
        self.diversity_batch, self.diversity_real = None, torch.zeros(0)
        if self.diversity_mine:
            repeat = [p for p in self.diversity_mine for _ in range(samples)]
            self.diversity_batch = {**_take(chosen, repeat), "index": [self.diversity_rows[p] for p in repeat],
                                    "sample": list(range(samples)) * len(self.diversity_mine)}
            self.diversity_real = data.to_float(data.read_samples(
                self.shards, "val", rows=[r for p in self.diversity_mine for r in groups[p]])["image"])
        self._diversity_real_sums: torch.Tensor | None = None

    def _diversity_sums(self, images: torch.Tensor) -> torch.Tensor:
        """Diversity of each of this rank's prompts' K images (prompt-major) in its row of a zero [P] buffer,
        all-reduced: each row has one rank's value and zeros, so the sum is exact on any number of ranks."""
        every = torch.zeros(len(self.diversity_rows), dtype=torch.float64)
        for p, group in zip(self.diversity_mine, images.split(self.diversity_size)):
            every[p] = diversity(group)
        return dist.all_sum(every)

    def _diversity_report(self, generate: Callable[[dict], torch.Tensor]) -> dict:
        """Diversity of this rank's samples from `generate`, reduced over ranks, beside the real images'."""
        if self._diversity_real_sums is None:
            self._diversity_real_sums = self._diversity_sums(self.diversity_real)
        images = torch.zeros(0)
        if self.diversity_batch is not None:
            images = as_saved(_generated(generate, self.diversity_batch))  # 8-bit, as saved and as the real ones
        gen, real = self._diversity_sums(images), self._diversity_real_sums
        return {"samples": gen.mean().item(), "real": real.mean().item(), "ratio": (gen.mean() / real.mean()).item(),
                "prompts": len(gen), "samples_per_prompt": self.diversity_size, "size": DIVERSITY_SIZE,
                "attributes": self.attributes,
                "per_prompt": [{"val_index": v, "prompt": text, "samples": g, "real": r} for v, text, g, r in
                               zip(self.diversity_rows, self.diversity_prompts, gen.tolist(), real.tolist())]}

    def _skip(self, metric: str, message: str, log: Callable[[str], None]) -> None:
        self.metrics.remove(metric)
        self.skipped[metric] = message
        log(message)

    def _sums(self, images: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """Per-metric sums over this rank's images, reduced over all ranks (same order on every rank)."""
        sums = {}
        if "attr_acc" in self.metrics:
            agree = attribute_hits(self.classifier, images, batch["attrs"], self.batch_size)
            sums["attr_acc"] = torch.cat([agree.sum(0).double(),
                                          torch.tensor([float(len(agree))], dtype=torch.float64)])
        if "clip_score" in self.metrics:
            scores = clip_scores(self.encoder, images, batch["text_emb"], self.batch_size, self.progress)
            sums["clip_score"] = torch.stack([scores.sum(), torch.tensor(float(len(scores)), dtype=torch.float64)])
        return {k: dist.all_sum(v) for k, v in sums.items()}

    def _fid_stats(self, images: torch.Tensor) -> fid.Stats:
        """The samples' FID statistics over all ranks: feature sums all-reduced, and every sample's features
        (for KID) in its row of a zero buffer, all-reduced."""
        feats = fid.features(self.inception, to_uint8(images).movedim(-1, -3), self.batch_size, self.progress)
        every = torch.zeros(self.num, feats.shape[1])
        every[self.samples["index"]] = feats
        return fid.Stats.of(dist.all_sum(fid.moments(feats)), dist.all_sum(every))

    def reference(self) -> tuple[fid.Stats, Path | None]:
        """FID's reference statistics and their cache file (None for an injected network); on every rank."""
        if self._reference is None:
            if self.inception_file is None:
                count = self.fid_count or data.split_count(data.load_manifest(self.shards), self.fid_split)
                stats = fid.split_stats(self.shards, self.fid_split, count, self.inception, self.batch_size)
                self._reference = stats, None
            else:
                self._reference = fid.reference_stats(self.shards, self.fid_split, self.fid_count, self.inception,
                                                      self.inception_file, self.batch_size, self.progress,
                                                      self.log)
        return self._reference

    @torch.no_grad()
    def run(self, generate: Callable[[dict], torch.Tensor]) -> dict:
        """The report for images `generate(batch)` makes for this rank's samples: [len(batch), 3, H, W] in [-1, 1].

        `batch` holds `index` (each sample's number), `prompt`, `attrs`, `clip_text` (and `tokens`, `token_mask`
        when the shards have them): what `Pipeline.generate_for` reads. Diversity's batch also has `sample`
        (0..K-1 per prompt, `index` the prompt's val position): K images per prompt from distinct seeds.
        """
        if self.metrics == ["diversity"]:  # it makes its own samples; no others are needed
            return {**self._report({}, {}), "diversity": self._diversity_report(generate)}
        images = _generated(generate, self.samples)
        gen = self._sums(as_saved(images), self.samples)  # 8-bit, as saved and as the real ones
        if self._real_sums is None:
            self._real_sums = self._sums(data.to_float(self.real["image"]), self.real)
        out = self._report(gen, self._real_sums)
        if "fid" in self.metrics:
            out["fid"] = self._fid_report(self._fid_stats(images))
        if self.held_out:
            out["held_out"] = self._held_out_report(generate)
        if "diversity" in self.metrics:
            out["diversity"] = self._diversity_report(generate)
        return out

    def _fid_report(self, samples: fid.Stats) -> dict:
        reference, path = self.reference()
        k = fid.kid(samples, reference)
        return {"value": fid.frechet_distance(samples, reference), "num": samples.num, "kid": k["value"],
                "kid_std": k["std"], "kid_subsets": k["subsets"], "kid_subset_size": k["subset_size"],
                "reference": {"split": self.fid_split, "count": reference.num, "stats": str(path) if path else None}}

    def _report(self, gen: dict, real: dict) -> dict:
        out: dict = {"metrics": list(self.metrics), "skipped": dict(self.skipped), "num": self.num}
        if "attr_acc" in gen:
            g, r = (s[:-1] / s[-1] for s in (gen["attr_acc"], real["attr_acc"]))
            chosen = [ATTRIBUTES.index(a) for a in self.attributes]
            out["attr_acc"] = {
                "mean": g[chosen].mean().item(), "real_mean": r[chosen].mean().item(),
                "attributes": self.attributes, "num": int(gen["attr_acc"][-1]), "num_real": int(real["attr_acc"][-1]),
                "per_attribute": {name: {"samples": g[i].item(), "real": r[i].item()}
                                  for i, name in enumerate(ATTRIBUTES)}}
        if "clip_score" in gen:
            (gs, gn), (rs, rn) = gen["clip_score"].tolist(), real["clip_score"].tolist()
            out["clip_score"] = {"samples": gs / gn, "real": rs / rn, "num": int(gn), "num_real": int(rn)}
        return out


def _generated(generate: Callable[[dict], torch.Tensor], batch: dict) -> torch.Tensor:
    """`generate(batch)`, checked to be one image per prompt."""
    images = generate(batch)
    if len(images) != len(batch["prompt"]):
        raise EvalError(f"generate returned {len(images)} images for {len(batch['prompt'])} prompts")
    return images


def scalars(report: dict) -> tuple[dict[str, float], dict[str, float]]:
    """TensorBoard scalars of a report: the headline ones, and the per-attribute accuracies."""
    head, detail = {}, {}
    if "attr_acc" in report:
        a = report["attr_acc"]
        head.update({"eval/attr_acc": a["mean"], "eval/attr_acc_real": a["real_mean"]})
        detail.update({f"eval/attr_acc/{name}": v["samples"] for name, v in a["per_attribute"].items()})
    if "clip_score" in report:
        head.update({"eval/clip_score": report["clip_score"]["samples"],
                     "eval/clip_score_real": report["clip_score"]["real"]})
    if "fid" in report:
        head.update({"eval/fid": report["fid"]["value"], "eval/kid": report["fid"]["kid"]})
    if "held_out" in report:
        head.update(_held_out_scalars(report["held_out"]))
    if "diversity" in report:
        d = report["diversity"]
        head.update({"eval/diversity": d["samples"], "eval/diversity_real": d["real"],
                     "eval/diversity_ratio": d["ratio"]})
    return head, detail


def _held_out_scalars(held_out: dict) -> dict[str, float]:
    """eval/held_out/A+B/FIGURE and FIGURE_real for each pair."""
    return {f"eval/held_out/{pair}/{name}{suffix}": v[side][name] for pair, v in held_out["pairs"].items()
            for side, suffix in (("samples", ""), ("real", "_real")) for name in v[side]}


# Below this share of real images with a pair seen as having both, the classifier cannot judge the pair
# (typically: it was trained on the same held-out train split and never saw the two together).
BLIND_JUDGE = 0.8


def _held_out_lines(held_out: dict) -> list[str]:
    """The summary's lines for the held-out pairs: each figure beside its real-image ceiling."""
    head = (f"held-out pairs ({held_out['num']} samples each for val prompts with both; real: the val images "
            "with the pair):")
    lines = [head]
    for pair, v in held_out["pairs"].items():
        figures = "  ".join(f"{name} {v['samples'][name]:.3f} (real {v['real'][name]:.3f})" for name in v["samples"])
        lines.append(f"  {pair:<24} {figures}")
        if v["real"]["both"] < BLIND_JUDGE:
            lines.append(f"  {'':<24} the classifier sees both in only {v['real']['both']:.0%} of the real val images "
                         "with the pair, so it cannot judge it: train it on data that has the pair")
    return lines


def summary(report: dict) -> str:
    """Human-readable lines of a report (the demo prints them)."""
    lines = []
    if "attr_acc" in report:
        a = report["attr_acc"]
        lines.append(f"attribute accuracy over {len(a['attributes'])} attributes, {a['num']} samples: "
                     f"{a['mean']:.3f} (classifier on {a['num_real']} real val images: {a['real_mean']:.3f})")
        per = a["per_attribute"]
        lines += [f"  {name:<20} {per[name]['samples']:.3f} (real {per[name]['real']:.3f})" for name in a["attributes"]]
    if "clip_score" in report:
        c = report["clip_score"]
        lines.append(f"CLIP score: {c['samples']:.4f} (real val images: {c['real']:.4f})")
    if "fid" in report:
        f = report["fid"]
        r = f["reference"]
        lines.append(f"FID: {f['value']:.2f}, KID: {f['kid']:.5f} ± {f['kid_std']:.5f} ({f['num']} samples vs "
                     f"{r['count']} {r['split']} images" + (f", stats {r['stats']})" if r["stats"] else ")"))
    if "held_out" in report:
        lines += _held_out_lines(report["held_out"])
    if "diversity" in report:
        d = report["diversity"]
        lines.append(f"diversity over {d['prompts']} prompts x {d['samples_per_prompt']} samples: {d['samples']:.2f} "
                     f"levels (real val images of the same attributes: {d['real']:.2f}), ratio {d['ratio']:.3f}")
    lines += list(report["skipped"].values())
    return "\n".join(lines)
