"""The CelebA format: its 40 attribute names, split codes, the prompt rule, and reading the annotation files."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from .errors import UsageError

ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()
assert len(ATTRIBUTES) == 40
HAIR_COLOURS = ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")  # the attributes that name a colour

SPLITS = ("train", "val", "test")  # list_eval_partition.txt codes 0, 1, 2

PROMPT_RULE = "'Photo of person ' + positive attribute names (lower-cased, '_' -> ' ') joined by ', ' + '.'"


def prompt(attrs: Mapping[str, int]) -> str:
    """The original design's prompt: 'Photo of person arched eyebrows, smiling, wearing hat.'"""
    words = [phrase(name) for name in ATTRIBUTES if attrs.get(name, 0) > 0]
    return "Photo of person " + ", ".join(words) + "." if words else "Photo of person."


def phrase(name: str) -> str:
    """How attribute `name` reads in a prompt ('Wearing_Hat' -> 'wearing hat')."""
    return name.lower().replace("_", " ")


# Every word of every training prompt: what a model trained on CelebA's prompts has seen.
VOCABULARY = frozenset("photo of person".split()) | {w for name in ATTRIBUTES for w in phrase(name).split()}


class AnnotationError(UsageError):
    """A malformed annotation file; the message is one line naming the file, the line and the problem."""


ATTR_FILE, PARTITION_FILE, IDENTITY_FILE = "list_attr_celeba.txt", "list_eval_partition.txt", "identity_CelebA.txt"
IMAGE_DIR = "img_align_celeba"


def _rows(path: Path, skip: int, width: int) -> pd.DataFrame:
    """Whitespace-separated rows after `skip` header lines as strings, each checked to have `width` values.

    pandas reads each line whole and splits it, so a short or long row becomes a clear error with its line
    number instead of silently shifted columns.
    """
    lines = pd.read_csv(path, sep="\x00", header=None, names=["line"], skiprows=skip, dtype=str,
                        quoting=csv.QUOTE_NONE, skip_blank_lines=False, keep_default_na=False)["line"]
    cells = lines.str.split(expand=True).reindex(columns=range(width + 1))
    widths = cells.notna().sum(axis=1).to_numpy()
    bad = np.flatnonzero(widths != width)
    if len(bad):
        i = bad[0]
        raise AnnotationError(f"{path}: line {i + skip + 1}: expected {width} values, got "
                              f"{len(lines.iloc[i].split())}")
    cells = cells.iloc[:, :width]
    dup = cells[0].duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        raise AnnotationError(f"{path}: line {i + skip + 1}: file {cells.iat[i, 0]} is listed twice")
    return cells.set_axis(range(width), axis=1).set_index(pd.RangeIndex(len(cells)) + skip + 1)


def _first_bad(path: Path, ok: pd.DataFrame, cells: pd.DataFrame, what: str) -> AnnotationError:
    """The error for the first cell (in file order) where `ok` is False."""
    line, col = next((line, col) for line, row in ok.iterrows() for col in ok.columns if not row[col])
    return AnnotationError(f"{path}: line {line}: {what}, got {cells.at[line, col]!r}")


def read_annotations(root: str | os.PathLike) -> pd.DataFrame:
    """The validated annotations, one row per image sorted by file name.

    Columns: `file` (e.g. 000001.jpg), `split` (train/val/test), `identity` (int, -1 without the optional
    identity file), and the 40 attributes as 0/1 int8. Raises AnnotationError on the first problem.
    """
    root = Path(root)
    attr_path, part_path, id_path = root / ATTR_FILE, root / PARTITION_FILE, root / IDENTITY_FILE
    for path in (attr_path, part_path):
        if not path.is_file():
            raise AnnotationError(f"{path}: file not found (expected the official CelebA layout under {root})")
    with open(attr_path) as f:
        count, names = f.readline().strip(), f.readline().split()
    if not count.isdigit():
        raise AnnotationError(f"{attr_path}: line 1: expected the number of images, got {count!r}")
    if names != list(ATTRIBUTES):
        wrong = next((i for i, (a, b) in enumerate(zip(names, ATTRIBUTES)) if a != b), min(len(names), 40))
        raise AnnotationError(f"{attr_path}: line 2: expected the 40 CelebA attribute names, "
                              f"got {len(names)} names (first difference at position {wrong + 1})")
    attrs = _rows(attr_path, 2, 41)
    if len(attrs) != int(count):
        raise AnnotationError(f"{attr_path}: line 1: header says {count} images but the file has {len(attrs)} rows")
    values = attrs.iloc[:, 1:]
    ok = values.isin(["1", "-1"])
    if not ok.all(axis=None):
        raise _first_bad(attr_path, ok, values, "expected attribute values 1 or -1")
    table = pd.DataFrame((values.to_numpy() == "1").astype(np.int8), columns=list(ATTRIBUTES))
    table.insert(0, "file", attrs[0].to_numpy())

    part = _rows(part_path, 0, 2)
    ok = part[[1]].isin(["0", "1", "2"])
    if not ok.all(axis=None):
        raise _first_bad(part_path, ok, part[[1]], "expected split 0 (train), 1 (val) or 2 (test)")
    splits = dict(zip(part[0], part[1].astype(int)))
    _same_files(attr_path, attrs[0], part_path, splits)
    table.insert(1, "split", [SPLITS[splits[f]] for f in table["file"]])

    identity = np.full(len(table), -1, dtype=np.int64)
    if id_path.is_file():
        ids = _rows(id_path, 0, 2)
        ok = ids[[1]].apply(lambda c: c.str.fullmatch(r"\d+"))
        if not ok.all(axis=None):
            raise _first_bad(id_path, ok, ids[[1]], "expected a non-negative integer identity")
        known = dict(zip(ids[0], ids[1].astype(np.int64)))
        identity = np.array([known.get(f, -1) for f in table["file"]], dtype=np.int64)
    table.insert(2, "identity", identity)
    return table.sort_values("file", kind="stable").reset_index(drop=True)


def _same_files(attr_path: Path, attr_files: pd.Series, part_path: Path, splits: dict[str, int]) -> None:
    """Both files must list the same images, or a split or attributes would be missing for one."""
    missing = attr_files[~attr_files.isin(splits)]
    if len(missing):
        raise AnnotationError(f"{part_path}: no split for {missing.iloc[0]} (listed in {attr_path} line "
                              f"{missing.index[0]})")
    extra = set(splits) - set(attr_files)
    if extra:
        raise AnnotationError(f"{attr_path}: no attributes for {min(extra)} (listed in {part_path})")


def sample_meta(row: Mapping) -> dict:
    """The sample's KEY.json content from one `read_annotations` row."""
    identity = int(row["identity"])
    return {"file": row["file"], "split": row["split"], "attrs": {a: int(row[a]) for a in ATTRIBUTES},
            "identity": identity if identity >= 0 else None}
