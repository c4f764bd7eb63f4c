"""Train the SRResNet upsampler on the shards' native-resolution crops (`KEY.jpg`).

  python -m ddpdiff.train_sr --config jobs/configs/sr_smoke.yaml [--section.field value ...]
  torchrun --nproc_per_node=8 -m ddpdiff.train_sr --config jobs/configs/sr.yaml

Random `sr.hr_patch` patches are the targets and their antialiased bicubic downsamples by `sr.scale` the
inputs; the loss is MSE. It runs in the same loop as the diffusion model (DDP, precision, EMA, checkpoints,
resume, TensorBoard); `sr.eval_every_steps` sets how often the EMA weights are scored by PSNR against
bicubic upsampling on `sr.eval_images` fixed validation crops.
"""

from __future__ import annotations

import functools
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record

from . import data, dist, loop, models
from .config import SRTrainerConfig
from .models import SRMeta
from .monitor import Monitor


def hr_lr(crop: np.ndarray, size: int, scale: int, rng: np.random.Generator | None = None,
          ) -> tuple[np.ndarray, np.ndarray]:
    """A `size` HR patch of an RGB uint8 crop (random, or centred when rng is None) and its bicubic LR.

    A crop smaller than `size` is first resized up (bicubic) so the patch fits. Both come back float32
    [3, h, w] in [-1, 1]; PIL's bicubic filter widens with the factor, so the downsample is antialiased.
    """
    im = Image.fromarray(crop)
    short = min(im.size)
    if short < size:
        im = im.resize((max(size, round(im.width * size / short)), max(size, round(im.height * size / short))),
                       Image.Resampling.BICUBIC)
    if rng is None:
        x, y = (im.width - size) // 2, (im.height - size) // 2
    else:
        x, y = int(rng.integers(im.width - size + 1)), int(rng.integers(im.height - size + 1))
    hr = im.crop((x, y, x + size, y + size))
    lr = hr.resize((size // scale, size // scale), Image.Resampling.BICUBIC)
    return _to_float(hr), _to_float(lr)


def _to_float(im: Image.Image) -> np.ndarray:
    return np.asarray(im, np.float32).transpose(2, 0, 1) / 127.5 - 1


def random_pair(sample: dict, rng: np.random.Generator, size: int, scale: int) -> dict:
    """The loader's `map_sample`: a training pair from one sample; everything else it carries is dropped."""
    hr, lr = hr_lr(sample["jpg"], size, scale, rng)
    return {"key": sample["key"], "hr": hr, "lr": lr}


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2): [B]."""
    mse = (a.float() - b.float()).square().flatten(1).mean(1)
    return 10 * torch.log10(4 / mse.clamp_min(1e-12))


class SRTask:
    def __init__(self, cfg: SRTrainerConfig, env: dist.Env):
        self.cfg, self.env = cfg, env
        self.val: tuple[torch.Tensor, torch.Tensor] | None = None

    def loader(self) -> data.Loader:
        pair = functools.partial(random_pair, size=self.cfg.sr.hr_patch, scale=self.cfg.sr.scale)
        return loop.train_loader(self, tokens=False, extra=("jpg",), map_sample=pair)

    def validate(self) -> list[str]:
        cfg = self.cfg
        s, problems = cfg.sr, []
        if s.hr_patch < s.scale or s.hr_patch % s.scale:
            problems.append(f"sr.hr_patch {s.hr_patch} is not a positive multiple of sr.scale {s.scale}")
        if s.channels < 1 or s.num_blocks < 0:
            problems.append("sr.channels must be >= 1 and sr.num_blocks >= 0")
        if cfg.train.grad_checkpointing:
            problems.append("train.grad_checkpointing: the SRResNet has no checkpointed blocks; set it false")
        if s.eval_every_steps < 0:
            problems.append(f"sr.eval_every_steps must be >= 0, got {s.eval_every_steps}")
        val = data.split_count(data.load_manifest(cfg.data.shards), "val")
        if s.eval_every_steps and not 1 <= s.eval_images <= val:
            problems.append(f"sr.eval_images {s.eval_images} is outside 1..{val} (the val split of "
                            f"{cfg.data.shards}); lower it, or set sr.eval_every_steps 0 to skip evaluation")
        return problems

    def build_model(self) -> nn.Module:
        return models.build(self.metadata())

    def describe(self, model: nn.Module) -> dict:
        s = self.cfg.sr
        return {"model": SRMeta.kind, "scale": s.scale, "params": models.count_params(model),
                "patch": f"{s.hr_patch // s.scale}->{s.hr_patch}"}

    def metadata(self) -> SRMeta:
        s = self.cfg.sr
        return SRMeta(scale=s.scale, channels=s.channels, num_blocks=s.num_blocks)

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        lr, hr = loop.as_input(batch["lr"], self), batch["hr"].to(self.env.device, non_blocking=True)
        sr = model(lr).float()
        return F.mse_loss(sr, hr), {"train/psnr": (psnr(sr.detach(), hr).sum(), torch.tensor(len(hr)))}

    def _val_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share (every world_size-th) of the fixed centre crops of the first val images."""
        s = self.cfg.sr
        crops = data.read_samples(self.cfg.data.shards, split="val", n=s.eval_images, tokens=False,
                                  extra=("jpg",))["jpg"]
        pairs = [hr_lr(c, s.hr_patch, s.scale) for c in crops[self.env.rank::self.env.world_size]]
        lr_side = s.hr_patch // s.scale  # reshape keeps the shape when a rank's share is empty
        hr = np.array([p[0] for p in pairs], np.float32).reshape(-1, 3, s.hr_patch, s.hr_patch)
        lr = np.array([p[1] for p in pairs], np.float32).reshape(-1, 3, lr_side, lr_side)
        return torch.from_numpy(lr), torch.from_numpy(hr)

    def eval_due(self, step: int) -> bool:
        return loop.due(step, self.cfg.sr.eval_every_steps)

    @torch.no_grad()
    def evaluate(self, step: int, model: nn.Module, monitor: Monitor) -> None:
        """Mean PSNR of the EMA model and of bicubic upsampling; each rank scores its share, then one sum."""
        if self.val is None:
            self.val = self._val_pairs()
        lr_all, hr_all = self.val
        chunk = loop.micro_size(self)
        sums = torch.zeros(3, dtype=torch.float64)  # PSNR sums of SR and bicubic, image count
        shown = []
        for i in range(0, len(lr_all), chunk):
            lr, hr = loop.as_input(lr_all[i:i + chunk], self), hr_all[i:i + chunk].to(self.env.device)
            sr = model(lr).float()
            bicubic = F.interpolate(lr, scale_factor=self.cfg.sr.scale, mode="bicubic", align_corners=False)
            bicubic = bicubic.clamp(-1, 1)
            sums += torch.stack([psnr(sr, hr).sum().cpu(), psnr(bicubic, hr).sum().cpu(),
                                 torch.tensor(float(len(hr)))]).double()
            if not shown:
                shown = [bicubic[:4].cpu(), sr[:4].cpu(), hr[:4].cpu()]
        psnr_sr, psnr_bicubic, n = dist.all_sum(sums).tolist()
        monitor.scalars(step, {"eval/psnr_sr": psnr_sr / n, "eval/psnr_bicubic": psnr_bicubic / n,
                               "eval/psnr_gain": (psnr_sr - psnr_bicubic) / n})
        if shown:  # rows: bicubic, SR, HR
            monitor.images("eval/bicubic_sr_hr", step, torch.cat(shown), nrow=len(shown[0]))


@record
def main(argv: list[str] | None = None) -> int:
    return loop.launch(SRTask, SRTrainerConfig, __doc__, "python -m ddpdiff.train_sr", argv)


if __name__ == "__main__":
    sys.exit(main())
