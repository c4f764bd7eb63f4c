"""Writing CelebA as WebDataset shards with CLIP embeddings and `manifest.json`: resume, SLURM tasks, merge.

The shard plan (which images go into which shard) depends only on the annotations and
`samples_per_shard`, so a single run, a resumed run and a merged SLURM array all write the same bytes.
Layout and manifest fields are the contract in docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import multiprocessing as mp
import os
import re
import sys
import tarfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from . import __version__, celeba, clip
from .atomic import HashingWriter, atomic_write, sha256_file
from .errors import UsageError

FORMAT, VERSION = "ddpdiff-shards", 1
MANIFEST, TASK_DIR = "manifest.json", "tasks"
TASK_NAME = re.compile(r"task-\d{4,}-of-\d{4,}\.json")  # _task_path's names
JPEG_QUALITY = 95
IN_FLIGHT = 2  # CPU-stage windows queued beyond the one being encoded: keeps workers busy, memory bounded


class ShardError(UsageError):
    """A refused or inconsistent output folder; the message is one line that says what to do."""


@dataclass(frozen=True)
class ShardPlan:
    """One shard to write: its split, index within the split, and row positions in the annotation table."""

    split: str
    index: int
    rows: tuple[int, ...]

    @property
    def path(self) -> str:
        return f"{self.split}/{self.split}-{self.index:06d}.tar"


def plan_shards(table, samples_per_shard: int) -> list[ShardPlan]:
    """Every shard of the dataset in manifest order: split by split, keys sorted, `samples_per_shard` each."""
    plans = []
    for split in celeba.SPLITS:
        rows = np.flatnonzero((table["split"] == split).to_numpy())
        rows = rows[np.argsort(table["file"].to_numpy()[rows], kind="stable")]
        for index, start in enumerate(range(0, len(rows), samples_per_shard)):
            plans.append(ShardPlan(split, index, tuple(int(r) for r in rows[start:start + samples_per_shard])))
    return plans


def task_from_env() -> tuple[int, int]:
    """(num_tasks, task_index) of a SLURM array task, or (1, 0) outside one."""
    return int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1)), int(os.environ.get("SLURM_ARRAY_TASK_ID", 0))


# ---- CPU stage: decode, crop, resize, re-encode (runs in worker processes)

def square_crop(img: Image.Image) -> Image.Image:
    """The largest centred square, in RGB whatever the source mode (grayscale, CMYK, palette)."""
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.convert("RGB").crop((left, top, left + s, top + s))


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


@dataclass(frozen=True)
class Prepared:
    """The CPU stage's output for one image: member bytes and CLIP-preprocessed pixels, or why it was skipped."""

    jpg: bytes = b""
    img_npy: bytes = b""
    pixels: np.ndarray | None = None
    skipped: str | None = None


@dataclass(frozen=True)
class PrepareImage:
    """Picklable per-image work for the pool: everything that does not need the CLIP model."""

    image_dir: Path
    image_size: int
    preprocess: Callable

    def __call__(self, file: str) -> Prepared:
        try:
            with Image.open(self.image_dir / file) as img:
                img.load()
                crop = square_crop(img)
        except FileNotFoundError:
            return Prepared(skipped="missing")
        except UnidentifiedImageError:
            return Prepared(skipped="undecodable: not an image format PIL can read")
        except (OSError, SyntaxError, ValueError) as e:
            return Prepared(skipped=f"undecodable: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        jpg = io.BytesIO()
        crop.save(jpg, format="JPEG", quality=JPEG_QUALITY)
        small = np.asarray(crop.resize((self.image_size,) * 2, Image.Resampling.BICUBIC), dtype=np.uint8)
        pixels = self.preprocess(crop).numpy()
        return Prepared(jpg.getvalue(), npy_bytes(small), pixels)


def worker_init() -> None:
    torch.set_num_threads(1)  # the parallelism is the processes; threads inside them would oversubscribe


def ordered_map(fn: Callable, items: Iterable, workers: int, window: int) -> Iterator:
    """`map(fn, items)` in order over `workers` processes, holding at most IN_FLIGHT + 1 windows of results."""
    if workers == 0:
        yield from map(fn, items)
        return
    with mp.get_context("spawn").Pool(workers, initializer=worker_init) as pool:
        pending: deque = deque()
        it = iter(items)
        while chunk := list(itertools.islice(it, window)):
            pending.append(pool.map_async(fn, chunk, chunksize=max(1, window // (4 * workers))))
            if len(pending) > IN_FLIGHT:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


# ---- writing one shard

def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """One member with fixed metadata (mtime 0, root, 0644), so identical input gives identical bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def _f16(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float16)


def write_shard(out: Path, path: str, rows: list[dict], prepared: Iterator[Prepared], encoder: clip.Encoder,
                batch_size: int, tokens: bool, bar: tqdm) -> dict:
    """Write shard OUT/`path` atomically from `rows` and their CPU-stage results; returns its record."""
    skipped, count = [], 0
    with atomic_write(out / path) as f:
        out = HashingWriter(f)
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for start in range(0, len(rows), batch_size):
                batch = [(row, next(prepared)) for row in rows[start:start + batch_size]]
                skipped += [{"file": row["file"], "reason": p.skipped} for row, p in batch if p.skipped]
                batch = [(row, p) for row, p in batch if not p.skipped]
                if batch:
                    _write_batch(tar, batch, encoder, tokens)
                count += len(batch)
                bar.update(len(rows[start:start + batch_size]))
    return {"path": path, "count": count, "sha256": out.sha256.hexdigest(), "skipped": skipped}


def _write_batch(tar: tarfile.TarFile, batch: list[tuple[dict, Prepared]], encoder: clip.Encoder,
                 tokens: bool) -> None:
    metas = [celeba.sample_meta(row) for row, _ in batch]
    prompts = [celeba.prompt(m["attrs"]) for m in metas]
    image_emb = encoder.encode_pixels(torch.from_numpy(np.stack([p.pixels for _, p in batch])))
    text_emb, token_states = encoder.encode_prompts(prompts)
    for i, ((row, p), meta) in enumerate(zip(batch, metas)):
        key = Path(row["file"]).stem
        _add(tar, f"{key}.jpg", p.jpg)
        _add(tar, f"{key}.img.npy", p.img_npy)
        _add(tar, f"{key}.txt", prompts[i].encode())
        _add(tar, f"{key}.json", json.dumps(meta).encode())
        _add(tar, f"{key}.clip_image.npy", npy_bytes(_f16(image_emb[i])))
        _add(tar, f"{key}.clip_text.npy", npy_bytes(_f16(text_emb[i])))
        if tokens:
            _add(tar, f"{key}.clip_tokens.npy", npy_bytes(_f16(token_states[i])))


# ---- the output folder: header, refusal, resume

def _header(encoder: clip.Encoder, image_size: int, tokens: bool, samples_per_shard: int, num_images: int,
            num_shards: int) -> dict:
    """Everything in the manifest except the shard lists; equal for every task of one run."""
    text, token_states = encoder.encode_prompts([""])
    info = encoder.info()
    if not tokens:
        info["token_dim"] = None
    return {
        "format": FORMAT, "version": VERSION, "tool_version": __version__, "image_size": image_size,
        "prompt_rule": celeba.PROMPT_RULE, "attributes": list(celeba.ATTRIBUTES), "clip": info,
        "empty_prompt": {"clip_text": _f16(text[0]).astype(float).tolist(),
                         "tokens": _f16(token_states[0]).astype(float).tolist() if tokens else None},
        "samples_per_shard": samples_per_shard, "num_images": num_images, "num_shards": num_shards,
    }


def _task_path(out: Path, num_tasks: int, task_index: int) -> Path:
    return out / TASK_DIR / f"task-{task_index:04d}-of-{num_tasks:04d}.json"


def _write_json(path: Path, obj: dict) -> None:
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def _remove_temporaries(out: Path, names: set[str]) -> None:
    """Temporaries that a killed run left for our own files (atomic_write names them .NAME.PID.tmp)."""
    for tmp in out.glob("**/.*.tmp"):
        if tmp.name[1:].rsplit(".", 2)[0] in names:
            tmp.unlink()


def _refuse_busy(out: Path, mine: list[ShardPlan], task_file: Path, resume: bool, overwrite: bool,
                 num_tasks: int) -> None:
    """Refuse an OUT holding earlier work unless --resume or --overwrite says what to do with it.

    Tasks of one SLURM array share OUT, so a task only counts its own files and anything foreign as busy.
    """
    if resume and overwrite:
        raise ShardError("pass --resume or --overwrite, not both")
    if resume or overwrite or not out.is_dir():
        return
    own = [out / p.path for p in mine] + [task_file, out / MANIFEST]
    known = {*celeba.SPLITS, TASK_DIR}
    busy = any(out.iterdir()) if num_tasks == 1 else (
        any(p.exists() for p in own) or any(e.name not in known for e in out.iterdir()))
    if busy:
        raise ShardError(f"{out} is not empty: pass --resume to continue a killed run or --overwrite to replace it")


def _claim(out: Path, mine: list[ShardPlan], task_file: Path, header: dict, resume: bool, overwrite: bool,
           num_tasks: int) -> dict[str, dict]:
    """Clear what a killed or replaced run left of this task's files; returns the finished shards to keep."""
    own = [out / p.path for p in mine] + [task_file, out / MANIFEST]
    _remove_temporaries(out, {p.name for p in own})
    if overwrite:
        for path in own + (_tool_files(out) if num_tasks == 1 else []):
            path.unlink(missing_ok=True)
    return _verified(out, task_file, header) if resume else {}


def _tool_files(out: Path) -> list[Path]:
    """Every file under OUT named as this tool names its own (shards of any run, task files), and nothing else:
    `--overwrite` removes these, so a user's other files in OUT, .tar or not, survive it."""
    shard = {split: re.compile(rf"{split}-\d{{6,}}\.tar") for split in celeba.SPLITS}
    return ([p for split in celeba.SPLITS for p in (out / split).glob("*.tar")
             if p.is_file() and shard[split].fullmatch(p.name)]
            + [p for p in (out / TASK_DIR).glob("*.json") if p.is_file() and TASK_NAME.fullmatch(p.name)])


def _verified(out: Path, task_file: Path, header: dict) -> dict[str, dict]:
    """The finished shards recorded in this task's progress file whose bytes still match their sha256."""
    if not task_file.is_file():
        return {}
    progress = json.loads(task_file.read_text())
    changed = _header_change(progress["header"], header)
    if changed:
        raise ShardError(f"cannot resume into {out}: {changed!r} differs from the interrupted run "
                         "(use the same flags, or --overwrite)")
    return {s["path"]: s for s in progress["shards"]
            if (out / s["path"]).is_file() and sha256_file(out / s["path"]) == s["sha256"]}


def _header_change(old: dict, new: dict) -> str | None:
    """The first field in which two tasks' or runs' headers differ; None when they are the same run's.

    The empty prompt's embeddings differ by float noise between devices (CPU and CUDA kernels), so they count
    as changed only when their cosine says other weights; every other field must be equal.
    """
    changed = next((k for k in new if k != "empty_prompt" and old.get(k) != new[k]), None)
    if changed:
        return changed
    old_empty = old.get("empty_prompt") or {}
    return next((f"empty_prompt.{k}" for k, v in new["empty_prompt"].items()
                 if not _same_embeddings(old_empty.get(k), v)), None)


def _same_embeddings(a, b) -> bool:
    """Both absent, or of one shape and the same weights' (cosine at least clip.SAME_WEIGHTS)."""
    if a is None or b is None:
        return a is b
    return np.shape(a) == np.shape(b) and clip.cosine(a, b) >= clip.SAME_WEIGHTS


# ---- the entry points

def write_shards(root, out, *, image_size: int = 64, samples_per_shard: int = 1000,
                 clip_model: str = clip.DEFAULT_MODEL, clip_pretrained: str = clip.DEFAULT_PRETRAINED,
                 tokens: bool = True, device: str | None = None, workers: int | None = None,
                 clip_batch_size: int = 256, resume: bool = False, overwrite: bool = False, num_tasks: int = 1,
                 task_index: int = 0, progress: bool = True) -> dict:
    """Shard the CelebA folder `root` into `out`; this task's shards only when `num_tasks` > 1.

    Returns the manifest (also written to OUT/manifest.json) for a single task, else the task's partial
    manifest (OUT/tasks/task-IIII-of-KKKK.json); `merge(out)` combines those once every task is done.
    Raises celeba.AnnotationError, clip.ClipError or ShardError with one-line messages.
    """
    root, out = Path(root), Path(out)
    problems = [msg for bad, msg in [
        (image_size < 1, f"image_size must be positive, got {image_size}"),
        (samples_per_shard < 1, f"samples_per_shard must be positive, got {samples_per_shard}"),
        (clip_batch_size < 1, f"clip_batch_size must be positive, got {clip_batch_size}"),
        (num_tasks < 1 or not 0 <= task_index < num_tasks,
         f"task_index must be in [0, num_tasks), got {task_index} of {num_tasks}"),
        (workers is not None and workers < 0, f"workers must be >= 0, got {workers}"),
        (device == "cuda" and not torch.cuda.is_available(), "device cuda was asked for but no GPU is visible"),
        (out.exists() and not out.is_dir(), f"{out} exists and is not a folder")] if bad]
    if problems:
        raise ShardError("; ".join(problems))
    layout = celeba.find_layout(root)
    table = celeba.read_annotations(root, layout)
    if progress:
        print(f"CelebA in the {layout.name} layout: {len(table)} images in {layout.images}, annotations "
              f"{layout.attr.name}, {layout.partition.name}", file=sys.stderr, flush=True)
    plans = plan_shards(table, samples_per_shard)
    mine = plans[task_index::num_tasks]
    task_file = _task_path(out, num_tasks, task_index)
    _refuse_busy(out, mine, task_file, resume, overwrite, num_tasks)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cores = len(os.sched_getaffinity(0))
    workers = cores if workers is None else workers
    with _torch_threads(max(1, cores - workers) if device == "cpu" else None):
        encoder = clip.load(clip_model, clip_pretrained, device)
        header = _header(encoder, image_size, tokens, samples_per_shard, len(table), len(plans))
        out.mkdir(parents=True, exist_ok=True)
        done = _claim(out, mine, task_file, header, resume, overwrite, num_tasks)
        _write_task(layout.images, out, table, mine, done, encoder, header, image_size, tokens, workers, clip_batch_size,
                    num_tasks, task_index, progress)
    partial = _progress(header, mine, done, num_tasks, task_index)
    _write_json(task_file, partial)
    return merge(out) if num_tasks == 1 else partial


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """CLIP on the CPU gets the cores the workers leave; oversubscribed torch threads run several times slower."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _write_task(images: Path, out: Path, table, mine: list[ShardPlan], done: dict[str, dict], encoder: clip.Encoder,
                header: dict, image_size: int, tokens: bool, workers: int, clip_batch_size: int, num_tasks: int,
                task_index: int, progress: bool) -> None:
    """Write this task's unfinished shards in order, recording each in the task file as soon as it is safe."""
    task_file = _task_path(out, num_tasks, task_index)

    # Stream the images of the unfinished shards through the CPU stage, in shard order.
    todo = [p for p in mine if p.path not in done]
    files = table["file"].tolist()
    prepare = PrepareImage(images, image_size, encoder.preprocess)
    prepared = ordered_map(prepare, (files[r] for p in todo for r in p.rows), workers, clip_batch_size)
    bar = tqdm(total=sum(len(p.rows) for p in mine), initial=sum(len(p.rows) for p in mine if p.path in done),
               unit="img", desc=f"shards {task_index + 1}/{num_tasks}", disable=not progress, smoothing=0.1)
    with bar:
        for plan in todo:
            rows = table.iloc[list(plan.rows)].to_dict("records")
            done[plan.path] = write_shard(out, plan.path, rows, prepared, encoder, clip_batch_size, tokens, bar)
            _write_json(task_file, _progress(header, mine, done, num_tasks, task_index))


def _progress(header: dict, mine: list[ShardPlan], done: dict[str, dict], num_tasks: int, task_index: int) -> dict:
    """A task's partial manifest: its finished shards in plan order and whether all of its shards are done."""
    return {"header": header, "task": {"index": task_index, "count": num_tasks},
            "complete": all(p.path in done for p in mine),
            "shards": [done[p.path] for p in mine if p.path in done]}


def merge(out) -> dict:
    """Combine the complete task files under OUT/tasks into OUT/manifest.json (the single-run manifest)."""
    out = Path(out)
    files = sorted((out / TASK_DIR).glob("task-*-of-*.json"))
    if not files:
        raise ShardError(f"{out / TASK_DIR}: no task files to merge (run tools/make_shards.py first)")
    tasks = [json.loads(f.read_text()) for f in files]
    counts = {t["task"]["count"] for t in tasks}
    if len(counts) != 1:
        raise ShardError(f"{out / TASK_DIR}: task files from runs with different --num-tasks {sorted(counts)}; "
                         "remove the stale ones")
    num_tasks = counts.pop()
    missing = sorted(set(range(num_tasks)) - {t["task"]["index"] for t in tasks})
    incomplete = [t["task"]["index"] for t in tasks if not t["complete"]]
    if missing or incomplete:
        raise ShardError(f"{out}: tasks {missing + incomplete} of {num_tasks} are missing or unfinished "
                         "(rerun them with --resume, then merge)")
    header = tasks[0]["header"]
    differs = [t["task"]["index"] for t in tasks if _header_change(header, t["header"])]
    if differs:
        raise ShardError(f"{out}: tasks {differs} were run with different flags than task 0")
    order = {s: i for i, s in enumerate(celeba.SPLITS)}
    shards = sorted((s for t in tasks for s in t["shards"]),
                    key=lambda s: (order[s["path"].split("/")[0]], s["path"]))
    absent = [s["path"] for s in shards if not (out / s["path"]).is_file()]
    if absent or len(shards) != header["num_shards"]:
        raise ShardError(f"{out}: expected {header['num_shards']} shards, found {len(shards) - len(absent)}"
                         + (f" (missing {absent[0]})" if absent else ""))
    splits = {split: {"count": 0, "shards": []} for split in celeba.SPLITS}
    for s in shards:
        entry = splits[s["path"].split("/")[0]]
        entry["count"] += s["count"]
        entry["shards"].append({"path": s["path"], "count": s["count"], "sha256": s["sha256"]})
    skipped = sorted((k for s in shards for k in s["skipped"]), key=lambda k: k["file"])
    manifest = {**header, "count": sum(e["count"] for e in splits.values()), "splits": splits, "skipped": skipped}
    _write_json(out / MANIFEST, manifest)
    return manifest
