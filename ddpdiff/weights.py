"""Exported weights: a network's EMA weights and what rebuilds it, in one safetensors file that runs no code on load.

A checkpoint carries the model, EMA and optimizer states for resuming (~1.3 GB for celeba64); an export
carries the EMA weights alone (in fp32, bf16 or fp16) with string metadata:

  format          "ddpdiff-weights"              the marker `is_exported` and `read` look for
  format_version  "1"                            bumped when a reader of this version could not read a file
  kind            "denoiser", "srresnet", "attr_resnet"
  meta            JSON of the checkpoint's meta  (ddpdiff/models/meta.py: CLIP, image size, empty prompt, sizes)
  config          JSON of the resolved config    (model, diffusion, data.shards for a denoiser)
  step            the training step              dtype: fp32, bf16 or fp16
  checkpoint      the checkpoint's file name     checkpoint_sha256: its recorded checksum, if it had one
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from . import checkpoint
from .atomic import atomic_write
from .errors import UsageError
from .models import meta as model_meta

FORMAT, VERSION = "ddpdiff-weights", "1"
SUFFIX = ".safetensors"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_JSON_FIELDS = ("meta", "config")


class WeightsError(UsageError):
    """An exported file (or an export's arguments) that cannot be used; the message is one line naming it."""


@dataclass(frozen=True)
class Weights:
    """One network's weights and what rebuilds it, from a checkpoint or an exported file."""
    tensors: dict[str, torch.Tensor]
    meta: model_meta.Meta
    config: dict[str, Any]  # the resolved training config
    step: int
    path: Path  # the file they were read from


def is_exported(path: str | Path) -> bool:
    """Whether `path` names an exported file rather than a checkpoint or run directory: by its suffix, or by
    its first bytes (a safetensors header length then '{'; a torch checkpoint is a zip starting 'PK')."""
    path = Path(path)
    if path.suffix == SUFFIX:
        return True
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:] == b"{" and struct.unpack("<Q", head[:8])[0] < path.stat().st_size


def export(source: str | Path, out: str | Path, dtype: str = "fp32") -> Weights:
    """Write the EMA weights of a checkpoint (or a run directory's newest complete one), of any kind, to `out`
    in `dtype`, atomically; what was written."""
    if dtype not in DTYPES:
        raise WeightsError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    out = Path(out)
    if out.suffix != SUFFIX or out.is_dir():
        raise WeightsError(f"--out {out}: expected a file name ending in {SUFFIX}")
    path = checkpoint.resolve(source)
    digest = path.with_name(path.name + ".sha256")
    if digest.is_file() and (problem := checkpoint.verify(path)):
        raise WeightsError(f"{path}: {problem}")
    state, meta, path = checkpoint.read(path)
    tensors = {}
    for name, t in state["ema"].items():
        if t.is_floating_point():
            t = t.to(DTYPES[dtype])
            if not t.isfinite().all():  # fp16 overflows beyond 65504; a diverged run has no finite weights
                raise WeightsError(f"{path}: EMA weight {name} is not finite in {dtype}")
        tensors[name] = t.contiguous()
    metadata = {"format": FORMAT, "format_version": VERSION, "kind": meta.kind, "meta": json.dumps(meta.to_dict()),
                "config": json.dumps(state["config"]), "step": str(state["step"]), "dtype": dtype,
                "checkpoint": path.name}
    if digest.is_file():
        metadata["checkpoint_sha256"] = digest.read_text().strip()
    with atomic_write(out) as f:
        f.write(save(tensors, metadata))
    return Weights(tensors, meta, state["config"], state["step"], out)


def read(path: str | Path, kind: type) -> Weights:
    """An exported file's weights (as stored: fp32, bf16 or fp16) with its meta as `kind` (`DenoiserMeta`,
    `SRMeta`, `ClassifierMeta`); WeightsError naming the file if it is not a complete export of that kind."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such exported file")
    try:
        with safe_open(str(path), "pt", device="cpu") as f:
            stored = f.metadata() or {}
            names = f.keys()  # a safe_open is not a dict: no `in f`
            tensors = {name: f.get_tensor(name) for name in names}
    except Exception as e:  # safetensors' own error for a bad header, a truncated file, a wrong dtype
        raise WeightsError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())[:160]})") from None
    if stored.get("format") != FORMAT:
        raise WeightsError(f"{path}: not a ddpdiff export (its metadata has no format={FORMAT}; write one with "
                           "python -m ddpdiff.export)")
    if stored.get("format_version") != VERSION:
        raise WeightsError(f"{path}: format_version {stored.get('format_version')!r}, this ddpdiff reads {VERSION}")
    missing = [k for k in ("kind", *_JSON_FIELDS, "step") if k not in stored]
    if missing:
        raise WeightsError(f"{path}: its metadata lacks {', '.join(missing)}")
    try:
        fields = {k: json.loads(stored[k]) for k in _JSON_FIELDS}
        step = int(stored["step"])
    except ValueError as e:
        raise WeightsError(f"{path}: unreadable metadata ({type(e).__name__}: {e})") from None
    if fields["meta"] is None or model_meta.kind_of(fields["meta"]) != stored["kind"]:
        raise WeightsError(f"{path}: its meta does not describe the kind it records ({stored['kind']})")
    meta = model_meta.read(fields["meta"], kind, str(path))
    if not isinstance(fields["config"], dict):
        raise WeightsError(f"{path}: its config is not a JSON object")
    return Weights(tensors, meta, fields["config"], step, path)
