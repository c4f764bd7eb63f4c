"""Fréchet Inception Distance: Inception-v3 pool features from a local weights file, feature moments, the distance.

The weights cannot be downloaded here, so they come from a file named by `--inception PATH` or the
environment variable DDPDIFF_INCEPTION_WEIGHTS: a state dict of torchvision's `inception_v3` (e.g.
torchvision's `inception_v3_google-0cc3c7bd.pth`, or pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`;
the classifier heads are dropped, so either loads). Images in [-1, 1] are resized to 299x299 (bilinear)
and fed as they are: the Google Inception weights expect inputs in [-1, 1]. Moments are sums (features,
outer products, count) in float64, so ranks can add theirs with one all-reduce.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .errors import UsageError

ENV = "DDPDIFF_INCEPTION_WEIGHTS"
SIZE = 299
DIM = 2048

SKIP_MESSAGE = (f"fid skipped: no Inception weights (they cannot be downloaded here); pass --inception PATH or set "
                f"{ENV}=PATH to a torchvision inception_v3 state dict, e.g. inception_v3_google-0cc3c7bd.pth "
                "from https://download.pytorch.org/models/")


class FIDError(UsageError):
    """Unusable Inception weights; the message is one line naming the file."""


class InceptionFeatures(nn.Module):
    """torchvision's Inception-v3 up to its 2048-d average pool: [B,3,H,W] in [-1,1] -> [B,2048]."""

    def __init__(self):
        super().__init__()
        from torchvision.models import inception_v3

        self.net = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
        self.net.fc = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        return self.net(x)


def weights_path(flag: str | os.PathLike | None = None) -> Path | None:
    """The weights file from the flag, else from DDPDIFF_INCEPTION_WEIGHTS; None when neither names one."""
    value = flag or os.environ.get(ENV)
    if not value:
        return None
    path = Path(value)
    if not path.is_file():
        source = "--inception" if flag else ENV
        raise FIDError(f"{source}: Inception weights file not found: {path}")
    return path


def load(path: str | os.PathLike, build: Callable[[], nn.Module] = InceptionFeatures,
         device: str | torch.device = "cpu") -> nn.Module:
    """The feature network `build()` in eval mode with the weights in `path` (a state dict of `build().net`).

    Keys of the classifier heads (`fc.`, `AuxLogits.`) are dropped; any other mismatch is an error.
    `build` is injectable so tests can run the whole path with a small network.
    """
    model = build()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign files arrive as many exception types
        raise FIDError(f"{path}: cannot be read as a state dict ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise FIDError(f"{path}: holds a {type(state).__name__}, not a state dict")
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "AuxLogits."))}
    target = getattr(model, "net", model)
    try:
        target.load_state_dict(state)
    except RuntimeError as e:
        raise FIDError(f"{path}: not weights of this network ({' '.join(str(e).split())[:300]})") from None
    return model.to(device).eval()


@torch.no_grad()
def features(net: nn.Module, images: torch.Tensor, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """Features of images in [-1, 1] [N,3,H,W] as float64 [N, D], batch by batch."""
    device = next(net.parameters()).device
    out = [net(images[i:i + batch_size].to(device)).double().flatten(1).cpu()
           for i in tqdm(range(0, len(images), batch_size), desc="inception", disable=not progress)]
    return torch.cat(out)


def moments(feats: torch.Tensor) -> torch.Tensor:
    """The sums that determine mean and covariance, flattened into one float64 vector: [n, sum f, sum f f^T]."""
    f = feats.double()
    return torch.cat([torch.tensor([float(len(f))], dtype=torch.float64), f.sum(0), (f.T @ f).flatten()])


def mean_cov(sums: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance from `moments` (or their sum over ranks); needs at least 2 samples."""
    s = sums.double().numpy()
    n = s[0]
    dim = int(round((np.sqrt(1 + 4 * (len(s) - 1)) - 1) / 2))
    if n < 2:
        raise FIDError(f"FID needs at least 2 images per side, got {int(n)}")
    total, outer = s[1:1 + dim], s[1 + dim:].reshape(dim, dim)
    mu = total / n
    cov = (outer - n * np.outer(mu, mu)) / (n - 1)
    return mu, (cov + cov.T) / 2


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (rounding's negative eigenvalues clipped)."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2), in float64.

    The cross term uses the symmetric PSD product S1^1/2 S2 S1^1/2 (same trace of square root as
    sqrtm(S1 S2)), so only symmetric eigen-decompositions are needed and no complex parts appear.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    root1 = _sqrt_psd(cov1)
    cross = np.linalg.eigvalsh(root1 @ cov2 @ root1)
    trace_root = np.sqrt(np.clip(cross, 0, None)).sum()
    d = float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * trace_root)
    return max(d, 0.0)


def fid_from_moments(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between two sets given by their `moments`."""
    return frechet_distance(*mean_cov(a), *mean_cov(b))
