"""The metrics (`ddpdiff.metrics`): name parsing, metric functions, the Evaluator's sums and skips."""

import numpy as np
import pytest
import torch
from torch import nn

from ddpdiff import clip, data, fid, metrics as ev, synthetic
from ddpdiff.celeba import ATTRIBUTES
from ddpdiff.images import to_pil
from ddpdiff.models import DenoiserMeta

from test_fid import Tiny


def meta_of(shards) -> DenoiserMeta:
    """What a diffusion checkpoint trained on these shards carries in `meta`."""
    m = data.load_manifest(shards)
    return DenoiserMeta(clip=m["clip"], image_size=m["image_size"], empty_prompt=m["empty_prompt"])


def test_metric_and_attribute_names_are_checked():
    assert ev.parse_metrics("fid, attr_acc,fid") == ["fid", "attr_acc"]
    with pytest.raises(ev.EvalError, match=r"--metrics: unknown or no metrics \['fdi'\]"):
        ev.parse_metrics("attr_acc,fdi")
    assert ev.parse_attributes(None) == list(ATTRIBUTES)
    assert ev.parse_attributes("visible") == list(synthetic.VISIBLE)
    assert ev.parse_attributes(["Smiling", "Eyeglasses"]) == ["Smiling", "Eyeglasses"]
    with pytest.raises(ev.EvalError, match=r"--attributes: unknown .*\['smiling'\]"):
        ev.parse_attributes("Eyeglasses,smiling")


def test_clip_score_of_an_image_with_its_own_embedding_is_one():
    encoder = clip.load("tiny", "none")
    images = torch.rand(5, 3, 64, 64) * 2 - 1
    own = encoder.encode_images(to_pil(images))
    scores = ev.clip_scores(encoder, images, own, batch_size=2)
    assert scores.shape == (5,) and torch.allclose(scores, torch.ones(5, dtype=torch.float64), atol=1e-5)
    others = ev.clip_scores(encoder, images, np.roll(own, 1, axis=0))
    assert (others < 1 - 1e-4).all()
    texts = encoder.encode_texts(["Photo of person smiling."] * 5)
    expected = (encoder.encode_images(to_pil(images)) * texts).sum(1)
    np.testing.assert_allclose(ev.clip_scores(encoder, images, texts).numpy(), expected, rtol=1e-5)


def test_samples_equal_to_the_val_images_score_exactly_like_them(shards_dir, classifier_run):
    evaluator = ev.Evaluator(shards_dir, meta_of(shards_dir), ["attr_acc", "clip_score", "fid"], 4,
                             classifier=classifier_run,
                             attributes=["Smiling", "Eyeglasses"], inception=Tiny(), batch_size=3,
                             fid_split="val", fid_count=4)
    report = evaluator.run(lambda batch: batch["image"])
    a = report["attr_acc"]
    assert a["num"] == a["num_real"] == 4 and a["attributes"] == ["Smiling", "Eyeglasses"]
    assert a["mean"] == a["real_mean"]
    assert a["mean"] == pytest.approx((a["per_attribute"]["Smiling"]["samples"]
                                       + a["per_attribute"]["Eyeglasses"]["samples"]) / 2)
    assert all(v["samples"] == v["real"] for v in a["per_attribute"].values())
    assert report["clip_score"]["samples"] == pytest.approx(report["clip_score"]["real"], abs=1e-9)
    assert report["fid"]["value"] == pytest.approx(0, abs=1e-6)
    assert report["fid"]["reference"] == {"split": "val", "count": 4, "stats": None}
    assert report["fid"]["num"] == 4 and report["fid"]["kid_subset_size"] == 4
    assert report["skipped"] == {}

    noise = evaluator.run(lambda batch: torch.rand(len(batch["prompt"]), 3, 64, 64) * 2 - 1)
    assert noise["fid"]["value"] > 1e-3 and noise["clip_score"]["samples"] != noise["clip_score"]["real"]
    assert noise["fid"]["kid"] > report["fid"]["kid"]
    assert noise["attr_acc"]["real_mean"] == a["real_mean"]  # the ceiling is computed once


def test_prompts_cycle_through_val_when_num_exceeds_it(shards_dir):
    n_val = data.split_count(data.load_manifest(shards_dir), "val")
    evaluator = ev.Evaluator(shards_dir, meta_of(shards_dir), ["clip_score"], n_val + 2)
    val = data.read_samples(shards_dir, "val", n=n_val)
    assert evaluator.samples["key"] == val["key"] + val["key"][:2]
    assert evaluator.samples["index"] == list(range(n_val + 2))
    assert evaluator.real["key"] == val["key"]
    assert torch.equal(evaluator.samples["attrs"][n_val:], val["attrs"][:2])


def test_missing_classifier_and_inception_weights_skip_with_how_to(shards_dir, monkeypatch):
    monkeypatch.delenv(fid.ENV, raising=False)
    messages = []
    evaluator = ev.Evaluator(shards_dir, meta_of(shards_dir), ev.METRICS, 2, log=messages.append)
    assert evaluator.metrics == ["clip_score"]
    assert messages[:2] == [ev.TRAIN_CLASSIFIER_HINT, fid.SKIP_MESSAGE]
    assert "ddpdiff.train_classifier" in messages[0] and "--classifier" in messages[0]
    # the 40 attributes of the few val images: no 8 of them agree on all
    assert messages[2].startswith("diversity skipped: no 8 val images of ") and "--attributes" in messages[2]
    report = evaluator.run(lambda batch: batch["image"])
    assert set(report) >= {"clip_score"} and not {"attr_acc", "fid", "diversity"} & set(report)
    assert report["skipped"] == {"attr_acc": ev.TRAIN_CLASSIFIER_HINT, "fid": fid.SKIP_MESSAGE,
                                 "diversity": messages[2]}




def test_shards_whose_embeddings_come_from_another_clip_are_refused(shards_dir):
    other = meta_of(shards_dir)
    other.clip["dim"] += 1
    with pytest.raises(ev.EvalError, match=r"its embeddings do not come from the checkpoint's CLIP .*dim="):
        ev.Evaluator(shards_dir, other, ["attr_acc"], 2)
    moved = DenoiserMeta(meta_of(shards_dir).clip, 64, {"clip_text": [1.0] + [0.0] * (other.clip["dim"] - 2)})
    with pytest.raises(ev.EvalError, match="embeds the empty prompt differently"):
        ev.Evaluator(shards_dir, moved, ["attr_acc"], 2)


def test_diversity_is_the_mean_pairwise_rms_distance_of_the_pooled_images():
    flat = torch.zeros(3, 3, 64, 64, dtype=torch.float64)
    flat[1] += 0.2
    flat[2] -= 0.4
    # pairs (0,1), (0,2), (1,2) differ by 0.2, 0.4, 0.6 everywhere: mean 0.4, in 8-bit levels
    assert ev.diversity(flat) == pytest.approx(0.4 * 127.5, rel=1e-12)
    assert ev.diversity(flat[:1].expand(4, -1, -1, -1)) == 0
    checker = (torch.arange(64)[:, None] + torch.arange(64)) % 2 * 0.5 - 0.25  # texture finer than 4x4 blocks
    textured = torch.stack([torch.zeros(3, 64, 64), checker.expand(3, -1, -1)])
    assert ev.diversity(textured) == pytest.approx(0, abs=1e-12)
    assert ev.diversity(textured, size=64) == pytest.approx(0.25 * 127.5)
    left = torch.zeros(2, 3, 64, 64)
    left[1, :, :, :32] = 1.0  # half the image differs by 1: RMS sqrt(1/2)
    assert ev.diversity(left) == pytest.approx(0.5 ** 0.5 * 127.5)


def test_diversity_groups_are_rows_with_equal_chosen_attributes_in_order_of_first_row():
    attrs = np.zeros((10, 40), np.uint8)
    attrs[[1, 4, 6, 8], 3] = 1  # group (1, 0) from row 1; (1, 1) only rows 2, 9; (0, 0) from row 0
    attrs[[2, 9], 3] = 1
    attrs[[2, 9], 7] = 1
    attrs[:, 20] = np.arange(10) % 2  # not a chosen column: ignored
    assert ev.diversity_groups(attrs, [3, 7], prompts=8, size=3) == [[0, 3, 5], [1, 4, 6]]
    assert ev.diversity_groups(attrs, [3, 7], prompts=1, size=3) == [[0, 3, 5]]
    assert ev.diversity_groups(attrs, [3, 7], prompts=8, size=2) == [[0, 3], [1, 4], [2, 9]]
    assert ev.diversity_groups(attrs, [3, 7], prompts=8, size=5) == []


def diverse_setup(shards_dir):
    """An attribute that splits the fixture's val images into two groups of at least 2, and those groups."""
    attrs = data.split_attrs(shards_dir, "val")
    name = next(n for i, n in enumerate(ATTRIBUTES) if 2 <= attrs[:, i].sum() <= len(attrs) - 2)
    return name, ev.diversity_groups(attrs, [ATTRIBUTES.index(name)], 8, 2)


def test_diversity_compares_k_samples_of_each_prompt_with_k_real_images_of_its_group(shards_dir):
    name, groups = diverse_setup(shards_dir)
    val = data.read_samples(shards_dir, "val", n=data.split_count(data.load_manifest(shards_dir), "val"))
    evaluator = ev.Evaluator(shards_dir, meta_of(shards_dir), ["diversity"], 2, attributes=[name],
                             diversity_samples=2)
    batches = []

    def real_images(batch):
        batches.append(batch)
        return torch.cat([val["image"][rows] for rows in groups])

    report = evaluator.run(real_images)
    (batch,) = batches  # diversity alone: no per-prompt samples besides its own
    assert batch["index"] == [rows[0] for rows in groups for _ in range(2)] and batch["sample"] == [0, 1] * len(groups)
    assert batch["prompt"] == [val["prompt"][rows[0]] for rows in groups for _ in range(2)]
    assert torch.equal(batch["clip_text"], val["clip_text"][batch["index"]])
    d = report["diversity"]
    assert d["prompts"] == len(groups) == 2 and d["samples_per_prompt"] == 2 and d["attributes"] == [name]
    assert d["samples"] == d["real"] > 0 and d["ratio"] == 1
    expected = [ev.diversity(val["image"][rows]) for rows in groups]
    assert [p["real"] for p in d["per_prompt"]] == expected and d["real"] == pytest.approx(np.mean(expected))
    assert [(p["val_index"], p["prompt"]) for p in d["per_prompt"]] == [(r[0], val["prompt"][r[0]]) for r in groups]
    same = evaluator.run(lambda batch: batch["image"][:1].expand(len(batch["index"]), -1, -1, -1))["diversity"]
    assert same["samples"] == 0 and same["ratio"] == 0 and same["real"] == d["real"]
    assert "diversity over 2 prompts x 2 samples" in ev.summary(report)
    head, _ = ev.scalars(report)
    assert head["eval/diversity_ratio"] == 1 and head["eval/diversity_real"] == d["real"]


def test_ranks_split_the_diversity_prompts_and_their_sums_add_up_to_one_rank(shards_dir):
    """Rank r takes prompts r, r + world size, …: each rank's zero buffer holds its own prompts, so their sum
    (what all_sum gives under torchrun) is the one-rank figure exactly."""
    name, groups = diverse_setup(shards_dir)
    images = torch.rand(2 * len(groups), 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def per_prompt(rank, world_size):
        evaluator = ev.Evaluator(shards_dir, meta_of(shards_dir), ["diversity"], 2, attributes=[name],
                                 diversity_samples=2, rank=rank, world_size=world_size)
        assert evaluator.diversity_mine == list(range(rank, len(groups), world_size))
        mine = torch.cat([images[2 * p:2 * p + 2] for p in evaluator.diversity_mine])
        return torch.tensor([p["samples"] for p in evaluator.run(lambda batch: mine)["diversity"]["per_prompt"]])

    one = per_prompt(0, 1)
    assert torch.equal(per_prompt(0, 2) + per_prompt(1, 2), one) and (one > 0).all()
    idle = ev.Evaluator(shards_dir, meta_of(shards_dir), ["diversity"], 3, attributes=[name], diversity_samples=2,
                        rank=2, world_size=3)
    assert idle.run(lambda batch: pytest.fail("a rank without prompts generates nothing"))["diversity"]["prompts"] == 2


def test_diversity_settings_are_checked(shards_dir):
    with pytest.raises(ev.EvalError, match="--diversity-prompts 8 and --diversity-samples 1: expected at least"):
        ev.Evaluator(shards_dir, meta_of(shards_dir), ["diversity"], 2, attributes="Smiling", diversity_samples=1)


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
    evaluator = ev.Evaluator(shards_copy, meta_of(shards_copy), ["fid"], 3, inception=weights, batch_size=16)
    report = evaluator.run(lambda batch: batch["image"])
    ref = report["fid"]["reference"]
    assert ref["split"] == "train" and ref["count"] == n_train and report["fid"]["num"] == 3
    stats = fid.Stats.load(ref["stats"])
    assert stats.num == n_train and stats.key["weights_sha256"] == fid.sha256_file(weights)
    assert report["fid"]["value"] > 0 and np.isfinite(report["fid"]["kid"])
    assert f"vs {n_train} train images, stats {ref['stats']})" in ev.summary(report)
    with pytest.raises(ev.EvalError, match=r"--fid-split holdout: .* has no such split \(it has train, val"):
        ev.Evaluator(shards_copy, meta_of(shards_copy), ["fid"], 3, inception=Tiny(), fid_split="holdout")
    with pytest.raises(ev.EvalError, match=rf"--fid-count 100000: the train split of .* has {n_train} images"):
        ev.Evaluator(shards_copy, meta_of(shards_copy), ["fid"], 3, inception=Tiny(), fid_count=100_000)
