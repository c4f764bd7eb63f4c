"""Epochs over the training shards: exact-once, equal batches on every rank, seeded order, start mid-epoch.

Epoch e is one permutation of the split's N samples drawn from `default_rng([seed, epoch])`, cut to
N' = floor(N / G) * G for a global batch of G. Global batch g is perm[g * G : (g + 1) * G], and rank r
takes its `share` of it (G need not divide by the world size: the first G % world_size ranks take one
more), so the ranks' batches partition the first N' samples of the permutation, every rank has N' / G
batches, and the split into shards plays no part.
Batch g is a pure function of (seed, epoch, g, rank), so loader workers, which build whole batches from
a sampler of positions that the DataLoader returns in order, give what one process gives.

Unusable samples (malformed or undecodable members) keep their place in the order and are replaced inside
their batch (`batch.Reader.read`), so the rule above holds whatever is damaged. A loader counts them, reports
each once, and stops with the list when there are more than `max_bad`.
"""

from __future__ import annotations

import os
import signal
import sys
from multiprocessing import forkserver, resource_tracker
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from . import index
from .batch import BAD, Reader, decoder, stack, to_torch, unbatch
from .manifest import DataError, load_manifest, use_tokens, verify_shards

MapSample = Callable[[dict, np.random.Generator], dict]
MAX_BAD = 10  # unusable samples a loader replaces before it stops
SHOWN = 20  # unusable samples an error lists by name
# Workers start from a clean server process, not a fork of a rank that may hold CUDA or NCCL state.
WORKER_START = "forkserver"
# What a scheduler sends every process of a job (SLURM: the whole step); the rank decides what to do about it.
JOB_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _start_worker_server() -> None:
    """Start the forkserver (and multiprocessing's resource tracker) with JOB_SIGNALS blocked: they keep that
    mask, and so does every worker the forkserver forks, so a signal to the whole job leaves them to the rank,
    which checkpoints and then shuts them down. A forkserver killed by it would take its workers with it, and
    the rank would wait for batches that never come. Blocked rather than ignored, so that the rank holds a
    signal that arrives meanwhile instead of losing it."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
    try:
        resource_tracker.ensure_running()  # starting the tracker unblocks SIGINT and SIGTERM again
        signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def share(global_batch: int, world_size: int, rank: int) -> tuple[int, int]:
    """(offset, size) of rank's part of a global batch; the first global_batch % world_size ranks take one more."""
    base, extra = divmod(global_batch, world_size)
    return rank * base + min(rank, extra), base + (rank < extra)


def _reader(shards_dir, manifest: dict, split: str, tokens: bool | None, extra, verify: bool) -> Reader:
    decoders = {name: decoder(name) for name in extra}  # an unknown extension fails before the scan
    if verify:
        differ = verify_shards(shards_dir, (split,), manifest)
        if differ:
            raise DataError(differ[0] if len(differ) == 1 else
                            f"{len(differ)} shards of split {split!r} differ from manifest.json: " + "; ".join(differ))
    split_index = index.build(shards_dir, manifest, split, use_tokens(manifest, tokens, shards_dir), tuple(decoders))
    return Reader(split_index, manifest, decoders)


def _to_stderr(line: str) -> None:
    print(f"ddpdiff.data: {line}", file=sys.stderr, flush=True)


class _BadSamples:
    """The unusable samples met so far: each reported once; more than `limit` is a DataError listing them."""

    def __init__(self, limit: int, report: Callable[[str], None] | None):
        self.limit, self.report, self.lines = limit, report or _to_stderr, []
        self._seen: set[str] = set()

    def add(self, lines: Iterable[str], report: bool = True) -> None:
        new = [line for line in dict.fromkeys(lines) if line not in self._seen]
        self._seen.update(new)
        self.lines += new
        if len(self.lines) > self.limit:
            shown = "; ".join(self.lines[:SHOWN]) + (f"; and {len(self.lines) - SHOWN} more"
                                                     if len(self.lines) > SHOWN else "")
            raise DataError(f"{len(self.lines)} unusable sample{'s' * (len(self.lines) > 1)}, more than max_bad="
                            f"{self.limit}: {shown}")
        for k, line in enumerate(new if report else (), len(self.lines) - len(new) + 1):
            self.report(f"{line} (unusable sample {k} of at most {self.limit}; replaced by another sample of its "
                        "batch)")


class Loader:
    """This rank's batches of a split, epoch by epoch; worker processes start on first use and persist.

    Args:
        batch_size / global_batch: give one: this rank's batch (the same on every rank), or the global batch
            split over the ranks by `share`.
        tokens: None includes token states when the shards have them, True requires them, False skips them.
        extra: further members to decode per sample into lists, e.g. ("jpg",) for the full-resolution crop.
        map_sample: fn(sample, rng) -> sample applied to each sample's numpy form (see `batch.unbatch`),
            with rng seeded from (seed, epoch, sample index in the split): the same whatever the workers.
        pin_memory: page-locked batches, for copies to a GPU that overlap its work (see `batch.to_float`).
        max_bad: unusable samples to replace (see the module doc) before stopping with a DataError that lists
            them; those the scan finds count at once for the whole split, the same on every rank, and those
            found while reading as this rank's batches meet them. 0: any unusable sample is an error.
        report: fn(line) called once per unusable sample (default: a line on stderr); the scan's are
            reported by rank 0 only, as every rank finds the same.
        verify: check every shard of the split against the manifest's sha256 first (reads all of it, on
            every rank; `tools/make_shards.py --verify OUT` does it once, before a run).
        timeout_s: with workers, the longest wait for one batch before a DataError (a worker that hangs, e.g.
            on a stalled filesystem, would otherwise hang the rank and with it the job); 0 waits forever.
    """

    def __init__(self, shards_dir: str | os.PathLike, split: str = "train", *, batch_size: int | None = None,
                 global_batch: int | None = None, rank: int = 0, world_size: int = 1, seed: int = 0,
                 workers: int = 2, tokens: bool | None = None, extra: tuple[str, ...] = (),
                 map_sample: MapSample | None = None, pin_memory: bool = False, max_bad: int = MAX_BAD,
                 report: Callable[[str], None] | None = None, verify: bool = False, timeout_s: float = 0):
        if (batch_size is None) == (global_batch is None):
            raise DataError("Loader: give exactly one of batch_size (per rank) and global_batch")
        global_batch = global_batch if batch_size is None else batch_size * world_size
        problems = [f"{name} must be {rule}, got {value}" for name, value, ok, rule in (
            ("global_batch", global_batch, global_batch >= world_size, f">= world_size ({world_size})"),
            ("world_size", world_size, world_size >= 1, ">= 1"),
            ("rank", rank, 0 <= rank < world_size, "in [0, world_size)"),
            ("seed", seed, seed >= 0, ">= 0"),
            ("workers", workers, workers >= 0, ">= 0"),
            ("max_bad", max_bad, max_bad >= 0, ">= 0"),
            ("timeout_s", timeout_s, timeout_s >= 0, ">= 0")) if not ok]
        if problems:
            raise DataError("Loader: " + "; ".join(problems))
        self.manifest = load_manifest(shards_dir)
        reader = _reader(shards_dir, self.manifest, split, tokens, extra, verify)
        self._bad = _BadSamples(max_bad, report)
        self._bad.add(reader.index.bad.values(), report=rank == 0)
        self._batches = _Batches(reader, global_batch, rank, world_size, seed, map_sample)
        self.batches_per_epoch = self._batches.batches_per_epoch
        self._positions = _Positions()
        self._workers, self._pin_memory, self._timeout_s = workers, pin_memory, timeout_s
        self._loader: DataLoader | None = None

    @property
    def bad(self) -> list[str]:
        """The unusable samples met so far, one line each: the whole split's found by the scan, then this rank's."""
        return list(self._bad.lines)

    def order(self, epoch: int) -> np.ndarray:
        """Sample indices (in the split) of this rank's batches in `epoch`: [batches_per_epoch, batch_size]."""
        return self._batches.order(epoch)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """Batches start .. batches_per_epoch - 1 of `epoch`, the same on every run; one pass at a time."""
        if epoch < 0 or not 0 <= start <= self.batches_per_epoch:
            raise DataError(f"Loader.epoch: epoch {epoch} must be >= 0 and start {start} in "
                            f"[0, {self.batches_per_epoch}]")
        if self._workers == 0 or start == self.batches_per_epoch:
            batches = (self._batches[epoch, g] for g in range(start, self.batches_per_epoch))
            return self._counted(map(_pinned, batches) if self._pin_memory else batches)
        self._positions.epoch, self._positions.start, self._positions.stop = epoch, start, self.batches_per_epoch
        if self._loader is None:
            _start_worker_server()
            self._loader = DataLoader(self._batches, batch_size=None, sampler=self._positions,
                                      num_workers=self._workers, persistent_workers=True,
                                      pin_memory=self._pin_memory, multiprocessing_context=WORKER_START,
                                      timeout=self._timeout_s)
        return self._counted(self._timed(iter(self._loader)))

    def _timed(self, batches: Iterator[dict]) -> Iterator[dict]:
        """The workers' batches; the DataLoader's timeout as one line naming the setting."""
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except RuntimeError as e:
                if "DataLoader timed out" not in str(e):
                    raise
                raise DataError(f"no batch from the {self._workers} loader worker(s) within timeout_s="
                                f"{self._timeout_s:g} s (data.timeout_s): a worker hangs, e.g. reading a shard "
                                "on a stalled filesystem") from None
            yield batch

    def _counted(self, batches: Iterator[dict]) -> Iterator[dict]:
        """The batches, with the unusable samples each replaced taken off it and counted here, in the rank."""
        for batch in batches:
            self._bad.add(batch.pop(BAD, ()))
            yield batch


def _pinned(batch: dict) -> dict:
    """The batch with its tensors in page-locked memory, as the DataLoader pins its workers' batches."""
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


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
        bad = batch.pop(BAD, None)
        if self.map_sample is not None:  # a substitute draws from its own index's rng, not its twin's
            samples = [self.map_sample(s, np.random.default_rng([self.seed, epoch, i]))
                       for s, i in zip(unbatch(batch), indices.tolist())]
            batch = stack(samples, self.reader.extra)
        return to_torch(batch) | ({BAD: bad} if bad else {})


def read_samples(shards_dir: str | os.PathLike, split: str = "val", n: int = 8, tokens: bool | None = None,
                 extra: tuple[str, ...] = (), max_bad: int = MAX_BAD, report: Callable[[str], None] | None = None,
                 verify: bool = False, rows: Sequence[int] | None = None) -> dict:
    """One batch of the first n samples of a split in key order (fixed validation prompts and real images),
    or of the samples at positions `rows` of the split when given (n is then ignored), in the same compact
    form as a `Loader`'s (`batch.to_torch`).

    Unusable samples among them are replaced and reported as a `Loader` does, counting only these.
    """
    manifest = load_manifest(shards_dir)
    reader = _reader(shards_dir, manifest, split, tokens, extra, verify)
    if rows is None and not 1 <= n <= len(reader):
        raise DataError(f"read_samples: n={n}, but split {split!r} of {shards_dir} has {len(reader)} samples")
    rows = range(n) if rows is None else list(rows)
    if not rows or not 0 <= min(rows) <= max(rows) < len(reader):
        raise DataError(f"read_samples: rows must be 0..{len(reader) - 1} (split {split!r} of {shards_dir}), and "
                        "at least one")
    batch = reader.read(rows)
    _BadSamples(max_bad, report).add(batch.pop(BAD, ()))
    return to_torch(batch)


def split_attributes(shards_dir: str | os.PathLike, split: str) -> np.ndarray:
    """The 0/1 attributes of every sample of a split, uint8 [N, 40], from the shards' index alone (no image or
    embedding is read): to choose samples by attribute before reading them with `read_samples(rows=...)`."""
    return index.build(shards_dir, load_manifest(shards_dir), split, False).attrs
