"""Evaluation (`ddpdiff.eval`): metric functions, the Evaluator's sums, skips, in-training use on 1 and 2 ranks, the CLI."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from ddpdiff import clip, config, data, dist, eval as ev, fid, sample, synthetic, train, train_classifier
from ddpdiff.celeba import ATTRIBUTES

from conftest import CONFIGS
from test_fid import Tiny


@pytest.fixture(scope="module")
def classifier_run(shards_dir, tmp_path_factory):
    """A 4-step smoke attribute classifier."""
    out = tmp_path_factory.mktemp("classifier")
    assert train_classifier.main(["--config", str(CONFIGS / "classifier_smoke.yaml"), "--data.shards",
                                  str(shards_dir), "--run.dir", str(out), "--sample.every_steps", "0"]) == 0
    return out


@pytest.fixture(scope="module")
def diffusion_run(shards_dir, tmp_path_factory):
    """A 2-step smoke diffusion run."""
    out = tmp_path_factory.mktemp("diffusion")
    assert train.main(["--config", str(CONFIGS / "smoke.yaml"), "--data.shards", str(shards_dir),
                       "--run.dir", str(out), "--train.max_steps", "2"]) == 0
    return out


def _meta(shards):
    """What a diffusion checkpoint trained on these shards carries in `meta`."""
    m = data.load_manifest(shards)
    return {"clip": m["clip"], "image_size": m["image_size"], "empty_prompt": m["empty_prompt"]}


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
    own = encoder.encode_images(ev.to_pil(images))
    scores = ev.clip_scores(encoder, images, own, batch_size=2)
    assert scores.shape == (5,) and torch.allclose(scores, torch.ones(5, dtype=torch.float64), atol=1e-5)
    others = ev.clip_scores(encoder, images, np.roll(own, 1, axis=0))
    assert (others < 1 - 1e-4).all()
    texts = encoder.encode_texts(["Photo of person smiling."] * 5)
    expected = (encoder.encode_images(ev.to_pil(images)) * texts).sum(1)
    np.testing.assert_allclose(ev.clip_scores(encoder, images, texts).numpy(), expected, rtol=1e-5)


def test_samples_equal_to_the_val_images_score_exactly_like_them(shards_dir, classifier_run):
    evaluator = ev.Evaluator(shards_dir, _meta(shards_dir), ev.METRICS, 4, classifier=classifier_run,
                             attributes=["Smiling", "Eyeglasses"], inception=Tiny(), batch_size=3)
    report = evaluator.run(lambda batch: batch["image"])
    a = report["attr_acc"]
    assert a["num"] == a["num_real"] == 4 and a["attributes"] == ["Smiling", "Eyeglasses"]
    assert a["mean"] == a["real_mean"]
    assert a["mean"] == pytest.approx((a["per_attribute"]["Smiling"]["samples"]
                                       + a["per_attribute"]["Eyeglasses"]["samples"]) / 2)
    assert all(v["samples"] == v["real"] for v in a["per_attribute"].values())
    assert report["clip_score"]["samples"] == pytest.approx(report["clip_score"]["real"], abs=1e-9)
    assert report["fid"]["value"] == pytest.approx(0, abs=1e-6)
    assert report["skipped"] == {}

    noise = evaluator.run(lambda batch: torch.rand(len(batch["prompt"]), 3, 64, 64) * 2 - 1)
    assert noise["fid"]["value"] > 1e-3 and noise["clip_score"]["samples"] != noise["clip_score"]["real"]
    assert noise["attr_acc"]["real_mean"] == a["real_mean"]  # the ceiling is computed once


def test_prompts_cycle_through_val_when_num_exceeds_it(shards_dir):
    n_val = data.load_manifest(shards_dir)["splits"]["val"]["count"]
    evaluator = ev.Evaluator(shards_dir, _meta(shards_dir), ["clip_score"], n_val + 2)
    val = data.read_samples(shards_dir, "val", n=n_val)
    assert evaluator.samples["key"] == val["key"] + val["key"][:2]
    assert evaluator.real["key"] == val["key"]
    assert torch.equal(evaluator.samples["attrs"][n_val:], val["attrs"][:2])


def test_missing_classifier_and_inception_weights_skip_with_how_to(shards_dir, monkeypatch):
    monkeypatch.delenv(fid.ENV, raising=False)
    messages = []
    evaluator = ev.Evaluator(shards_dir, _meta(shards_dir), ev.METRICS, 2, log=messages.append)
    assert evaluator.metrics == ["clip_score"]
    assert messages == [ev.TRAIN_CLASSIFIER_HINT, fid.SKIP_MESSAGE]
    assert "ddpdiff.train_classifier" in messages[0] and "--classifier" in messages[0]
    report = evaluator.run(lambda batch: batch["image"])
    assert set(report) >= {"clip_score"} and "attr_acc" not in report and "fid" not in report
    assert report["skipped"] == {"attr_acc": ev.TRAIN_CLASSIFIER_HINT, "fid": fid.SKIP_MESSAGE}


def test_in_training_config_problems_are_collected(shards_dir, tmp_path):
    cfg = config.load(CONFIGS / "smoke.yaml", ["--data.shards", str(shards_dir)])
    assert ev.problems(cfg, world_size=2) == []  # off
    cfg.eval = dataclasses.replace(cfg.eval, every_steps=5, metrics=["attr_acc", "psnr"], num=1, steps=500,
                                   classifier=str(tmp_path / "nope"), inception=str(tmp_path / "none.pt"))
    found = ev.problems(cfg, world_size=2)
    assert any("eval.metrics" in p and "psnr" in p for p in found)
    assert any("eval.num 1 is less than the world size 2" in p for p in found)
    assert any("eval.steps 500 is outside 1..100" in p for p in found)
    assert any(p.startswith("eval.classifier:") and "nope" in p for p in found)
    assert any(p.startswith("eval.inception:") and "none.pt" in p for p in found)


class Recorder:
    """A Monitor that keeps what it is given."""

    def __init__(self):
        self.values, self.console = {}, []

    def scalars(self, step, values, console=True):
        self.values.update(values)
        if console:
            self.console.append(values)


def _training_cfg(run, classifier_run, num):
    state = sample.read_denoiser(run)[0]
    cfg = config.from_dict(state["config"])
    cfg.eval = dataclasses.replace(cfg.eval, every_steps=2, num=num, steps=2, metrics=["attr_acc", "clip_score"],
                                   classifier=str(classifier_run))
    model, _ = sample.build_denoiser(state, "cpu")
    return cfg, state["meta"], model


def test_training_hook_evaluates_every_n_steps_on_one_process(diffusion_run, classifier_run):
    cfg, meta, model = _training_cfg(diffusion_run, classifier_run, num=3)
    hook, recorder = ev.TrainingEval(cfg, meta, dist.Env()), Recorder()
    assert hook(3, model, recorder) is None and recorder.values == {}
    report = hook(4, model, recorder)
    assert report["attr_acc"]["num"] == 3 and report["clip_score"]["num"] == 3
    assert set(recorder.console[0]) == {"eval/attr_acc", "eval/attr_acc_real", "eval/clip_score",
                                        "eval/clip_score_real"}
    assert {f"eval/attr_acc/{name}" for name in ATTRIBUTES} <= set(recorder.values)
    assert recorder.values["eval/clip_score"] == report["clip_score"]["samples"]


def _rank_worker(rank, world, port, run, classifier_run, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    env = dist.init(60)
    try:
        cfg, meta, model = _training_cfg(run, classifier_run, num=3)
        report = ev.TrainingEval(cfg, meta, env)(2, model, Recorder())
        (out / f"rank{rank}.json").write_text(json.dumps(report))
    finally:
        dist.cleanup()


@pytest.mark.slow
def test_two_ranks_split_the_samples_and_gather_the_same_report(diffusion_run, classifier_run, tmp_path):
    mp.spawn(_rank_worker, args=(2, 31500 + os.getpid() % 1000, diffusion_run, classifier_run, tmp_path), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0 == r1  # every rank holds the gathered result
    assert r0["attr_acc"]["num"] == r0["clip_score"]["num"] == 3  # 2 samples on rank 0, 1 on rank 1
    cfg, meta, model = _training_cfg(diffusion_run, classifier_run, num=3)
    single = ev.TrainingEval(cfg, meta, dist.Env())(2, model, Recorder())
    assert r0["attr_acc"]["real_mean"] == pytest.approx(single["attr_acc"]["real_mean"], abs=1e-12)
    assert r0["clip_score"]["real"] == pytest.approx(single["clip_score"]["real"], abs=1e-6)


def _tb_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0}).Reload().Tags()["scalars"]


@pytest.mark.slow
def test_cli_reports_json_to_stdout_a_file_and_tensorboard(diffusion_run, classifier_run, shards_dir, capsys,
                                                           monkeypatch):
    monkeypatch.delenv(fid.ENV, raising=False)
    assert ev.main(["--checkpoint", str(diffusion_run), "--data", str(shards_dir), "--classifier", str(classifier_run),
                    "--num", "3", "--steps", "2", "--attributes", "visible", "--no-progress"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["step"] == 2 and report["metrics"] == ["attr_acc", "clip_score"]
    assert report["attr_acc"]["attributes"] == list(synthetic.VISIBLE) and report["attr_acc"]["num"] == 3
    assert report["skipped"] == {"fid": fid.SKIP_MESSAGE} and fid.SKIP_MESSAGE in captured.err
    assert "attribute accuracy over 8 attributes, 3 samples" in captured.err
    saved = diffusion_run / "eval" / "step_00000002_num3_steps2_guidance3.json"
    assert json.loads(saved.read_text()) == report
    assert {"eval/attr_acc", "eval/attr_acc_real", "eval/clip_score", "eval/attr_acc/Smiling"} <= set(
        _tb_scalars(diffusion_run))

    again = ev.evaluate(diffusion_run, shards_dir, ev.METRICS, num=3, steps=2,
                        classifier=classifier_run, attributes="visible", progress=False)
    assert again == report  # a seed gives the same report


@pytest.mark.slow
def test_cli_errors_are_one_line(diffusion_run, shards_dir, capsys):
    assert ev.main(["--checkpoint", str(diffusion_run), "--metrics", "attr_acc,bleu"]) == 2
    assert "ddpdiff.eval: error: --metrics: unknown" in capsys.readouterr().err
    assert ev.main(["--checkpoint", str(diffusion_run), "--data", str(shards_dir), "--classifier",
                    str(diffusion_run), "--metrics", "attr_acc", "--num", "2", "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ddpdiff.eval: error: ") and "not an attribute classifier checkpoint" in err
    assert ev.main(["--checkpoint", str(diffusion_run), "--steps", "500"]) == 2
    assert "--steps 500 is outside 1..100" in capsys.readouterr().err
