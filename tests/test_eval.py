"""The evaluation CLI (`python -m ddpdiff.eval`): JSON report, files, TensorBoard, one-line errors, and the
same images as the sampling CLI and the in-training previews for the same seeds."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpdiff import eval as ev, fid, metrics, synthetic, train
from ddpdiff.metrics import attr_acc

from conftest import CONFIGS
from test_metrics import HELD_OUT


def _tb_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0}).Reload().Tags()["scalars"]


@pytest.mark.slow
def test_cli_reports_json_to_stdout_a_file_and_tensorboard(diffusion_run, classifier_run, shards_dir, capsys,
                                                           monkeypatch):
    monkeypatch.delenv(fid.ENV, raising=False)
    assert ev.main(["--checkpoint", str(diffusion_run), "--data", str(shards_dir), "--classifier", str(classifier_run),
                    "--num", "3", "--steps", "2", "--attributes", "visible", "--no-progress",
                    "--held-out", HELD_OUT, "--held-out-num", "2"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["step"] == 2 and report["metrics"] == ["attr_acc", "clip_cosine"]
    assert report["attr_acc"]["attributes"] == list(synthetic.VISIBLE) and report["attr_acc"]["num"] == 3
    assert report["skipped"]["fid"] == fid.SKIP_MESSAGE and fid.SKIP_MESSAGE in captured.err
    assert report["skipped"]["diversity"].startswith("diversity skipped: no 8 val images")  # 4 val images
    assert "attribute accuracy over 8 attributes, 3 samples" in captured.err
    held = report["held_out"]
    assert held["num"] == 2 and list(held["pairs"]) == HELD_OUT.split(",")
    for pair in held["pairs"].values():
        assert pair["num"] == 2 and all(0 <= v <= 1 for side in ("samples", "real") for v in pair[side].values())
    assert held["pairs"]["Brown_Hair+Mustache"]["real"]["own_colour"] == 1.0
    assert "held-out pairs (2 samples each" in captured.err
    saved = diffusion_run / "eval" / "step_00000002_num3_steps2_guidance2_interval0.17-0.88.json"
    assert json.loads(saved.read_text()) == report
    assert {"eval/attr_acc", "eval/attr_acc_real", "eval/clip_cosine", "eval/attr_acc/Smiling",
            "eval/held_out/Brown_Hair+Mustache/binding", "eval/held_out/Wearing_Hat+Eyeglasses/both_real"} <= set(
        _tb_scalars(diffusion_run))

    spec = metrics.EvalSpec(metrics.named(), num=3, steps=2, classifier=str(classifier_run),
                            attributes=metrics.parse_attributes("visible"), held_out=metrics.parse_held_out(HELD_OUT),
                            held_out_num=2)
    again = ev.evaluate(diffusion_run, spec, shards_dir, progress=False)
    assert again.to_dict() == report  # a seed gives the same report


@pytest.mark.slow
def test_cli_errors_are_one_line(diffusion_run, classifier_run, shards_dir, capsys):
    assert ev.main(["--checkpoint", str(diffusion_run), "--metrics", "attr_acc,bleu"]) == 2
    assert "ddpdiff.eval: error: --metrics: unknown" in capsys.readouterr().err
    assert ev.main(["--checkpoint", str(diffusion_run), "--data", str(shards_dir), "--classifier",
                    str(diffusion_run), "--metrics", "attr_acc", "--num", "2", "--steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ddpdiff.eval: error: ") and "not an attribute classifier checkpoint" in err
    assert ev.main(["--checkpoint", str(diffusion_run), "--steps", "500"]) == 2
    assert "--steps 500 is outside 1..100" in capsys.readouterr().err
    assert ev.main(["--checkpoint", str(diffusion_run), "--held-out", "Blond_Hair+Moustache"]) == 2
    assert "ddpdiff.eval: error: --held-out: attribute pair 'Blond_Hair+Moustache'" in capsys.readouterr().err
    assert ev.main(["--checkpoint", str(diffusion_run), "--data", str(shards_dir), "--classifier", str(classifier_run),
                    "--metrics", "attr_acc", "--num", "2", "--steps", "2", "--held-out", "Blond_Hair+Mustache"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ddpdiff.eval: error: --held-out Blond_Hair+Mustache: no val image of")


@pytest.mark.slow
def test_out_names_where_reports_go_and_no_metric_that_can_run_is_an_error(diffusion_run, shards_dir, tmp_path,
                                                                         capsys):
    common = ["--checkpoint", str(diffusion_run), "--data", str(shards_dir), "--num", "2", "--steps", "2",
              "--no-progress"]
    assert ev.main([*common, "--metrics", "attr_acc"]) == 2  # no --classifier: nothing it asked for can run
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("ddpdiff.eval: error: none of the requested metrics (attr_acc) can run; the line above says "
                       "what each needs")
    assert sum(attr_acc.TRAIN_CLASSIFIER_HINT in line for line in err) == 1  # the reason, said once
    out = tmp_path / "elsewhere"
    assert ev.main([*common, "--metrics", "clip_cosine", "--out", str(out)]) == 0
    assert len(list((out / "eval").glob("step_00000002_num2_*.json"))) == 1 and "eval/clip_cosine" in _tb_scalars(out)


@pytest.mark.slow
def test_sampling_cli_evaluation_and_training_previews_give_the_same_images(shards_dir, tmp_path):
    """One generation path: prompt i with seed S is the same image from `ddpdiff.sample --seed S`, from
    `ddpdiff.eval --seed S` (sample i) and from the preview grid of a run with train.seed S."""
    from ddpdiff import data, sample

    run, n = tmp_path / "run", 3
    assert train.main(["--config", str(CONFIGS / "smoke.yaml"), "--data.shards", str(shards_dir), "--run.dir",
                       str(run), "--train.max_steps", "2", "--train.seed", "5", "--sample.every_steps", "2",
                       "--sample.num_prompts", str(n), "--sample.steps", "3", "--sample.guidance", "2"]) == 0
    grid = np.asarray(Image.open(run / "samples" / "step_00000002.png"))
    previews = [grid[2:66, 2 + 66 * i:66 + 66 * i] for i in range(n)]  # make_grid: 2-pixel padding

    settings = ["--steps", "3", "--guidance", "2", "--seed", "5", "--batch-size", str(n)]
    assert ev.main(["--checkpoint", str(run), "--metrics", "clip_score", "--num", str(n), "--no-progress",
                    "--save-samples", str(tmp_path / "eval"), *settings]) == 0
    evaluated = [np.asarray(Image.open(tmp_path / "eval" / f"i{i:06d}.png")) for i in range(n)]

    prompts = data.read_samples(shards_dir, "val", n=n)["prompt"]
    assert sample.main(["--checkpoint", str(run), *[a for p in prompts for a in ("--prompt", p)], "--num", "1",
                        "--out", str(tmp_path / "cli"), *settings]) == 0
    sampled = [np.asarray(Image.open(tmp_path / "cli" / f"p{i:03d}_s000.png")) for i in range(n)]

    for i in range(n):
        assert np.array_equal(evaluated[i], previews[i]), f"eval and preview differ for prompt {i}"
        # the CLI encodes the prompt anew; the others read the shards' float16 embeddings of the same encoder
        assert np.abs(sampled[i].astype(int) - previews[i]).max() <= 1, f"sample CLI differs for prompt {i}"
    assert not np.array_equal(previews[0], previews[1])


@pytest.mark.slow
def test_diversity_samples_are_saved_per_prompt_and_sample_and_an_interval_names_the_report(diffusion_run,
                                                                                          shards_dir, tmp_path,
                                                                                          capsys):
    from ddpdiff import data
    from ddpdiff.celeba import ATTRIBUTES

    attrs = data.split_attributes(shards_dir, "val")  # an attribute with two groups of >= 2 val images
    name = next(n for i, n in enumerate(ATTRIBUTES) if 2 <= attrs[:, i].sum() <= len(attrs) - 2)
    assert ev.main(["--checkpoint", str(diffusion_run), "--data", str(shards_dir), "--metrics", "diversity",
                    "--attributes", name, "--diversity-samples", "2", "--num", "2", "--steps", "2",
                    "--guidance-interval", "0.2,0.8", "--save-samples", str(tmp_path / "s"), "--no-progress"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    d = report["diversity"]
    assert report["guidance_interval"] == [0.2, 0.8] and d["prompts"] == 2 and d["ratio"] == d["samples"] / d["real"]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(
        f"i{p['val_index']:06d}_s{k:03d}.png" for p in d["per_prompt"] for k in range(2))
    assert (diffusion_run / "eval" / "step_00000002_num2_steps2_guidance2_interval0.2-0.8.json").is_file()
    assert "diversity over 2 prompts x 2 samples" in captured.err
    assert {"eval/diversity", "eval/diversity_real", "eval/diversity_ratio"} <= set(_tb_scalars(diffusion_run))
    assert ev.main(["--checkpoint", str(diffusion_run), "--guidance-interval", "0.9,0.1"]) == 2
    assert "--guidance-interval 0.9,0.1: expected LO,HI" in capsys.readouterr().err


def _eval_json(cmd, env):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout[proc.stdout.index("{"):])


@pytest.mark.slow
def test_two_ranks_report_the_fid_and_kid_of_one_rank(diffusion_run, shards_copy, tmp_path):
    """torchrun with 2 gloo ranks: each makes half the samples and half the reference features; the sums
    all-reduced give the 1-rank figures for the same seeds."""
    from test_fid import random_inception

    weights = random_inception(tmp_path / "inception.pth")
    args = ["-m", "ddpdiff.eval", "--checkpoint", str(diffusion_run), "--data", str(shards_copy), "--metrics", "fid",
            "--num-samples", "6", "--steps", "2", "--inception", str(weights), "--fid-count", "9", "--batch-size", "2",
            "--no-progress", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    two = _eval_json([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args], env)
    stats = Path(two["fid"]["reference"]["stats"])
    by_two = fid.Stats.load(stats)
    stats.unlink()  # the 1-rank run computes the reference again, alone
    one = _eval_json([sys.executable, *args], env)
    by_one = fid.Stats.load(stats)

    assert (two["ranks"], one["ranks"]) == (2, 1) and two["fid"]["num"] == one["fid"]["num"] == 6
    assert two["fid"]["reference"] == one["fid"]["reference"]
    assert two["fid"]["reference"]["count"] == 9 and two["fid"]["value"] > 1
    np.testing.assert_allclose(by_two.sigma, by_one.sigma, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(by_two.features, by_one.features)
    assert two["fid"]["value"] == pytest.approx(one["fid"]["value"], rel=1e-7)
    assert two["fid"]["kid"] == pytest.approx(one["fid"]["kid"], rel=1e-7, abs=1e-12)


def test_spec_problems_are_worded_as_flags_by_the_cli_and_as_keys_by_training(diffusion_run, classifier_run,
                                                                              shards_dir, capsys):
    """One EvalSpec, one set of checks: the CLI names a setting by its flag, training by its `eval.` key."""
    from ddpdiff import config, data

    from conftest import CONFIGS

    assert ev.main(["--checkpoint", str(diffusion_run), "--metrics", "psnr"]) == 2
    assert capsys.readouterr().err.strip() == ("ddpdiff.eval: error: --metrics: unknown or no metrics ['psnr'] "
                                               "(known: attr_acc, clip_cosine, fid, diversity)")
    assert ev.main(["--checkpoint", str(diffusion_run), "--data", str(shards_dir), "--classifier", str(classifier_run),
                    "--metrics", "attr_acc", "--held-out", HELD_OUT, "--held-out-num", "0", "--steps", "2"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "ddpdiff.eval: error: --held-out-num 0: expected at least 1 sample per pair")
    assert ev.main(["--checkpoint", str(diffusion_run), "--data", str(shards_dir), "--metrics", "diversity",
                    "--diversity-samples", "1", "--steps", "2"]) == 2
    assert "error: --diversity-prompts 8 and --diversity-samples 1: expected at least" in capsys.readouterr().err

    cfg = config.load(CONFIGS / "smoke.yaml", ["--data.shards", str(shards_dir), "--eval.every_steps", "2",
                                               "--eval.metrics", "[psnr]", "--eval.num", "1"])
    found = train.eval_problems(cfg, 2, data.load_manifest(shards_dir))
    assert "eval.metrics: unknown or no metrics ['psnr'] (known: attr_acc, clip_cosine, fid, diversity)" in found
    assert "eval.num 1 is less than the world size 2 (every rank makes samples)" in found
    assert not any("--" in p for p in found)
    cfg.eval.metrics, cfg.eval.num = ["attr_acc", "clip_score"], 2  # the former name still works
    assert train.eval_problems(cfg, 2, data.load_manifest(shards_dir)) == []
    assert train.eval_spec(cfg).metrics == ("attr_acc", "clip_score")
