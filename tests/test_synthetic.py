import hashlib
import re

import numpy as np
import pytest
from PIL import Image

from ddpdiff import synthetic
from ddpdiff.celeba import ATTRIBUTES


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_layout_and_annotation_format(celeba_root):
    lines = (celeba_root / "list_attr_celeba.txt").read_text().splitlines()
    assert lines[0] == "48"
    assert lines[1].split() == ATTRIBUTES
    row = lines[2]
    assert row.startswith("000001.jpg ") and len(row.split()) == 41
    assert set(row.split()[1:]) <= {"1", "-1"}
    assert len(row) == len("000001.jpg") + 40 * 3  # each value right-aligned in a 2-wide column
    parts = [line.split() for line in (celeba_root / "list_eval_partition.txt").read_text().splitlines()]
    assert [p[0] for p in parts] == [f"{i:06d}.jpg" for i in range(1, 49)]
    assert {p[1] for p in parts} == {"0", "1", "2"}
    assert len((celeba_root / "identity_CelebA.txt").read_text().splitlines()) == 48
    with Image.open(celeba_root / "img_align_celeba" / "000048.jpg") as im:
        assert (im.format, im.size, im.mode) == ("JPEG", (178, 218), "RGB")
    assert not list(celeba_root.rglob("*.tmp"))


def test_same_seed_same_bytes_other_seed_differs(tmp_path, celeba_root):
    again = synthetic.make(tmp_path / "a", num=48, seed=0, workers=2, progress=False)
    assert _digest(again) == _digest(celeba_root)
    other = synthetic.make(tmp_path / "b", num=48, seed=1, workers=1, progress=False)
    assert _digest(other) != _digest(celeba_root)


def test_split_proportions_match_real_celeba():
    assert synthetic.split_of(162_770, 202_599) == 0
    assert synthetic.split_of(162_771, 202_599) == 1
    assert synthetic.split_of(182_637, 202_599) == 1
    assert synthetic.split_of(182_638, 202_599) == 2


@pytest.mark.parametrize("attr", ["Eyeglasses", "Smiling", "Wearing_Hat", "Mustache"])
def test_visible_attributes_change_the_pixels_they_should(attr):
    rng = np.random.default_rng(0)
    base = synthetic.sample_attributes(rng)
    on, off = dict(base, **{attr: 1}), dict(base, **{attr: 0})
    a = np.asarray(synthetic.draw_face(on, np.random.default_rng(5)), dtype=np.int16)
    b = np.asarray(synthetic.draw_face(off, np.random.default_rng(5)), dtype=np.int16)
    changed = (np.abs(a - b).sum(-1) > 30).mean()
    assert changed > 0.005, f"{attr} is not visible ({changed:.4f} of pixels changed)"
    assert changed < 0.5


def test_hair_colour_is_exclusive():
    for i in range(200):
        attrs = synthetic.sample_attributes(np.random.default_rng(i))
        assert sum(attrs[h] for h in ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")) <= 1


def _rows(root):
    attrs = [line.split() for line in (root / "list_attr_celeba.txt").read_text().splitlines()[2:]]
    parts = dict(line.split() for line in (root / "list_eval_partition.txt").read_text().splitlines())
    return [(row[0], parts[row[0]], {a: row[1 + i] == "1" for i, a in enumerate(ATTRIBUTES)}) for row in attrs]


def test_hold_out_removes_the_pairs_from_train_only_and_leaves_other_images_alone(tmp_path):
    pairs = [("Wearing_Hat", "Eyeglasses"), ("Blond_Hair", "Mustache")]
    held = synthetic.make(tmp_path / "held", num=400, seed=0, workers=1, progress=False, hold_out=pairs)
    plain = synthetic.make(tmp_path / "plain", num=400, seed=0, workers=1, progress=False)
    rows, plain_rows = _rows(held), _rows(plain)

    def both(attrs, pair):
        return attrs[pair[0]] and attrs[pair[1]]
    for pair in pairs:
        assert not [name for name, split, attrs in rows if split == "0" and both(attrs, pair)], pair
        assert [name for name, split, attrs in plain_rows if split == "0" and both(attrs, pair)], pair
    assert [name for name, split, attrs in rows if split != "0" and both(attrs, pairs[0])]
    unaffected = [name for (name, split, attrs) in plain_rows if not any(both(attrs, p) for p in pairs)]
    assert len(unaffected) > 200
    for name in unaffected:
        assert (held / "img_align_celeba" / name).read_bytes() == (plain / "img_align_celeba" / name).read_bytes()
    redrawn = [name for (name, split, attrs) in plain_rows if split == "0" and any(both(attrs, p) for p in pairs)]
    assert all((held / "img_align_celeba" / n).read_bytes() != (plain / "img_align_celeba" / n).read_bytes()
               for n in redrawn)


@pytest.mark.parametrize("text, message", [
    ("Blond_Hair", "two different CelebA attribute names"),
    ("Blond_Hair+Moustache", "Moustache unknown"),
    ("Smiling+Smiling", "two different"),
    (",", "expected A+B"),
])
def test_parse_pairs_names_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        synthetic.parse_pairs(text)


def test_parse_pairs():
    assert synthetic.parse_pairs("Wearing_Hat+Eyeglasses, Blond_Hair+Mustache") == [
        ("Wearing_Hat", "Eyeglasses"), ("Blond_Hair", "Mustache")]
