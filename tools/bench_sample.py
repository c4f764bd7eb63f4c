#!/usr/bin/env python3
"""Sampling speed on one device, and with a trained checkpoint, attribute accuracy and diversity, per sampler,
step count and guidance: 64x64 images/s through `Pipeline.generate` (classifier-free guidance), and images/s
through the x8 SRResNet upsampler.

  python tools/bench_sample.py [--config jobs/configs/celeba64.yaml] [--sr-config jobs/configs/sr.yaml] \
      [--samplers ddim,dpmpp2m] [--steps 5,10,20,50] [--num 256] [--batch 256] [--device cuda] [--json OUT]
  python tools/bench_sample.py --checkpoint demo/run --classifier demo/classifier \
      --samplers ddim,dpmpp2m --steps 5,10,20,50 --num 128 --no-sr
  python tools/bench_sample.py --checkpoint demo/run --classifier demo/classifier --diversity \
      --guidance 1,3,5 --guidance-interval 0.17,0.88 --steps 50 --num 256 --no-sr

Without `--checkpoint` the networks have random weights of the configs' sizes (speed does not depend on the
weights) and conditions are random CLIP-sized embeddings (512-d, `--tokens` token states). With
`--checkpoint`, the samples are those `python -m ddpdiff.eval --num NUM --seed 0` makes (val prompts of
`--data`, default the checkpoint's shards) and `--classifier` adds their attribute accuracy on `--attributes`:
the table that decides the default sampler. `--diversity` adds `ddpdiff.eval`'s diversity ratio (K samples of
each of P val prompts against K real val images with the same `--attributes`; docs/evaluation.md): with
`--guidance 1,3,5` and `--guidance-interval LO,HI` (each guidance above 1 again with guidance only in that
band of t/T), the table that decides the default guidance. `--reference-steps N` also samples the same seeds
and prompts with DDIM at N steps, the probability-flow ODE's solution that both deterministic samplers (ddim,
dpmpp2m) approach as steps grow, and reports each run's mean distance from it in 8-bit levels (`ode_error`):
how far few steps fall short of many, even where accuracy cannot tell. The first batch is a warm-up and not
timed. Prints progress and the table to stderr and one JSON object to stdout (and `--json`); its top-level
sample_* fields are the first sampler at the first step count."""

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
from ddpdiff.errors import UsageError, cli  # noqa: E402
from ddpdiff.eval import flag  # noqa: E402
from ddpdiff.images import as_saved  # noqa: E402
from ddpdiff.metrics import EvalError, EvalSpec, Evaluator, parse_attributes  # noqa: E402
from ddpdiff.models import DenoiserMeta, SRMeta  # noqa: E402
from ddpdiff.pipeline import Pipeline, upsample  # noqa: E402
from ddpdiff.sampling import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLERS, guidance_interval, image_seed  # noqa: E402


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


def int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 5,10,20, got {text!r}")


def float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 1,3,5, got {text!r}")


def name_list(text: str) -> list[str]:
    names = text.split(",")
    unknown = [n for n in names if n not in SAMPLERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown sampler(s) {', '.join(unknown)} (known: {', '.join(SAMPLERS)})")
    return names


def random_setup(args: argparse.Namespace, device: torch.device) -> tuple[Pipeline, dict, int]:
    """A random-weight denoiser of --config's size and random CLIP-sized conditions: for speed only."""
    cfg = config.load(args.config)
    dim = 512
    meta = DenoiserMeta(clip={"model": "synthetic", "dim": dim, "token_dim": dim}, image_size=64,
                        empty_prompt={"clip_text": [0.0] * dim, "tokens": [[0.0] * dim] * 2})
    torch.manual_seed(0)
    model = models.build_denoiser(cfg.model, cfg.diffusion.timesteps, meta).to(device).eval()
    cond = {"pooled": torch.nn.functional.normalize(torch.randn(args.num, dim), dim=-1).to(device),
            "tokens": torch.randn(args.num, args.tokens, dim).to(device),
            "mask": torch.ones(args.num, args.tokens, dtype=torch.bool, device=device)}
    return Pipeline(model, Diffusion(cfg.diffusion), cfg.model, meta), cond, models.count_params(model)


@cli("bench_sample")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="jobs/configs/celeba64.yaml", help="diffusion config (model, diffusion), "
                   "without --checkpoint")
    p.add_argument("--checkpoint", metavar="RUN_DIR|FILE", help="a trained diffusion checkpoint instead of random "
                   "weights: val prompts of --data, and attribute accuracy with --classifier")
    p.add_argument("--data", metavar="SHARDS", help="with --checkpoint: shards whose val prompts are sampled "
                   "(default: the checkpoint's data.shards)")
    p.add_argument("--classifier", metavar="RUN_DIR|FILE", help="with --checkpoint: attribute classifier run")
    p.add_argument("--attributes", default="visible", help="attributes the accuracy averages (default visible)")
    p.add_argument("--sr-config", default="jobs/configs/sr.yaml", help="SRResNet config (sr section)")
    p.add_argument("--no-sr", action="store_true", help="skip the upsampler timing")
    p.add_argument("--num", type=int, default=256, help="timed 64x64 images per sampler and step count (default 256)")
    p.add_argument("--batch", type=int, default=256, help="images per sampler batch (default 256)")
    p.add_argument("--samplers", type=name_list, default=[DEFAULT_SAMPLER],
                   help=f"comma-separated, any of {', '.join(SAMPLERS)} (default {DEFAULT_SAMPLER})")
    p.add_argument("--steps", type=int_list, default=[DEFAULT_STEPS],
                   help=f"comma-separated step counts (default {DEFAULT_STEPS})")
    p.add_argument("--guidance", type=float_list, default=[3.0],
                   help="comma-separated guidance scales (default 3: two forwards a step)")
    p.add_argument("--guidance-interval", type=guidance_interval, action="append", default=[], metavar="LO,HI",
                   help="also run each guidance above 1 with guidance only where LO <= t/T < HI (repeatable)")
    p.add_argument("--diversity", action="store_true", help="with --checkpoint: the diversity ratio of each run")
    p.add_argument("--diversity-prompts", type=int, default=8, metavar="P", help="diversity's prompts (default 8)")
    p.add_argument("--diversity-samples", type=int, default=8, metavar="K",
                   help="diversity's samples per prompt (default 8)")
    p.add_argument("--sr-batch", type=int, default=16, help="images per upsampler batch (default 16)")
    p.add_argument("--tokens", type=int, default=36, help="prompt length in tokens, without --checkpoint (default 36)")
    p.add_argument("--reference-steps", type=int, default=0, metavar="N",
                   help="also report each deterministic run's mean distance (8-bit levels) from DDIM at N steps, "
                        "e.g. 100 (default 0: off)")
    p.add_argument("--device", help="torch device (default cuda if available, else cpu)")
    p.add_argument("--json", type=Path, help="also write the JSON result here")
    args = p.parse_args(argv)
    if (args.classifier or args.diversity) and not args.checkpoint:
        raise UsageError("bench_sample: --classifier and --diversity need --checkpoint (random weights have no "
                         "accuracy and no diversity worth measuring)")
    device = dist.default_device(args.device)
    n = args.num
    evaluator = None
    if args.checkpoint:
        pipe = Pipeline.from_checkpoint(args.checkpoint, device, encoder=False)
        params = models.count_params(pipe.model)
        evaluator = scoring(args, pipe)
        seeds = [image_seed(0, i) for i in evaluator.samples["index"]]  # as ddpdiff.eval --seed 0
        cond = pipe.condition(evaluator.samples)
    else:
        pipe, cond, params = random_setup(args, device)
        seeds = list(range(n))
    # (guidance, interval): every guidance over all steps, and each above 1 again only inside each interval
    guidings = [(g, None) for g in args.guidance] + [
        (g, tuple(i)) for g in args.guidance if g != 1 for i in args.guidance_interval]
    for sampler, steps in [(s, k) for s in args.samplers for k in args.steps] + (
            [("ddim", args.reference_steps)] if args.reference_steps else []):
        for _, interval in guidings:
            pipe.check(sampler, steps, guidance_interval=interval)

    def generate(sampler: str, steps: int, rows: int, guidance: float, interval) -> torch.Tensor:
        return pipe.generate({k: v[:rows] for k, v in cond.items()}, seeds[:rows], sampler=sampler, steps=steps,
                             guidance=guidance, batch_size=args.batch, guidance_interval=interval)

    warm = min(n, args.batch)
    timed(lambda: generate(args.samplers[0], min(args.steps), warm, *guidings[0]), device)
    references = {guiding: as_saved(generate("ddim", args.reference_steps, n, *guiding))
                  for guiding in guidings} if args.reference_steps else {}
    runs, images = [], []
    for sampler in args.samplers:
        for steps in args.steps:
            for guidance, interval in guidings:
                seconds = timed(lambda sampler=sampler, steps=steps, g=guidance, i=interval: images.append(
                    generate(sampler, steps, n, g, i)), device)
                run = {"sampler": sampler, "steps": steps, "guidance": guidance,
                       "guidance_interval": list(interval) if interval else None, "sample_seconds": seconds,
                       "sample_images_per_s": n / seconds}
                if evaluator is not None and evaluator.metrics:
                    run.update(scores(evaluator, images[-1], lambda batch, s=sampler, k=steps, g=guidance, i=interval:
                                      pipe.generate_for(batch, 0, sampler=s, steps=k, guidance=g,
                                                        batch_size=args.batch, guidance_interval=i)))
                if references and sampler != "ddpm":  # ddpm draws fresh noise: no ODE to approach
                    reference = references[(guidance, interval)]
                    run["ode_error"] = (as_saved(images[-1]) - reference).abs().mean().item() * 127.5
                runs.append(run)
                extra = "".join(f", {label} {run[key]:.3f}" for key, label in LABELS if key in run)
                print(f"bench_sample: {sampler} {steps} steps, guidance {guidance:g}{interval_text(run)}: {n} images "
                      f"in {seconds:.2f} s, {n / seconds:.1f} images/s{extra}", file=sys.stderr)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "config": args.checkpoint or args.config, "params": params,
              "num": n, "batch": args.batch, "reference_steps": args.reference_steps, **runs[0], "runs": runs}
    print(table(runs), file=sys.stderr)

    if not args.no_sr:
        sr = config.load(args.sr_config, root=config.SRTrainerConfig).sr
        upsampler = models.build(SRMeta(scale=sr.scale, channels=sr.channels,
                                        num_blocks=sr.num_blocks)).to(device).eval()
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


LABELS = (("attr_acc", "attribute accuracy"), ("diversity_ratio", "diversity ratio"),
          ("ode_error", "distance from the reference (levels)"))


def scoring(args: argparse.Namespace, pipe: Pipeline) -> Evaluator:
    """`ddpdiff.eval`'s evaluation of the checkpoint's samples: attr_acc with --classifier, diversity with
    --diversity; its errors name this command's flags."""
    try:
        spec = EvalSpec(metrics=("attr_acc",) * bool(args.classifier) + ("diversity",) * args.diversity,
                        num=args.num, classifier=args.classifier, attributes=parse_attributes(args.attributes),
                        batch_size=args.batch, diversity_prompts=args.diversity_prompts,
                        diversity_samples=args.diversity_samples)
        return Evaluator(args.data or pipe.shards, pipe.meta, spec, device=pipe.device,
                         log=lambda msg: print(f"bench_sample: {msg}", file=sys.stderr))
    except EvalError as e:
        raise UsageError(e.worded(lambda setting: "--batch" if setting == "batch_size" else flag(setting))) from None


def scores(evaluator: Evaluator, images: torch.Tensor, generate) -> dict[str, float]:
    """Attribute accuracy of the timed `images` and the diversity ratio of the samples `generate` makes for
    diversity's prompts: `ddpdiff.eval`'s figures for the same seeds, under its scalars' names."""
    report = evaluator.run(lambda batch: images if batch is evaluator.samples else generate(batch))
    return {name.removeprefix("eval/"): value for name, value in report.scalars()[0].items()}


def interval_text(run: dict) -> str:
    return " in {:g}..{:g}".format(*run["guidance_interval"]) if run.get("guidance_interval") else ""


def table(runs: list[dict]) -> str:
    """The runs as a Markdown table (docs/benchmarks.md's format)."""
    extra = [(key, label) for key, label in LABELS if any(key in r for r in runs)]
    lines = ["| sampler | steps | guidance | s per image | images/s |" + "".join(f" {label} |" for _, label in extra),
             "|---|---:|---|---:|---:|" + "---:|" * len(extra)]
    for r in runs:
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['guidance']:g}{interval_text(r)} "
                     f"| {1 / r['sample_images_per_s']:.4f} | {r['sample_images_per_s']:.1f} |"
                     + "".join(f" {r[key]:.3f} |" if key in r else " - |" for key, _ in extra))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
