"""Export a checkpoint's EMA weights to one safetensors file, to share or deploy: no optimizer state, no pickle.

  python -m ddpdiff.export --checkpoint runs/celeba64 --out celeba64.safetensors [--dtype bf16]

Works for the diffusion model, the SRResNet upsampler and the attribute classifier alike (the file records
which). The file carries the config and the metadata that rebuild the network (CLIP model, image size, empty
prompt) and is accepted wherever a checkpoint is: `python -m ddpdiff.sample --checkpoint FILE [--upsampler
FILE]`, `python -m ddpdiff.eval --checkpoint FILE [--classifier FILE]`, `Pipeline.from_pretrained(FILE)`.
fp32 gives the checkpoint's images exactly; bf16 and fp16 files are half the size and give images within a
few 8-bit levels of them (README, "Export").
"""

from __future__ import annotations

import argparse
import sys

from .errors import cli
from .weights import DTYPES, SUFFIX, export


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpdiff.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR|FILE",
                   help="checkpoint, or a run directory meaning its newest complete checkpoint")
    p.add_argument("--out", required=True, metavar=f"FILE{SUFFIX}",
                   help="the file to write (written under a temporary name, then renamed; overwritten)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                   help="precision of the stored weights: fp32 reproduces the checkpoint's samples exactly, "
                        "bf16/fp16 halve the file (default fp32)")
    return p


@cli("ddpdiff.export")
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    w = export(args.checkpoint, args.out, args.dtype)
    size = w.path.stat().st_size
    print(f"{w.path}: {w.meta.kind} EMA weights of step {w.step} in {args.dtype}, {size / 1e6:.1f} MB "
          f"(from {args.checkpoint})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
