"""tools/gpu_check.sh end to end on the CPU (--cpu), so its first GPU run is not its first run."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_gpu_check_runs_every_step_and_reports_json(repo, tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run(["bash", "tools/gpu_check.sh", str(out), "--cpu"], cwd=repo, capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "cpu" and report["failed_steps"] == 0
    steps = {k[len("step_"):]: v for k, v in report.items() if k.startswith("step_")}
    assert set(steps) == {"environment", "synthetic", "shards", "train_smoke", "bench_train",
                          "bench_train_compile", "bench_memory", "bench_saves", "bench_sample", "deterministic_a",
                          "deterministic_b", "determinism"}
    assert all(s["status"] == 0 and s["milliseconds"] > 0 for s in steps.values())
    assert report["environment"]["torch"] and report["environment"]["cuda_available"] is False
    assert [r["grad_checkpointing"] for r in report["bench_train"]["results"]] == [False, True]
    assert all(r["images_per_s"] > 0 for r in report["bench_train"]["results"])
    assert [r["grad_checkpointing"] for r in report["bench_memory"]["results"]] == [False, True]
    assert report["bench_memory"]["results"][0]["saved_mib_per_image"] > 0
    saves = report["bench_saves"]["checkpoint_saves"]
    assert saves["bytes"] > 0 and all(saves[m]["written_s_median"] >= saves[m]["held_s_median"] > 0
                                      for m in ("blocking", "background"))
    assert report["bench_sample"]["sample_images_per_s"] > 0 and report["bench_sample"]["sr_images_per_s"] > 0
    assert report["determinism"]["bitwise_equal"] is True
    log = (out / "gpu_check.log").read_text()
    assert "world_size=1" in log and "backend=gloo" in log
