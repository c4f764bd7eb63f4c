"""Compare two folders of images (or .npz statistics files) by FID and KID, as torch-fidelity's command line does.

  python -m ddpdiff.fid DIR_A DIR_B --inception FILE      (either side may be a .npz stats file)

The network, weights file and formulas are those of ddpdiff.fid: torch-fidelity's port of the TensorFlow
Inception, loaded from a local weights file (--inception or DDPDIFF_INCEPTION_WEIGHTS), never downloaded.
The figures equal `torch_fidelity.calculate_metrics(input1=DIR_A, input2=DIR_B, fid=True, kid=True,
feature_extractor_weights_path=FILE)` on the same folders.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from torch import nn

from .. import dist
from ..atomic import sha256_file
from ..errors import cli
from . import (ENV, KID_SUBSET_SIZE, KID_SUBSETS, SKIP_MESSAGE, WEIGHTS_NAME, FIDError, Stats, folder_images,
               folder_stats, frechet_distance, kid, load, weights_path)


def side(source: str) -> Stats | list[Path]:
    """A stats file's contents, or a folder's images: what one side of the command line names, checked before
    the network loads."""
    if source.endswith(".npz") and not Path(source).is_dir():
        if not Path(source).is_file():
            raise FIDError(f"{source}: no such stats file")
        return Stats.load(source)
    return folder_images(source)


def side_stats(source: str, net: nn.Module, sha: str, batch_size: int, progress: bool) -> Stats:
    """Stats of one side: a folder's computed now, or a stats file's if made with the same weights."""
    found = side(source)
    if isinstance(found, list):
        return folder_stats(found, net, batch_size, progress, {"folder": os.path.realpath(source),
                                                               "weights_sha256": sha})
    made_with = (found.key or {}).get("weights_sha256")
    if made_with and made_with != sha:
        raise FIDError(f"{source}: computed with other Inception weights (sha256 {made_with[:16]}..., "
                       f"--inception has {sha[:16]}...)")
    return found


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpdiff.fid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", metavar="DIR_A|STATS.npz", help="a folder of images (.png/.jpg/.jpeg, not recursive) or "
                   "a stats file (this command's --save-stats, or pytorch-fid's mu/sigma .npz: FID only)")
    p.add_argument("b", metavar="DIR_B|STATS.npz", help="the other set, likewise")
    p.add_argument("--inception", metavar="FILE", help=f"torch-fidelity's {WEIGHTS_NAME} (default: ${ENV})")
    p.add_argument("--batch-size", type=int, default=64, help="images per Inception batch (default 64)")
    p.add_argument("--kid-subsets", type=int, default=KID_SUBSETS, help=f"KID subsets (default {KID_SUBSETS})")
    p.add_argument("--kid-subset-size", type=int, default=KID_SUBSET_SIZE,
                   help=f"images per KID subset, capped at the smaller set's size (default {KID_SUBSET_SIZE})")
    p.add_argument("--save-stats", metavar="OUT.npz", help="also write DIR_A's stats there, to reuse as DIR_A")
    p.add_argument("--device", help="torch device (default cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


@cli("ddpdiff.fid")
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    path = weights_path(args.inception)
    if path is None:
        raise FIDError(SKIP_MESSAGE.replace("fid skipped: ", ""))
    if args.batch_size < 1 or args.kid_subsets < 1:
        raise FIDError("--batch-size and --kid-subsets must be >= 1")
    for source in (args.a, args.b):
        side(source)
    net, sha = load(path, dist.default_device(args.device)), sha256_file(path)
    a, b = (side_stats(s, net, sha, args.batch_size, not args.no_progress) for s in (args.a, args.b))
    if args.save_stats:
        a.save(args.save_stats)
    print(f"FID: {frechet_distance(a, b):.6f} ({a.num} vs {b.num} images)")
    k = kid(a, b, args.kid_subsets, args.kid_subset_size)
    print(f"KID: {k['value']:.6f} ± {k['std']:.6f} ({k['subsets']} subsets of {k['subset_size']})" if k else
          "KID: not computed (a stats file without features)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
