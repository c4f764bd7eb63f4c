"""Attribute classifier training (`ddpdiff.train_classifier`): the loop run, val accuracy, loading, agreement."""

import pytest
import torch

from ddpdiff import checkpoint, metrics, train_classifier
from ddpdiff.checkpoint import CheckpointError
from ddpdiff.models import MetaError
from ddpdiff.celeba import ATTRIBUTES
from ddpdiff.models.classifier import AttributeResNet

from conftest import CONFIGS

SMOKE = str(CONFIGS / "classifier_smoke.yaml")


def _args(shards, run_dir, *extra):
    return ["--config", SMOKE, "--data.shards", str(shards), "--run.dir", str(run_dir), *map(str, extra)]


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0}).Reload()
    return {e.step: e.value for e in events.Scalars(tag)}, events.Tags()["scalars"]


def test_resnet_maps_any_size_to_40_logits_and_checks_its_shape():
    model = AttributeResNet(width=4, blocks=(1, 2, 1))
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 40)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 40)
    assert model.head.in_features == 16  # width doubles per stage
    with pytest.raises(ValueError, match="blocks a non-empty list"):
        AttributeResNet(width=4, blocks=())


def test_smoke_run_logs_val_accuracy_and_saves_a_loadable_classifier(shards_dir, tmp_path, capsys):
    run = tmp_path / "clf"
    assert train_classifier.main(_args(shards_dir, run)) == 0
    out = capsys.readouterr().out
    assert "model=attr_resnet width=8 blocks=1x1" in out and "acc_mean=" in out and " acc=" in out
    state = checkpoint.load(checkpoint.resolve(run))
    assert state["meta"] == {"model": "attr_resnet", "width": 8, "blocks": [1, 1], "image_size": 64,
                             "attributes": list(ATTRIBUTES)}
    model, meta = metrics.load_classifier(run)
    assert meta.to_dict() == state["meta"] and not model.training
    assert all(torch.equal(p, state["ema"][k]) for k, p in model.state_dict().items())
    acc, tags = _scalars(run, "eval/acc_mean")
    assert sorted(acc) == [0, 2, 4] and all(0 <= a <= 1 for a in acc.values())
    assert {f"eval/acc/{name}" for name in ATTRIBUTES} <= set(tags) and "train/acc" in tags


def test_config_problems_are_reported_together(shards_dir, tmp_path, capsys):
    assert train_classifier.main(_args(shards_dir, tmp_path / "r", "--classifier.width", 0,
                                       "--train.micro_batch", -1)) == 2
    err = capsys.readouterr().err.strip()
    assert "classifier.width must be >= 1" in err and "train.micro_batch must be >= 0" in err
    assert err.count("\n") == 0 and not (tmp_path / "r").exists()


def test_loading_something_else_is_a_one_line_error(tmp_path):
    path = tmp_path / "sr.pt"
    torch.save({"meta": {"model": "srresnet"}, "ema": {}}, path)
    with pytest.raises(MetaError, match=r"sr.pt: not an attribute classifier checkpoint, it holds an SRResNet"):
        metrics.load_classifier(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        metrics.load_classifier(tmp_path / "missing")
