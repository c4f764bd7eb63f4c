"""tools/bench_memory.py: activation bytes per image under CUDA's autocast policy, on a machine without CUDA."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import load_tool

from ddpdiff import config
from ddpdiff.models import build_model, layers

# celeba64's shape (levels, attention at 16x16, cross-attention at 16 and 8, bf16, channels_last) at a quarter
# of its width, with ViT-B-32's token width: fast, and the same dtypes and layouts as the real job.
NARROW = ["--model.channels", "32"]


@pytest.fixture(scope="module")
def bench():
    return load_tool("bench_memory")


def census(bench, batch: int, overrides: list[str] = NARROW) -> dict:
    cfg = config.load("jobs/configs/celeba64.yaml", overrides)
    model = build_model(cfg.model, 64, 64, 32, torch.zeros(2, 32), cfg.diffusion.timesteps)
    return bench.saved_tensors(model, batch, 64, 36, torch.bfloat16, channels_last=True)


def float32_share(bench) -> float:
    per, _ = bench.per_image(census(bench, 2), census(bench, 4), (2, 4))
    return per.get("float32", 0) / sum(per.values())


def test_group_norm_keeps_activations_in_bf16_where_cuda_autocast_would_save_float32(bench, monkeypatch):
    """CUDA's autocast runs group_norm in float32 (the CPU's does not), so nn.GroupNorm saved most activations
    in float32 (celeba64: 115 of 167 MiB per image); `layers.GroupNorm` keeps them in bf16."""
    assert float32_share(bench) < 0.02
    monkeypatch.setattr(layers.GroupNorm, "forward", torch.nn.GroupNorm.forward)
    assert float32_share(bench) > 0.4


def test_bytes_per_image_do_not_depend_on_the_two_batches(bench):
    first = bench.per_image(census(bench, 2), census(bench, 4), (2, 4))
    second = bench.per_image(census(bench, 3), census(bench, 5), (3, 5))
    assert first == second
    per, fixed = first
    assert fixed > 0 and sum(per.values()) > 0 and min(per.values()) >= 0


def test_attention_saves_no_attention_matrix(bench, monkeypatch):
    """Through the fused kernels a GPU takes, which save a float32 log-sum-exp [B, heads, N], not the math
    fallback's float32 softmax [B, heads, N, L]."""
    def attention_matrices() -> list[tuple]:
        return [s["shape"] for s in census(bench, 2).values()
                if s["dtype"] == "float32" and len(s["shape"]) == 4 and s["shape"][:2] == (2, 4)]

    assert attention_matrices() == []
    monkeypatch.setattr(bench.FusedAttention, "__torch_function__",
                        lambda self, func, types, args=(), kwargs=None: func(*args, **(kwargs or {})))
    assert (2, 4, 16 * 16, 16 * 16) in attention_matrices()


def test_cli_reports_json_with_checkpointing_saving_memory(python, repo, tmp_path):
    out = subprocess.run([python, "tools/bench_memory.py", "--config", "jobs/configs/celeba64.yaml", *NARROW,
                          "--dim", "64", "--token-dim", "32", "--top", "3", "--json", str(tmp_path / "m.json")],
                         cwd=repo, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert json.loads((tmp_path / "m.json").read_text()) == report
    assert report["precision"] == "bf16" and report["fixed_mib"] == pytest.approx(report["params"] * 20 / 2**20)
    off, on = report["results"]
    assert (off["grad_checkpointing"], on["grad_checkpointing"]) == (False, True)
    for r in (off, on):
        assert r["saved_mib_per_image"] == pytest.approx(sum(r["by_dtype_mib_per_image"].values()))
        assert len(r["largest_at_batch_4"]) == 3
    assert on["saved_mib_per_image"] < 0.5 * off["saved_mib_per_image"]
    assert "| off |" in out.stderr and "| on |" in out.stderr


def test_cli_rejects_batches_in_the_wrong_order(python, repo):
    out = subprocess.run([python, "tools/bench_memory.py", "--config", "jobs/configs/smoke.yaml", "--batches", "4",
                          "2"], cwd=repo, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("bench_memory.py: error: --batches")
