"""tools/bench_train.py: runs the smoke config end to end and reports consistent JSON."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
from conftest import load_tool

from ddpdiff import config, models
from ddpdiff.models import DenoiserMeta


@pytest.mark.parametrize("source", ["shards", "synthetic"])
def test_bench_train_reports_sane_json(source, shards_dir, python, repo, tmp_path):
    data = ["--data.shards", str(shards_dir)] if source == "shards" else ["--synthetic", "--dim", "64", "--token-dim", "32"]
    out = subprocess.run([python, "tools/bench_train.py", "--config", "jobs/configs/smoke.yaml", *data,
                          "--steps", "2", "--warmup", "1", "--grad-checkpointing", "both", "--peak-tflops", "1",
                          "--saves", "2", "--json", str(tmp_path / "bench.json")], cwd=repo, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert json.loads((tmp_path / "bench.json").read_text()) == report
    assert report["batch"] == 8 and report["params"] > 0 and report["gflops_forward_per_image"] > 0
    off, on = report["results"]
    assert (off["grad_checkpointing"], on["grad_checkpointing"]) == (False, True)
    for r in (off, on):
        assert r["images_per_s"] > 0 and r["max_rss_gib"] > 0 and r["nonfinite_steps"] == 0
        assert r["step_s_min"] <= r["step_s_median"] <= r["step_s_max"]
        assert math.isclose(r["images_per_s"], 8 / r["step_s_median"])
        assert math.isclose(r["tflops"], 3 * report["gflops_forward_per_image"] * r["images_per_s"] / 1e3)
        assert math.isclose(r["mfu"], r["tflops"] / 1.0)
    assert set(report["checkpointing"]) == {"memory_saving", "time_cost"}
    saves = report["checkpoint_saves"]
    assert saves["bytes"] > 4 * 4 * report["params"]  # model, EMA and two Adam states in fp32
    for mode in ("blocking", "background"):
        assert 0 < saves[mode]["held_s_median"] <= saves[mode]["held_s_max"]
        assert saves[mode]["held_s_median"] <= saves[mode]["written_s_median"]


def conv_widths(model: torch.nn.Module) -> list[int]:
    """Output widths of the 3x3 convolutions (sorted: the two register modules in different orders): the
    U-Net's levels, residual blocks and resamplers."""
    return sorted(m.out_channels for m in model.modules()
                  if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))


def test_reference_unet_has_our_widths_and_depth():
    """Same 3x3 convolutions, level by level, as our U-Net; its extra parameters are diffusers' transformer
    blocks (a GEGLU feed-forward and self-attention beside each cross-attention): at most 1.5x ours (celeba64's
    shape: 1.41x at full width)."""
    bench = load_tool("bench_train")
    cfg = config.load("jobs/configs/celeba64.yaml", ["--model.channels", "32"])
    meta = DenoiserMeta(clip={"model": "synthetic", "dim": 64, "token_dim": 32}, image_size=64,
                        empty_prompt={"clip_text": [0.0] * 64, "tokens": [[0.0] * 32] * 2})
    ours = models.build_denoiser(cfg.model, cfg.diffusion.timesteps, meta)
    ref = bench.reference_unet(cfg.model, meta, cfg.diffusion.timesteps)
    assert conv_widths(ref) == conv_widths(ours) and len(conv_widths(ours)) == 52
    assert 1.0 < models.count_params(ref) / models.count_params(ours) < 1.5
    x, t, cond, drop = models.example_inputs(ours, 2, 64, num_tokens=5)
    assert ref(x, t, cond, drop).shape == x.shape
    with pytest.raises(config.ConfigError, match="--reference diffusers"):
        bench.reference_unet(config.load("jobs/configs/celeba64.yaml", ["--model.cond", "pooled"]).model, meta, 100)


def test_bench_train_prints_the_ratio_to_the_diffusers_reference(python, repo):
    out = subprocess.run([python, "tools/bench_train.py", "--config", "jobs/configs/smoke.yaml", "--synthetic",
                          "--dim", "64", "--token-dim", "32", "--steps", "1", "--warmup", "0", "--reference",
                          "diffusers"], cwd=repo, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    ours, ref = report["results"][0], report["reference"]["results"][0]
    assert report["reference"]["params"] > report["params"] > 0
    assert report["reference"]["gflops_forward_per_image"] > 0 and ref["images_per_s"] > 0
    vs = report["vs_reference"][0]
    assert math.isclose(vs["images_per_s_ratio"], ours["images_per_s"] / ref["images_per_s"])
    assert math.isclose(vs["tflops_ratio"], ours["tflops"] / ref["tflops"])
    assert f"ours / diffusers: images/s {vs['images_per_s_ratio']:.3f}x" in out.stderr
