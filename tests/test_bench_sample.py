"""tools/bench_sample.py: the sampler x steps table, with attribute accuracy from a trained checkpoint."""

from __future__ import annotations

import json
import subprocess


def test_bench_sample_tables_each_sampler_and_step_count(diffusion_run, classifier_run, python, repo):
    out = subprocess.run([python, "tools/bench_sample.py", "--checkpoint", str(diffusion_run), "--classifier",
                          str(classifier_run), "--samplers", "ddim,dpmpp2m", "--steps", "2,3", "--num", "4",
                          "--batch", "4", "--no-sr"], cwd=repo, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    runs = report["runs"]
    assert [(r["sampler"], r["steps"]) for r in runs] == [("ddim", 2), ("ddim", 3), ("dpmpp2m", 2), ("dpmpp2m", 3)]
    assert all(0 <= r["attr_acc"] <= 1 and r["sample_images_per_s"] > 0 for r in runs)
    assert report["sample_images_per_s"] == runs[0]["sample_images_per_s"] and "sr_images_per_s" not in report
    rows = [line for line in out.stderr.splitlines() if line.startswith("| dpmpp2m | 3 |")]
    assert len(rows) == 1 and rows[0].endswith(f" {runs[3]['attr_acc']:.3f} |")


def test_bench_sample_names_an_unknown_sampler(python, repo):
    out = subprocess.run([python, "tools/bench_sample.py", "--samplers", "ddim,euler"], cwd=repo,
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2 and "unknown sampler(s) euler (known: ddpm, ddim, dpmpp2m)" in out.stderr


def test_reference_steps_measure_how_far_each_deterministic_run_is_from_many_steps(diffusion_run, python, repo):
    """DDIM at the reference's own step count is the reference (distance 0); fewer steps are not."""
    out = subprocess.run([python, "tools/bench_sample.py", "--checkpoint", str(diffusion_run), "--samplers",
                          "ddim,dpmpp2m,ddpm", "--steps", "2,6", "--reference-steps", "6", "--num", "4", "--batch", "4",
                          "--no-sr"], cwd=repo, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    runs = {(r["sampler"], r["steps"]): r for r in json.loads(out.stdout)["runs"]}
    assert runs[("ddim", 6)]["ode_error"] == 0
    assert runs[("ddim", 2)]["ode_error"] > 0 and runs[("dpmpp2m", 2)]["ode_error"] > 0
    assert "ode_error" not in runs[("ddpm", 2)]  # stochastic: no ODE solution to approach
    assert "| ddpm | 2 |" in out.stderr and out.stderr.count("distance from the reference") >= 2


def test_bench_sample_tables_accuracy_and_diversity_per_guidance_and_interval(diffusion_run, classifier_run,
                                                                            shards_dir, python, repo):
    from ddpdiff import data
    from ddpdiff.celeba import ATTRIBUTES

    attrs = data.split_attributes(shards_dir, "val")  # an attribute with two groups of >= 2 val images
    name = next(n for i, n in enumerate(ATTRIBUTES) if 2 <= attrs[:, i].sum() <= len(attrs) - 2)
    out = subprocess.run([python, "tools/bench_sample.py", "--checkpoint", str(diffusion_run), "--classifier",
                          str(classifier_run), "--attributes", name, "--diversity", "--diversity-samples", "2",
                          "--guidance", "1,3", "--guidance-interval", "0.2,0.8", "--steps", "2", "--num", "4",
                          "--batch", "4", "--no-sr"], cwd=repo, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    runs = json.loads(out.stdout)["runs"]
    assert [(r["guidance"], r["guidance_interval"]) for r in runs] == [(1, None), (3, None), (3, [0.2, 0.8])]
    assert all(0 <= r["attr_acc"] <= 1 and r["diversity_ratio"] == r["diversity"] / r["diversity_real"] for r in runs)
    assert len({r["diversity_real"] for r in runs}) == 1 and runs[1]["diversity"] != runs[2]["diversity"]
    rows = [line for line in out.stderr.splitlines() if line.startswith("| dpmpp2m | 2 | 3 in 0.2..0.8 |")]
    assert len(rows) == 1 and rows[0].endswith(f" {runs[2]['attr_acc']:.3f} | {runs[2]['diversity_ratio']:.3f} |")
    assert "| guidance |" in out.stderr and "diversity ratio |" in out.stderr
