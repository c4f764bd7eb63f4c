"""Text-to-face sampling from a diffusion checkpoint or exported file, optionally upsampled by a trained SRResNet.

  python -m ddpdiff.sample --checkpoint runs/celeba64 --prompt "Photo of person blond hair, smiling." \\
      --num 8 --out samples [--upsampler runs/sr]

Prompts are encoded by the CLIP model that made the training embeddings (named in the checkpoint); an
encoder that disagrees with it is an error. OUT gets pPPP_sSSS.png per image (prompt PPP, sample SSS),
pPPP_grid.png per prompt, the same with a _SIZE suffix after upsampling, and samples.json recording the
prompt, seed, sampler, steps, guidance (and its interval) and checkpoint of every file. Each image's noise comes from
(seed, prompt index, sample index), so a seed gives the same files again.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from . import celeba
from .atomic import write_text
from .errors import cli
from .images import write_png
from .models import SRMeta
from .pipeline import Pipeline, SamplingError, load_network, upsample
from .sampling import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLER_HELP, SAMPLERS, add_guidance_arguments


def save(out: Path, images: torch.Tensor, prompts: list[str], num: int, suffix: str = "") -> list[dict]:
    """Write pPPP_sSSS{suffix}.png per image and pPPP_grid{suffix}.png per prompt; one record per image."""
    records = []
    for p, prompt in enumerate(prompts):
        group = images[p * num:(p + 1) * num]
        for s, image in enumerate(group):
            name = f"p{p:03d}_s{s:03d}{suffix}.png"
            write_png(out / name, image)
            records.append({"file": name, "prompt_index": p, "sample_index": s, "prompt": prompt})
        write_png(out / f"p{p:03d}_grid{suffix}.png", group, nrow=min(num, 8))
    return records


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts, checked before anything loads: none, or an empty one, is an error unless `--unconditional`
    (which takes none); words no training prompt had get one warning line."""
    prompts = list(args.prompt or []) + [attribute_prompt(names) for names in args.attributes or []]
    if args.prompts_file:
        try:
            text = Path(args.prompts_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SamplingError(f"--prompts-file {args.prompts_file}: cannot read ({e})") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if args.unconditional:
        if prompts:
            raise SamplingError("--unconditional samples without a prompt: drop --prompt, --attributes and "
                                "--prompts-file, or --unconditional")
        return [""]
    if not prompts:
        raise SamplingError("no prompts: pass --prompt TEXT, --attributes NAMES, --prompts-file FILE, or "
                            "--unconditional")
    empty = [i for i, text in enumerate(prompts, 1) if not text.strip()]
    if empty:
        raise SamplingError(f"prompt {empty[0]} is empty: pass --unconditional for samples without a prompt")
    unknown = sorted({w for text in prompts for w in re.findall(r"[a-z0-9]+", text.lower())} - celeba.VOCABULARY)
    if unknown:
        print(f"ddpdiff.sample: warning: words no training prompt had, which the model may ignore: "
              f"{', '.join(unknown)} (it learned 'Photo of person' + CelebA attribute names: --list-attributes)",
              file=sys.stderr, flush=True)
    return prompts


def attribute_prompt(names: str) -> str:
    """The training prompt of comma-separated attribute names ('Smiling,Blond_Hair'; any case, spaces for
    underscores)."""
    known = {name.lower(): name for name in celeba.ATTRIBUTES}
    wanted = [n.strip().lower().replace(" ", "_") for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        raise SamplingError(f"--attributes {names!r}: {'unknown ' + ', '.join(unknown) if unknown else 'no names'}; "
                            "expected CelebA attribute names (--list-attributes)")
    return celeba.prompt({known[n]: 1 for n in wanted})


def list_attributes() -> str:
    """CelebA's attribute names with the words they are in a prompt."""
    return "\n".join(f"{name:<22}{celeba.phrase(name)}" for name in celeba.ATTRIBUTES)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpdiff.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", metavar="RUN_DIR|FILE",
                   help="diffusion checkpoint, a run directory meaning its newest complete checkpoint, or an "
                        "exported .safetensors file (python -m ddpdiff.export)")
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help="a prompt (repeat for several); the model learned 'Photo of person ' + attribute words, "
                        "e.g. 'Photo of person blond hair, smiling.'")
    p.add_argument("--attributes", action="append", metavar="NAMES",
                   help="a prompt built from comma-separated CelebA attribute names, e.g. Smiling,Blond_Hair "
                        "(repeat for several)")
    p.add_argument("--list-attributes", action="store_true", help="print the 40 attribute names and exit")
    p.add_argument("--prompts-file", metavar="FILE", help="one prompt per line (blank lines skipped)")
    p.add_argument("--unconditional", action="store_true",
                   help="samples without a prompt (guidance 0: the model's unconditional branch)")
    p.add_argument("--num", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=DEFAULT_SAMPLER,
                   help=f"{SAMPLER_HELP} (default {DEFAULT_SAMPLER})")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"sampling steps, at most diffusion.timesteps (default {DEFAULT_STEPS})")
    add_guidance_arguments(p)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta; 0 is deterministic given the noise (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed; the same seed gives the same files (default 0)")
    p.add_argument("--batch-size", type=int, default=64, help="images per sampler batch (default 64)")
    p.add_argument("--device", help="torch device (default cuda if available, else cpu)")
    p.add_argument("--raw", action="store_true", help="use the raw trained weights instead of the EMA weights "
                   "(checkpoints only: an export holds the EMA weights)")
    p.add_argument("--clip-pretrained", metavar="TAG|FILE",
                   help="where the checkpoint's CLIP weights are, e.g. a local file on an offline node "
                        "(default: as recorded in the checkpoint)")
    p.add_argument("--upsampler", metavar="RUN_DIR|FILE", help="SRResNet run, checkpoint or exported file to "
                   "upsample with (python -m ddpdiff.train_sr); writes *_SIZE.png beside the originals")
    p.add_argument("--sr-batch-size", type=int, default=8, help="images per upsampler batch (default 8)")
    p.add_argument("--out", metavar="DIR", help="output folder (created; files are overwritten)")
    return p


@cli("ddpdiff.sample")
def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.list_attributes:
        print(list_attributes())
        return 0
    missing = [flag for flag, value in (("--checkpoint", args.checkpoint), ("--out", args.out)) if value is None]
    if missing:
        p.error(f"the following arguments are required: {', '.join(missing)}")
    prompts = read_prompts(args)
    if args.unconditional:
        args.guidance = 0.0
    if min(args.num, args.batch_size, args.sr_batch_size) < 1:
        raise SamplingError("--num, --batch-size and --sr-batch-size must be >= 1")
    upsampler, _, sr_path = load_network(args.upsampler, SRMeta, args.device) if args.upsampler else (None,) * 3
    pipe = Pipeline.from_checkpoint(args.checkpoint, args.device, ema=not args.raw,
                                    clip_pretrained=args.clip_pretrained)
    pipe.check(args.sampler, args.steps, args.eta, args.guidance_interval)
    images = pipe.sample(prompts, args.num, args.seed, sampler=args.sampler, steps=args.steps,
                         guidance=args.guidance, eta=args.eta, batch_size=args.batch_size, progress=True,
                         guidance_interval=args.guidance_interval)
    out = Path(args.out)
    common = {"seed": args.seed, "sampler": args.sampler, "steps": args.steps, "eta": args.eta,
              "guidance": args.guidance,
              "guidance_interval": list(args.guidance_interval) if args.guidance_interval else None,
              "ema": not args.raw, "checkpoint": str(pipe.source)}
    records = [{**r, **common} for r in save(out, images, prompts, args.num)]
    if upsampler is not None:
        big = upsample(upsampler, images, args.sr_batch_size)
        for r, up in zip(records, save(out, big, prompts, args.num, f"_{big.shape[-1]}")):
            r["upsampled"] = up["file"]
        common["upsampler"] = str(sr_path)
    write_text(out / "samples.json", json.dumps({**common, "prompts": prompts, "files": records}, indent=1) + "\n")
    print(f"{len(records)} images for {len(prompts)} prompts in {out} (index: {out / 'samples.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
