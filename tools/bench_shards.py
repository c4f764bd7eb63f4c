#!/usr/bin/env python3
"""Benchmark sharding: CPU-stage images/s per core, a full make_shards run, and the size of token states.

  cpu     decode + crop + resize + JPEG re-encode + CLIP preprocessing in ONE process (= per core)
  full    run tools/make_shards.py as a child; report wall time and peak RSS of its whole process tree
  tokens  token-state bytes for every image of a CelebA root: per-sample L from the real prompts through
          the model's tokenizer, x token width x 2 bytes (float16), plus npy and tar overhead
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import open_clip  # noqa: E402

from ddpdiff import celeba, clip, shards  # noqa: E402


def bench_cpu(args) -> None:
    shards.worker_init()  # one torch thread, as in make_shards' worker processes
    files = celeba.read_annotations(args.root)["file"].tolist()[: args.num]
    for model in args.clip_model:
        prepare = shards.PrepareImage(celeba.find_layout(args.root).images, args.image_size,
                                      clip.load(model, "none").preprocess)
        for f in files[:20]:  # warm up caches and lazy imports
            prepare(f)
        start = time.perf_counter()
        for f in files:
            prepare(f)
        rate = len(files) / (time.perf_counter() - start)
        print(f"cpu stage, {model} preprocessing: {rate:.0f} images/s on one core ({len(files)} images)")


def _tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants, from /proc."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * 4096
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def bench_full(args, rest: list[str]) -> None:
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "make_shards.py"), "--root", args.root,
           "--out", args.out, *rest]
    start, peak = time.perf_counter(), 0
    proc = subprocess.Popen(cmd)
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.5)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"make_shards failed with status {proc.returncode}")
    print(f"full run: {wall:.0f} s wall, peak RSS of the process tree {peak / 2**20:.0f} MiB; {' '.join(cmd[1:])}")


def bench_tokens(args) -> None:
    table = celeba.read_annotations(args.root)
    tokenizer = open_clip.get_tokenizer(args.clip_model)
    width = open_clip.get_model_config(args.clip_model)["text_cfg"]["width"]
    prompts = [celeba.prompt(dict(zip(celeba.ATTRIBUTES, row)))
               for row in table[list(celeba.ATTRIBUTES)].itertuples(index=False)]
    context = tokenizer.context_length
    lengths = np.array([min(len(tokenizer.encode(p)) + 2, context) for p in prompts])  # + start/end of text
    raw = int(lengths.sum()) * width * 2
    npy = len(shards.npy_bytes(np.zeros((int(lengths.max()), width), np.float16))) - int(lengths.max()) * width * 2
    in_tar = sum(512 + -(-(npy + n * width * 2) // 512) * 512 for n in lengths)  # header + padded data
    print(f"{len(prompts)} prompts, {args.clip_model} tokenizer: L mean {lengths.mean():.2f}, "
          f"min {lengths.min()}, max {lengths.max()}, truncated at {context}: {(lengths == context).sum()}")
    print(f"token states (float16, width {width}): {raw / 1e9:.2f} GB raw, {in_tar / 1e9:.2f} GB as tar members")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    cpu = sub.add_parser("cpu", help="CPU-stage images/s on one core")
    cpu.add_argument("--root", required=True, help="CelebA root (e.g. from tools/make_synthetic_celeba.py)")
    cpu.add_argument("--num", type=int, default=2000, help="images to time")
    cpu.add_argument("--image-size", type=int, default=64)
    cpu.add_argument("--clip-model", nargs="+", default=["tiny", "ViT-B-32"],
                     help="models whose preprocessing to time (weights are not loaded)")
    full = sub.add_parser("full", help="time a make_shards run; arguments after -- go to make_shards.py")
    full.add_argument("--root", required=True)
    full.add_argument("--out", required=True)
    tokens = sub.add_parser("tokens", help="token-state size for every image of a root")
    tokens.add_argument("--root", required=True)
    tokens.add_argument("--clip-model", default="ViT-B-32")
    args, rest = p.parse_known_args(argv)
    if rest and args.what != "full":
        p.error(f"unrecognised arguments: {' '.join(rest)}")
    if args.what == "cpu":
        bench_cpu(args)
    elif args.what == "full":
        bench_full(args, [a for a in rest if a != "--"])
    else:
        bench_tokens(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
