"""Text-to-face sampling from a diffusion checkpoint, optionally upsampled by a trained SRResNet.

  python -m ddpdiff.sample --checkpoint runs/celeba64 --prompt "Photo of person blond hair, smiling." \\
      --num 8 --out samples [--upsampler runs/sr]

Prompts are encoded by the CLIP model that made the training embeddings (named in the checkpoint); an
encoder that disagrees with it is an error. OUT gets pPPP_sSSS.png per image (prompt PPP, sample SSS),
pPPP_grid.png per prompt, the same with a _SIZE suffix after upsampling, and samples.json recording the
prompt, seed, sampler, steps, guidance and checkpoint of every file. Each image's noise comes from
(seed, prompt index, sample index), so a seed gives the same files again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.utils import make_grid

from . import checkpoint, clip, config, train, train_sr
from .atomic import atomic_write, write_text
from .config import Config
from .data.batch import pad, to_torch
from .diffusion import Diffusion
from .sampling import SAMPLERS, guided

# Cosine similarity below which the encoder's embedding of "" is not the one stored with the checkpoint:
# float16 storage and device differences stay far above it, other weights far below.
SAME_WEIGHTS = 0.999


class SampleError(ValueError):
    """A checkpoint, encoder or argument sampling cannot use; the message is one line naming it."""


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _state(path: str | Path, role: str) -> tuple[dict, Path]:
    """The checkpoint a file or run directory names, with its `meta`."""
    path = checkpoint.resolve(path)
    try:
        state = checkpoint.load(path)
    except Exception as e:  # not a torch file, or one that needs unpickling arbitrary objects
        raise SampleError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(state.get("meta"), dict):
        raise SampleError(f"{path}: no 'meta' entry, so it cannot be used as {role} (trained before metadata "
                          "was stored?)")
    return state, path


def read_denoiser(path: str | Path) -> tuple[dict, Path]:
    """The state of a diffusion run's newest checkpoint (or of a checkpoint file), and its file."""
    state, path = _state(path, "--checkpoint")
    meta = state["meta"]
    if "clip" not in meta:
        hint = " (an SRResNet checkpoint: pass it as --upsampler)" if meta.get("model") == "srresnet" else ""
        raise SampleError(f"{path}: not a diffusion checkpoint, its meta has no 'clip'{hint}")
    return state, path


def build_denoiser(state: dict, device: str | torch.device | None = None, ema: bool = True,
                   ) -> tuple[nn.Module, Config]:
    """The checkpoint's model in eval mode with its EMA (or raw) weights, and its config."""
    cfg = config.from_dict(state["config"])
    model = train.make_model(cfg, state["meta"])
    model.load_state_dict(state["ema" if ema else "model"])
    return model.to(_device(device)).eval(), cfg


def load_encoder(meta: dict, device: str | torch.device | None = None, pretrained: str | None = None,
                 where: str = "checkpoint") -> clip.Encoder:
    """The CLIP encoder the checkpoint was trained with; `pretrained` relocates its weights (offline nodes).

    Raises SampleError when the encoder's widths or token layer differ from the checkpoint's, or when it
    embeds the empty prompt differently (other weights).
    """
    want = meta["clip"]
    enc = clip.load(want["model"], pretrained or want["pretrained"], str(_device(device)))
    got = enc.info()
    fields = [k for k in ("model", "dim", "token_dim", "token_layer", "text_layers") if k in want]
    if any(got[k] != want[k] for k in fields):
        raise SampleError(f"CLIP mismatch: {where} was trained with {_fmt(want, fields)}, but "
                          f"{enc.model_name} {enc.pretrained!r} is {_fmt(got, fields)}")
    stored = np.asarray(meta["empty_prompt"]["clip_text"], np.float32)
    cosine = float(enc.encode_texts([""])[0] @ stored / np.linalg.norm(stored))
    if cosine < SAME_WEIGHTS:
        raise SampleError(f"CLIP mismatch: {where} was trained with {want['model']} weights "
                          f"{want['pretrained']!r}, but {enc.pretrained!r} embeds the empty prompt differently "
                          f"(cosine {cosine:.3f}): pass the same weights with --clip-pretrained")
    return enc


def _fmt(info: dict, fields: list[str]) -> str:
    return "{" + ", ".join(f"{k}={info[k]}" for k in fields) + "}"


def encode(enc: clip.Encoder, prompts: list[str], cfg: Config, device: str | torch.device) -> dict:
    """The model's condition for each prompt, [P, ...], built as the data pipeline builds a batch.

    Embeddings pass through float16 as in the shards, so the model sees numbers of the kind it was trained
    on; the pooled condition is the text embedding whatever `data.condition` the model was trained with.
    """
    pooled, tokens = enc.encode_prompts(prompts)
    batch = {"clip_text": pooled.astype(np.float16)}
    if train.uses_tokens(cfg):
        batch["tokens"], batch["token_len"] = pad([t.astype(np.float16) for t in tokens])
    text_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, condition="text"))
    return train.condition(to_torch(batch), text_cfg, torch.device(device))


def noise_seed(seed: int, prompt_index: int, sample_index: int, stream: int = 0) -> int:
    """The seed of one image's initial noise (stream 0) or of a batch's later draws (stream 1)."""
    return int(np.random.SeedSequence([seed, prompt_index, sample_index, stream]).generate_state(1)[0])


@torch.no_grad()
def generate(checkpoint: str | Path, prompts: list[str], num: int = 1, sampler: str = "ddim", steps: int = 50,
             guidance: float = 3.0, eta: float = 0.0, seed: int = 0, batch_size: int = 64,
             device: str | torch.device | None = None, ema: bool = True, progress: bool = True,
             clip_pretrained: str | None = None) -> torch.Tensor:
    """`num` images per prompt, [len(prompts) * num, 3, H, W] in [-1, 1], prompt-major.

    Image (p, s) starts from noise seeded by (seed, p, s), so with a deterministic sampler (ddim, eta 0)
    it does not depend on batch_size; ddpm and eta > 0 draw later noise per batch, seeded by its first image.
    """
    state, path = read_denoiser(checkpoint)
    check_args(prompts, num, sampler, steps, eta, batch_size, state["config"]["diffusion"]["timesteps"])
    meta, device = state["meta"], _device(device)
    encoder = load_encoder(meta, device, clip_pretrained, where=str(path))  # before the model: a clearer error
    model, cfg = build_denoiser(state, device, ema)
    cond = encode(encoder, prompts, cfg, device)
    diff = Diffusion(cfg.diffusion)
    size = meta["image_size"]
    index = [(p, s) for p in range(len(prompts)) for s in range(num)]
    out = []
    for start in range(0, len(index), batch_size):
        chunk = index[start:start + batch_size]
        x_T = torch.stack([torch.randn(3, size, size, generator=torch.Generator().manual_seed(noise_seed(seed, p, s)))
                           for p, s in chunk]).to(device)  # CPU generators: the same noise on every device
        rows = torch.tensor([p for p, _ in chunk], device=device)
        later = torch.Generator().manual_seed(noise_seed(seed, *chunk[0], stream=1))
        options = {"eta": eta} if sampler == "ddim" else {}
        x0 = SAMPLERS[sampler](guided(model, guidance), diff, x_T, {k: v[rows] for k, v in cond.items()},
                               steps=steps, generator=later, progress=progress, **options)
        out.append(x0.clamp(-1, 1).cpu())
    return torch.cat(out)


def check_args(prompts: list[str], num: int, sampler: str, steps: int, eta: float, batch_size: int,
               timesteps: int) -> None:
    """Every problem with the sampling arguments, in one SampleError."""
    problems = []
    if not prompts:
        problems.append("no prompts (pass --prompt TEXT or --prompts-file FILE)")
    if num < 1 or batch_size < 1:
        problems.append("--num and --batch-size must be >= 1")
    if sampler not in SAMPLERS:
        problems.append(f"--sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
    if not 1 <= steps <= timesteps:
        problems.append(f"--steps {steps} is outside 1..{timesteps} (the checkpoint's diffusion.timesteps)")
    if eta < 0 or (eta and sampler != "ddim"):
        problems.append("--eta must be >= 0 and applies to the ddim sampler only")
    if problems:
        raise SampleError("; ".join(problems))


def load_upsampler(path: str | Path, device: str | torch.device | None = None) -> nn.Module:
    """The EMA SRResNet of an SR run directory or checkpoint file (`python -m ddpdiff.train_sr`)."""
    state, path = _state(path, "--upsampler")
    if state["meta"].get("model") != "srresnet":
        raise SampleError(f"{path}: not an SRResNet checkpoint (train one with python -m ddpdiff.train_sr)")
    model = train_sr.build(state["meta"])
    model.load_state_dict(state["ema"])
    return model.to(_device(device)).eval()


@torch.no_grad()
def upsample(model: nn.Module, images: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Images in [-1, 1] upsampled by the SRResNet's scale, on the CPU."""
    device = next(model.parameters()).device
    return torch.cat([model(images[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(images), batch_size)])


def write_png(path: Path, images: torch.Tensor, nrow: int | None = None) -> None:
    """One image [3,H,W], or a grid of [N,3,H,W] with `nrow` per row, in [-1, 1] as an 8-bit PNG."""
    if images.dim() == 4:
        images = make_grid(images, nrow=nrow or len(images), padding=2, normalize=False, pad_value=1.0)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    with atomic_write(path) as f:
        Image.fromarray(pixels).save(f, format="PNG")


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
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            text = Path(args.prompts_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SampleError(f"--prompts-file {args.prompts_file}: cannot read ({e})") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    return prompts


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpdiff.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR|FILE",
                   help="diffusion checkpoint, or a run directory meaning its newest complete checkpoint")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeat for several)")
    p.add_argument("--prompts-file", metavar="FILE", help="one prompt per line (blank lines skipped)")
    p.add_argument("--num", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddim", help="sampler (default ddim)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps, at most diffusion.timesteps (default 50)")
    p.add_argument("--guidance", type=float, default=3.0,
                   help="classifier-free guidance: 0 unconditional, 1 conditional, >1 stronger (default 3)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta; 0 is deterministic given the noise (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed; the same seed gives the same files (default 0)")
    p.add_argument("--batch-size", type=int, default=64, help="images per sampler batch (default 64)")
    p.add_argument("--device", help="torch device (default cuda if available, else cpu)")
    p.add_argument("--raw", action="store_true", help="use the raw trained weights instead of the EMA weights")
    p.add_argument("--clip-pretrained", metavar="TAG|FILE",
                   help="where the checkpoint's CLIP weights are, e.g. a local file on an offline node "
                        "(default: as recorded in the checkpoint)")
    p.add_argument("--upsampler", metavar="RUN_DIR|FILE", help="SRResNet run or checkpoint to upsample with "
                   "(python -m ddpdiff.train_sr); writes *_SIZE.png beside the originals")
    p.add_argument("--sr-batch-size", type=int, default=8, help="images per upsampler batch (default 8)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; files are overwritten)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        prompts = read_prompts(args)
        if args.sr_batch_size < 1:
            raise SampleError("--sr-batch-size must be >= 1")
        sr_path = checkpoint.resolve(args.upsampler) if args.upsampler else None
        upsampler = load_upsampler(sr_path, args.device) if sr_path else None
        path = checkpoint.resolve(args.checkpoint)
        images = generate(path, prompts, num=args.num, sampler=args.sampler, steps=args.steps,
                          guidance=args.guidance, eta=args.eta, seed=args.seed, batch_size=args.batch_size,
                          device=args.device, ema=not args.raw, clip_pretrained=args.clip_pretrained)
        out = Path(args.out)
        common = {"seed": args.seed, "sampler": args.sampler, "steps": args.steps, "eta": args.eta,
                  "guidance": args.guidance, "ema": not args.raw, "checkpoint": str(path)}
        records = [{**r, **common} for r in save(out, images, prompts, args.num)]
        if upsampler is not None:
            big = upsample(upsampler, images, args.sr_batch_size)
            suffix = f"_{big.shape[-1]}"
            for r, up in zip(records, save(out, big, prompts, args.num, suffix)):
                r["upsampled"] = up["file"]
            common["upsampler"] = str(sr_path)
        write_text(out / "samples.json", json.dumps({**common, "prompts": prompts, "files": records}, indent=1) + "\n")
    except (SampleError, clip.ClipError, config.ConfigError, FileNotFoundError) as e:
        print(f"ddpdiff.sample: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"{len(records)} images for {len(prompts)} prompts in {out} (index: {out / 'samples.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
