"""Epochs over the training shards: exact-once, equal batches on every rank, seeded order, start mid-epoch.

Epoch e is one permutation of the split's N samples drawn from `default_rng([seed, epoch])`, cut to
N' = floor(N / G) * G for a global batch of G. Global batch g is perm[g * G : (g + 1) * G], and rank r
takes its `share` of it (G need not divide by the world size: the first G % world_size ranks take one
more), so the ranks' batches partition the first N' samples of the permutation, every rank has N' / G
batches, and the split into shards plays no part.
Batch g is a pure function of (seed, epoch, g, rank), so loader workers, which build whole batches from
a sampler of positions that the DataLoader returns in order, give what one process gives.
"""

from __future__ import annotations

import os
import signal
from typing import Callable, Iterator

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from . import index
from .batch import Reader, decoder, stack, to_torch, unbatch
from .manifest import DataError, load_manifest, use_tokens

MapSample = Callable[[dict, np.random.Generator], dict]
# Workers start from a clean server process, not a fork of a rank that may hold CUDA or NCCL state.
WORKER_START = "forkserver"


def _leave_signals_to_main(worker_id: int) -> None:
    """Workers ignore SIGTERM, SIGUSR1 and SIGINT: a scheduler signals every process of a job, and the rank
    decides (it checkpoints, then shuts its workers down); a worker that died of it would only fail the rank."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def share(global_batch: int, world_size: int, rank: int) -> tuple[int, int]:
    """(offset, size) of rank's part of a global batch; the first global_batch % world_size ranks take one more."""
    base, extra = divmod(global_batch, world_size)
    return rank * base + min(rank, extra), base + (rank < extra)


def _reader(shards_dir, manifest: dict, split: str, tokens: bool | None, extra) -> Reader:
    decoders = {name: decoder(name) for name in extra}  # an unknown extension fails before the scan
    split_index = index.build(shards_dir, manifest, split, use_tokens(manifest, tokens, shards_dir), tuple(decoders))
    return Reader(split_index, manifest, decoders)


class Loader:
    """This rank's batches of a split, epoch by epoch; worker processes start on first use and persist.

    Args:
        batch_size / global_batch: give one: this rank's batch (the same on every rank), or the global batch
            split over the ranks by `share`.
        tokens: None includes token states when the shards have them, True requires them, False skips them.
        extra: further members to decode per sample into lists, e.g. ("jpg",) for the full-resolution crop.
        map_sample: fn(sample, rng) -> sample applied to each sample's numpy form (see `batch.unbatch`),
            with rng seeded from (seed, epoch, sample index in the split): the same whatever the workers.
        pin_memory: page-locked batches, for faster copies to a GPU.
    """

    def __init__(self, shards_dir: str | os.PathLike, split: str = "train", *, batch_size: int | None = None,
                 global_batch: int | None = None, rank: int = 0, world_size: int = 1, seed: int = 0,
                 workers: int = 2, tokens: bool | None = None, extra: tuple[str, ...] = (),
                 map_sample: MapSample | None = None, pin_memory: bool = False):
        if (batch_size is None) == (global_batch is None):
            raise DataError("Loader: give exactly one of batch_size (per rank) and global_batch")
        global_batch = global_batch if batch_size is None else batch_size * world_size
        problems = [f"{name} must be {rule}, got {value}" for name, value, ok, rule in (
            ("global_batch", global_batch, global_batch >= world_size, f">= world_size ({world_size})"),
            ("world_size", world_size, world_size >= 1, ">= 1"),
            ("rank", rank, 0 <= rank < world_size, "in [0, world_size)"),
            ("seed", seed, seed >= 0, ">= 0"),
            ("workers", workers, workers >= 0, ">= 0")) if not ok]
        if problems:
            raise DataError("Loader: " + "; ".join(problems))
        self.manifest = load_manifest(shards_dir)
        reader = _reader(shards_dir, self.manifest, split, tokens, extra)
        self._batches = _Batches(reader, global_batch, rank, world_size, seed, map_sample)
        self.batches_per_epoch = self._batches.batches_per_epoch
        self._positions = _Positions()
        self._workers, self._pin_memory = workers, pin_memory
        self._loader: DataLoader | None = None

    def order(self, epoch: int) -> np.ndarray:
        """Sample indices (in the split) of this rank's batches in `epoch`: [batches_per_epoch, batch_size]."""
        return self._batches.order(epoch)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """Batches start .. batches_per_epoch - 1 of `epoch`, the same on every run; one pass at a time."""
        if epoch < 0 or not 0 <= start <= self.batches_per_epoch:
            raise DataError(f"Loader.epoch: epoch {epoch} must be >= 0 and start {start} in "
                            f"[0, {self.batches_per_epoch}]")
        if self._workers == 0 or start == self.batches_per_epoch:
            return (self._batches[epoch, g] for g in range(start, self.batches_per_epoch))
        self._positions.epoch, self._positions.start, self._positions.stop = epoch, start, self.batches_per_epoch
        if self._loader is None:
            self._loader = DataLoader(self._batches, batch_size=None, sampler=self._positions,
                                      num_workers=self._workers, persistent_workers=True,
                                      pin_memory=self._pin_memory, worker_init_fn=_leave_signals_to_main,
                                      multiprocessing_context=WORKER_START)
        return iter(self._loader)


class _Positions(Sampler):
    """The (epoch, batch) positions of the current pass, set by `Loader.epoch` before it starts."""

    def __init__(self):
        self.epoch = self.start = self.stop = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, g) for g in range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


class _Batches(Dataset):
    """Batch g of epoch e of one rank, as a pure function of (seed, epoch, g, rank)."""

    def __init__(self, reader: Reader, global_batch: int, rank: int, world_size: int, seed: int,
                 map_sample: MapSample | None):
        self.reader, self.global_batch = reader, global_batch
        self.offset, self.size = share(global_batch, world_size, rank)
        self.seed, self.map_sample = seed, map_sample
        self.batches_per_epoch = len(reader) // global_batch
        self._order: tuple[int, np.ndarray] | None = None  # the last epoch asked for and its order

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.reader))
            used = perm[:self.batches_per_epoch * self.global_batch].reshape(-1, self.global_batch)
            self._order = epoch, used[:, self.offset:self.offset + self.size]
        return self._order[1]

    def __getitem__(self, position: tuple[int, int]) -> dict:
        epoch, g = position
        indices = self.order(epoch)[g]
        batch = self.reader.read(indices)
        if self.map_sample is not None:
            samples = [self.map_sample(s, np.random.default_rng([self.seed, epoch, i]))
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
