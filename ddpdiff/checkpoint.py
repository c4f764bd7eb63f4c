"""Checkpoints of a run: save (atomic, checksummed), find the newest that verifies, load, prune, set aside the
ones that fail, and read one for inference with its typed metadata.

`RUN/checkpoints/step_XXXXXXXX.pt` is a plain dict readable with `torch.load(path, weights_only=True)`;
`step_XXXXXXXX.pt.sha256` beside it is written after it, so a checkpoint counts only once both exist and
the checksum matches. Checkpoints a resume could not use move to a numbered folder of
`RUN/checkpoints/set_aside/` (one per event, so none overwrites another), kept for inspection and never counted
again. A refused resume leaves `RUN/checkpoints/REFUSED`, so every later start is refused too until the user acts;
`RUN/fresh_start` names the job that last started the run afresh, so its restarts resume instead.

A `Writer` takes the write off the training loop: the state is copied to host memory (the copy later steps
cannot change) and written, hashed, renamed and pruned in one background thread, one write at a time.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, Self

import torch

from .atomic import HashingWriter, atomic_write, sha256_file, write_text
from .errors import UsageError
from .models import meta as model_meta

_NAME = re.compile(r"^step_(\d{8})\.pt$")
REFUSED = "REFUSED"  # in checkpoints/: why a resume was refused, until the user acts
FRESH = "fresh_start"  # in the run directory: the job that last started the run afresh
# What flock raises on a filesystem that does not lock at all: NFS without lockd (ENOLCK), Lustre mounted
# noflock (ENOSYS), others (EOPNOTSUPP, EINVAL).
UNLOCKABLE = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}


class CheckpointError(UsageError):
    """A checkpoint path that names nothing usable; the message is one line naming it."""


def path_for(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}.pt"


def save(run_dir: str | Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write the checkpoint for `step` (streamed to disk and hashed on the way, never whole in memory), then
    delete all but the newest `keep` complete ones; the one just written is always kept."""
    path = path_for(run_dir, step)
    with atomic_write(path) as f:
        out = HashingWriter(f)
        torch.save(state, out)
    write_text(path.with_name(path.name + ".sha256"), out.sha256.hexdigest() + "\n")
    prune(run_dir, keep, path)
    return path


def snapshot(state: Any) -> Any:
    """A copy of `state` in host memory that nothing else references: containers rebuilt, every tensor copied
    (same dtype, shape and strides, so it serialises to the same bytes). Device tensors go to pinned buffers
    with non-blocking copies, waited for once."""
    cuda = []

    def copy(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            out = torch.empty_like(obj, device="cpu", pin_memory=obj.is_cuda)
            out.copy_(obj.detach(), non_blocking=obj.is_cuda)
            if obj.is_cuda:
                cuda.append(obj.device)
            return out
        if isinstance(obj, dict):
            out = type(obj)((k, copy(v)) for k, v in obj.items())
            if hasattr(obj, "__dict__"):  # a module state_dict's `_metadata` (versions `load_state_dict` reads)
                out.__dict__.update(copy(vars(obj)))
            return out
        if isinstance(obj, (list, tuple)):
            return type(obj)(copy(v) for v in obj)
        return obj  # numbers, strings, None: immutable

    out = copy(state)
    for device in set(cuda):
        torch.cuda.synchronize(device)
    return out


class Writer:
    """Writes checkpoints in a background thread, at most one in flight, so the training loop is held only for
    the copy to host memory (`snapshot`); with `background=False` it writes the live state in the caller,
    holding no copy. A failed write is kept, and raised by the next `wait` as one line naming the file."""

    def __init__(self, background: bool = True):
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: CheckpointError | None = None

    def start(self, run_dir: str | Path, step: int, state: dict[str, Any], keep: int,
              wait_s: float | None = None) -> bool:
        """Write the checkpoint of `step` (`save`), after waiting for the previous write (raising its error).

        With `wait_s`, a previous write still in flight after that many seconds is abandoned and nothing is
        written (False): the checkpoint before it stays the newest complete one, since the abandoned write ends
        with the process (a daemon thread) and the next start removes its temporary file.
        """
        if not self.wait(wait_s):
            self._thread = None
            return False
        if self.background:
            self._thread = threading.Thread(target=self._write, args=(run_dir, step, snapshot(state), keep),
                                            name="checkpoint-writer", daemon=True)
            self._thread.start()
        else:
            self._write(run_dir, step, state, keep)
            self.wait()
        return True

    def _write(self, run_dir: str | Path, step: int, state: dict[str, Any], keep: int) -> None:
        try:
            save(run_dir, step, state, keep)
        except Exception as e:  # reported on the training thread by `wait`
            self._error = CheckpointError(f"{path_for(run_dir, step)}: writing the checkpoint failed "
                                          f"({type(e).__name__}: {' '.join(str(e).split())})")
            self._error.__cause__ = e

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the write in flight (if any) is complete and raise its error, once; False instead when it
        is still in flight after `timeout` seconds."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error
        return True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Leave no write in flight. Its error is raised, or, when the run already ends with another, reported
        on stderr so that neither is lost."""
        try:
            self.wait()
        except CheckpointError as e:
            if exc is None:
                raise
            print(f"checkpoint: {e}", file=sys.stderr, flush=True)


def candidates(run_dir: str | Path) -> list[Path]:
    """Checkpoint files of a run, newest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.match(p.name)), reverse=True)


def verify(path: Path) -> str | None:
    """None if `path` is complete and intact, else why not."""
    digest_file = path.with_name(path.name + ".sha256")
    if not digest_file.is_file():
        return "no checksum file (the save did not finish)"
    if sha256_file(path) != digest_file.read_text().strip():
        return "checksum mismatch (truncated or corrupt)"
    return None


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=True)


def load_latest(run_dir: str | Path, map_location: str | torch.device = "cpu",
                log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that verifies and loads; each newer one that does not is reported and set aside.

    Raises CheckpointError when checkpoints exist but none is usable: starting again from step 0 would
    silently throw a run away, so that takes `run.fresh` (`start_fresh`). The refusal is written to
    checkpoints/REFUSED and repeated by every later call until the user removes it (or starts afresh), since
    the next start would otherwise find nothing and train from step 0.
    """
    folder = Path(run_dir) / "checkpoints"
    marker = folder / REFUSED
    if marker.is_file():
        raise CheckpointError(f"{marker}: resume refused by an earlier start: {marker.read_text().strip()}")
    rejected, aside = [], None
    for path in candidates(run_dir):
        problem = verify(path)
        if problem is None:
            try:
                state = load(path, map_location)
            except Exception as e:  # a file that hashes right but does not unpickle is still unusable
                problem = f"does not load ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
            else:
                if state.get("step") == int(_NAME.match(path.name).group(1)):
                    return state, path
                problem = f"holds step {state.get('step')}, not the step in its name"
        aside = aside or aside_folder(run_dir)
        log(f"checkpoint {path} set aside in {set_aside(path, aside).parent}: {problem}")
        rejected.append(f"{path.name}: {problem}")
    if rejected:
        reason = (f"no checkpoint is usable ({'; '.join(rejected)}); they are kept in {aside}; pass --run.fresh "
                  f"true to start again from step 0, or put a usable checkpoint back into {folder} and delete "
                  f"{marker}")
        write_text(marker, reason + "\n")
        raise CheckpointError(f"{folder}: {reason}")
    return None


def start_fresh(run_dir: str | Path, job: str | None) -> list[Path] | None:
    """Set every checkpoint (and a refusal) aside for `run.fresh`, once per job: a launcher that restarts
    `job` repeats its arguments (a SLURM requeue, a torchrun restart), and that restart must resume from what
    the fresh start has saved since. None when `job` has already started afresh here; `job` None (a plain
    process, which nothing restarts) always starts afresh."""
    record = Path(run_dir) / FRESH
    if job is not None and record.is_file() and record.read_text().strip() == job:
        return None
    old, refused = candidates(run_dir), Path(run_dir) / "checkpoints" / REFUSED
    aside = aside_folder(run_dir) if old or refused.is_file() else None
    moved = [set_aside(p, aside) for p in old]
    if refused.is_file():
        refused.replace(aside / REFUSED)
    if job is None:
        record.unlink(missing_ok=True)
    else:
        write_text(record, job + "\n")
    return moved


def resolve(path: str | Path) -> Path:
    """A checkpoint file, or a run directory meaning its newest complete checkpoint."""
    path = Path(path)
    if path.is_dir():
        for p in candidates(path):
            if verify(p) is None:
                return p
        raise CheckpointError(f"{path}: no complete checkpoint under {path / 'checkpoints'}")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file or run directory")
    return path


def read(path: str | Path, kind: type | None = None) -> tuple[dict[str, Any], Any, Path]:
    """A checkpoint file (or a run directory's newest complete one) for inference: its state, its meta as
    `kind` (`ddpdiff.models.DenoiserMeta`, `SRMeta`, `ClassifierMeta`; None: the kind its meta names), and the
    file."""
    path = resolve(path)
    try:
        state = load(path)
    except Exception as e:  # not a torch file, or one that needs unpickling arbitrary objects
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    meta = state.get("meta")
    kind = kind or model_meta.KINDS.get(model_meta.kind_of(meta), model_meta.DenoiserMeta)
    return state, model_meta.read(meta, kind, str(path)), path


def prune(run_dir: str | Path, keep: int, written: Path) -> None:
    """Delete all but the newest `keep` complete checkpoints, and leftovers older than them; never `written`."""
    complete = [p for p in candidates(run_dir) if p.with_name(p.name + ".sha256").is_file()]
    if len(complete) <= keep:
        return
    oldest_kept = min(complete[keep - 1].name, written.name)
    for p in candidates(run_dir):
        if p.name < oldest_kept:
            p.with_name(p.name + ".sha256").unlink(missing_ok=True)
            p.unlink(missing_ok=True)


@contextlib.contextmanager
def locked(run_dir: str | Path, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> Iterator[None]:
    """Hold RUN/.lock for as long as a run writes there: a second job (or a requeue racing a straggler) on the
    same directory stops at once, naming the holder. The lock dies with its process, so no stale lock stays
    (except where a filesystem keeps the lock of a crashed node: docs/reliability.md#shared-filesystems).

    A filesystem that refuses flock (`UNLOCKABLE`) gets one line saying the directory is unprotected, and the
    run goes on: refusing would make the suite unusable there. Any other failure is a CheckpointError.
    """
    path = Path(run_dir) / ".lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open the run's lock file ({e.strerror or e})") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            f.seek(0)
            raise CheckpointError(f"{run_dir}: in use by another run ({f.read().strip() or 'holder unknown'}); "
                                  "wait for it to end, or pass another --run.dir") from None
        except OSError as e:
            if e.errno not in UNLOCKABLE:
                raise CheckpointError(f"{path}: cannot lock ({errno.errorcode.get(e.errno, e.errno)}: "
                                      f"{e.strerror})") from None
            log(f"{run_dir}: unprotected: its filesystem refused flock ({errno.errorcode[e.errno]}), so nothing "
                "stops a second run from writing here at the same time (docs/reliability.md#shared-filesystems)")
            held = False
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            if held:  # unlocked, not only closed: a process that inherited the descriptor would keep the lock
                fcntl.flock(f, fcntl.LOCK_UN)


def aside_folder(run_dir: str | Path) -> Path:
    """A new numbered folder in checkpoints/set_aside/ for the files of one event, so that no event overwrites
    what an earlier one set aside under the same names."""
    parent = Path(run_dir) / "checkpoints" / "set_aside"
    parent.mkdir(parents=True, exist_ok=True)
    number = 1 + max((int(p.name) for p in parent.iterdir() if p.name.isdigit()), default=0)
    folder = parent / str(number)
    folder.mkdir()
    return folder


def set_aside(path: Path, folder: Path) -> Path:
    """Move a checkpoint (and its checksum) into `folder` (`aside_folder`), where nothing counts it again."""
    for p in (path, path.with_name(path.name + ".sha256")):
        if p.exists():
            p.replace(folder / p.name)
    return folder / path.name


def remove_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files of saves that were killed (call only while holding the run's lock)."""
    folder = Path(run_dir) / "checkpoints"
    stale = sorted(folder.glob(".step_*.tmp")) if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
