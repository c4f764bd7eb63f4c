"""Random access into the shards: one scan of each tar's headers gives every sample's byte ranges.

Shards are uncompressed ustar files, so every member's payload is a byte range of its shard. The scan
reads tar headers, `.npy` headers and the small JSON (through a 16 KiB window, so small members cost no
extra reads), checks them against the manifest, and keeps where each wanted payload lies and the
attributes.
"""

from __future__ import annotations

import functools
import io
import json
import math
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .manifest import DataError

BLOCK = 512
WINDOW = 1 << 14
NPY_MAGIC = b"\x93NUMPY"

IMAGE, CLIP_TEXT, CLIP_IMAGE, TOKENS, META, PROMPT = (
    "img.npy", "clip_text.npy", "clip_image.npy", "clip_tokens.npy", "json", "txt")


@dataclass(frozen=True)
class SplitIndex:
    """Where each sample of a split lies, and its attributes; sample i is the i-th in manifest shard order.

    `loc[i, m]` is (offset, length) in shard `shard[i]` of member `members[m]`'s payload, after any .npy
    header; `sizes` are the shards' sizes when scanned, to notice a shard replaced since.
    """

    paths: tuple[Path, ...]
    sizes: tuple[int, ...]
    members: tuple[str, ...]
    keys: tuple[str, ...]
    shard: np.ndarray  # int32 [N]
    loc: np.ndarray  # int64 [N, M, 2]
    attrs: np.ndarray  # uint8 [N, 40], 0/1 in the manifest's attribute order

    def __len__(self) -> int:
        return len(self.keys)


def build(shards_dir: str | os.PathLike, manifest: dict, split: str, tokens: bool,
          extra: tuple[str, ...] = ()) -> SplitIndex:
    """Scan every shard of `split`, checking sample counts, core `.npy` headers and JSON against the manifest.

    Members: those a training batch reads (TOKENS only if `tokens`), then `extra` (kept whole, undecoded).
    The JSON is parsed here, once, for the attributes.
    """
    core = (IMAGE, CLIP_TEXT, CLIP_IMAGE, PROMPT) + ((TOKENS,) if tokens else ())
    clash = [e for e in extra if e in core + (META,)]
    if clash:
        raise DataError(f"extra: {', '.join(clash)} already in every batch; list only other members")
    if split not in manifest["splits"]:
        raise DataError(f"{Path(shards_dir) / 'manifest.json'}: no split {split!r} "
                        f"(has {', '.join(manifest['splits'])})")
    members = core + tuple(extra)
    specs = {m: spec for m, spec in npy_specs(manifest).items() if m in core}
    scan = functools.partial(_scan, members=members, specs=specs, attributes=manifest["attributes"])
    paths, shards = [], []
    for entry in manifest["splits"][split]["shards"]:
        paths.append(Path(shards_dir) / entry["path"])
        shards.append(scan(paths[-1]))
        if len(shards[-1].keys) != entry["count"]:
            raise DataError(f"{paths[-1]}: {len(shards[-1].keys)} samples, but manifest.json says {entry['count']}")
    keys = tuple(k for s in shards for k in s.keys)
    shard = np.repeat(np.arange(len(shards), dtype=np.int32), [len(s.keys) for s in shards])
    attrs = np.array([x for s in shards for x in s.attrs], np.int64).reshape(len(keys), len(manifest["attributes"]))
    bad = ((attrs != 0) & (attrs != 1)).any(axis=1)
    if bad.any():
        i = int(bad.argmax())
        raise DataError(f"{paths[shard[i]]}: {keys[i]}.json: attrs values must be 0 or 1")
    return SplitIndex(paths=tuple(paths), sizes=tuple(s.size for s in shards), members=members, keys=keys,
                      shard=shard, attrs=attrs.astype(np.uint8),
                      loc=np.array([x for s in shards for x in s.locs], np.int64).reshape(len(keys), len(members), 2))


def npy_specs(manifest: dict) -> dict[str, tuple[str, tuple[int | None, ...]]]:
    """Expected (dtype, shape) of the core `.npy` members; None is a dimension that varies."""
    size, clip = manifest["image_size"], manifest["clip"]
    return {IMAGE: ("|u1", (size, size, 3)), CLIP_TEXT: ("<f2", (clip["dim"],)),
            CLIP_IMAGE: ("<f2", (clip["dim"],)), TOKENS: ("<f2", (None, clip["token_dim"]))}


@dataclass
class _Shard:
    """One shard's scan: per sample its key, (offset, length) of each member, and attributes."""

    size: int
    keys: list = field(default_factory=list)
    locs: list = field(default_factory=list)
    attrs: list = field(default_factory=list)


def _scan(path: Path, members: tuple[str, ...], specs: dict, attributes: list[str]) -> _Shard:
    wanted = set(members) | {META}
    get_attrs = operator.itemgetter(*attributes)
    try:
        f = open(path, "rb", buffering=0)
    except OSError as e:
        raise DataError(f"{path}: cannot open shard: {e.strerror}") from None
    with f:
        window = _Window(f.fileno(), os.fstat(f.fileno()).st_size, path)
        shard, key, found = _Shard(window.size), None, {}

        def finish():
            missing = sorted(wanted - found.keys())
            if missing:
                raise DataError(f"{path}: sample {key} has no {', '.join(missing)}")
            shard.keys.append(key)
            shard.locs.extend(found[m] for m in members)
            shard.attrs.append(found[META])

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
            if ext not in wanted:
                continue
            if ext == META:
                found[META] = _attrs(window.read(offset, size), get_attrs, f"{path}: {name}")
                continue
            if ext in specs:
                payload = _npy_payload(window, offset, size, specs[ext], name)
                offset, size = payload, size - (payload - offset)
            found[ext] = (offset, size)
        if key is not None:
            finish()
    return shard


def _attrs(data: bytes, get_attrs: Callable, where: str) -> tuple[int, ...]:
    """The attribute values of a sample's JSON, in manifest order (checked to be 0/1 by `build`)."""
    try:
        values = get_attrs(json.loads(data)["attrs"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{where}: expected {{'attrs': {{name: 0 or 1}}}} with the manifest's names ({e!r})") from None
    return values


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
        name, prefix = (raw.split(b"\0", 1)[0].decode(errors="replace") for raw in (header[:100], header[345:500]))
        if prefix:
            name = f"{prefix}/{name}"
        if kind in (b"0", b"\0"):
            yield name, offset + BLOCK, size
        elif kind != b"5":
            raise DataError(f"{window.path}: tar member {name!r} has type {kind!r}; expected regular files only")
        offset += BLOCK + -(-size // BLOCK) * BLOCK
    raise DataError(f"{window.path}: truncated: no end-of-archive block")


def _npy_payload(window: _Window, offset: int, size: int, spec: tuple, name: str) -> int:
    """Offset of a `.npy` member's array data, after checking its dtype and shape against `spec`."""
    where = f"{window.path}: {name}"
    start = window.read(offset, min(size, 12))
    if len(start) < 10 or start[:6] != NPY_MAGIC or start[6] not in (1, 2):
        raise DataError(f"{where}: not a version 1 or 2 .npy file")
    prefix = 10 if start[6] == 1 else 12
    header_end = prefix + int.from_bytes(start[8:prefix], "little")
    if header_end > size:
        raise DataError(f"{where}: .npy header longer than the member")
    try:
        nbytes = _npy_nbytes(window.read(offset, header_end), spec)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    if size - header_end != nbytes:
        raise DataError(f"{where}: {size - header_end} bytes of array data, but its header says {nbytes}")
    return offset + header_end


@functools.lru_cache(maxsize=1024)
def _npy_nbytes(header: bytes, spec: tuple) -> int:
    """Data size from a .npy header that must match `spec` (dtype, shape with None for any L >= 1).

    numpy's own header parser, which never unpickles; cached because headers repeat across samples.
    """
    fp = io.BytesIO(header)
    version = np.lib.format.read_magic(fp)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(fp)
    want_dtype, want = spec
    if (dtype.str != want_dtype or fortran or len(shape) != len(want)
            or not all(s >= 1 if w is None else s == w for s, w in zip(shape, want))):
        expect = "x".join("L" if w is None else str(w) for w in want)
        raise ValueError(f"array {dtype.str} {shape}, expected {want_dtype} [{expect}] in C order with L >= 1")
    return dtype.itemsize * math.prod(shape)
