"""The CelebA format: its 40 attribute names, split codes, the prompt rule, the layouts its copies come in, and
reading the annotation files."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
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
KAGGLE_ATTR_FILE, KAGGLE_PARTITION_FILE = "list_attr_celeba.csv", "list_eval_partition.csv"
IMAGE_DIR = "img_align_celeba"


@dataclass(frozen=True)
class Layout:
    """Where one copy of CelebA keeps its annotations and images, as its source ships it."""
    name: str
    attr: Path
    partition: Path
    identity: Path | None  # optional even where named; Kaggle's copy has none
    images: Path

    @property
    def csv(self) -> bool:
        return self.attr.suffix == ".csv"


def find_layout(root: str | os.PathLike) -> Layout:
    """The layout of the CelebA copy at `root`: the official one (MMLAB's files unpacked in ROOT), torchvision's
    (the official files in ROOT/celeba/, as `torchvision.datasets.CelebA(ROOT, download=True)` leaves them) or
    Kaggle's (CSV annotations, the images in a nested img_align_celeba/img_align_celeba/)."""
    root = Path(root)
    for base, name in ((root, "official"), (root / "celeba", "torchvision (ROOT/celeba/)")):
        if (base / ATTR_FILE).is_file() or (base / PARTITION_FILE).is_file():
            return Layout(name, base / ATTR_FILE, base / PARTITION_FILE, base / IDENTITY_FILE, base / IMAGE_DIR)
    if (root / KAGGLE_ATTR_FILE).is_file() or (root / KAGGLE_PARTITION_FILE).is_file():
        nested = root / IMAGE_DIR / IMAGE_DIR
        return Layout("Kaggle (CSV annotations)", root / KAGGLE_ATTR_FILE, root / KAGGLE_PARTITION_FILE, None,
                      nested if nested.is_dir() else root / IMAGE_DIR)
    raise AnnotationError(f"{root}: no CelebA annotations: expected {ATTR_FILE} and {PARTITION_FILE} in it (the "
                          f"official layout) or in celeba/ (torchvision's), or {KAGGLE_ATTR_FILE} and "
                          f"{KAGGLE_PARTITION_FILE} (Kaggle's)")


def _rows(path: Path, skip: int, width: int, sep: str | None = None) -> pd.DataFrame:
    """Rows after `skip` header lines as strings (split at white space, or at `sep`), each checked to have
    `width` values.

    pandas reads each line whole and splits it, so a short or long row becomes a clear error with its line
    number instead of silently shifted columns.
    """
    lines = pd.read_csv(path, sep="\x00", header=None, names=["line"], skiprows=skip, dtype=str,
                        quoting=csv.QUOTE_NONE, skip_blank_lines=False, keep_default_na=False)["line"]
    cells = lines.str.split(sep, expand=True).reindex(columns=range(width + 1))
    widths = cells.notna().sum(axis=1).to_numpy()
    bad = np.flatnonzero(widths != width)
    if len(bad):
        i = bad[0]
        raise AnnotationError(f"{path}: line {i + skip + 1}: expected {width} values, got "
                              f"{len(lines.iloc[i].split(sep))}")
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


def _names(path: Path, line: int, names: list[str], expected: list[str], what: str) -> None:
    if names != expected:
        wrong = next((i for i, (a, b) in enumerate(zip(names, expected)) if a != b), min(len(names), len(expected)))
        raise AnnotationError(f"{path}: line {line}: expected {what}, got {len(names)} names (first difference at "
                              f"position {wrong + 1})")


def _attribute_rows(attr_path: Path, csv_format: bool) -> pd.DataFrame:
    """The attribute file's rows: the file name, then the 40 values as strings."""
    with open(attr_path) as f:
        head = [f.readline(), f.readline()]
    if csv_format:  # Kaggle's: a header line "image_id,5_o_Clock_Shadow,…", then comma-separated rows
        _names(attr_path, 1, head[0].strip().split(","), ["image_id", *ATTRIBUTES],
               "the header image_id and the 40 CelebA attribute names")
        return _rows(attr_path, 1, 41, ",")
    count, names = head[0].strip(), head[1].split()
    if not count.isdigit():
        raise AnnotationError(f"{attr_path}: line 1: expected the number of images, got {count!r}")
    _names(attr_path, 2, names, list(ATTRIBUTES), "the 40 CelebA attribute names")
    attrs = _rows(attr_path, 2, 41)
    if len(attrs) != int(count):
        raise AnnotationError(f"{attr_path}: line 1: header says {count} images but the file has {len(attrs)} rows")
    return attrs


def _partition_rows(part_path: Path, csv_format: bool) -> pd.DataFrame:
    if csv_format:
        with open(part_path) as f:
            header = f.readline().strip().split(",")
        _names(part_path, 1, header, ["image_id", "partition"], "the header image_id,partition")
        return _rows(part_path, 1, 2, ",")
    return _rows(part_path, 0, 2)


def read_annotations(root: str | os.PathLike, layout: Layout | None = None) -> pd.DataFrame:
    """The validated annotations, one row per image sorted by file name, from `layout` (default: the one
    `find_layout` detects at `root`).

    Columns: `file` (e.g. 000001.jpg), `split` (train/val/test), `identity` (int, -1 without the optional
    identity file), and the 40 attributes as 0/1 int8. Raises AnnotationError on the first problem.
    """
    layout = layout or find_layout(root)
    attr_path, part_path, id_path = layout.attr, layout.partition, layout.identity
    for path in (attr_path, part_path):
        if not path.is_file():
            raise AnnotationError(f"{path}: file not found (expected the {layout.name} CelebA layout under {root})")
    attrs = _attribute_rows(attr_path, layout.csv)
    values = attrs.iloc[:, 1:]
    ok = values.isin(["1", "-1"])
    if not ok.all(axis=None):
        raise _first_bad(attr_path, ok, values, "expected attribute values 1 or -1")
    table = pd.DataFrame((values.to_numpy() == "1").astype(np.int8), columns=list(ATTRIBUTES))
    table.insert(0, "file", attrs[0].to_numpy())

    part = _partition_rows(part_path, layout.csv)
    ok = part[[1]].isin(["0", "1", "2"])
    if not ok.all(axis=None):
        raise _first_bad(part_path, ok, part[[1]], "expected split 0 (train), 1 (val) or 2 (test)")
    splits = dict(zip(part[0], part[1].astype(int)))
    _same_files(attr_path, attrs[0], part_path, splits)
    table.insert(1, "split", [SPLITS[splits[f]] for f in table["file"]])

    identity = np.full(len(table), -1, dtype=np.int64)
    if id_path is not None and id_path.is_file():
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
