#!/usr/bin/env python3
"""The whole pipeline on synthetic data (`make demo`): CelebA-format images → shards → DDP training on 2
CPU ranks → samples from a few prompts → 512×512 upsampled PNGs.

Each stage is the same command a user runs on real data; a stage whose output is already complete is
skipped, so an interrupted demo picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Photo of person eyeglasses, smiling.",
    "Photo of person blond hair, wearing hat.",
    "Photo of person black hair, mustache.",
    "Photo of person gray hair, eyeglasses, mustache, smiling.",
]
# Never together in a training image, so the model meets them only as prompts: a pair drawn in separate
# places, and one where a colour could leak (hair colour into the dark mustache). Step 7 measures both.
HOLD_OUT = "Wearing_Hat+Eyeglasses,Blond_Hair+Mustache"


def stage(title: str, cmd: list[str], done: Path | None = None) -> None:
    print(f"\n=== {title}", flush=True)
    if done is not None and done.exists():
        print(f"    already done ({done} exists)", flush=True)
        return
    print("    $ " + " ".join(cmd), flush=True)
    start = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    code = subprocess.run(cmd, cwd=REPO, env=env).returncode
    if code != 0:
        sys.exit(f"demo: stage '{title}' failed with exit status {code}")
    print(f"    ({time.time() - start:.0f} s)", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any other --section.field value flag goes to ddpdiff.train, e.g. "
                                       "--train.max_steps=50 for a quick run.")
    p.add_argument("--out", default="demo", help="folder for everything the demo makes")
    p.add_argument("--num", type=int, default=6000, help="synthetic CelebA images")
    p.add_argument("--nproc", type=int, default=2, help="DDP ranks (torchrun --nproc_per_node)")
    p.add_argument("--eval-num", type=int, default=128, help="samples generated to measure attribute accuracy")
    args, train_args = p.parse_known_args(argv)
    out = Path(args.out).resolve()
    py = sys.executable
    started = time.time()

    celeba, shards, run = out / "celeba", out / "shards", out / "run"
    stage("1. synthetic CelebA", [py, "tools/make_synthetic_celeba.py", "--out", str(celeba), "--num", str(args.num),
                                         "--hold-out", HOLD_OUT],
          done=celeba / "list_attr_celeba.txt")
    stage("2. shards with CLIP embeddings (tiny random CLIP: real weights cannot be downloaded here)",
          [py, "tools/make_shards.py", "--root", str(celeba), "--out", str(shards), "--clip-model", "tiny",
           "--clip-pretrained", "none", "--samples-per-shard", "500"], done=shards / "manifest.json")
    stage(f"3. DDP training: torchrun --nproc_per_node={args.nproc} on the CPU",
          [py, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_port", "29512",
           "-m", "ddpdiff.train", "--config", "jobs/configs/demo.yaml", "--data.shards", str(shards),
           "--run.dir", str(run), *train_args])
    sr_run, samples = out / "sr", out / "samples"
    stage(f"4. SRResNet x8 upsampler: torchrun --nproc_per_node={args.nproc} -m ddpdiff.train_sr",
          [py, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_port", "29513",
           "-m", "ddpdiff.train_sr", "--config", "jobs/configs/sr_demo.yaml", "--data.shards", str(shards),
           "--run.dir", str(sr_run)])
    judge, judge_shards, classifier = out / "celeba_judge", out / "shards_judge", out / "classifier"
    stage("5a. the judge's own synthetic CelebA, with every attribute pair (a classifier trained on the held-out "
          "data never sees the pairs together and could not judge them)",
          [py, "tools/make_synthetic_celeba.py", "--out", str(judge), "--num", str(args.num), "--seed", "1"],
          done=judge / "list_attr_celeba.txt")
    stage("5b. its shards (no token states: the classifier reads images alone)",
          [py, "tools/make_shards.py", "--root", str(judge), "--out", str(judge_shards), "--clip-model", "tiny",
           "--clip-pretrained", "none", "--samples-per-shard", "500", "--no-tokens"],
          done=judge_shards / "manifest.json")
    stage(f"5c. attribute classifier that judges the samples: torchrun --nproc_per_node={args.nproc} "
          "-m ddpdiff.train_classifier",
          [py, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc), "--master_port", "29514",
           "-m", "ddpdiff.train_classifier", "--config", "jobs/configs/classifier_demo.yaml",
           "--data.shards", str(judge_shards), "--run.dir", str(classifier)])
    stage("6. samples from the prompts, upsampled 64 -> 512",
          [py, "-m", "ddpdiff.sample", "--checkpoint", str(run), *[a for p in PROMPTS for a in ("--prompt", p)],
           "--num", "4", "--upsampler", str(sr_run), "--out", str(samples)])
    stage("7. does the text condition work? attribute accuracy of samples for val prompts and for the held-out "
          "pairs, and the diversity of each prompt's samples",
          [py, "-m", "ddpdiff.eval", "--checkpoint", str(run), "--data", str(shards), "--metrics", "attr_acc,diversity",
           "--num", str(args.eval_num), "--classifier", str(classifier),
           "--attributes", "visible", "--held-out", HOLD_OUT])
    newest = max((run / "eval").glob("*.json"), key=lambda p: p.stat().st_mtime)
    report = json.loads(newest.read_text())
    accuracy = report["attr_acc"]

    print(f"\ndemo finished in {time.time() - started:.0f} s")
    print(f"  attribute accuracy of the samples on the visibly drawn attributes: {accuracy['mean']:.3f} "
          f"(the classifier on real val images: {accuracy['real_mean']:.3f})")
    print("  held-out pairs, never together in a training image (samples, then real val images with the pair):")
    for pair, v in report["held_out"]["pairs"].items():
        g, r = v["samples"], v["real"]
        print(f"    {pair:<24} accuracy {g['attr_acc']:.3f} ({r['attr_acc']:.3f}), both shown {g['both']:.3f} "
              f"({r['both']:.3f}), binding {g['binding']:.3f} ({r['binding']:.3f})")
    d = report["diversity"]
    print(f"  diversity of {d['samples_per_prompt']} samples of one prompt against real faces with the same "
          f"attributes: {d['ratio']:.2f} ({d['samples']:.1f} against {d['real']:.1f} levels, {d['prompts']} prompts)")
    print(f"  run directory (config, checkpoints): {run}")
    print(f"  TensorBoard:                        tensorboard --logdir {run / 'tb'} (upsampler: {sr_run / 'tb'})")
    print(f"  samples, 64x64:                     {samples}/p*_s*.png, one grid per prompt p*_grid.png")
    print(f"  upsampled 512x512:                  {samples}/p*_s*_512.png, p*_grid_512.png "
          f"(index: {samples / 'samples.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
