"""ddpdiff.shards and tools/make_shards.py: layout, manifest, odd images, refusal, resume, tasks, determinism."""

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from ddpdiff import celeba, clip, shards, synthetic

from conftest import as_kaggle

TINY = dict(clip_model="tiny", clip_pretrained="none", samples_per_shard=8, workers=0, clip_batch_size=16,
            progress=False)  # the shards_dir fixture's flags
MEMBERS = ["jpg", "img.npy", "txt", "json", "clip_image.npy", "clip_text.npy", "clip_tokens.npy"]


def files_of(out):
    """Every file under `out` (shards, manifest) with its bytes, except the per-task progress files."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.parent.name != shards.TASK_DIR}


@pytest.fixture(scope="module")
def manifest(shards_dir):
    return json.loads((shards_dir / "manifest.json").read_text())


def test_manifest_fields(manifest, celeba_root):
    table = celeba.read_annotations(celeba_root)
    assert manifest["format"] == "ddpdiff-shards" and manifest["version"] == 1
    assert manifest["image_size"] == 64 and manifest["prompt_rule"] == celeba.PROMPT_RULE
    assert manifest["attributes"] == list(celeba.ATTRIBUTES)
    assert manifest["clip"] | {"text_layers": None} == {"model": "tiny", "pretrained": "none", "dim": 64,
                                                        "token_dim": 128, "token_layer": "ln_final",
                                                        "text_layers": None, "quick_gelu": False}
    assert manifest["skipped"] == []
    for split in celeba.SPLITS:
        entry = manifest["splits"][split]
        assert entry["count"] == (table["split"] == split).sum() == sum(s["count"] for s in entry["shards"])
        assert [s["path"] for s in entry["shards"]] == [f"{split}/{split}-{i:06d}.tar"
                                                        for i in range(len(entry["shards"]))]
    assert len(manifest["splits"]["train"]["shards"]) == 5  # 39 images, 8 per shard


def test_manifest_checksums_match_the_shards(manifest, shards_dir):
    for entry in manifest["splits"].values():
        for s in entry["shards"]:
            assert hashlib.sha256((shards_dir / s["path"]).read_bytes()).hexdigest() == s["sha256"]


def test_tar_members_have_fixed_metadata_and_sorted_keys(manifest, shards_dir):
    for entry in manifest["splits"].values():
        for s in entry["shards"]:
            with tarfile.open(shards_dir / s["path"]) as tar:
                infos = tar.getmembers()
            assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode) for i in infos} == {(0, 0, 0, "", "", 0o644)}
            keys = [i.name.split(".", 1)[0] for i in infos]
            assert keys == sorted(keys) and len(infos) == s["count"] * len(MEMBERS)
            assert [i.name.split(".", 1)[1] for i in infos[:len(MEMBERS)]] == MEMBERS


def test_plain_webdataset_reads_every_sample(manifest, shards_dir, celeba_root):
    table = celeba.read_annotations(celeba_root).set_index("file")
    urls = [str(shards_dir / s["path"]) for e in manifest["splits"].values() for s in e["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8"))
    assert len(samples) == manifest["count"] == 48
    for sample in samples:
        meta = sample["json"]
        row = table.loc[meta["file"]]
        assert meta["file"] == sample["__key__"] + ".jpg" and meta["split"] == row["split"]
        assert meta["attrs"] == {a: int(row[a]) for a in celeba.ATTRIBUTES}
        assert sample["txt"] == celeba.prompt(meta["attrs"])
        img = sample["img.npy"]
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert sample["jpg"].shape == (178, 178, 3)  # decoded: the native-resolution square crop
        for name in ("clip_image.npy", "clip_text.npy"):
            assert sample[name].shape == (64,) and sample[name].dtype == np.float16
            assert abs(np.linalg.norm(sample[name].astype(np.float32)) - 1) < 2e-3
        assert sample["clip_tokens.npy"].dtype == np.float16 and sample["clip_tokens.npy"].shape[1] == 128


def test_tar_command_lists_shards(manifest, shards_dir):
    first = shards_dir / manifest["splits"]["val"]["shards"][0]["path"]
    names = subprocess.run(["tar", "tf", str(first)], capture_output=True, text=True, check=True).stdout.split()
    assert len(names) == manifest["splits"]["val"]["count"] * len(MEMBERS)


def test_embeddings_equal_a_recomputation_through_ddpdiff_clip(manifest, shards_dir):
    encoder = clip.load(manifest["clip"]["model"], manifest["clip"]["pretrained"])
    path = shards_dir / manifest["splits"]["train"]["shards"][1]["path"]
    samples = list(wds.WebDataset(str(path), shardshuffle=False).decode("rgb8"))
    prompts = [s["txt"] for s in samples]
    for sample, tokens in zip(samples, encoder.encode_tokens(prompts)):
        assert sample["clip_tokens.npy"].shape == tokens.shape
        np.testing.assert_allclose(sample["clip_tokens.npy"], tokens, atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(np.stack([s["clip_text.npy"] for s in samples]), encoder.encode_texts(prompts),
                               atol=1e-3)
    crops = [Image.fromarray(s["jpg"]) for s in samples]  # JPEG round trip: only approximately the same input
    cosine = (np.stack([s["clip_image.npy"] for s in samples]).astype(np.float32) * encoder.encode_images(crops))
    assert cosine.sum(axis=1).min() > 0.99
    empty_text, empty_tokens = encoder.encode_prompts([""])
    np.testing.assert_allclose(manifest["empty_prompt"]["clip_text"], empty_text[0], atol=1e-3)
    np.testing.assert_allclose(manifest["empty_prompt"]["tokens"], empty_tokens[0], atol=2e-3, rtol=2e-3)


def test_the_kaggle_layout_gives_the_same_samples(celeba_root, shards_dir, tmp_path, capsys):
    """The same images, prompts and embeddings, whichever copy of CelebA they came from (only the identity,
    which Kaggle's copy lacks, differs in each KEY.json)."""
    kaggle = as_kaggle(celeba_root, tmp_path / "kaggle")
    shards.write_shards(kaggle, tmp_path / "out", **{**TINY, "progress": True})
    assert "CelebA in the Kaggle (CSV annotations) layout: 48 images in" in capsys.readouterr().err
    for split in celeba.SPLITS:
        for tar in sorted((shards_dir / split).glob("*.tar")):
            ours, theirs = (tarfile.open(t) for t in (tar, tmp_path / "out" / split / tar.name))
            names = [m.name for m in ours.getmembers()]
            assert names == [m.name for m in theirs.getmembers()]
            for name in names:
                if not name.endswith(".json"):
                    assert ours.extractfile(name).read() == theirs.extractfile(name).read(), name


def test_two_runs_are_byte_identical(celeba_root, shards_dir, tmp_path):
    shards.write_shards(celeba_root, tmp_path, **TINY)
    assert files_of(tmp_path) == files_of(shards_dir)


@pytest.mark.slow
def test_tasks_then_merge_equal_a_single_run(celeba_root, shards_dir, tmp_path, make_shards, capsys):
    partials = [shards.write_shards(celeba_root, tmp_path, **TINY, num_tasks=3, task_index=i) for i in (2, 0, 1)]
    assert [len(p["shards"]) for p in partials] == [2, 3, 2] and all(p["complete"] for p in partials)
    assert not (tmp_path / "manifest.json").exists()
    assert make_shards.main(["--merge", str(tmp_path)]) == 0
    assert "wrote 48 samples in 7 shards" in capsys.readouterr().out
    assert files_of(tmp_path) == files_of(shards_dir)


def test_merge_refuses_missing_tasks(celeba_root, tmp_path):
    shards.write_shards(celeba_root, tmp_path, **TINY, num_tasks=3, task_index=1)
    with pytest.raises(shards.ShardError, match=r"tasks \[0, 2\] of 3 are missing or unfinished"):
        shards.merge(tmp_path)


def test_task_index_defaults_from_slurm(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert shards.task_from_env() == (4, 3)


def test_non_empty_out_is_refused(odd_root, tmp_path, make_shards, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    args = ["--root", str(odd_root), "--out", str(tmp_path), "--clip-model", "tiny", "--clip-pretrained", "none",
            "--samples-per-shard", "4", "--workers", "0", "--no-progress"]
    assert make_shards.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty: pass --resume" in err
    assert make_shards.main(args + ["--overwrite"]) == 0
    assert (tmp_path / "manifest.json").is_file()


def test_overwrite_removes_only_the_tools_own_files(odd_root, tmp_path, make_shards):
    out = tmp_path / "out"
    theirs = {"train/mine.tar": b"a user's archive", "train/train-1.tar": b"not a shard name", "notes.tar": b"x",
              "backup/train/train-000000.tar": b"a copy elsewhere", "tasks/notes.json": b"{}",
              "val/val-000000.tar.bak": b"y"}
    stale = ["train/train-000007.tar", "test/test-000123.tar", "tasks/task-0001-of-0003.json"]  # an earlier run's
    for name, data in theirs.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    for name in stale:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"old")
    args = ["--root", str(odd_root), "--out", str(out), "--clip-model", "tiny", "--clip-pretrained", "none",
            "--samples-per-shard", "4", "--workers", "0", "--no-progress", "--overwrite"]
    assert make_shards.main(args) == 0
    assert {name: (out / name).read_bytes() for name in theirs} == theirs
    assert not [name for name in stale if (out / name).exists()]
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.tar")) == sorted(
        [s["path"] for e in manifest["splits"].values() for s in e["shards"]]
        + [n for n in theirs if n.endswith(".tar")])


def test_verify_lists_every_damaged_shard_and_exits_1(shards_dir, tmp_path, make_shards, capsys):
    out = tmp_path / "s"
    shutil.copytree(shards_dir, out)
    assert make_shards.main(["--verify", str(out)]) == 0
    assert capsys.readouterr().out == f"{out}: 7 of 7 shards match manifest.json\n"
    cut, flipped, gone = out / "train/train-000001.tar", out / "train/train-000004.tar", out / "test/test-000000.tar"
    cut.write_bytes(cut.read_bytes()[:10_000])
    data = bytearray(flipped.read_bytes())
    data[2000] ^= 1
    flipped.write_bytes(bytes(data))
    gone.unlink()
    assert make_shards.main(["--verify", str(out)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in lines[:3]] == [str(cut), str(flipped), str(gone)]
    assert "of its 10000 bytes, but manifest.json says" in lines[0] and "cannot read" in lines[2]
    assert lines[3].startswith(f"{out}: 4 of 7 shards match manifest.json; 3 differ") and len(lines) == 4
    assert make_shards.main(["--verify", str(tmp_path)]) == 2  # no manifest: a usage error
    assert "manifest.json: not found" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_of_a_finished_run_keeps_every_shard(celeba_root, shards_dir, tmp_path):
    shards.write_shards(celeba_root, tmp_path, **TINY)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/*.tar")}
    shards.write_shards(celeba_root, tmp_path, **TINY, resume=True)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/*.tar")} == before
    assert files_of(tmp_path) == files_of(shards_dir)


@pytest.mark.slow
def test_resume_rewrites_a_corrupted_shard_and_refuses_other_flags(celeba_root, shards_dir, tmp_path):
    shards.write_shards(celeba_root, tmp_path, **TINY)
    victim = tmp_path / "train" / "train-000002.tar"
    victim.write_bytes(victim.read_bytes()[:5000])
    shards.write_shards(celeba_root, tmp_path, **TINY, resume=True)
    assert files_of(tmp_path) == files_of(shards_dir)
    with pytest.raises(shards.ShardError, match="'image_size' differs from the interrupted run"):
        shards.write_shards(celeba_root, tmp_path, **TINY | {"image_size": 32}, resume=True)


def test_make_shards_defaults_to_openais_weights_with_quick_gelu(make_shards):
    args = make_shards.parse_args(["--root", "celeba", "--out", "shards"])
    assert (args.clip_model, args.clip_pretrained) == (clip.DEFAULT_MODEL, clip.DEFAULT_PRETRAINED)
    assert clip.builds_quick_gelu(args.clip_model, args.clip_pretrained)


def test_manifest_records_a_quick_gelu_model(odd_root, tmp_path, tiny_quick_gelu):
    manifest = shards.write_shards(odd_root, tmp_path, **TINY | {"clip_model": str(tiny_quick_gelu)})
    assert manifest["clip"]["quick_gelu"] is True and manifest["clip"]["model"] == str(tiny_quick_gelu)


def test_no_tokens(odd_root, tmp_path):
    manifest = shards.write_shards(odd_root, tmp_path, **TINY, tokens=False)
    assert manifest["clip"]["token_dim"] is None and manifest["empty_prompt"]["tokens"] is None
    with tarfile.open(tmp_path / "test" / "test-000000.tar") as tar:
        names = tar.getnames()
    assert names and not [n for n in names if n.endswith(".clip_tokens.npy")]


# ---- odd source images

def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def odd_root(tmp_path_factory):
    """Eight synthetic images, six of them replaced by the odd kinds real datasets contain."""
    root = synthetic.make(tmp_path_factory.mktemp("odd"), num=8, seed=1, workers=1, progress=False)
    img = root / celeba.IMAGE_DIR
    face = Image.open(img / "000001.jpg").convert("RGB")
    (img / "000001.jpg").write_bytes(_save(face.convert("L"), "JPEG"))
    (img / "000002.jpg").write_bytes(_save(face.convert("CMYK"), "JPEG"))
    (img / "000003.jpg").write_bytes(_save(face.convert("P"), "PNG"))  # palette image under a .jpg name
    (img / "000004.jpg").write_bytes((img / "000004.jpg").read_bytes()[:2000])
    (img / "000005.jpg").unlink()
    (img / "000006.jpg").write_bytes(b"not an image at all")
    return root


@pytest.mark.parametrize("name, mode", [("000001.jpg", "L"), ("000002.jpg", "CMYK"), ("000003.jpg", "P")])
def test_grayscale_cmyk_and_palette_become_rgb_squares(odd_root, name, mode):
    source = Image.open(odd_root / celeba.IMAGE_DIR / name)
    assert source.mode == mode
    prepared = shards.PrepareImage(odd_root / celeba.IMAGE_DIR, 64, clip.load("tiny", "none").preprocess)(name)
    assert prepared.skipped is None
    crop = Image.open(io.BytesIO(prepared.jpg))
    assert crop.mode == "RGB" and crop.size == (178, 178)
    small = np.load(io.BytesIO(prepared.img_npy))
    assert small.shape == (64, 64, 3) and small.dtype == np.uint8 and small.std() > 10
    assert prepared.pixels.shape == (3, 32, 32)


def test_square_crop_is_centred():
    img = Image.new("RGB", (10, 20))
    img.paste((255, 0, 0), (0, 5, 10, 15))
    crop = shards.square_crop(img)
    assert crop.size == (10, 10) and np.all(np.asarray(crop) == (255, 0, 0))


def test_bad_images_are_skipped_counted_and_listed(odd_root, tmp_path, make_shards, capsys):
    args = ["--root", str(odd_root), "--out", str(tmp_path), "--clip-model", "tiny", "--clip-pretrained", "none",
            "--samples-per-shard", "4", "--workers", "0", "--no-progress"]
    assert make_shards.main(args) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    reasons = {s["file"]: s["reason"] for s in manifest["skipped"]}
    assert list(reasons) == ["000004.jpg", "000005.jpg", "000006.jpg"]
    assert reasons["000004.jpg"].startswith("undecodable") and "truncated" in reasons["000004.jpg"]
    assert reasons["000005.jpg"] == "missing" and reasons["000006.jpg"].startswith("undecodable")
    assert manifest["count"] == 5 and manifest["splits"]["train"]["count"] == 3
    assert [s["count"] for s in manifest["splits"]["train"]["shards"]] == [3, 0]
    out = capsys.readouterr().out
    assert "skipped 3" in out and all(f"skipped {f}: {r}" in out for f, r in reasons.items())


# ---- resuming on another device

def _set_empty_prompt(out, change) -> None:
    """Rewrite the empty prompt that the interrupted run's task file recorded, as another device would have."""
    task_file = next((out / shards.TASK_DIR).glob("task-*.json"))
    progress = json.loads(task_file.read_text())
    progress["header"]["empty_prompt"] = change(progress["header"]["empty_prompt"])
    task_file.write_text(json.dumps(progress))


def test_resume_accepts_float_noise_in_the_empty_prompt(odd_root, tmp_path):
    """CPU and CUDA kernels round differently: a few float16 steps apart, the same weights."""
    shards.write_shards(odd_root, tmp_path, **TINY)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.rglob("*.tar")}
    rng = np.random.default_rng(0)

    def noisy(values):
        a = np.asarray(values)
        return (a * (1 + rng.uniform(-2e-3, 2e-3, a.shape))).astype(np.float16).astype(float).tolist()
    _set_empty_prompt(tmp_path, lambda e: {k: noisy(v) for k, v in e.items()})
    shards.write_shards(odd_root, tmp_path, **TINY, resume=True)
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.rglob("*.tar")} == before


def test_resume_refuses_an_empty_prompt_from_other_weights(odd_root, tmp_path, make_shards, capsys):
    args = ["--root", str(odd_root), "--out", str(tmp_path / "out"), "--clip-model", "tiny", "--clip-pretrained",
            "none", "--samples-per-shard", "4", "--workers", "0", "--no-progress"]
    assert make_shards.main(args) == 0
    other = tmp_path / "other.pt"
    torch.save({k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                for k, v in clip.load("tiny", "none").model.state_dict().items()}, other)
    text, tokens = clip.load("tiny", str(other)).encode_prompts([""])
    _set_empty_prompt(tmp_path / "out", lambda e: {"clip_text": text[0].tolist(), "tokens": tokens[0].tolist()})
    capsys.readouterr()
    assert make_shards.main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'empty_prompt.clip_text' differs from the interrupted run" in err


# ---- a killed run

@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_run(celeba_root, shards_dir, tmp_path, repo, python, procs):
    out = tmp_path / "killed"
    cmd = [python, str(repo / "tools" / "make_shards.py"), "--root", str(celeba_root), "--out", str(out),
           "--clip-model", "tiny", "--clip-pretrained", "none", "--samples-per-shard", "8", "--workers", "0",
           "--clip-batch-size", "16", "--no-progress"]
    proc = procs.start(cmd)
    deadline = time.monotonic() + 120
    while not list(out.glob("train/*.tar")) and time.monotonic() < deadline and proc.returncode is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (out / "manifest.json").exists()
    finished = list(out.glob("*/*.tar"))
    assert 1 <= len(finished) < 7
    for path in finished:  # a shard under its final name is complete
        with tarfile.open(path) as tar:
            assert len(tar.getnames()) == 8 * len(MEMBERS)
    assert subprocess.run(cmd, capture_output=True).returncode == 2  # refused without --resume
    assert subprocess.run(cmd + ["--resume"], capture_output=True).returncode == 0
    assert not list(out.rglob(".*.tmp"))
    assert files_of(out) == files_of(shards_dir)


def test_bad_flags_are_one_clear_error(celeba_root, tmp_path):
    with pytest.raises(shards.ShardError, match=r"samples_per_shard must be positive, got 0; task_index must be "
                                                r"in \[0, num_tasks\), got 2 of 2"):
        shards.write_shards(celeba_root, tmp_path, **TINY | {"samples_per_shard": 0}, num_tasks=2, task_index=2)
