"""Random access into the shards: one scan of each tar's headers gives every sample's byte ranges.

Shards are uncompressed ustar files, so every member's payload is a byte range of its shard. The scan
reads tar headers, `.npy` headers and the small JSON (through a 16 KiB window, so small members cost no
extra reads), checks them against the manifest, and keeps where each wanted payload lies and the
attributes. Member names are only parsed into KEY.EXT, never opened as paths.

Two kinds of problem: a shard that cannot be read as a whole (not a tar, truncated, a member name that is
not KEY.EXT, samples out of order, a count that is not the manifest's) fails `build` with one line per
such shard; a sample whose members are missing or malformed (a `.npy` of the wrong shape or length, a JSON
without the attributes) stays in the index, so the number of samples and every epoch's order stay the
same, and is listed in `SplitIndex.bad` for the reader to replace (see `batch.Reader.read`).
"""

from __future__ import annotations

import functools
import io
import json
import math
import operator
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .manifest import DataError

BLOCK = 512
WINDOW = 1 << 14
NPY_MAGIC = b"\x93NUMPY"
# A member is KEY.EXT: a plain key (no '/', '.', '\\' or control characters, so never a path) and dotted
# extension; the writer's keys are file stems such as 000001.
MEMBER = re.compile(r"([^./\\\x00-\x1f]+)\.([A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*)")

IMAGE, CLIP_TEXT, CLIP_IMAGE, TOKENS, META, PROMPT = (
    "img.npy", "clip_text.npy", "clip_image.npy", "clip_tokens.npy", "json", "txt")


@dataclass(frozen=True)
class SplitIndex:
    """Where each sample of a split lies, and its attributes; sample i is the i-th in manifest shard order.

    `loc[i, m]` is (offset, length) in shard `shard[i]` of member `members[m]`'s payload, after any .npy
    header; `sizes` are the shards' sizes when scanned, to notice a shard replaced since. `bad` maps each
    unusable sample to a line "SHARD: KEY.MEMBER: what is wrong"; its `loc` and `attrs` are zeros.
    """

    paths: tuple[Path, ...]
    sizes: tuple[int, ...]
    members: tuple[str, ...]
    keys: tuple[str, ...]
    shard: np.ndarray  # int32 [N]
    loc: np.ndarray  # int64 [N, M, 2]
    attrs: np.ndarray  # uint8 [N, 40], 0/1 in the manifest's attribute order
    bad: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)


def build(shards_dir: str | os.PathLike, manifest: dict, split: str, tokens: bool,
          extra: tuple[str, ...] = ()) -> SplitIndex:
    """Scan every shard of `split`, checking sample counts, core `.npy` headers and JSON against the manifest.

    Members: those a training batch reads (TOKENS only if `tokens`), then `extra` (kept whole, undecoded).
    The JSON is parsed here, once, for the attributes. Every shard is scanned before an unusable one is
    reported, so the error lists all of them.
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
    entries = manifest["splits"][split]["shards"]
    paths, shards, unusable = [], [], []
    for entry in entries:
        path = Path(shards_dir) / entry["path"]
        try:
            scanned = scan(path)
        except DataError as e:
            unusable.append(str(e))
            continue
        if len(scanned.keys) != entry["count"]:
            unusable.append(f"{path}: {len(scanned.keys)} samples, but manifest.json says {entry['count']}")
        paths.append(path)
        shards.append(scanned)
    if unusable:
        raise DataError(unusable[0] if len(unusable) == 1 else
                        f"{len(unusable)} of {len(entries)} shards of split {split!r} are unusable: "
                        + "; ".join(unusable))
    keys = tuple(k for s in shards for k in s.keys)
    shard = np.repeat(np.arange(len(shards), dtype=np.int32), [len(s.keys) for s in shards])
    starts = np.cumsum([0] + [len(s.keys) for s in shards])
    return SplitIndex(paths=tuple(paths), sizes=tuple(s.size for s in shards), members=members, keys=keys,
                      shard=shard, bad={int(start) + j: line for start, s in zip(starts, shards) for j, line in s.bad},
                      attrs=np.array([x for s in shards for x in s.attrs], np.uint8).reshape(len(keys), -1),
                      loc=np.array([x for s in shards for x in s.locs], np.int64).reshape(len(keys), len(members), 2))


def npy_specs(manifest: dict) -> dict[str, tuple[str, tuple[int | None, ...]]]:
    """Expected (dtype, shape) of the core `.npy` members; None is a dimension that varies."""
    size, clip = manifest["image_size"], manifest["clip"]
    return {IMAGE: ("|u1", (size, size, 3)), CLIP_TEXT: ("<f2", (clip["dim"],)),
            CLIP_IMAGE: ("<f2", (clip["dim"],)), TOKENS: ("<f2", (None, clip["token_dim"]))}


@dataclass
class _Shard:
    """One shard's scan: per sample its key, (offset, length) of each member, and attributes; the unusable
    samples' positions in the shard and what is wrong with them."""

    size: int
    keys: list = field(default_factory=list)
    locs: list = field(default_factory=list)
    attrs: list = field(default_factory=list)
    bad: list = field(default_factory=list)


class _Unusable(Exception):
    """A sample-level problem: the scan records it in `_Shard.bad` and goes on."""


def _scan(path: Path, members: tuple[str, ...], specs: dict, attributes: list[str]) -> _Shard:
    wanted = set(members) | {META}
    get_attrs = operator.itemgetter(*attributes)
    try:
        f = open(path, "rb", buffering=0)
    except OSError as e:
        raise DataError(f"{path}: cannot open shard: {e.strerror}") from None
    with f:
        window = _Window(f.fileno(), os.fstat(f.fileno()).st_size, path)
        shard, key, found, problem = _Shard(window.size), None, {}, None

        def finish():
            missing = sorted(wanted - found.keys())
            reason = problem or (f"{key}: no {', '.join(f'{key}.{m}' for m in missing)}" if missing else None)
            if reason:
                shard.bad.append((len(shard.keys), f"{path}: {reason}"))
            shard.keys.append(key)
            shard.locs.extend(found[m] if not reason else (0, 0) for m in members)
            shard.attrs.append(found[META] if not reason else (0,) * len(attributes))

        for name, offset, size in _tar_members(window):
            match = MEMBER.fullmatch(name)
            if not match:
                raise DataError(f"{path}: member {name!r} is not KEY.EXT with a plain key (no '/', '..' or "
                                "absolute path); refusing the shard")
            sample, ext = match.groups()
            if sample != key:
                if key is not None:
                    finish()
                    if sample <= key:
                        raise DataError(f"{path}: sample {sample} follows {key}: members must be contiguous "
                                        "and samples sorted by key")
                key, found, problem = sample, {}, None
            if ext not in wanted:
                continue
            try:
                if ext == META:
                    found[META] = _attrs(window.read(offset, size), get_attrs)
                    continue
                if ext in specs:
                    payload = _npy_payload(window, offset, size, specs[ext])
                    offset, size = payload, size - (payload - offset)
                found[ext] = (offset, size)
            except _Unusable as e:
                problem = problem or f"{name}: {e}"
        if key is not None:
            finish()
    return shard


def _attrs(data: bytes, get_attrs: Callable) -> tuple[int, ...]:
    """The attribute values of a sample's JSON, in manifest order, each 0 or 1."""
    try:
        values = get_attrs(json.loads(data)["attrs"])
    except (ValueError, KeyError, TypeError) as e:
        raise _Unusable(f"expected {{'attrs': {{name: 0 or 1}}}} with the manifest's names ({e!r})") from None
    if not all(isinstance(v, int) and v in (0, 1) for v in values):
        raise _Unusable("attrs values must be 0 or 1")
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
            raise DataError(f"{self.path}: truncated: {self.size} bytes, but a read needs up to byte {offset + n}")
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
        if offset + BLOCK + size > window.size:
            raise DataError(f"{window.path}: truncated: {window.size} bytes, but member {name!r} ends at byte "
                            f"{offset + BLOCK + size} (copy the shard again, or rewrite it: make_shards.py --resume)")
        if kind in (b"0", b"\0"):
            yield name, offset + BLOCK, size
        elif kind != b"5":
            raise DataError(f"{window.path}: tar member {name!r} has type {kind!r}; expected regular files only")
        offset += BLOCK + -(-size // BLOCK) * BLOCK
    raise DataError(f"{window.path}: truncated: {window.size} bytes end before the end-of-archive block "
                    "(copy the shard again, or rewrite it: make_shards.py --resume)")


def _npy_payload(window: _Window, offset: int, size: int, spec: tuple) -> int:
    """Offset of a `.npy` member's array data, after checking its dtype, shape and length against `spec`."""
    start = window.read(offset, min(size, 12))
    if len(start) < 10 or start[:6] != NPY_MAGIC or start[6] not in (1, 2):
        raise _Unusable("not a version 1 or 2 .npy file")
    prefix = 10 if start[6] == 1 else 12
    header_end = prefix + int.from_bytes(start[8:prefix], "little")
    if header_end > size:
        raise _Unusable(".npy header longer than the member")
    try:
        nbytes = _npy_nbytes(window.read(offset, header_end), spec)
    except (ValueError, SyntaxError) as e:
        raise _Unusable(str(e).splitlines()[0] if str(e) else "unreadable .npy header") from None
    if size - header_end != nbytes:
        raise _Unusable(f"{size - header_end} bytes of array data, but its header says {nbytes}")
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
