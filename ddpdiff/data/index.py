"""Random access into the shards: one scan of each tar's headers gives every sample's byte ranges.

Shards are uncompressed ustar files whose members of one sample are contiguous, so a sample is one
`os.pread`. The scan reads only tar headers and `.npy` headers (through a 64 KiB window, so small members
cost no extra reads), checks them against the manifest, and keeps where each wanted payload lies.
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .manifest import DataError

BLOCK = 512
WINDOW = 1 << 16
NPY_MAGIC = b"\x93NUMPY"

IMAGE, CLIP_TEXT, CLIP_IMAGE, TOKENS, META, PROMPT = (
    "img.npy", "clip_text.npy", "clip_image.npy", "clip_tokens.npy", "json", "txt")


@dataclass(frozen=True)
class SplitIndex:
    """Where each sample of a split lies; sample i is the i-th in manifest shard order.

    `loc[i, m]` is (offset, length) of member `members[m]`'s payload (after any .npy header) relative to
    `span[i, 0]`, and `span[i]` = (offset, length) of the one read that covers them all.
    """

    paths: tuple[Path, ...]
    members: tuple[str, ...]
    keys: tuple[str, ...]
    shard: np.ndarray  # int32 [N]
    span: np.ndarray  # int64 [N, 2]
    loc: np.ndarray  # int64 [N, M, 2]
    token_len: np.ndarray | None  # int32 [N], when TOKENS is a member

    def __len__(self) -> int:
        return len(self.keys)


def build(shards_dir: str | os.PathLike, manifest: dict, split: str, tokens: bool,
          extra: tuple[str, ...] = ()) -> SplitIndex:
    """Scan every shard of `split`, checking sample counts and core `.npy` headers against the manifest.

    Members: the core ones of a training batch, TOKENS if `tokens`, then `extra` (kept whole, undecoded).
    """
    core = (IMAGE, CLIP_TEXT, CLIP_IMAGE, META, PROMPT) + ((TOKENS,) if tokens else ())
    clash = [e for e in extra if e in core]
    if clash:
        raise DataError(f"extra: {', '.join(clash)} already in every batch; list only other members")
    if split not in manifest["splits"]:
        raise DataError(f"{Path(shards_dir) / 'manifest.json'}: no split {split!r} "
                        f"(has {', '.join(manifest['splits'])})")
    members = core + tuple(extra)
    specs = {m: spec for m, spec in npy_specs(manifest).items() if m in core}
    paths, keys, shard, locs, token_len = [], [], [], [], []
    for s, entry in enumerate(manifest["splits"][split]["shards"]):
        path = Path(shards_dir) / entry["path"]
        shard_keys, shard_locs, shard_tokens = _scan(path, members, specs)
        if len(shard_keys) != entry["count"]:
            raise DataError(f"{path}: {len(shard_keys)} samples, but manifest.json says {entry['count']}")
        paths.append(path)
        keys += shard_keys
        shard.append(np.full(len(shard_keys), s, np.int32))
        locs += shard_locs
        token_len += shard_tokens
    loc = np.asarray(locs, np.int64).reshape(len(keys), len(members), 2)
    lo = loc[:, :, 0].min(axis=1)
    hi = (loc[:, :, 0] + loc[:, :, 1]).max(axis=1)
    loc[:, :, 0] -= lo[:, None]
    return SplitIndex(paths=tuple(paths), members=members, keys=tuple(keys),
                      shard=np.concatenate(shard) if shard else np.zeros(0, np.int32),
                      span=np.stack([lo, hi - lo], axis=1), loc=loc,
                      token_len=np.asarray(token_len, np.int32) if TOKENS in members else None)


def npy_specs(manifest: dict) -> dict[str, tuple[str, tuple[int | None, ...]]]:
    """Expected (dtype, shape) of the core `.npy` members; None is a dimension that varies."""
    size, clip = manifest["image_size"], manifest["clip"]
    return {IMAGE: ("|u1", (size, size, 3)), CLIP_TEXT: ("<f2", (clip["dim"],)),
            CLIP_IMAGE: ("<f2", (clip["dim"],)), TOKENS: ("<f2", (None, clip["token_dim"]))}


def _scan(path: Path, members: tuple[str, ...], specs: dict) -> tuple[list, list, list]:
    """Keys, per-sample [(offset, length)] of `members`, and token lengths of one shard."""
    column = {m: i for i, m in enumerate(members)}
    keys, locs, token_len = [], [], []
    key, found = None, {}

    def finish():
        missing = [m for m in members if m not in found]
        if missing:
            raise DataError(f"{path}: sample {key} has no {', '.join(missing)}")
        keys.append(key)
        locs.extend(found[m] for m in members)

    try:
        f = open(path, "rb", buffering=0)
    except OSError as e:
        raise DataError(f"{path}: cannot open shard: {e.strerror}") from None
    with f:
        window = _Window(f.fileno(), os.fstat(f.fileno()).st_size, path)
        for name, offset, size in _tar_members(window):
            stem, _, ext = name.rpartition("/")[2].partition(".")
            sample = name[: len(name) - len(ext) - 1]
            if not stem or not ext:
                raise DataError(f"{path}: member {name!r} is not KEY.EXT")
            if sample != key:
                if key is not None:
                    finish()
                    if sample <= key:
                        raise DataError(f"{path}: sample {sample} follows {key}: members must be contiguous "
                                        "and samples sorted by key")
                key, found = sample, {}
            if ext not in column:
                continue
            if ext in specs:
                payload, shape = _npy_payload(window, offset, size, specs[ext], name)
                offset, size = payload, size - (payload - offset)
                if ext == TOKENS:
                    token_len.append(shape[0])
            found[ext] = (offset, size)
        if key is not None:
            finish()
    return keys, locs, token_len


class _Window:
    """Reads a file through one cached window, so consecutive small reads cost one pread."""

    def __init__(self, fd: int, size: int, path: Path):
        self.fd, self.size, self.path = fd, size, path
        self.start, self.buf = 0, b""

    def read(self, offset: int, n: int) -> bytes:
        rel = offset - self.start
        if rel < 0 or rel + n > len(self.buf):
            self.start, self.buf, rel = offset, os.pread(self.fd, max(n, WINDOW), offset), 0
        out = self.buf[rel:rel + n]
        if len(out) != n:
            raise DataError(f"{self.path}: truncated at byte {offset + len(out)} (file has {self.size})")
        return out


def _tar_members(window: _Window):
    """(name, payload offset, size) of each regular file in an uncompressed ustar archive."""
    offset = 0
    while offset + BLOCK <= window.size:
        header = window.read(offset, BLOCK)
        if header == bytes(BLOCK):
            return
        if header[257:262] != b"ustar":
            raise DataError(f"{window.path}: no ustar header at byte {offset} (expected an uncompressed tar)")
        try:
            size = int(header[124:136].rstrip(b" \0") or b"0", 8)
        except ValueError:
            raise DataError(f"{window.path}: bad size field in the tar header at byte {offset}") from None
        kind = header[156:157]
        name = header[:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
        if kind in (b"0", b"\0"):
            yield name.decode(), offset + BLOCK, size
        elif kind != b"5":
            raise DataError(f"{window.path}: tar member {name.decode(errors='replace')!r} has type {kind!r}; "
                            "expected regular files only")
        offset += BLOCK + -(-size // BLOCK) * BLOCK
    raise DataError(f"{window.path}: truncated: no end-of-archive block")


def _npy_payload(window: _Window, offset: int, size: int, spec: tuple, name: str) -> tuple[int, tuple]:
    """Offset of a `.npy` member's array data and its shape, after checking dtype and shape against `spec`."""
    where = f"{window.path}: {name}"
    start = window.read(offset, min(size, 12))
    if len(start) < 10 or start[:6] != NPY_MAGIC or start[6] not in (1, 2):
        raise DataError(f"{where}: not a .npy file")
    prefix = 10 if start[6] == 1 else 12
    header_len = int.from_bytes(start[8:prefix], "little")
    if prefix + header_len > size:
        raise DataError(f"{where}: .npy header longer than the member")
    try:
        descr, fortran, shape = _npy_header(window.read(offset, prefix + header_len))
    except ValueError as e:
        raise DataError(f"{where}: bad .npy header: {e}") from None
    dtype, want = spec
    if (descr != dtype or fortran or len(shape) != len(want)
            or not all(s >= 1 if w is None else s == w for s, w in zip(shape, want))):
        expect = "x".join("L" if w is None else str(w) for w in want)
        raise DataError(f"{where}: array {descr} {shape}, expected {dtype} [{expect}] in C order with L >= 1")
    if size - prefix - header_len != np.dtype(descr).itemsize * int(np.prod(shape)):
        raise DataError(f"{where}: array data size does not match its header")
    return offset + prefix + header_len, shape


@functools.lru_cache(maxsize=256)
def _npy_header(raw: bytes) -> tuple[str, bool, tuple]:
    """(dtype, fortran order, shape) by numpy's own parser, which never unpickles; cached since headers repeat."""
    fp = io.BytesIO(raw)
    version = np.lib.format.read_magic(fp)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(fp)
    return dtype.str, fortran, shape
