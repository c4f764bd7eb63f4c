"""tools/bench_train.py: runs the smoke config end to end and reports consistent JSON."""

from __future__ import annotations

import json
import math
import subprocess

import pytest


@pytest.mark.parametrize("source", ["shards", "synthetic"])
def test_bench_train_reports_sane_json(source, shards_dir, python, repo, tmp_path):
    data = ["--data.shards", str(shards_dir)] if source == "shards" else ["--synthetic", "--dim", "64", "--token-dim", "32"]
    out = subprocess.run([python, "tools/bench_train.py", "--config", "jobs/configs/smoke.yaml", *data,
                          "--steps", "2", "--warmup", "1", "--grad-checkpointing", "both", "--peak-tflops", "1",
                          "--json", str(tmp_path / "bench.json")], cwd=repo, capture_output=True, text=True)
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
