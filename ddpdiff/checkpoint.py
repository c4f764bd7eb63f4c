"""Checkpoints of a run: save (atomic, checksummed), find the newest that verifies, load, prune, and read one
for inference with its typed metadata.

`RUN/checkpoints/step_XXXXXXXX.pt` is a plain dict readable with `torch.load(path, weights_only=True)`;
`step_XXXXXXXX.pt.sha256` beside it is written after it, so a checkpoint counts only once both exist and
the checksum matches.
"""

from __future__ import annotations

import hashlib
import io
import re
import sys
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write, sha256_file, write_text
from .errors import UsageError
from .models import meta as model_meta

_NAME = re.compile(r"^step_(\d{8})\.pt$")


class CheckpointError(UsageError):
    """A checkpoint path that names nothing usable; the message is one line naming it."""


def path_for(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}.pt"


def save(run_dir: str | Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write the checkpoint for `step`, then delete all but the newest `keep` complete ones."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getbuffer()
    path = path_for(run_dir, step)
    with atomic_write(path) as f:
        f.write(data)
    write_text(path.with_name(path.name + ".sha256"), hashlib.sha256(data).hexdigest() + "\n")
    prune(run_dir, keep)
    return path


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
    """The newest checkpoint that verifies and loads, reporting each newer one that does not."""
    for path in candidates(run_dir):
        problem = verify(path)
        if problem is None:
            try:
                state = load(path, map_location)
            except Exception as e:  # a file that hashes right but does not unpickle is still unusable
                problem = f"does not load ({type(e).__name__}: {e})"
            else:
                if state.get("step") != int(_NAME.match(path.name).group(1)):
                    problem = f"holds step {state.get('step')}, not the step in its name"
                else:
                    return state, path
        log(f"checkpoint {path} skipped: {problem}")
    return None


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


def read(path: str | Path, kind: type) -> tuple[dict[str, Any], Any, Path]:
    """A checkpoint file (or a run directory's newest complete one) for inference: its state, its meta as
    `kind` (`ddpdiff.models.DenoiserMeta`, `SRMeta`, `ClassifierMeta`), and the file."""
    path = resolve(path)
    try:
        state = load(path)
    except Exception as e:  # not a torch file, or one that needs unpickling arbitrary objects
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    return state, model_meta.read(state.get("meta"), kind, str(path)), path


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and leftovers older than them."""
    complete = [p for p in candidates(run_dir) if p.with_name(p.name + ".sha256").is_file()]
    if len(complete) <= keep:
        return
    oldest_kept = complete[keep - 1].name
    for p in candidates(run_dir):
        if p.name < oldest_kept:
            p.with_name(p.name + ".sha256").unlink(missing_ok=True)
            p.unlink(missing_ok=True)
