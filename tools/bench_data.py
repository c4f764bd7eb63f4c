"""Benchmark the training input pipeline: samples/s per core, single process and with loader workers, and
the bytes per batch a rank copies to its device.

Per core = samples / CPU seconds of the main process and its workers, so the figure does not depend on how
many cores the machine has. Bytes per batch: the tensors as the loader gives them (uint8 pixels, float16
embeddings) beside the same batch in float32 (`data.to_float`), the form batches had before. Without --shards
it first writes synthetic 64x64 shards with token states, encoded by a randomly initialised CLIP sized like
the shipped 'tiny' config or like ViT-B-32 (--dims), because only the byte sizes matter here:

    python tools/bench_data.py --images 2000 --dims vit-b-32 --workers 0 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ddpdiff import data  # noqa: E402

# A CLIP whose outputs have ViT-B-32's sizes (embedding 512, token states 512) but one layer per tower.
VIT_B_32_SIZED = {"embed_dim": 512,
                  "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 1}}


def make_shards(out: Path, images: int, dims: str) -> Path:
    from ddpdiff import shards, synthetic

    root = synthetic.make(out / "celeba", num=images, seed=0, workers=2, progress=False)
    clip_model = "tiny"
    if dims == "vit-b-32":
        clip_model = str(out / "vit_b_32_sized.json")
        Path(clip_model).write_text(json.dumps(VIT_B_32_SIZED))
    shards.write_shards(root, out / "shards", image_size=64, clip_model=clip_model, clip_pretrained="none",
                        samples_per_shard=500, workers=2, progress=False)
    return out / "shards"


def cpu_seconds() -> float:
    """CPU time of this process and its children so far, live ones (loader workers) read from /proc."""
    total = sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                for field in ("ru_utime", "ru_stime"))
    for task in Path("/proc/self/task").iterdir():
        for pid in (task / "children").read_text().split():
            stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def batch_bytes(batch: dict) -> tuple[int, int]:
    """Bytes of a batch's tensors as copied to the device, and once converted to float32 (`data.to_float`)."""
    tensors = [v for v in batch.values() if isinstance(v, torch.Tensor)]
    return sum(t.nbytes for t in tensors), sum(data.to_float(t).nbytes for t in tensors)


def measure(shards: Path, workers: int, batch_size: int, epochs: int) -> dict:
    """Index time; bytes per batch over a warm-up epoch; then samples/s over `epochs` epochs: wall clock and
    per CPU second."""
    t0 = time.perf_counter()
    loader = data.Loader(shards, split="train", batch_size=batch_size, workers=workers, tokens=True)
    index_s = time.perf_counter() - t0
    moved, as_float = (sum(b) / loader.batches_per_epoch for b in zip(*map(batch_bytes, loader.epoch(0))))
    cpu0, t0, samples = cpu_seconds(), time.perf_counter(), 0
    for e in range(1, epochs + 1):
        for batch in loader.epoch(e):
            samples += len(batch["key"])
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    n = loader.batches_per_epoch * batch_size
    return {"workers": workers, "samples_per_epoch": n, "index_us_per_sample": round(index_s / n * 1e6, 1),
            "samples_per_s": round(samples / wall), "samples_per_cpu_s": round(samples / cpu),
            "mb_per_batch": round(moved / 1e6, 2), "mb_per_batch_float32": round(as_float / 1e6, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=Path, help="existing shard folder (with token states); default: write one")
    ap.add_argument("--images", type=int, default=2000, help="synthetic images to shard when --shards is not given")
    ap.add_argument("--dims", choices=("tiny", "vit-b-32"), default="vit-b-32", help="CLIP output sizes to shard with")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=5, help="timed epochs (after one warm-up epoch)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader worker counts to measure")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # one core for the single-process figure, as in a loader worker
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or make_shards(Path(tmp), args.images, args.dims)
        manifest = data.load_manifest(shards)
        print(json.dumps({"machine": f"{platform.node()} {os.cpu_count()} cores {platform.processor()}".strip(),
                          "date": time.strftime("%Y-%m-%d"), "image_size": manifest["image_size"],
                          "clip_dim": manifest["clip"]["dim"], "token_dim": manifest["clip"]["token_dim"],
                          "batch_size": args.batch_size}))
        for workers in args.workers:
            print(json.dumps(measure(shards, workers, args.batch_size, args.epochs)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
