#!/usr/bin/env python3
"""Turn a CelebA folder into WebDataset training shards with CLIP image, text and token embeddings.

Writes OUT/{train,val,test}/SPLIT-NNNNNN.tar and OUT/manifest.json (layout: docs/architecture.md).
Restartable (--resume), byte-identical for the same input and flags, and splittable over a SLURM array
(--num-tasks/--task-index, then --merge OUT). Bad annotation files, a refused OUT or an unloadable CLIP
model exit with status 2 and one line saying what is wrong. --verify OUT rehashes every shard and prints
one line per shard that is not what manifest.json recorded (exit status 1 if any).

  make_shards.py --root data/celeba --out data/shards --clip-pretrained /weights/ViT-B-32.bin  # offline, OpenAI's
  make_shards.py --root /tmp/celeba --out /tmp/shards --clip-model tiny --clip-pretrained none   # tests, demo
  make_shards.py --verify data/shards   # after copying shards to a cluster, before a long run
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpdiff import celeba, clip, data, shards  # noqa: E402
from ddpdiff.errors import cli  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    num_tasks, task_index = shards.task_from_env()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", help="CelebA root, in any of the layouts it ships in (the layout found is named in "
                                  "one line): the official one (img_align_celeba/, list_attr_celeba.txt, "
                                  "list_eval_partition.txt, optional identity_CelebA.txt), torchvision's (the same "
                                  "in ROOT/celeba/) or Kaggle's (list_attr_celeba.csv, list_eval_partition.csv, "
                                  "img_align_celeba/img_align_celeba/)")
    p.add_argument("--out", help="output folder for the shards and manifest.json")
    p.add_argument("--merge", metavar="OUT", help="only combine the finished tasks' files under OUT/tasks into "
                                                  "OUT/manifest.json (the last step of a SLURM array)")
    p.add_argument("--verify", metavar="OUT", help="only check every shard under OUT against manifest.json's "
                                                   "sha256: one line per shard that differs, exit status 1 if any")
    p.add_argument("--image-size", type=int, default=64, help="side of the resized square image (default 64)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="images per shard (default 1000)")
    p.add_argument("--clip-model", default=clip.DEFAULT_MODEL,
                   help=f"open_clip model name, 'tiny' (shipped test model) or a model config .json (default "
                        f"{clip.DEFAULT_MODEL}: OpenAI's weights need QuickGELU)")
    p.add_argument("--clip-pretrained", default=clip.DEFAULT_PRETRAINED,
                   help="open_clip pretrained tag, a local weights file, or 'none' for seeded random weights; a "
                        "tag trained with QuickGELU (openai) forces it, a local file gets the --clip-model's")
    p.add_argument("--no-tokens", dest="tokens", action="store_false",
                   help="omit KEY.clip_tokens.npy (per-token text states)")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="CLIP device (default: cuda if available)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes for decode/crop/resize (default: all usable cores; 0 = in this process)")
    p.add_argument("--clip-batch-size", type=int, default=256, help="images and prompts per CLIP forward")
    p.add_argument("--resume", action="store_true", help="continue a killed run, keeping verified finished shards")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what an earlier run wrote in OUT: its SPLIT/SPLIT-NNNNNN.tar shards, manifest.json "
                        "and tasks/task-*.json; other files in OUT are kept")
    p.add_argument("--num-tasks", type=int, default=num_tasks,
                   help=f"tasks sharing the work (default: $SLURM_ARRAY_TASK_COUNT or 1; now {num_tasks})")
    p.add_argument("--task-index", type=int, default=task_index,
                   help=f"this task's index (default: $SLURM_ARRAY_TASK_ID or 0; now {task_index})")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    args = p.parse_args(argv)
    write = bool(args.root or args.out)
    if [bool(args.merge), bool(args.verify), write].count(True) != 1 or write and not (args.root and args.out):
        p.error("pass --root and --out to write shards, --merge OUT to combine finished tasks, or --verify OUT")
    return args


def summary(manifest: dict) -> str:
    """What a run wrote and every image it skipped, with the reason."""
    counts = ", ".join(f"{s} {manifest['splits'][s]['count']}" for s in celeba.SPLITS)
    shards_total = sum(len(v["shards"]) for v in manifest["splits"].values())
    lines = [f"wrote {manifest['count']} samples in {shards_total} shards ({counts}); "
             f"skipped {len(manifest['skipped'])}"]
    lines += [f"  skipped {s['file']}: {s['reason']}" for s in manifest["skipped"]]
    return "\n".join(lines)


def verify(out: str) -> int:
    """Print one line per shard under `out` that differs from manifest.json, then a count; 1 if any differ."""
    manifest = data.load_manifest(out)
    total = sum(len(v["shards"]) for v in manifest["splits"].values())
    differ = data.verify_shards(out, manifest=manifest)
    for line in differ:
        print(line)
    fix = "copy them again, or rewrite them: make_shards.py --resume with the run's flags"
    print(f"{out}: {total - len(differ)} of {total} shards match manifest.json"
          + (f"; {len(differ)} differ ({fix})" if differ else ""))
    return 1 if differ else 0


@cli("make_shards")
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        print(summary(shards.merge(args.merge)))
        return 0
    if args.verify:
        return verify(args.verify)
    result = shards.write_shards(
        args.root, args.out, image_size=args.image_size, samples_per_shard=args.samples_per_shard,
        clip_model=args.clip_model, clip_pretrained=args.clip_pretrained, tokens=args.tokens,
        device=args.device, workers=args.workers, clip_batch_size=args.clip_batch_size, resume=args.resume,
        overwrite=args.overwrite, num_tasks=args.num_tasks, task_index=args.task_index,
        progress=args.progress)
    if args.num_tasks == 1:
        print(summary(result))
    else:
        skipped = sum(len(s["skipped"]) for s in result["shards"])
        print(f"task {args.task_index} of {args.num_tasks}: wrote {len(result['shards'])} shards, skipped "
              f"{skipped} images; run `{Path(__file__).name} --merge {args.out}` once every task is done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
