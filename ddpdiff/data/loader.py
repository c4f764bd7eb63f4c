"""Epochs over the training shards: exact-once, equal batches on every rank, seeded order, start mid-epoch.

Epoch e is one permutation of the split's N samples drawn from `default_rng([seed, epoch])`, cut to
N' = floor(N / (world_size * B)) * world_size * B. Global batch g of rank r is
perm[(g * world_size + r) * B : +B], so the ranks' batches partition the first N' samples of the
permutation, every rank has N' / (world_size * B) batches, and the split into shards plays no part.
Loader worker w builds the batches g - start ≡ w (mod workers); the DataLoader takes them round-robin,
which is the order start, start + 1, ... whatever the number of workers.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import index
from .batch import Reader, stack, to_torch, unbatch
from .manifest import DataError, load_manifest, use_tokens

MapSample = Callable[[dict, np.random.Generator], dict]


def _reader(shards_dir, manifest: dict, split: str, tokens: bool | None, extra) -> Reader:
    extra = tuple(extra)
    split_index = index.build(shards_dir, manifest, split, use_tokens(manifest, tokens, shards_dir), extra)
    return Reader(split_index, manifest, extra)


class Loader:
    """This rank's batches of a split, epoch by epoch.

    Args:
        tokens: None includes token states when the shards have them, True requires them, False skips them.
        extra: further members to decode per sample into lists, e.g. ("jpg",) for the full-resolution crop.
        map_sample: fn(sample, rng) -> sample applied to each sample's numpy form (see `batch.unbatch`),
            with rng seeded from (seed, epoch, sample index in the split): the same whatever the workers.
    """

    def __init__(self, shards_dir: str | os.PathLike, split: str = "train", *, batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, workers: int = 2, tokens: bool | None = None,
                 extra: tuple[str, ...] = (), map_sample: MapSample | None = None, pin_memory: bool = False):
        problems = [f"{name} must be {rule}, got {value}" for name, value, ok, rule in (
            ("batch_size", batch_size, batch_size >= 1, ">= 1"),
            ("world_size", world_size, world_size >= 1, ">= 1"),
            ("rank", rank, 0 <= rank < world_size, "in [0, world_size)"),
            ("seed", seed, seed >= 0, ">= 0"),
            ("workers", workers, workers >= 0, ">= 0")) if not ok]
        if problems:
            raise DataError("Loader: " + "; ".join(problems))
        self.manifest = load_manifest(shards_dir)
        self._reader = _reader(shards_dir, self.manifest, split, tokens, extra)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.workers, self.map_sample, self.pin_memory = workers, map_sample, pin_memory
        self.batches_per_epoch = len(self._reader) // (world_size * batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """Sample indices of this rank's batches in `epoch`: int64 [batches_per_epoch, batch_size]."""
        per_batch = self.world_size * self.batch_size
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self._reader))
        return perm[:self.batches_per_epoch * per_batch].reshape(-1, self.world_size, self.batch_size)[:, self.rank]

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """Batches start .. batches_per_epoch - 1 of `epoch`, the same on every run."""
        if not 0 <= start <= self.batches_per_epoch:
            raise DataError(f"Loader.epoch: start {start} is outside [0, {self.batches_per_epoch}]")
        if epoch < 0:
            raise DataError(f"Loader.epoch: epoch must be >= 0, got {epoch}")
        batches = _Batches(self._reader, self.order(epoch)[start:], self.seed, epoch, self.map_sample)
        workers = min(self.workers, len(batches.order))
        if workers == 0:
            return iter(batches)
        return iter(DataLoader(batches, batch_size=None, num_workers=workers, pin_memory=self.pin_memory))


class _Batches(IterableDataset):
    """Builds the batches of one epoch from a position; in worker w of W, only every W-th from the w-th."""

    def __init__(self, reader: Reader, order: np.ndarray, seed: int, epoch: int, map_sample: MapSample | None):
        self.reader, self.order, self.seed, self.epoch, self.map_sample = reader, order, seed, epoch, map_sample

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for indices in self.order[worker::workers]:
            yield self.make(indices)

    def make(self, indices: np.ndarray) -> dict:
        batch = self.reader.read(indices)
        if self.map_sample is not None:
            samples = [self.map_sample(s, np.random.default_rng([self.seed, self.epoch, i]))
                       for s, i in zip(unbatch(batch), indices.tolist())]
            batch = stack(samples, self.reader.extra)
        return to_torch(batch)


def read_samples(shards_dir: str | os.PathLike, split: str = "val", n: int = 8, tokens: bool | None = None,
                 extra: tuple[str, ...] = ()) -> dict:
    """One batch of the first n samples of a split in key order (fixed validation prompts and real images)."""
    manifest = load_manifest(shards_dir)
    reader = _reader(shards_dir, manifest, split, tokens, extra)
    if not 1 <= n <= len(reader):
        raise DataError(f"read_samples: n={n}, but split {split!r} of {shards_dir} has {len(reader)} samples")
    return to_torch(reader.read(range(n)))
