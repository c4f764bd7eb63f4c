"""FID and KID as the reference implementation computes them, and reference statistics cached beside the
shards (the folder-against-folder command line, `python -m ddpdiff.fid`, is in __main__.py).

The network is torch-fidelity's port of the TensorFlow Inception graph FID was defined with
(`FeatureExtractorInceptionV3`, 2048-d pool features): its own TF1-compatible bilinear resize to 299x299 of
8-bit images and its scaling. The weights cannot be downloaded here, so they come from a local file named by
`--inception FILE` or DDPDIFF_INCEPTION_WEIGHTS: torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`
(a state dict with its module names, which are torchvision's Inception3 names with a 1008-class `fc`;
pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` is made for those names too, untested here). FID
comes from feature sums (count, sum f, sum f f^T in float64), so ranks add theirs with one all-reduce; KID
from the features themselves, with torch-fidelity's subsets, kernel and seed.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from .. import dist
from ..atomic import atomic_write, sha256_file
from ..errors import UsageError

ENV = "DDPDIFF_INCEPTION_WEIGHTS"
DIM = 2048
WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
EXTENSIONS = ("png", "jpg", "jpeg")  # what torch-fidelity finds in a folder
KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = 100, 1000, 2020  # torch-fidelity's defaults
KID_REFERENCE = 10_000  # reference images whose features a cached stats file keeps for KID (80 MB)

SKIP_MESSAGE = (f"fid skipped: no Inception weights (they cannot be downloaded here); pass --inception PATH or set "
                f"{ENV}=PATH to torch-fidelity's {WEIGHTS_NAME} (from "
                "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/)")


class FIDError(UsageError):
    """Unusable Inception weights, images or statistics; the message is one line naming the file."""


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


class Inception(nn.Module):
    """torch-fidelity's Inception: uint8 images [B,3,H,W] (any size) -> float32 pool features [B,2048]."""

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.extractor = extractor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extractor(x)[0]


@contextlib.contextmanager
def _handed(marker: str, state: dict) -> Iterator[None]:
    """torch-fidelity's constructor always loads its weights itself, unpickling (weights_only=False): it gets
    the state already read with weights_only=True instead, and the file is read once."""
    real = torch.load
    torch.load = lambda f, *args, **kwargs: state if f is marker else real(f, *args, **kwargs)
    try:
        yield
    finally:
        torch.load = real


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> Inception:
    """torch-fidelity's Inception in eval mode with the weights in `path`; never downloads."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign files arrive as many exception types
        raise FIDError(f"{path}: cannot be read as a state dict ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FIDError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    marker = f"<the state read from {path}>"  # no file: were it ever read, it would fail loudly
    try:
        with _handed(marker, state):
            extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                    feature_extractor_weights_path=marker)
    except RuntimeError as e:
        raise FIDError(f"{path}: not Inception weights in torch-fidelity's format ({WEIGHTS_NAME}): "
                       f"{' '.join(str(e).split())[:300]}") from None
    return Inception(extractor).to(device).eval()


@torch.no_grad()
def features(net: nn.Module, images: torch.Tensor, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """Float32 features [N, D] of uint8 images [N,3,H,W], batch by batch, in float32 even under autocast."""
    device = next(net.parameters()).device
    with torch.autocast(device.type, enabled=False):
        out = [net(images[i:i + batch_size].to(device)).float().flatten(1).cpu()
               for i in tqdm(range(0, len(images), batch_size), desc="inception", disable=not progress)]
    return torch.cat(out) if out else torch.zeros(0, DIM)


def feature_dim(net: nn.Module) -> int:
    """How many features the network gives per image (2048 for Inception)."""
    return features(net, torch.zeros(1, 3, 16, 16, dtype=torch.uint8)).shape[1]


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


@dataclass
class Stats:
    """What FID and KID need of one image set: mean, covariance, count, and features for KID (None: FID only)."""
    mu: np.ndarray
    sigma: np.ndarray
    num: int
    features: np.ndarray | None = None
    key: dict | None = None  # what the set is (source, weights' sha256, ...), checked when a cache is reused

    @classmethod
    def of(cls, sums: torch.Tensor, feats: torch.Tensor | None = None, key: dict | None = None) -> Stats:
        mu, sigma = mean_cov(sums)
        return cls(mu, sigma, int(sums[0]), None if feats is None else feats.float().numpy(), key)

    def save(self, path: str | os.PathLike) -> None:
        """As a .npz (no pickle), written atomically."""
        arrays = {"mu": self.mu, "sigma": self.sigma, "num": np.int64(self.num),
                  "key": np.array(json.dumps(self.key or {}, sort_keys=True))}
        if self.features is not None:
            arrays["features"] = self.features
        with atomic_write(path) as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Stats:
        """A file `save` wrote, or pytorch-fid's / torch-fidelity's (mu, sigma only: FID without KID)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
                feats = z.get("features")
                num = int(z["num"]) if "num" in z else (len(feats) if feats is not None else 0)
                key = json.loads(str(z["key"])) if "key" in z else None
        except (OSError, ValueError, KeyError, EOFError) as e:
            raise FIDError(f"{path}: not a stats file with mu and sigma ({type(e).__name__}: {str(e)[:200]})") from None
        if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
            raise FIDError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
        return cls(mu, sigma, num, feats, key)


def frechet_distance(a: Stats, b: Stats) -> float:
    """FID between two sets, by torch-fidelity's formula (eigenvalues of sigma_a sigma_b) in float64."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    if a.mu.shape != b.mu.shape:
        raise FIDError(f"features of {len(a.mu)} and {len(b.mu)} dimensions cannot be compared")
    return fid_statistics_to_metric({"mu": a.mu, "sigma": a.sigma}, {"mu": b.mu, "sigma": b.sigma},
                                    verbose=False)[KEY_METRIC_FID]


def kid(a: Stats, b: Stats, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE) -> dict | None:
    """KID (mean and std over `subsets` random subsets, torch-fidelity's polynomial kernel and seed) in float64.

    The subset size is `subset_size` or the smaller set's size if less (reported: KIDs compare only at the
    same size). None when a side has no features (a mu/sigma-only stats file).
    """
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    if a.features is None or b.features is None:
        return None
    size = min(subset_size, len(a.features), len(b.features))
    if size < 2:
        raise FIDError(f"KID needs at least 2 images per side, got {len(a.features)} and {len(b.features)}")
    out = kid_features_to_metric(torch.from_numpy(a.features).double(), torch.from_numpy(b.features).double(),
                                 kid_subsets=subsets, kid_subset_size=size, rng_seed=KID_SEED, verbose=False)
    return {"value": out[KEY_METRIC_KID_MEAN], "std": out[KEY_METRIC_KID_STD], "subsets": subsets,
            "subset_size": size}


# -- image folders ---------------------------------------------------------------------------------------------

def folder_images(folder: str | os.PathLike) -> list[Path]:
    """The images torch-fidelity would take from a folder: .png/.jpg/.jpeg at its top level, sorted by real path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FIDError(f"{folder}: no such folder")
    files = sorted(os.path.realpath(p) for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower().lstrip(".") in EXTENSIONS)
    if not files:
        raise FIDError(f"{folder}: no images (.{', .'.join(EXTENSIONS)}) in this folder")
    return [Path(f) for f in files]


def _read(path: Path) -> torch.Tensor:
    try:
        with Image.open(path) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise FIDError(f"{path}: not a readable image ({type(e).__name__}: {str(e)[:200]})") from None


def folder_stats(files: list[Path], net: nn.Module, batch_size: int = 64, progress: bool = False,
                 key: dict | None = None) -> Stats:
    """Stats of images (`folder_images`); a batch holds images of one size (the network resizes each to 299)."""
    sums, feats = None, []
    for i in tqdm(range(0, len(files), batch_size), desc="images", disable=not progress):
        images = [_read(p) for p in files[i:i + batch_size]]
        groups = [torch.stack(images)] if len({im.shape for im in images}) == 1 else [im[None] for im in images]
        for group in groups:
            f = features(net, group, batch_size)
            feats.append(f)
            sums = moments(f) if sums is None else sums + moments(f)
    return Stats.of(sums, torch.cat(feats), key)


# -- reference statistics of a shard split ---------------------------------------------------------------------

def stats_path(shards: str | os.PathLike, key: dict) -> Path:
    """Where the stats of `key` are cached: beside the shards, named by everything that determines them."""
    return Path(shards) / (f"fid_stats_{key['split']}_{key['count']}_{key['size']}px_"
                           f"{key['weights_sha256'][:16]}.npz")


def reference_key(shards: str | os.PathLike, split: str, count: int | None, weights: str | os.PathLike) -> dict:
    """The cache key of a split's reference stats; count None means the whole split."""
    from .. import data

    manifest = data.load_manifest(shards)
    n = data.split_count(manifest, split)
    if count is not None and not 2 <= count <= n:
        raise FIDError(f"--fid-count {count}: split {split!r} of {shards} has {n} images (at least 2 needed)")
    return {"split": split, "count": n if count is None else count, "size": manifest["image_size"],
            "crop": "64x64 of the largest centred square" if manifest["image_size"] == 64
            else f"{manifest['image_size']}px of the largest centred square",
            "weights_sha256": sha256_file(weights)}


def split_stats(shards: str | os.PathLike, split: str, count: int, net: nn.Module, batch_size: int = 64,
                key: dict | None = None, progress: bool = False) -> Stats:
    """Stats of the first `count` images of a split, shared over the ranks (rank r takes batches r, r + W, ...),
    with the features of every ceil(count / KID_REFERENCE)-th image kept for KID. Call on every rank."""
    from ..data import index, load_manifest
    from ..data.batch import Reader

    manifest = load_manifest(shards)
    reader = Reader(index.build(shards, manifest, split, False, ()), manifest, {})
    stride, dim = -(-count // KID_REFERENCE), feature_dim(net)
    kept = torch.zeros(len(range(0, count, stride)), dim)
    sums = torch.zeros(1 + dim + dim * dim, dtype=torch.float64)
    starts = range(dist.rank() * batch_size, count, dist.world_size() * batch_size)
    for start in tqdm(starts, desc=f"reference {split}", disable=not progress):
        rows = np.arange(start, min(start + batch_size, count))
        images = torch.from_numpy(reader.read(rows)["image"]).permute(0, 3, 1, 2)
        f = features(net, images, batch_size)
        sums += moments(f)
        mine = rows % stride == 0
        kept[rows[mine] // stride] = f[torch.from_numpy(mine)]
    return Stats.of(dist.all_sum(sums), dist.all_sum(kept), key)


def reference_stats(shards: str | os.PathLike, split: str, count: int | None, net: nn.Module,
                    weights: str | os.PathLike, batch_size: int = 64, progress: bool = False,
                    log: Callable[[str], None] = lambda msg: None) -> tuple[Stats, Path]:
    """The cached reference stats of a split, computed (by all ranks) and written (by rank 0) when the cache
    is missing or holds another key. Call on every rank."""
    key = reference_key(shards, split, count, weights)
    path = stats_path(shards, key)
    cached = Stats.load(path) if path.is_file() else None
    if dist.any_rank(cached is None or cached.key != key):
        log(f"fid: computing the reference statistics of {key['count']} {split} images into {path}")
        cached = split_stats(shards, split, key["count"], net, batch_size, key, progress)
        if dist.is_main():
            cached.save(path)
        dist.barrier()
    return cached, path
