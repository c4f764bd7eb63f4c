#!/usr/bin/env python3
"""Write a synthetic dataset in the real CelebA layout (images + the annotation files)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpdiff import synthetic  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__ + " Attributes " + ", ".join(synthetic.VISIBLE)
                                + " are drawn visibly; the other 32 are random labels.")
    p.add_argument("--out", required=True, help="output folder (becomes a CelebA root)")
    p.add_argument("--num", type=int, default=5000, help="number of images (202599 = full CelebA size)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives byte-identical files")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--hold-out", metavar="A+B[,C+D...]", help="attribute pairs no train-partition image shows "
                   "together (val and test keep them), e.g. Wearing_Hat+Eyeglasses,Blond_Hair+Mustache: the "
                   "combinations reach a model only as prompts (python -m ddpdiff.eval --held-out measures them)")
    args = p.parse_args(argv)
    if args.num < 1:
        p.error(f"--num must be at least 1, got {args.num}")
    try:
        hold_out = synthetic.parse_pairs(args.hold_out) if args.hold_out is not None else []
    except ValueError as e:
        p.error(f"--hold-out: {e}")
    synthetic.make(args.out, args.num, args.seed, args.workers, hold_out=hold_out)
    held = f" (train partition without {', '.join('+'.join(pair) for pair in hold_out)})" if hold_out else ""
    print(f"wrote {args.num} images to {Path(args.out) / 'img_align_celeba'}{held}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
