"""Reading and checking `manifest.json`, the shard set's description that the reader trusts."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UsageError

FORMAT = "ddpdiff-shards"


class DataError(UsageError):
    """Shards or arguments the pipeline cannot use; the message is one line naming the file or field."""


def load_manifest(shards_dir: str | os.PathLike) -> dict:
    """The manifest of a shard directory, after checking every field the reader relies on."""
    path = Path(shards_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not found (write shards with tools/make_shards.py)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not readable as JSON: {e}") from None
    problems = _problems(manifest)
    if problems:
        raise DataError(f"{path}: " + "; ".join(problems))
    return manifest


def _problems(m) -> list[str]:
    if not isinstance(m, dict):
        return ["expected a JSON object"]
    if m.get("format") != FORMAT:
        return [f"format is {m.get('format')!r}, expected {FORMAT!r}"]
    problems = []
    if not _positive_int(m.get("image_size")):
        problems.append("image_size: expected a positive int")
    attrs = m.get("attributes")
    if not (isinstance(attrs, list) and len(attrs) == 40 and all(isinstance(a, str) for a in attrs)):
        problems.append("attributes: expected a list of 40 names")
    clip = m.get("clip")
    if not (isinstance(clip, dict) and _positive_int(clip.get("dim"))
            and (clip.get("token_dim") is None or _positive_int(clip.get("token_dim")))):
        problems.append("clip: expected {'dim': int, 'token_dim': int or null, ...}")
    splits = m.get("splits")
    if not isinstance(splits, dict):
        return problems + ["splits: expected an object {split: {'count', 'shards'}}"]
    for name, split in splits.items():
        shards = split.get("shards") if isinstance(split, dict) else None
        if not (isinstance(shards, list) and all(isinstance(s, dict) and isinstance(s.get("path"), str)
                                                 and _count(s.get("count")) for s in shards)
                and _count(split.get("count")) and split["count"] == sum(s["count"] for s in shards)):
            problems.append(f"splits.{name}: expected 'shards' as a list of {{'path', 'count'}} whose counts "
                            "sum to 'count'")
    return problems


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def split_count(manifest: dict, split: str) -> int:
    """Samples in a split of the shards (0 when the split is absent)."""
    return manifest["splits"].get(split, {}).get("count", 0)


def use_tokens(manifest: dict, tokens: bool | None, shards_dir: str | os.PathLike) -> bool:
    """Whether batches carry token states: None follows the shards, True requires them, False skips them."""
    has = manifest["clip"]["token_dim"] is not None
    if tokens and not has:
        raise DataError(f"{Path(shards_dir) / 'manifest.json'}: clip.token_dim is null, so the shards have no "
                        "token states (re-shard without --no-tokens, or pass tokens=False)")
    return has if tokens is None else bool(tokens)
