"""Evaluate a diffusion checkpoint: attribute accuracy, CLIP cosine, FID and diversity of samples for val-split
prompts.

  torchrun --nproc_per_node=8 -m ddpdiff.eval --checkpoint runs/celeba64 --classifier runs/classifier \\
      --inception weights-inception-2015-12-05-6726825d.pth [--num-samples 10000] [--metrics attr_acc,fid,diversity]

Every rank generates its share of the samples (rank r: samples r, r + world size, ...; under bf16 autocast
on GPUs) and the metric sums are all-reduced, so the report does not depend on the number of ranks; plain
`python -m ddpdiff.eval` is one rank. FID and KID compare the samples with the reference statistics of a
split (--fid-split, default all train images), computed once and cached beside the shards.

Sample i is generated for the prompt (and stored CLIP embeddings) of val image i, cycling when --num exceeds
the val split, from the seed `python -m ddpdiff.sample --seed SEED` gives prompt i's first image; every
metric is reported beside the same metric for the real val images (ddpdiff/metrics/ says what each
measures). --held-out A+B[,C+D] adds --held-out-num samples per attribute pair for the val prompts that
have both (numbered from N on): does the model compose a pair its training images never showed together,
and does each attribute keep its own colour (docs/evaluation.md). Diversity adds K samples for each of P
val prompts: sample k of val prompt i from the seed the sampling CLI gives prompt i's image k. A metric
whose inputs are missing is skipped with a message saying how to provide them; when none of the requested
metrics can run, the command stops with status 2 before sampling. The JSON report goes to stdout and to
OUT/eval/step_S_numN_stepsK_guidanceG[_intervalLO-HI].json, the scalars to OUT/tb (TensorBoard); OUT is
--out, by default the checkpoint's run directory. During training the same evaluation runs every `eval.every_steps` on all ranks.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import dist, fid
from .atomic import write_text
from .errors import UsageError, cli
from .images import write_png
from .metrics import (EvalError, EvalSpec, Evaluator, Report, named, parse_attributes, parse_held_out, parse_metrics,
                      sampler)
from .monitor import Monitor
from .pipeline import Pipeline
from .sampling import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLER_HELP, SAMPLERS, add_guidance_arguments


@dataclass(frozen=True)
class Evaluation:
    """A checkpoint's evaluation: where it came from, how it was made, and its report."""

    checkpoint: str
    step: int
    shards: str
    spec: EvalSpec
    ranks: int
    bf16: bool
    report: Report

    def to_dict(self) -> dict:
        """The JSON report: the settings, then the metrics' figures."""
        s = self.spec
        return {"checkpoint": self.checkpoint, "step": self.step, "shards": self.shards, "sampler": s.sampler,
                "steps": s.steps, "guidance": s.guidance,
                "guidance_interval": list(s.guidance_interval) if s.guidance_interval else None, "seed": s.seed,
                "classifier": str(s.classifier) if s.classifier else None, "ranks": self.ranks, "bf16": self.bf16,
                **self.report.to_dict()}


def evaluate(checkpoint: str | Path, spec: EvalSpec, shards: str | Path | None = None, *,
             device: str | None = None, clip_pretrained: str | None = None, progress: bool = True,
             save_samples: str | Path | None = None, bf16: bool = True,
             log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)) -> Evaluation:
    """Generate `spec.num` samples for val prompts with a diffusion checkpoint and report the metrics; call it on
    every rank (after `dist.init`) or in one process.

    `shards` defaults to the checkpoint's own data.shards; a seed gives the same report again. With
    `save_samples`, sample i is also written there as iIIIIII.png (diversity's sample k of val prompt i as
    iIIIIII_sKKK.png). `bf16`: sample under bf16 autocast on GPUs.
    """
    pipe = Pipeline.from_checkpoint(checkpoint, device, encoder=False)
    pipe.check(spec.sampler, spec.steps, guidance_interval=spec.guidance_interval)
    shards = shards or pipe.shards
    evaluator = Evaluator(shards, pipe.meta, spec, clip_pretrained=clip_pretrained, device=pipe.device,
                          rank=dist.rank(), world_size=dist.world_size(), progress=progress, log=log)
    if not evaluator.names:  # before any sampling: nothing would be measured
        raise EvalError(f"none of the requested metrics ({', '.join(spec.metrics)}) can run; the line above says "
                        "what each needs")
    make = sampler(pipe, spec, progress)

    def generate(batch: dict) -> torch.Tensor:
        with pipe.autocast(bf16):
            images = make(batch)
        if save_samples:
            names = ([f"i{i:06d}_s{k:03d}.png" for i, k in zip(batch["index"], batch["sample"])] if "sample" in batch
                     else [f"i{i:06d}.png" for i in batch["index"]])
            for name, image in zip(names, images):
                write_png(Path(save_samples) / name, image)
        return images
    return Evaluation(str(pipe.source), pipe.step, str(shards), spec, dist.world_size(),
                      bf16 and pipe.device.type == "cuda", evaluator.run(generate))


def run_dir_of(path: Path) -> Path:
    """The run directory of a checkpoint file (RUN/checkpoints/step_X.pt -> RUN)."""
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpdiff.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR|FILE",
                   help="diffusion checkpoint, a run directory meaning its newest complete checkpoint, or an "
                        "exported .safetensors file (python -m ddpdiff.export)")
    p.add_argument("--data", metavar="SHARDS", help="shard directory whose val split gives prompts and real "
                   "images (default: the checkpoint's data.shards)")
    p.add_argument("--metrics", default=",".join(named()), help=f"comma-separated, any of {', '.join(named())} "
                   "(default all; clip_score is clip_cosine's former name)")
    p.add_argument("--num-samples", "--num", dest="num", type=int, default=10_000, metavar="N",
                   help="samples to generate, one per val prompt, cycling (default 10000, the usual FID count; "
                   "50000 for the papers that use it; compare FIDs only at the same count). Under torchrun "
                   "write --num-samples: torchrun takes --num for its own --numa-binding")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"sampling steps, at most diffusion.timesteps (default {DEFAULT_STEPS})")
    add_guidance_arguments(p)
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=DEFAULT_SAMPLER,
                   help=f"{SAMPLER_HELP} (default {DEFAULT_SAMPLER})")
    p.add_argument("--classifier", metavar="RUN_DIR|FILE",
                   help="attribute classifier (run, checkpoint or exported file) from python -m "
                        "ddpdiff.train_classifier (needed for attr_acc)")
    p.add_argument("--attributes", metavar="NAMES", help="comma-separated attributes averaged into the attr_acc "
                   "mean, or 'visible' for the synthetic data's drawn ones (default all 40)")
    p.add_argument("--inception", metavar="FILE", help=f"torch-fidelity's {fid.WEIGHTS_NAME} for fid "
                   f"(default: ${fid.ENV})")
    p.add_argument("--fid-split", default="train", help="split whose images are FID's reference (default train)")
    p.add_argument("--fid-count", type=int, metavar="N", help="FID's reference: the split's first N images "
                   "(default all); statistics are cached beside the shards per split, count and weights")
    p.add_argument("--held-out", metavar="A+B[,C+D]", help="attribute pairs (CelebA names) to test for "
                   "composition and binding, e.g. those tools/make_synthetic_celeba.py --hold-out kept apart: "
                   "samples for the val prompts with both (needs attr_acc and --classifier)")
    p.add_argument("--held-out-num", type=int, default=32, metavar="N",
                   help="samples per held-out pair, cycling over its val prompts (default 32)")
    p.add_argument("--diversity-prompts", type=int, default=8, metavar="P",
                   help="diversity: val prompts whose group (val images with their values of --attributes) has "
                        "at least K images (default 8)")
    p.add_argument("--diversity-samples", type=int, default=8, metavar="K",
                   help="diversity: samples per prompt, and real images per group (default 8)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; the same seed gives the same report")
    p.add_argument("--batch-size", type=int, default=64, help="images per sampler and metric batch (default 64)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: this rank's GPU when CUDA works, else the CPU (default auto)")
    p.add_argument("--fp32", action="store_true", help="sample in float32 on GPUs too (default: bf16 autocast)")
    p.add_argument("--clip-pretrained", metavar="TAG|FILE",
                   help="where the checkpoint's CLIP weights are on an offline node (default: as recorded)")
    p.add_argument("--out", metavar="DIR", help="where the report (DIR/eval/*.json) and the TensorBoard scalars "
                   "(DIR/tb) go (default: the checkpoint's run directory, or an exported file's folder)")
    p.add_argument("--save-samples", metavar="DIR", help="also write the generated samples there (iIIIIII.png)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def flag(setting: str) -> str:
    """An EvalSpec field as this command line names it."""
    return "--" + setting.replace("_", "-")


def spec_of(args: argparse.Namespace) -> EvalSpec:
    """The command line's EvalSpec (training makes its own from `eval.*`: `train.eval_spec`)."""
    return EvalSpec(
        metrics=parse_metrics(args.metrics), num=args.num, attributes=parse_attributes(args.attributes),
        classifier=args.classifier, inception=args.inception, fid_split=args.fid_split, fid_count=args.fid_count,
        held_out=() if args.held_out is None else parse_held_out(args.held_out), held_out_num=args.held_out_num,
        diversity_prompts=args.diversity_prompts, diversity_samples=args.diversity_samples, sampler=args.sampler,
        steps=args.steps, guidance=args.guidance, guidance_interval=args.guidance_interval, seed=args.seed,
        batch_size=args.batch_size)


@cli("ddpdiff.eval")
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        spec = spec_of(args)
        env = dist.init(device=args.device)
        try:
            result = evaluate(args.checkpoint, spec, args.data, device=env.device,
                              clip_pretrained=args.clip_pretrained, progress=not args.no_progress and env.rank == 0,
                              save_samples=args.save_samples, bf16=not args.fp32,
                              log=lambda msg: dist.print0(msg, file=sys.stderr))
        finally:
            dist.cleanup()
    except EvalError as e:
        raise UsageError(e.worded(flag)) from None
    if env.rank != 0:  # rank 0 alone reports
        return 0
    run_dir = Path(args.out) if args.out else run_dir_of(Path(result.checkpoint))
    interval = "_interval{:g}-{:g}".format(*args.guidance_interval) if args.guidance_interval else ""
    out = run_dir / "eval" / (f"step_{result.step:08d}_num{args.num}_steps{args.steps}_"
                              f"guidance{args.guidance:g}{interval}.json")
    text = json.dumps(result.to_dict(), indent=1)
    write_text(out, text + "\n")
    monitor = Monitor(run_dir, enabled=True)
    head, detail = result.report.scalars()
    monitor.scalars(result.step, {**head, **detail}, console=False)
    monitor.close()
    print(result.report.summary(), file=sys.stderr, flush=True)
    print(f"report: {out}", file=sys.stderr, flush=True)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
