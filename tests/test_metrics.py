"""The metrics (`ddpdiff.metrics`): name parsing, metric functions, the Evaluator's sums and skips, the interface."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from ddpdiff import clip, data, fid, metrics as ev, synthetic
from ddpdiff.metrics import attr_acc, held_out as ho, registry
from ddpdiff.metrics.clip_cosine import clip_cosines
from ddpdiff.metrics.diversity import diversity, diversity_groups
from ddpdiff.celeba import ATTRIBUTES
from ddpdiff.images import to_pil
from ddpdiff.models import DenoiserMeta

from test_fid import Tiny


def make(shards, metrics, num, inception=None, rank=0, world_size=1, log=lambda msg: None, **settings):
    """The Evaluator of an EvalSpec, the former keyword arguments' way (`inception` a network or a file)."""
    if inception is not None and not isinstance(inception, nn.Module):
        inception, settings["inception"] = None, inception
    spec = ev.EvalSpec(metrics=tuple(metrics), num=num, **settings)
    return ev.Evaluator(shards, meta_of(shards), spec, inception=inception, rank=rank, world_size=world_size, log=log)


def meta_of(shards) -> DenoiserMeta:
    """What a diffusion checkpoint trained on these shards carries in `meta`."""
    m = data.load_manifest(shards)
    return DenoiserMeta(clip=m["clip"], image_size=m["image_size"], empty_prompt=m["empty_prompt"])


def test_metric_and_attribute_names_are_checked():
    assert ev.parse_metrics("fid, attr_acc,fid") == ("fid", "attr_acc")
    with pytest.raises(ev.EvalError, match=r"^metrics: unknown or no metrics \['fdi'\]"):
        ev.parse_metrics("attr_acc,fdi")
    assert ev.parse_attributes(None) == tuple(ATTRIBUTES)
    assert ev.parse_attributes("visible") == tuple(synthetic.VISIBLE)
    assert ev.parse_attributes(["Smiling", "Eyeglasses"]) == ("Smiling", "Eyeglasses")
    with pytest.raises(ev.EvalError, match=r"^attributes: unknown .*\['smiling'\]"):
        ev.parse_attributes("Eyeglasses,smiling")


def test_clip_cosine_of_an_image_with_its_own_embedding_is_one():
    encoder = clip.load("tiny", "none")
    images = torch.rand(5, 3, 64, 64) * 2 - 1
    own = encoder.encode_images(to_pil(images))
    scores = clip_cosines(encoder, images, own, batch_size=2)
    assert scores.shape == (5,) and torch.allclose(scores, torch.ones(5, dtype=torch.float64), atol=1e-5)
    others = clip_cosines(encoder, images, np.roll(own, 1, axis=0))
    assert (others < 1 - 1e-4).all()
    texts = encoder.encode_texts(["Photo of person smiling."] * 5)
    expected = (encoder.encode_images(to_pil(images)) * texts).sum(1)
    np.testing.assert_allclose(clip_cosines(encoder, images, texts).numpy(), expected, rtol=1e-5)


def test_samples_equal_to_the_val_images_score_exactly_like_them(shards_dir, classifier_run):
    evaluator = make(shards_dir, ["attr_acc", "clip_cosine", "fid"], 4, classifier=classifier_run,
                     attributes=("Smiling", "Eyeglasses"), inception=Tiny(), batch_size=3,
                     fid_split="val", fid_count=4)
    report = evaluator.run(lambda batch: data.to_float(batch["image"])).to_dict()
    a = report["attr_acc"]
    assert a["num"] == a["num_real"] == 4 and a["attributes"] == ["Smiling", "Eyeglasses"]
    assert a["mean"] == a["real_mean"]
    assert a["mean"] == pytest.approx((a["per_attribute"]["Smiling"]["samples"]
                                       + a["per_attribute"]["Eyeglasses"]["samples"]) / 2)
    assert all(v["samples"] == v["real"] for v in a["per_attribute"].values())
    assert report["clip_cosine"]["samples"] == pytest.approx(report["clip_cosine"]["real"], abs=1e-9)
    assert report["fid"]["value"] == pytest.approx(0, abs=1e-6)
    assert report["fid"]["reference"] == {"split": "val", "count": 4, "stats": None}
    assert report["fid"]["num"] == 4 and report["fid"]["kid_subset_size"] == 4
    assert report["skipped"] == {}

    noise = evaluator.run(lambda batch: torch.rand(len(batch["prompt"]), 3, 64, 64) * 2 - 1).to_dict()
    assert noise["fid"]["value"] > 1e-3 and noise["clip_cosine"]["samples"] != noise["clip_cosine"]["real"]
    assert noise["fid"]["kid"] > report["fid"]["kid"]
    assert noise["attr_acc"]["real_mean"] == a["real_mean"]  # the ceiling is computed once


def test_prompts_cycle_through_val_when_num_exceeds_it(shards_dir):
    n_val = data.split_count(data.load_manifest(shards_dir), "val")
    evaluator = make(shards_dir, ["clip_cosine"], n_val + 2)
    val = data.read_samples(shards_dir, "val", n=n_val)
    assert evaluator.samples["key"] == val["key"] + val["key"][:2]
    assert evaluator.samples["index"] == list(range(n_val + 2))
    assert evaluator.setup.real["key"] == val["key"]
    assert torch.equal(evaluator.samples["attrs"][n_val:], val["attrs"][:2])


def test_missing_classifier_and_inception_weights_skip_with_how_to(shards_dir, monkeypatch):
    monkeypatch.delenv(fid.ENV, raising=False)
    messages = []
    evaluator = make(shards_dir, ev.named(), 2, log=messages.append)
    assert evaluator.names == ["clip_cosine"]
    assert messages[:2] == [attr_acc.TRAIN_CLASSIFIER_HINT, fid.SKIP_MESSAGE]
    assert "ddpdiff.train_classifier" in messages[0] and "--classifier" in messages[0]
    # the 40 attributes of the few val images: no 8 of them agree on all
    assert messages[2].startswith("diversity skipped: no 8 val images of ") and "--attributes" in messages[2]
    report = evaluator.run(lambda batch: data.to_float(batch["image"])).to_dict()
    assert set(report) >= {"clip_cosine"} and not {"attr_acc", "fid", "diversity"} & set(report)
    assert report["skipped"] == {"attr_acc": attr_acc.TRAIN_CLASSIFIER_HINT, "fid": fid.SKIP_MESSAGE,
                                 "diversity": messages[2]}




def test_shards_whose_embeddings_come_from_another_clip_are_refused(shards_dir):
    other = meta_of(shards_dir)
    other.clip["dim"] += 1
    with pytest.raises(ev.EvalError, match=r"its embeddings do not come from the checkpoint's CLIP .*dim="):
        ev.Evaluator(shards_dir, other, ev.EvalSpec(("attr_acc",), 2))
    moved = DenoiserMeta(meta_of(shards_dir).clip, 64, {"clip_text": [1.0] + [0.0] * (other.clip["dim"] - 2)})
    with pytest.raises(ev.EvalError, match="embeds the empty prompt differently"):
        ev.Evaluator(shards_dir, moved, ev.EvalSpec(("attr_acc",), 2))


def test_diversity_is_the_mean_pairwise_rms_distance_of_the_pooled_images():
    flat = torch.zeros(3, 3, 64, 64, dtype=torch.float64)
    flat[1] += 0.2
    flat[2] -= 0.4
    # pairs (0,1), (0,2), (1,2) differ by 0.2, 0.4, 0.6 everywhere: mean 0.4, in 8-bit levels
    assert diversity(flat) == pytest.approx(0.4 * 127.5, rel=1e-12)
    assert diversity(flat[:1].expand(4, -1, -1, -1)) == 0
    checker = (torch.arange(64)[:, None] + torch.arange(64)) % 2 * 0.5 - 0.25  # texture finer than 4x4 blocks
    textured = torch.stack([torch.zeros(3, 64, 64), checker.expand(3, -1, -1)])
    assert diversity(textured) == pytest.approx(0, abs=1e-12)
    assert diversity(textured, size=64) == pytest.approx(0.25 * 127.5)
    left = torch.zeros(2, 3, 64, 64)
    left[1, :, :, :32] = 1.0  # half the image differs by 1: RMS sqrt(1/2)
    assert diversity(left) == pytest.approx(0.5 ** 0.5 * 127.5)


def test_diversity_groups_are_rows_with_equal_chosen_attributes_in_order_of_first_row():
    attrs = np.zeros((10, 40), np.uint8)
    attrs[[1, 4, 6, 8], 3] = 1  # group (1, 0) from row 1; (1, 1) only rows 2, 9; (0, 0) from row 0
    attrs[[2, 9], 3] = 1
    attrs[[2, 9], 7] = 1
    attrs[:, 20] = np.arange(10) % 2  # not a chosen column: ignored
    assert diversity_groups(attrs, [3, 7], prompts=8, size=3) == [[0, 3, 5], [1, 4, 6]]
    assert diversity_groups(attrs, [3, 7], prompts=1, size=3) == [[0, 3, 5]]
    assert diversity_groups(attrs, [3, 7], prompts=8, size=2) == [[0, 3], [1, 4], [2, 9]]
    assert diversity_groups(attrs, [3, 7], prompts=8, size=5) == []


def diverse_setup(shards_dir):
    """An attribute that splits the fixture's val images into two groups of at least 2, and those groups."""
    attrs = data.split_attributes(shards_dir, "val")
    name = next(n for i, n in enumerate(ATTRIBUTES) if 2 <= attrs[:, i].sum() <= len(attrs) - 2)
    return name, diversity_groups(attrs, [ATTRIBUTES.index(name)], 8, 2)


def test_diversity_compares_k_samples_of_each_prompt_with_k_real_images_of_its_group(shards_dir):
    name, groups = diverse_setup(shards_dir)
    val = data.read_samples(shards_dir, "val", n=data.split_count(data.load_manifest(shards_dir), "val"))
    val["image"] = data.to_float(val["image"])  # in [-1, 1], as a sampler's images
    evaluator = make(shards_dir, ["diversity"], 2, attributes=(name,), diversity_samples=2)
    batches = []

    def real_images(batch):
        batches.append(batch)
        return torch.cat([val["image"][rows] for rows in groups])

    result = evaluator.run(real_images)
    report = result.to_dict()
    (batch,) = batches  # diversity alone: no per-prompt samples besides its own
    assert batch["index"] == [rows[0] for rows in groups for _ in range(2)] and batch["sample"] == [0, 1] * len(groups)
    assert batch["prompt"] == [val["prompt"][rows[0]] for rows in groups for _ in range(2)]
    assert torch.equal(batch["clip_text"], val["clip_text"][batch["index"]])
    d = report["diversity"]
    assert d["prompts"] == len(groups) == 2 and d["samples_per_prompt"] == 2 and d["attributes"] == [name]
    assert d["samples"] == d["real"] > 0 and d["ratio"] == 1
    expected = [diversity(val["image"][rows]) for rows in groups]
    assert [p["real"] for p in d["per_prompt"]] == expected and d["real"] == pytest.approx(np.mean(expected))
    assert [(p["val_index"], p["prompt"]) for p in d["per_prompt"]] == [(r[0], val["prompt"][r[0]]) for r in groups]
    same = evaluator.run(lambda batch: batch["image"][:1].expand(len(batch["index"]), -1, -1, -1))
    same = same.to_dict()["diversity"]
    assert same["samples"] == 0 and same["ratio"] == 0 and same["real"] == d["real"]
    assert "diversity over 2 prompts x 2 samples" in result.summary()
    head, _ = result.scalars()
    assert head["eval/diversity_ratio"] == 1 and head["eval/diversity_real"] == d["real"]


def test_ranks_split_the_diversity_prompts_and_their_sums_add_up_to_one_rank(shards_dir):
    """Rank r takes prompts r, r + world size, …: each rank's zero buffer holds its own prompts, so their sum
    (what all_sum gives under torchrun) is the one-rank figure exactly."""
    name, groups = diverse_setup(shards_dir)
    images = torch.rand(2 * len(groups), 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def per_prompt(rank, world_size):
        evaluator = make(shards_dir, ["diversity"], 2, attributes=(name,), diversity_samples=2, rank=rank,
                         world_size=world_size)
        assert evaluator.metric("diversity").mine == list(range(rank, len(groups), world_size))
        mine = torch.cat([images[2 * p:2 * p + 2] for p in evaluator.metric("diversity").mine])
        return torch.tensor([p.samples for p in evaluator.run(lambda batch: mine)["diversity"].per_prompt])

    one = per_prompt(0, 1)
    assert torch.equal(per_prompt(0, 2) + per_prompt(1, 2), one) and (one > 0).all()
    idle = make(shards_dir, ["diversity"], 3, attributes=(name,), diversity_samples=2, rank=2, world_size=3)
    assert idle.run(lambda batch: pytest.fail("a rank without prompts generates nothing"))["diversity"].prompts == 2


def test_diversity_settings_are_checked(shards_dir):
    with pytest.raises(ev.EvalError, match="diversity_prompts 8 and diversity_samples 1: expected at least"):
        make(shards_dir, ["diversity"], 2, attributes=("Smiling",), diversity_samples=1)


class Reader(nn.Module):
    """A 'classifier' that reads the attributes back from the first row of red pixels (+1 present, -1 absent)."""

    def __init__(self, sign: float = 1.0):
        super().__init__()
        self.sign = nn.Parameter(torch.tensor(sign))

    def forward(self, x):
        return self.sign * x[:, 0, 0, :40]


def test_hits_count_agreement_per_image_and_attribute():
    attrs = (torch.rand(7, 40) < 0.5).float()
    images = torch.zeros(7, 3, 40, 40)
    images[:, 0, 0, :] = attrs * 2 - 1
    assert torch.equal(ev.attribute_hits(Reader(), images, attrs, batch_size=3), torch.ones(7, 40))
    assert torch.equal(ev.attribute_hits(Reader(-1.0), images, attrs, batch_size=3), torch.zeros(7, 40))
    flipped = attrs.clone()
    flipped[:, 5] = 1 - flipped[:, 5]
    agree = ev.attribute_hits(Reader(), images, flipped)
    assert agree[:, 5].sum() == 0 and agree.sum() == 7 * 39


@pytest.mark.slow
def test_fid_reference_is_the_cached_train_split_and_the_report_names_it(shards_copy, tmp_path):
    """With a weights file: the reference is every train image by default, written beside the shards once (a copy of
    them: the session's shards stay as made)."""
    from test_fid import random_inception

    weights = random_inception(tmp_path / "inception.pth")
    n_train = data.split_count(data.load_manifest(shards_copy), "train")
    evaluator = make(shards_copy, ["fid"], 3, inception=weights, batch_size=16)
    result = evaluator.run(lambda batch: data.to_float(batch["image"]))
    report = result.to_dict()
    ref = report["fid"]["reference"]
    assert ref["split"] == "train" and ref["count"] == n_train and report["fid"]["num"] == 3
    stats = fid.Stats.load(ref["stats"])
    assert stats.num == n_train and stats.key["weights_sha256"] == fid.sha256_file(weights)
    assert report["fid"]["value"] > 0 and np.isfinite(report["fid"]["kid"])
    assert f"vs {n_train} train images, stats {ref['stats']})" in result.summary()
    with pytest.raises(ev.EvalError, match=r"fid_split holdout: .* has no such split \(it has train, val"):
        make(shards_copy, ["fid"], 3, inception=Tiny(), fid_split="holdout")
    with pytest.raises(ev.EvalError, match=rf"fid_count 100000: the train split of .* has {n_train} images"):
        make(shards_copy, ["fid"], 3, inception=Tiny(), fid_count=100_000)


# Held-out pairs: composition and binding.

DARK_MUSTACHE = (45, 30, 20)  # what synthetic.draw_face fills a mustache with


def face(attrs: dict, seed: int, mustache: tuple[int, int, int] | None = None) -> np.ndarray:
    """A synthetic face as the shards store it (centred square, 64x64), its mustache repainted `mustache`."""
    from PIL import Image

    from ddpdiff.shards import square_crop

    img = np.asarray(synthetic.draw_face(attrs, np.random.default_rng(seed))).copy()
    if mustache is not None:
        img[(img == DARK_MUSTACHE).all(-1)] = mustache
    return np.asarray(square_crop(Image.fromarray(img)).resize((64, 64), Image.Resampling.BICUBIC))


def faces(attrs: list[dict], first_seed: int = 0, mustache=None) -> torch.Tensor:
    return torch.from_numpy(np.stack([face(a, first_seed + i, mustache) for i, a in enumerate(attrs)]))


def as_rows(attrs: list[dict]) -> torch.Tensor:
    return torch.tensor([[a[name] for name in ATTRIBUTES] for a in attrs], dtype=torch.float32)


def test_held_out_pairs_are_parsed_with_one_line_errors():
    assert ev.parse_held_out("Wearing_Hat+Eyeglasses, Blond_Hair+Mustache") == (("Wearing_Hat", "Eyeglasses"),
                                                                                 ("Blond_Hair", "Mustache"))
    assert ev.parse_held_out([("Blond_Hair", "Mustache"), ["Blond_Hair", "Mustache"]]) == (("Blond_Hair", "Mustache"),)
    for bad, why in (("Blond_Hair+mustache", "mustache unknown"), ("Smiling", "expected two"),
                     ("Smiling+Smiling", "expected two different"), ("", "expected A\\+B"),
                     ([("Smiling", "Mustache", "Eyeglasses")], "expected two")):
        with pytest.raises(ev.EvalError, match=f"^held_out: .*{why}") as err:
            ev.parse_held_out(bad)
        assert "\n" not in str(err.value)
    assert ho.colour_pair(("Mustache", "Blond_Hair")) == ("Blond_Hair", "Mustache")
    assert ho.colour_pair(("Gray_Hair", "Smiling")) == ("Gray_Hair", "Smiling")
    assert ho.colour_pair(("Wearing_Hat", "Eyeglasses")) is None
    assert ho.colour_pair(("Black_Hair", "Blond_Hair")) is None


def test_colour_check_locates_the_mustache_and_tells_a_blond_one_from_a_dark_one():
    """From real-like images where blond hair and a mustache never meet (a held-out train split), the check finds
    the mustache, its dark colour and the blond one; a blond-haired face's dark mustache keeps its own colour, one
    painted blond (the leak a model might make) does not."""
    rng = np.random.default_rng(0)
    attrs = [synthetic.sample_attributes(rng, [("Blond_Hair", "Mustache")]) for _ in range(240)]
    check = ho.colour_check(faces(attrs), as_rows(attrs), "Blond_Hair", "Mustache")
    assert (check.colour, check.other) == ("Blond_Hair", "Mustache")
    rows, cols = torch.nonzero(check.region, as_tuple=True)
    # the mustache: a thin bar below the face's centre, a small part of the image
    assert 10 <= len(rows) <= 0.03 * 64 * 64
    assert 34 <= rows.min() and rows.max() <= 44 and rows.max() - rows.min() <= 4
    assert 20 <= cols.min() and cols.max() <= 44
    assert check.own.max() < 110 and check.leak.min() > 90 and (check.leak - check.own).norm() > 150

    # (a mustache drawn more than half outside the region is missed: about 1 in 100 here)
    blond_mustache = {name: 0 for name in ATTRIBUTES} | {"Blond_Hair": 1, "Mustache": 1}
    assert ho.shows_own_colour(faces([blond_mustache] * 20, 1000), check).float().mean() >= 0.9
    assert not ho.shows_own_colour(faces([blond_mustache] * 20, 1000, synthetic.HAIR["Blond_Hair"]), check).any()
    assert not ho.shows_own_colour(faces([blond_mustache | {"Mustache": 0}] * 10, 1000), check).any()
    brown = blond_mustache | {"Blond_Hair": 0, "Brown_Hair": 1}
    assert ho.shows_own_colour(faces([brown] * 10, 2000), check).float().mean() >= 0.9
    d = check.summary()
    assert d.pixels == len(rows) and len(d.own) == len(d.leak) == 3

    # a region is where the attribute changes the mean image most, wherever that is
    pixels = torch.zeros(4, 8, 8, 3, dtype=torch.uint8)
    pixels[:2, 1, 2] = 200
    pixels[:2, 5, 5] = 60
    assert torch.equal(torch.nonzero(ho.attribute_region(pixels, torch.tensor([True, True, False, False]))),
                       torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="no real image with Mustache without Blond_Hair"):
        ho.colour_check(faces(attrs[:8]), as_rows([a | {"Mustache": int(a["Blond_Hair"])} for a in attrs[:8]]),
                        "Blond_Hair", "Mustache")


def test_pair_sums_count_accuracy_both_own_colour_and_binding():
    attrs = torch.zeros(4, 40)
    hat, glasses, smiling = (ATTRIBUTES.index(n) for n in ("Wearing_Hat", "Eyeglasses", "Smiling"))
    attrs[:, [hat, glasses]] = 1
    predicted = attrs.bool().clone()
    predicted[1, glasses] = False  # no glasses shown
    predicted[2, smiling] = True  # a smile not asked for
    own = torch.tensor([True, True, False, True])
    sums = ho.pair_sums(predicted, attrs, ("Wearing_Hat", "Eyeglasses"), [hat, glasses, smiling], own)
    assert sums.dtype == torch.float64
    assert sums.tolist() == pytest.approx([1 + 2 / 3 + 2 / 3 + 1, 3, 3, 2, 4])
    assert ho.pair_sums(predicted, attrs, ("Wearing_Hat", "Eyeglasses"), [hat], None).tolist() == [4, 3, 4, 3, 4]
    assert ho.pair_sums(predicted[:0], attrs[:0], ("Wearing_Hat", "Eyeglasses"), [hat], None).tolist() == [0] * 5


HELD_OUT = "Wearing_Hat+Eyeglasses,Brown_Hair+Mustache"  # both present in the session shards' val split


class Everything(nn.Module):
    """A 'classifier' that sees every attribute in every image."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.ones(40))

    def forward(self, x):
        return self.bias.expand(len(x), 40)


def test_held_out_pairs_are_scored_on_their_val_prompts_beside_the_real_images(shards_dir, classifier_run):
    n_val = data.split_count(data.load_manifest(shards_dir), "val")
    val = data.read_samples(shards_dir, "val", n=n_val, tokens=False)
    evaluator = make(shards_dir, ["attr_acc"], 4, classifier=classifier_run, attributes=tuple(synthetic.VISIBLE),
                     held_out=ev.parse_held_out(HELD_OUT), held_out_num=3)
    pairs = evaluator.metric("held_out")
    batch = pairs.samples
    assert batch["index"] == list(range(4, 10)) and batch["pair"] == [0, 0, 0, 1, 1, 1]
    for k, (a, b) in enumerate(ev.parse_held_out(HELD_OUT)):
        with_pair = [key for key, row in zip(val["key"], val["attrs"])
                     if row[ATTRIBUTES.index(a)] and row[ATTRIBUTES.index(b)]]
        assert with_pair and {key for key, p in zip(batch["key"], batch["pair"]) if p == k} == set(with_pair)
        assert [key for key, p in zip(pairs.real["key"], pairs.real["pair"]) if p == k] \
            == with_pair[:3]
    generated = []
    result = evaluator.run(lambda b: generated.append(b["index"]) or b["image"])
    report = result.to_dict()
    assert generated == [[0, 1, 2, 3], list(range(4, 10))]
    h = report["held_out"]
    assert h["num"] == 3 and h["attributes"] == list(synthetic.VISIBLE) and list(h["pairs"]) == HELD_OUT.split(",")
    hat, mustache = h["pairs"]["Wearing_Hat+Eyeglasses"], h["pairs"]["Brown_Hair+Mustache"]
    assert hat["colour_check"] is None and set(hat["samples"]) == {"attr_acc", "both", "binding"}
    assert mustache["colour_check"]["colour"] == "Brown_Hair" and mustache["colour_check"]["other"] == "Mustache"
    assert set(mustache["samples"]) == set(mustache["real"]) == {"attr_acc", "both", "own_colour", "binding"}
    for pair in (hat, mustache):
        assert pair["num"] == 3 and pair["num_real"] >= 1
        assert all(0 <= v <= 1 for side in ("samples", "real") for v in pair[side].values())
        assert pair["samples"] == pytest.approx(pair["real"])  # the val images themselves, cycled
        assert pair["samples"]["binding"] <= pair["samples"]["both"]
    assert mustache["real"]["own_colour"] == 1.0  # a real mustache has its own colour
    scalars = result.scalars()[0]
    assert scalars["eval/held_out/Brown_Hair+Mustache/binding"] == mustache["samples"]["binding"]
    assert scalars["eval/held_out/Wearing_Hat+Eyeglasses/both_real"] == hat["real"]["both"]
    text = result.summary()
    assert "held-out pairs (3 samples each" in text and "Brown_Hair+Mustache" in text and "own_colour 1.000" in text

    pairs.classifier = Everything()
    evaluator._ceilings.pop("held_out")
    blank = evaluator.run(lambda b: torch.zeros(len(b["prompt"]), 3, 64, 64)).to_dict()
    for name, pair in blank["held_out"]["pairs"].items():
        a, b = name.split("+")
        rows = pairs.samples["attrs"][torch.tensor(pairs.samples["pair"])
                                                   == list(blank["held_out"]["pairs"]).index(name)]
        chosen = [ATTRIBUTES.index(x) for x in synthetic.VISIBLE]
        assert pair["samples"]["attr_acc"] == pytest.approx(rows[:, chosen].mean().item())
        assert pair["samples"]["both"] == pair["real"]["both"] == 1.0
        assert pair["real"]["binding"] == 1.0
    # a grey face has no dark mustache where the real ones have theirs
    assert blank["held_out"]["pairs"]["Brown_Hair+Mustache"]["samples"]["own_colour"] in (0.0, 1.0)


def test_held_out_samples_are_shared_over_ranks(shards_dir, classifier_run):
    one = make(shards_dir, ["attr_acc"], 4, classifier=classifier_run, held_out=ev.parse_held_out(HELD_OUT),
               held_out_num=3).metric("held_out")
    ranks = [make(shards_dir, ["attr_acc"], 4, classifier=classifier_run, held_out=ev.parse_held_out(HELD_OUT),
                  held_out_num=3, rank=r, world_size=4).metric("held_out") for r in range(4)]
    assert [r.samples["index"] for r in ranks] == [[4, 8], [5, 9], [6], [7]]
    assert sorted(k for r in ranks for k in r.samples["key"]) == sorted(one.samples["key"])
    real = [r.real for r in ranks]
    assert sum(len(r["key"]) for r in real if r) == len(one.real["key"])
    assert real[-1] is None  # a rank with nothing to score still takes part (its sums are zeros)
    assert ranks[-1].sums(None, None)[0].tolist() == [[0.0] * 5] * 2


def test_held_out_bad_input_is_one_line(shards_dir, classifier_run):
    def make_pairs(held_out, **kw):
        kw = {"metrics": ["attr_acc"], "classifier": classifier_run} | kw
        return make(shards_dir, kw.pop("metrics"), 2, held_out=ev.parse_held_out(held_out), **kw)

    with pytest.raises(ev.EvalError, match=r"held_out Blond_Hair\+Mustache: no val image of .* has both"):
        make_pairs("Wearing_Hat+Eyeglasses,Blond_Hair+Mustache")
    with pytest.raises(ev.EvalError, match="held_out: attribute pair 'Hat\\+Eyeglasses'"):
        make_pairs("Hat+Eyeglasses")
    with pytest.raises(ev.EvalError, match="held_out_num 0: expected at least 1"):
        make_pairs(HELD_OUT, held_out_num=0)
    with pytest.raises(ev.EvalError, match="held_out needs attr_acc in metrics"):
        make_pairs(HELD_OUT, metrics=["clip_score"])
    messages = []
    skipped = make_pairs(HELD_OUT, classifier=None, log=messages.append)
    assert "held_out" not in [m.name for m in skipped.metrics] and messages == [attr_acc.TRAIN_CLASSIFIER_HINT,
                                                                               ho.HELD_OUT_SKIP]
    assert skipped.run(lambda b: b["image"]).to_dict()["skipped"]["held_out"] == ho.HELD_OUT_SKIP


@pytest.mark.parametrize("real_both, blind", [(0.094, True), (0.97, False)])
def test_the_summary_says_when_the_classifier_cannot_judge_a_pair(real_both, blind):
    figures = {"attr_acc": 0.9, "both": real_both, "binding": real_both}
    pair = ho.PairReport(samples=dict(figures, both=0.5), real=figures, num=32, num_real=32, colour_check=None)
    text = "\n".join(ho.HeldOutReport(num=32, attributes=[], pairs={"Wearing_Hat+Eyeglasses": pair}).lines())
    assert ("cannot judge it" in text) == blind
    assert "both 0.500 (real " in text


# The interface: a metric is one module and one registry line.

@dataclass(frozen=True)
class BrightnessReport(ev.MetricReport):
    samples: float
    real: float

    def scalars(self):
        return {"eval/brightness": self.samples}, {}

    def lines(self):
        return [f"brightness {self.samples:.3f} (real {self.real:.3f})"]


class Brightness(ev.Metric):
    """A toy metric, as a module would hold it: the mean pixel value of the samples and of the real images."""

    name = "brightness"

    @classmethod
    def problems(cls, spec, shards, manifest):
        return [ev.EvalError(ev.Setting("num"), f" {spec.num}: brightness wants an even number")] * (spec.num % 2)

    def sums(self, images, batch):
        return (torch.stack([images.double().sum(), torch.tensor(float(images.numel()), dtype=torch.float64)]),)

    def report(self, samples, real):
        (g,), (r,) = samples, real
        return BrightnessReport((g[0] / g[1]).item(), (r[0] / r[1]).item())


def test_a_metric_is_one_module_and_one_registry_line(shards_dir, monkeypatch):
    monkeypatch.setitem(registry.METRICS, "brightness", Brightness)  # the registry line
    assert "brightness" in ev.named() and ev.parse_metrics("brightness,clip_score") == ("brightness", "clip_cosine")
    evaluator = make(shards_dir, ev.parse_metrics("brightness"), 4)
    result = evaluator.run(lambda batch: data.to_float(batch["image"]))
    assert result.metrics == ["brightness"] and result["brightness"].samples == result["brightness"].real
    figures = result["brightness"]
    assert result.to_dict()["brightness"] == {"samples": figures.samples, "real": figures.real}
    assert result.scalars() == ({"eval/brightness": result["brightness"].samples}, {})
    assert result.summary().startswith("brightness ")
    dark = evaluator.run(lambda batch: -torch.ones(len(batch["index"]), 3, 64, 64))["brightness"]
    assert dark.samples == -1 and dark.real == result["brightness"].real  # the ceiling, computed once
    with pytest.raises(ev.EvalError, match="^num 3: brightness wants an even number$"):
        make(shards_dir, ["brightness"], 3)


def test_errors_name_the_setting_and_each_front_end_words_it():
    err = ev.EvalError(ev.Setting("held_out"), " needs attr_acc in ", ev.Setting("metrics"), ": why")
    assert str(err) == "held_out needs attr_acc in metrics: why"
    assert err.worded(lambda s: "--" + s.replace("_", "-")) == "--held-out needs attr_acc in --metrics: why"
    assert err.worded(lambda s: f"eval.{s}") == "eval.held_out needs attr_acc in eval.metrics: why"
    both = ev.EvalError.joined([err, ev.EvalError("plain")])
    assert both.worded(lambda s: s.upper()) == "HELD_OUT needs attr_acc in METRICS: why; plain"


def test_clip_score_is_clip_cosine_by_its_former_name(shards_dir):
    assert ev.parse_metrics("clip_score") == ("clip_cosine",) and "clip_score" not in ev.named()
    evaluator = make(shards_dir, ["clip_score"], 2)
    assert evaluator.names == ["clip_cosine"] and [m.name for m in evaluator.metrics] == ["clip_cosine"]
