"""Reading and checking `manifest.json`, the shard set's description that the reader trusts."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..atomic import sha256_file
from ..errors import UsageError

FORMAT = "ddpdiff-shards"
SHA256 = re.compile(r"[0-9a-f]{64}")


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
            continue
        for i, s in enumerate(shards):
            if not _inside(s["path"]):
                problems.append(f"splits.{name}.shards[{i}].path: expected a relative path inside the shard "
                                f"folder (no leading '/', no '..'), got {s['path']!r}")
            if "sha256" in s and not (isinstance(s["sha256"], str) and SHA256.fullmatch(s["sha256"])):
                problems.append(f"splits.{name}.shards[{i}].sha256: expected 64 lowercase hex digits")
    return problems


def _inside(path: str) -> bool:
    """Whether a manifest path names a file under the shard folder: relative, no '..', nothing odd in it."""
    parts = PurePosixPath(path).parts
    return (bool(parts) and not path.startswith("/") and ".." not in parts and "\\" not in path
            and not PureWindowsPath(path).drive and not any(c < " " for c in path))


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def verify_shards(shards_dir: str | os.PathLike, splits: tuple[str, ...] | None = None,
                  manifest: dict | None = None) -> list[str]:
    """One line for each shard of `splits` (default: all) whose bytes are not those manifest.json recorded.

    Reads and hashes every shard (about a second per GB), so training does it only when asked; a shard is
    reported when it is missing or unreadable, has no sha256 in the manifest, or hashes to another sha256
    (which is also how a shard of another size shows: the manifest records no sizes).
    """
    manifest = manifest or load_manifest(shards_dir)
    path = Path(shards_dir) / "manifest.json"
    unknown = sorted(set(splits or ()) - manifest["splits"].keys())
    if unknown:
        raise DataError(f"{path}: no split {unknown[0]!r} (has {', '.join(manifest['splits'])})")
    problems = []
    for split in splits or manifest["splits"]:
        for entry in manifest["splits"][split]["shards"]:
            shard = Path(shards_dir) / entry["path"]
            if "sha256" not in entry:
                problems.append(f"{shard}: no sha256 recorded in {path.name}")
                continue
            try:
                size, sha = shard.stat().st_size, sha256_file(shard)
            except OSError as e:
                problems.append(f"{shard}: cannot read: {e.strerror or e}")
                continue
            if sha != entry["sha256"]:
                problems.append(f"{shard}: sha256 {sha[:16]}... of its {size} bytes, but {path.name} says "
                                f"{entry['sha256'][:16]}... (damaged or replaced)")
    return problems


def fingerprint(manifest: dict) -> str:
    """sha256 of the manifest's content (keys sorted): the same for every copy of a shard set, wherever it is
    staged, and another for other shards (the manifest holds each shard's count and sha256)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
