"""Sample indices to a training batch: members sliced from mapped shards, stacked as numpy, then tensors.

A batch passes through one intermediate form, the *numpy batch*: `image` uint8 [B,H,W,3], `clip_text` and
`clip_image` float16 [B,D], `tokens` float16 [B,L,Dt] zero-padded with `token_len` int [B], `attrs`
float32 [B,40], and lists for `prompt`, `key` and extra members. `to_torch` is the only way out of it, so
batches built sample by sample (`stack`, for `map_sample` hooks) come out exactly like read ones.
Tensors keep the compact dtypes (uint8 pixels, float16 embeddings: 2.3x fewer bytes than float32 to pass
between processes and copy to a GPU); `to_float` is the one conversion to what models read, on the device.
A read that replaced unusable samples lists them under the key BAD, which `Loader` takes off again.
"""

from __future__ import annotations

import io
import json
import math
import mmap
import os
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .index import CLIP_IMAGE, CLIP_TEXT, IMAGE, PROMPT, TOKENS, SplitIndex, npy_specs
from .manifest import DataError

FIXED = {"image": IMAGE, "clip_text": CLIP_TEXT, "clip_image": CLIP_IMAGE}  # batch key -> member
FLOATS = {"clip_text": CLIP_TEXT, "clip_image": CLIP_IMAGE, "tokens": TOKENS}  # checked to be finite
BAD = "_bad"  # numpy-batch key: lines "SHARD: KEY.MEMBER: what is wrong" of the samples a read replaced
# What a decoder raises on bytes that are not a valid file of its kind (PIL, numpy, json, UTF-8).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _decode_image(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


# How an `extra` member is decoded, by the last part of its extension.
DECODERS: dict[str, Callable[[bytes], object]] = {
    "jpg": _decode_image, "jpeg": _decode_image, "png": _decode_image, "webp": _decode_image,
    "npy": _decode_npy, "json": json.loads, "txt": bytes.decode,
}


def decoder(member: str) -> Callable[[bytes], object]:
    """The decoder of an `extra` member, by the last part of its extension."""
    ext = member.rpartition(".")[2]
    if ext not in DECODERS:
        raise DataError(f"extra: no decoder for {member} (known extensions: {', '.join(DECODERS)})")
    return DECODERS[ext]


class _Unusable(Exception):
    """A sample that cannot go into a batch; the message is its report line."""


class Reader:
    """Reads numpy batches of one split by sample index; forks and pickles into loader workers cheaply."""

    def __init__(self, index: SplitIndex, manifest: dict, extra: dict[str, Callable[[bytes], object]]):
        """`extra`: decoder of each extra member, see `decoder`."""
        specs = npy_specs(manifest)
        column = {m: c for c, m in enumerate(index.members)}
        self.index, self.extra = index, tuple(extra)
        self._fixed = [(key, column[m], np.dtype(specs[m][0]), specs[m][1]) for key, m in FIXED.items()]
        self._blanks = [np.zeros(dtype.itemsize * math.prod(shape), np.uint8) for _, _, dtype, shape in self._fixed]
        self._tokens = (column[TOKENS], specs[TOKENS][1][1]) if TOKENS in column else None
        self._prompt = column[PROMPT]
        self._extra = [(name, column[name], decode) for name, decode in extra.items()]
        self._maps: dict[int, tuple[mmap.mmap, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}  # mappings stay in their process

    def read(self, indices: Sequence[int]) -> dict:
        """The numpy batch of these samples, in this order, each unusable one replaced by a usable one.

        A sample is unusable when the scan found it malformed (`SplitIndex.bad`: a missing member, a
        `.npy` of the wrong shape or length, bad JSON), its prompt is not UTF-8, an `extra` member does not
        decode (a truncated JPEG), or an embedding is not finite. It takes the data (and key) of the next
        usable sample of the same batch, cyclically. So the batch keeps its size and its place in the epoch,
        the epoch's order and every other batch stay as they are, every usable sample is still read exactly
        once per epoch, and the substitute depends only on the batch's indices and the shards' bytes: every
        rank, worker count and restart makes the same choice. The unusable samples' lines go under BAD; a
        batch without one usable sample is a DataError.
        """
        ix = self.index
        idx = np.asarray(indices, np.int64)
        fixed = [[] for _ in self._fixed]
        tokens, prompts, bad = [], [], []
        extras = [[] for _ in self._extra]
        usable = np.ones(len(idx), bool)
        for j, (i, loc, s) in enumerate(zip(idx.tolist(), ix.loc[idx].tolist(), ix.shard[idx].tolist())):
            raw, array = self._map(s)
            try:
                if i in ix.bad:
                    raise _Unusable(ix.bad[i])
                prompt, decoded = self._decode(raw, loc, i, s)
            except _Unusable as e:  # a blank of the right size in its place until it is replaced below
                usable[j] = False
                bad.append(str(e))
                for out, blank in zip(fixed, self._blanks):
                    out.append(blank)
                if self._tokens:
                    tokens.append(np.zeros((1, self._tokens[1]), np.float16))
                prompts.append("")
                for out in extras:
                    out.append(None)
                continue
            for out, (_, c, _, _) in zip(fixed, self._fixed):
                o, n = loc[c]
                out.append(array[o:o + n])
            if self._tokens:
                (o, n), dim = loc[self._tokens[0]], self._tokens[1]
                tokens.append(array[o:o + n].view(np.float16).reshape(-1, dim))
            prompts.append(prompt)
            for out, value in zip(extras, decoded):
                out.append(value)
        batch = {key: np.stack(out).view(dtype).reshape(len(idx), *shape)
                 for out, (key, _, dtype, shape) in zip(fixed, self._fixed)}
        if self._tokens:
            batch["tokens"], batch["token_len"] = pad(tokens)
        batch["attrs"] = ix.attrs[idx].astype(np.float32)
        batch["prompt"], batch["key"] = prompts, [ix.keys[i] for i in idx.tolist()]
        batch.update({name: out for out, (name, _, _) in zip(extras, self._extra)})
        for key, member in FLOATS.items():
            if key in batch:
                finite = _finite_rows(batch[key])
                bad += [f"{ix.paths[ix.shard[i]]}: {ix.keys[i]}.{member}: NaN or infinite values"
                        for i in idx[usable & ~finite].tolist()]
                usable &= finite
        return batch if usable.all() else _replace(batch, usable, bad)

    def _decode(self, raw: mmap.mmap, loc: list, i: int, s: int) -> tuple[str, list]:
        """Sample i's prompt and decoded extras; _Unusable says which does not decode."""
        o, n = loc[self._prompt]
        try:
            prompt = raw[o:o + n].decode()
        except UnicodeDecodeError:
            raise _Unusable(f"{self.index.paths[s]}: {self.index.keys[i]}.{PROMPT}: not UTF-8 text") from None
        decoded = []
        for name, c, decode in self._extra:
            o, n = loc[c]
            try:
                decoded.append(decode(raw[o:o + n]))
            except DECODE_ERRORS as e:
                why = (str(e) or type(e).__name__).splitlines()[0]
                raise _Unusable(f"{self.index.paths[s]}: {self.index.keys[i]}.{name}: cannot decode ({why})") from None
        return prompt, decoded

    def _map(self, shard: int) -> tuple[mmap.mmap, np.ndarray]:
        """The shard mapped read-only (once per process), as bytes and as a uint8 array."""
        if shard not in self._maps:
            path = self.index.paths[shard]
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size != self.index.sizes[shard]:
                    raise DataError(f"{path}: {size} bytes, but {self.index.sizes[shard]} when indexed "
                                    "(the shard was rewritten; restart to re-index)")
                raw = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
            self._maps[shard] = raw, np.frombuffer(raw, np.uint8)
        return self._maps[shard]


def _finite_rows(a: np.ndarray) -> np.ndarray:
    """Per row of a float16 batch array: no NaN or infinity (exponent bits not all ones); 5x isfinite's speed."""
    return ((a.reshape(len(a), -1).view(np.uint16) & 0x7C00) != 0x7C00).all(axis=1)


def _replace(batch: dict, usable: np.ndarray, bad: list[str]) -> dict:
    """The batch with each unusable row replaced by the next usable one, cyclically (see `Reader.read`)."""
    rows = np.flatnonzero(usable)
    if not len(rows):
        raise DataError(f"every sample of a batch of {len(usable)} is unusable: {'; '.join(bad)}")
    source = [j if ok else int(rows[np.argmin((rows - j) % len(usable))]) for j, ok in enumerate(usable)]
    batch = {k: v[source] if isinstance(v, np.ndarray) else [v[j] for j in source] for k, v in batch.items()}
    if "tokens" in batch:  # no padding beyond the longest sample that is left
        batch["tokens"] = batch["tokens"][:, :batch["token_len"].max(initial=0)]
    return batch | {BAD: bad}


def pad(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """[L_i, Dt] arrays as one [B, max L_i, Dt] array, zero past each L_i, and the L_i."""
    lengths = np.array([len(a) for a in arrays], np.int64)
    out = np.zeros((len(arrays), lengths.max(initial=0), *arrays[0].shape[1:]), arrays[0].dtype)
    for row, a in zip(out, arrays):
        row[:len(a)] = a
    return out, lengths


def unbatch(batch: dict) -> list[dict]:
    """A numpy batch as per-sample dicts (tokens cut to their real length), the form `map_sample` sees."""
    n = len(batch["key"])
    samples = [{k: v[j] for k, v in batch.items() if k not in ("tokens", "token_len")} for j in range(n)]
    if "tokens" in batch:
        for s, t, length in zip(samples, batch["tokens"], batch["token_len"]):
            s["tokens"] = t[:length]
    return samples


def stack(samples: list[dict], lists: tuple[str, ...]) -> dict:
    """Per-sample dicts back into a numpy batch: numpy values stacked, tokens padded, others and `lists` listed."""
    batch = {}
    for k in samples[0]:
        values = [s[k] for s in samples]
        if k == "tokens":
            batch["tokens"], batch["token_len"] = pad(values)
        elif k in lists or not isinstance(values[0], (np.ndarray, np.generic)):
            batch[k] = values
        else:
            try:
                batch[k] = np.stack(values)
            except ValueError:
                raise DataError(f"map_sample: {k!r} arrays differ in shape across samples "
                                f"({sorted({v.shape for v in values})}); return equal shapes, or a list") from None
    return batch


def to_torch(batch: dict) -> dict:
    """Tensors from a numpy batch, in the compact dtypes: image uint8 [B,3,H,W], float16 as it is, mask from
    lengths. Whoever feeds a model converts with `to_float`, after the copy to the device."""
    out = {}
    for k, v in batch.items():
        if k == "image":
            out[k] = torch.from_numpy(v).permute(0, 3, 1, 2).contiguous()
        elif k == "token_len":
            out["token_mask"] = torch.arange(batch["tokens"].shape[1]) < torch.from_numpy(v)[:, None]
        elif isinstance(v, np.ndarray):
            out[k] = torch.from_numpy(v)
        else:
            out[k] = v
    return out


def to_float(t: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """A batch tensor as models read it, on `device` (default: where it is): uint8 pixels to float32 in
    [-1, 1], float16 to float32, float32 as it is. The compact form is what is copied (non_blocking: from a
    pinned batch the copy overlaps the device's work); the values are those the host computes (k / 127.5 - 1
    for pixel k), so where the conversion runs does not change training."""
    if device is not None:
        t = t.to(device, non_blocking=True)
    if t.dtype == torch.uint8:  # divisor on the device: CUDA divides by a host number as a product with its
        # reciprocal, one bit off the host's quotient for 111 of the 256 levels
        return t.float().div_(torch.full((), 127.5, device=t.device)).sub_(1)
    return t.float() if t.dtype == torch.float16 else t
