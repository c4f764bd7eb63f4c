#!/usr/bin/env python3
"""Sampling speed on one device: 64x64 images/s through `Pipeline.generate` (classifier-free guidance, DDIM),
and images/s through the x8 SRResNet upsampler.

  python tools/bench_sample.py [--config jobs/configs/celeba64.yaml] [--sr-config jobs/configs/sr.yaml] \
      [--num 256] [--batch 256] [--steps 50] [--device cuda] [--json OUT]

The networks have random weights of the configs' sizes (speed does not depend on the weights); conditions
are random CLIP-sized embeddings (512-d, `--tokens` token states). The first batch is a warm-up and not
timed. Prints progress to stderr and one JSON object to stdout (and `--json`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ddpdiff import config, dist, models  # noqa: E402
from ddpdiff.diffusion import Diffusion  # noqa: E402
from ddpdiff.errors import cli  # noqa: E402
from ddpdiff.models import DenoiserMeta, SRMeta  # noqa: E402
from ddpdiff.pipeline import Pipeline, upsample  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds one call of fn takes, between device synchronisations."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


@cli("bench_sample")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="jobs/configs/celeba64.yaml", help="diffusion config (model, diffusion)")
    p.add_argument("--sr-config", default="jobs/configs/sr.yaml", help="SRResNet config (sr section)")
    p.add_argument("--num", type=int, default=256, help="timed 64x64 images (default 256)")
    p.add_argument("--batch", type=int, default=256, help="images per sampler batch (default 256)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--guidance", type=float, default=3.0, help="guidance scale (default 3: two forwards a step)")
    p.add_argument("--sr-batch", type=int, default=16, help="images per upsampler batch (default 16)")
    p.add_argument("--tokens", type=int, default=36, help="prompt length in tokens (default 36)")
    p.add_argument("--device", help="torch device (default cuda if available, else cpu)")
    p.add_argument("--json", type=Path, help="also write the JSON result here")
    args = p.parse_args(argv)
    cfg = config.load(args.config)
    sr = config.load(args.sr_config, root=config.SRTrainerConfig).sr
    device = dist.default_device(args.device)
    dim = 512
    meta = DenoiserMeta(clip={"model": "synthetic", "dim": dim, "token_dim": dim}, image_size=64,
                        empty_prompt={"clip_text": [0.0] * dim, "tokens": [[0.0] * dim] * 2})
    torch.manual_seed(0)
    model = models.build_denoiser(cfg.model, cfg.diffusion.timesteps, meta).to(device).eval()
    pipe = Pipeline(model, Diffusion(cfg.diffusion), cfg.model, meta)
    n = args.num
    cond = {"pooled": torch.nn.functional.normalize(torch.randn(n, dim), dim=-1).to(device),
            "tokens": torch.randn(n, args.tokens, dim).to(device),
            "mask": torch.ones(n, args.tokens, dtype=torch.bool, device=device)}
    settings = {"steps": args.steps, "guidance": args.guidance, "batch_size": args.batch}
    warm = min(n, args.batch)
    timed(lambda: pipe.generate({k: v[:warm] for k, v in cond.items()}, list(range(warm)), **settings), device)
    images = []
    seconds = timed(lambda: images.append(pipe.generate(cond, list(range(n)), **settings)), device)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "config": args.config, "params": models.count_params(model),
              "num": n, "batch": args.batch, "steps": args.steps, "guidance": args.guidance,
              "sample_seconds": seconds, "sample_images_per_s": n / seconds}
    print(f"bench_sample: {n} images in {seconds:.2f} s: {n / seconds:.1f} images/s at 64x64, {args.steps} steps",
          file=sys.stderr)

    upsampler = models.build(SRMeta(scale=sr.scale, channels=sr.channels, num_blocks=sr.num_blocks)).to(device).eval()
    timed(lambda: upsample(upsampler, images[0][:args.sr_batch], args.sr_batch), device)
    sr_seconds = timed(lambda: upsample(upsampler, images[0], args.sr_batch), device)
    report.update({"sr_scale": sr.scale, "sr_batch": args.sr_batch, "sr_seconds": sr_seconds,
                   "sr_images_per_s": n / sr_seconds})
    print(f"bench_sample: x{sr.scale} upsampling: {n / sr_seconds:.1f} images/s", file=sys.stderr)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
