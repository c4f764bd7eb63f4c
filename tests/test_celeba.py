"""The prompt rule and the validation of CelebA annotation files (one-line errors, exit status 2)."""

import shutil

import pytest

from ddpdiff import celeba

from conftest import as_kaggle

ATTR, PART, IDENT = celeba.ATTR_FILE, celeba.PARTITION_FILE, celeba.IDENTITY_FILE


def test_prompt_lists_positive_attributes_in_celeba_order():
    attrs = {"Wearing_Hat": 1, "Arched_Eyebrows": 1, "Smiling": 1, "Male": -1, "Young": 0}
    assert celeba.prompt(attrs) == "Photo of person arched eyebrows, smiling, wearing hat."


def test_prompt_without_attributes():
    assert celeba.prompt({}) == "Photo of person."
    assert celeba.prompt({name: -1 for name in celeba.ATTRIBUTES}) == "Photo of person."


def test_read_annotations(celeba_root):
    table = celeba.read_annotations(celeba_root)
    assert len(table) == 48 and list(table["file"]) == sorted(table["file"])
    assert set(table["split"]) == set(celeba.SPLITS)
    assert set(table[list(celeba.ATTRIBUTES)].to_numpy().ravel()) == {0, 1}
    row = table.iloc[0]
    raw = (celeba_root / ATTR).read_text().splitlines()[2].split()
    assert raw[0] == row["file"] == "000001.jpg"
    assert [int(v) > 0 for v in raw[1:]] == [bool(row[a]) for a in celeba.ATTRIBUTES]
    assert row["identity"] == 1
    meta = celeba.sample_meta(row)
    assert meta["file"] == "000001.jpg" and meta["identity"] == 1 and len(meta["attrs"]) == 40


def test_identity_file_is_optional(celeba_root, tmp_path):
    for name in (ATTR, PART):
        shutil.copy(celeba_root / name, tmp_path / name)
    assert celeba.sample_meta(celeba.read_annotations(tmp_path).iloc[0])["identity"] is None


def _edit(lines: list[str], line: int, fn) -> list[str]:
    return lines[: line - 1] + [fn(lines[line - 1])] + lines[line:]


FAULTS = {
    "wrong header": (ATTR, lambda ls: _edit(ls, 2, lambda s: s.replace("Smiling", "Smiles")), 2),
    "bad count": (ATTR, lambda ls: _edit(ls, 1, lambda s: "47"), 1),
    "count not a number": (ATTR, lambda ls: _edit(ls, 1, lambda s: "many"), 1),
    "too many values": (ATTR, lambda ls: _edit(ls, 7, lambda s: s + " 1"), 7),
    "too few values": (ATTR, lambda ls: _edit(ls, 9, lambda s: s.rsplit(" ", 1)[0]), 9),
    "value not +-1": (ATTR, lambda ls: _edit(ls, 11, lambda s: s[:-2] + " 0"), 11),
    "unknown split": (PART, lambda ls: _edit(ls, 5, lambda s: s[:-1] + "3"), 5),
    "partition row too long": (PART, lambda ls: _edit(ls, 4, lambda s: s + " 0"), 4),
    "duplicate file": (PART, lambda ls: _edit(ls, 6, lambda s: ls[4]), 6),
    "bad identity": (IDENT, lambda ls: _edit(ls, 3, lambda s: s.split()[0] + " x7"), 3),
}


@pytest.fixture
def faulty_root(celeba_root, tmp_path):
    """A copy of the annotation files (images linked) whose `name` file gets `edit` applied."""
    (tmp_path / celeba.IMAGE_DIR).symlink_to(celeba_root / celeba.IMAGE_DIR)
    for name in (ATTR, PART, IDENT):
        shutil.copy(celeba_root / name, tmp_path / name)

    def apply(name, edit):
        path = tmp_path / name
        path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")
        return tmp_path

    return apply


@pytest.mark.parametrize("fault", FAULTS)
def test_annotation_faults_name_file_and_line(fault, faulty_root):
    name, edit, line = FAULTS[fault]
    root = faulty_root(name, edit)
    with pytest.raises(celeba.AnnotationError) as err:
        celeba.read_annotations(root)
    message = str(err.value)
    assert message.startswith(f"{root / name}: line {line}:") and "\n" not in message


def test_files_missing_from_partition(faulty_root):
    root = faulty_root(PART, lambda ls: ls[:-1])
    with pytest.raises(celeba.AnnotationError, match=r"list_eval_partition.txt: no split for 000048.jpg"):
        celeba.read_annotations(root)


def test_missing_annotation_file(celeba_root, tmp_path):
    shutil.copy(celeba_root / ATTR, tmp_path / ATTR)
    with pytest.raises(celeba.AnnotationError, match="list_eval_partition.txt: file not found"):
        celeba.read_annotations(tmp_path)


@pytest.mark.parametrize("fault", ["wrong header", "value not +-1", "unknown split"])
def test_cli_exits_2_with_one_line(fault, faulty_root, make_shards, capsys, tmp_path):
    name, edit, line = FAULTS[fault]
    root = faulty_root(name, edit)
    code = make_shards.main(["--root", str(root), "--out", str(tmp_path / "out"), "--clip-model", "tiny",
                             "--clip-pretrained", "none", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and f"{root / name}: line {line}:" in err
    assert not (tmp_path / "out").exists()  # validated before any work


def test_the_torchvision_and_kaggle_layouts_are_detected_and_read_as_the_official_one(celeba_root, tmp_path):
    official = celeba.read_annotations(celeba_root)
    assert celeba.find_layout(celeba_root).name == "official"
    shutil.copytree(celeba_root, tmp_path / "tv" / "celeba")
    layout = celeba.find_layout(tmp_path / "tv")
    assert layout.name == "torchvision (ROOT/celeba/)" and layout.images == tmp_path / "tv" / "celeba" / celeba.IMAGE_DIR
    assert celeba.read_annotations(tmp_path / "tv").equals(official)
    kaggle = as_kaggle(celeba_root, tmp_path / "kaggle")
    layout = celeba.find_layout(kaggle)
    assert layout.name == "Kaggle (CSV annotations)" and layout.images == kaggle / celeba.IMAGE_DIR / celeba.IMAGE_DIR
    table = celeba.read_annotations(kaggle)
    assert (table["identity"] == -1).all()  # Kaggle's copy has no identity file
    assert table.drop(columns="identity").equals(official.drop(columns="identity"))


def test_kaggle_csv_faults_name_file_and_line(celeba_root, tmp_path):
    kaggle = as_kaggle(celeba_root, tmp_path)
    attr = kaggle / celeba.KAGGLE_ATTR_FILE
    lines = attr.read_text().splitlines()
    attr.write_text("\n".join([*lines[:4], lines[4].rsplit(",", 1)[0], *lines[5:]]) + "\n")
    with pytest.raises(celeba.AnnotationError, match=rf"^{attr}: line 5: expected 41 values, got 40$"):
        celeba.read_annotations(kaggle)
    attr.write_text("\n".join(["file," + lines[0].split(",", 1)[1], *lines[1:]]) + "\n")
    with pytest.raises(celeba.AnnotationError, match=r"line 1: expected the header image_id and the 40 CelebA "
                                                     r"attribute names, got 41 names \(first difference at position 1\)"):
        celeba.read_annotations(kaggle)


def test_a_root_without_annotations_names_every_layout_it_looked_for(tmp_path):
    with pytest.raises(celeba.AnnotationError, match=r"no CelebA annotations: expected list_attr_celeba.txt and "
                                                     r"list_eval_partition.txt .* or list_attr_celeba.csv and "
                                                     r"list_eval_partition.csv \(Kaggle's\)$"):
        celeba.read_annotations(tmp_path)
