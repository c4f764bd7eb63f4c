"""A synthetic dataset in the exact CelebA layout, with a few attributes drawn so a model can learn them.

Every image and annotation row is a pure function of (seed, index), so the set is deterministic, can be
generated in parallel, and scales to all 202,599 images in bounded memory. It stands in for CelebA in the
demo and the tests; it is never a replacement for reading the real files.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from .atomic import atomic_write
from .celeba import ATTRIBUTES

WIDTH, HEIGHT = 178, 218  # aligned CelebA JPEGs
CELEBA_SIZE = 202_599
CELEBA_SPLIT_ENDS = (162_770, 182_637)  # last index of train and of val in the real partition

# Drawn so they survive the 64x64 centre crop. Hair colour is one of four CelebA attributes or none.
VISIBLE = ("Eyeglasses", "Smiling", "Wearing_Hat", "Mustache", "Black_Hair", "Blond_Hair", "Brown_Hair",
           "Gray_Hair")
HAIR = {"Black_Hair": (25, 22, 20), "Blond_Hair": (232, 200, 112), "Brown_Hair": (112, 68, 38),
        "Gray_Hair": (172, 172, 176), None: (150, 48, 30)}
HAIR_P = (("Black_Hair", 0.25), ("Blond_Hair", 0.2), ("Brown_Hair", 0.2), ("Gray_Hair", 0.1), (None, 0.25))
VISIBLE_P = 0.4
OTHER_P = 0.25

Pair = tuple[str, str]


def parse_pairs(text: str) -> list[Pair]:
    """Attribute pairs from "A+B,C+D" (CelebA names), e.g. the --hold-out of tools/make_synthetic_celeba.py."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        names = [n.strip() for n in item.split("+")]
        unknown = [n for n in names if n not in ATTRIBUTES]
        if len(names) != 2 or unknown or names[0] == names[1]:
            raise ValueError(f"attribute pair {item!r}: expected two different CelebA attribute names joined by "
                             f"'+', e.g. Blond_Hair+Mustache" + (f" ({', '.join(unknown)} unknown)" if unknown else ""))
        pairs.append((names[0], names[1]))
    if not pairs:
        raise ValueError(f"attribute pairs {text!r}: expected A+B[,C+D...], e.g. Blond_Hair+Mustache")
    return pairs


def split_of(index: int, num: int) -> int:
    """0/1/2 (train/val/test) in the same proportions as the real partition."""
    train_end = round(num * CELEBA_SPLIT_ENDS[0] / CELEBA_SIZE)
    val_end = round(num * CELEBA_SPLIT_ENDS[1] / CELEBA_SIZE)
    return 0 if index <= train_end else 1 if index <= val_end else 2


def sample_attributes(rng: np.random.Generator, hold_out: Sequence[Pair] = ()) -> dict[str, int]:
    """Random attributes; drawn again while they hold both attributes of a `hold_out` pair, so the pair's
    combination is absent and the other attributes keep their joint distribution (given no pair)."""
    while True:
        attrs = _draw_attributes(rng)
        if not any(attrs[a] and attrs[b] for a, b in hold_out):
            return attrs


def _draw_attributes(rng: np.random.Generator) -> dict[str, int]:
    attrs = {name: int(rng.random() < OTHER_P) for name in ATTRIBUTES}
    for name in ("Eyeglasses", "Smiling", "Wearing_Hat", "Mustache"):
        attrs[name] = int(rng.random() < VISIBLE_P)
    hair = [h for h, _ in HAIR_P][rng.choice(len(HAIR_P), p=[p for _, p in HAIR_P])]
    for name in ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair"):
        attrs[name] = int(name == hair)
    return attrs


def draw_face(attrs: dict[str, int], rng: np.random.Generator) -> Image.Image:
    def colour(base, spread=18):
        return tuple(int(np.clip(c + rng.integers(-spread, spread + 1), 0, 255)) for c in base)

    img = Image.new("RGB", (WIDTH, HEIGHT), colour((120, 140, 160), 60))
    d = ImageDraw.Draw(img)
    cx = WIDTH / 2 + rng.uniform(-5, 5)
    cy = HEIGHT / 2 + rng.uniform(-4, 4)
    s = rng.uniform(0.95, 1.05)
    hair = next((h for h in HAIR if h and attrs[h]), None)

    d.ellipse([cx - 80 * s, cy + 55 * s, cx + 80 * s, cy + 150 * s], fill=colour((70, 80, 110), 50))  # shoulders
    d.ellipse([cx - 56 * s, cy - 78 * s, cx + 56 * s, cy + 40 * s], fill=colour(HAIR[hair], 12))  # hair
    d.ellipse([cx - 44 * s, cy - 56 * s, cx + 44 * s, cy + 58 * s], fill=colour((224, 176, 140), 25))  # face
    ey = cy - 10 * s
    for ex in (cx - 18 * s, cx + 18 * s):
        d.ellipse([ex - 5 * s, ey - 4 * s, ex + 5 * s, ey + 4 * s], fill=(40, 30, 30))
        if attrs["Eyeglasses"]:
            d.ellipse([ex - 14 * s, ey - 12 * s, ex + 14 * s, ey + 12 * s], outline=(10, 10, 10), width=5)
    if attrs["Eyeglasses"]:
        d.line([cx - 5 * s, ey, cx + 5 * s, ey], fill=(10, 10, 10), width=5)
    d.line([cx, cy - 2 * s, cx - 4 * s, cy + 14 * s], fill=(170, 110, 90), width=3)  # nose
    my = cy + 30 * s
    if attrs["Smiling"]:
        d.pieslice([cx - 24 * s, my - 16 * s, cx + 24 * s, my + 14 * s], 0, 180, fill=(150, 30, 40))
        d.rectangle([cx - 18 * s, my - 1 * s, cx + 18 * s, my + 4 * s], fill=(245, 245, 240))  # teeth
    else:
        d.line([cx - 13 * s, my + 2 * s, cx + 13 * s, my + 2 * s], fill=(150, 50, 50), width=4)
    if attrs["Mustache"]:
        d.rectangle([cx - 22 * s, cy + 17 * s, cx + 22 * s, cy + 25 * s], fill=(45, 30, 20))
    if attrs["Wearing_Hat"]:
        hat = colour((200, 40, 40), 50)
        d.rectangle([cx - 64 * s, cy - 50 * s, cx + 64 * s, cy - 38 * s], fill=hat)  # brim
        d.rectangle([cx - 44 * s, cy - 92 * s, cx + 44 * s, cy - 48 * s], fill=hat)  # crown
    return img


def render(seed: int, index: int, hold_out: Sequence[Pair] = ()) -> tuple[bytes, dict[str, int]]:
    """JPEG bytes and attributes of image `index` (1-based, like the file names), with no `hold_out` pair."""
    rng = np.random.default_rng([seed, index])
    attrs = sample_attributes(rng, hold_out)
    buf = io.BytesIO()
    draw_face(attrs, rng).save(buf, format="JPEG", quality=90)
    return buf.getvalue(), attrs


def _write_image(job: tuple[Path, int, int, Sequence[Pair]]) -> tuple[int, dict[str, int]]:
    img_dir, seed, index, hold_out = job
    data, attrs = render(seed, index, hold_out)
    final = img_dir / f"{index:06d}.jpg"
    tmp = img_dir / f".{index:06d}.jpg.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, final)
    return index, attrs


def make(out: str | os.PathLike, num: int, seed: int = 0, workers: int | None = None,
         progress: bool = True, hold_out: Sequence[Pair] = ()) -> Path:
    """Write `num` images and the four annotation files under `out` in the CelebA layout.

    No train-partition image has both attributes of a `hold_out` pair (val and test keep them), so those
    combinations reach a model only as prompts: a test of composition. Images whose first draw holds no pair
    are the same bytes with or without `hold_out`.
    """
    if num < 1:
        raise ValueError(f"num must be at least 1, got {num}")
    hold_out = [tuple(pair) for pair in hold_out]
    out = Path(out)
    img_dir = out / "img_align_celeba"
    img_dir.mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    jobs = ((img_dir, seed, i, hold_out if split_of(i, num) == 0 else ()) for i in range(1, num + 1))
    with atomic_write(out / "list_attr_celeba.txt", "w") as attr_f, \
            atomic_write(out / "list_eval_partition.txt", "w") as part_f, \
            atomic_write(out / "identity_CelebA.txt", "w") as id_f, \
            mp.get_context("spawn").Pool(workers) as pool:
        attr_f.write(f"{num}\n" + " ".join(ATTRIBUTES) + " \n")
        bar = tqdm(pool.imap(_write_image, jobs, chunksize=64), total=num, unit="img",
                   desc="synthetic CelebA", disable=not progress)
        for index, attrs in bar:
            name = f"{index:06d}.jpg"
            attr_f.write(name + " " + " ".join(f"{1 if attrs[a] else -1:2d}" for a in ATTRIBUTES) + "\n")
            part_f.write(f"{name} {split_of(index, num)}\n")
            id_f.write(f"{name} {(index - 1) // 20 + 1}\n")
    return out
