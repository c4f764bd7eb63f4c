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
    evaluator = ev.Evaluator(shards_dir, meta_of(shards_dir), ev.METRICS, 4, classifier=classifier_run,
                             attributes=["Smiling", "Eyeglasses"], inception=Tiny(), batch_size=3,
                             fid_split="val", fid_count=4)
    report = evaluator.run(lambda batch: data.to_float(batch["image"]))
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
    assert messages == [ev.TRAIN_CLASSIFIER_HINT, fid.SKIP_MESSAGE]
    assert "ddpdiff.train_classifier" in messages[0] and "--classifier" in messages[0]
    report = evaluator.run(lambda batch: data.to_float(batch["image"]))
    assert set(report) >= {"clip_score"} and "attr_acc" not in report and "fid" not in report
    assert report["skipped"] == {"attr_acc": ev.TRAIN_CLASSIFIER_HINT, "fid": fid.SKIP_MESSAGE}




def test_shards_whose_embeddings_come_from_another_clip_are_refused(shards_dir):
    other = meta_of(shards_dir)
    other.clip["dim"] += 1
    with pytest.raises(ev.EvalError, match=r"its embeddings do not come from the checkpoint's CLIP .*dim="):
        ev.Evaluator(shards_dir, other, ["attr_acc"], 2)
    moved = DenoiserMeta(meta_of(shards_dir).clip, 64, {"clip_text": [1.0] + [0.0] * (other.clip["dim"] - 2)})
    with pytest.raises(ev.EvalError, match="embeds the empty prompt differently"):
        ev.Evaluator(shards_dir, moved, ["attr_acc"], 2)


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
    report = evaluator.run(lambda batch: data.to_float(batch["image"]))
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
