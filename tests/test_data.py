import io
import json
import re
import subprocess
import threading
import time

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import float_batch, rewrite_tar

from ddpdiff import shards
from ddpdiff.data import DataError, Loader, load_manifest, read_samples, split_attributes, verify_shards
from ddpdiff.data.batch import to_float

# `shards_dir` (conftest) holds 48 images at 8 per shard: 39 train samples in shards of 8, 8, 8, 8 and 7.


def _reference(shards_dir, split="train") -> dict:
    """Every sample of a split decoded by webdataset and numpy, independently of ddpdiff.data."""
    out = {}
    for entry in load_manifest(shards_dir)["splits"][split]["shards"]:
        for s in wds.WebDataset(str(shards_dir / entry["path"]), shardshuffle=False, empty_check=False):
            out[s["__key__"]] = {k: np.load(io.BytesIO(v), allow_pickle=False) if k.endswith(".npy") else v
                                 for k, v in s.items()}
    return out


@pytest.fixture(scope="module")
def train_keys(shards_dir) -> list[str]:
    return sorted(_reference(shards_dir))


@pytest.fixture(scope="module")
def no_token_shards(celeba_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards_no_tokens")
    shards.write_shards(celeba_root, out, clip_model="tiny", clip_pretrained="none", samples_per_shard=8,
                        workers=0, clip_batch_size=16, tokens=False, progress=False)
    return out


def _keys(loader, epoch, start=0) -> list[list[str]]:
    return [b["key"] for b in loader.epoch(epoch, start)]


def _equal(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _assert_same(a: list[dict], b: list[dict]):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert _equal(x[k], y[k]), k


@pytest.mark.parametrize("world_size,batch_size", [(1, 4), (2, 4), (3, 13), (4, 3), (5, 2), (7, 5)])
def test_epoch_visits_each_sample_once_with_equal_batches_per_rank(shards_dir, train_keys, world_size, batch_size):
    loaders = [Loader(shards_dir, batch_size=batch_size, rank=r, world_size=world_size, workers=0)
               for r in range(world_size)]
    per_rank = [_keys(loader, epoch=3) for loader in loaders]
    expected_batches = len(train_keys) // (world_size * batch_size)
    assert {loader.batches_per_epoch for loader in loaders} == {expected_batches}
    assert all(len(batches) == expected_batches for batches in per_rank)
    assert all(len(b) == batch_size for batches in per_rank for b in batches)
    seen = [k for batches in per_rank for b in batches for k in b]
    assert len(seen) == len(set(seen)) == expected_batches * world_size * batch_size
    assert set(seen) <= set(train_keys)
    assert len(train_keys) - len(seen) < world_size * batch_size  # only the remainder is dropped


def test_workers_give_the_same_batches_with_more_ranks_times_workers_than_shards(shards_dir, train_keys):
    world_size = 3  # 3 ranks x 2 workers > 5 shards
    seen = []
    for rank in range(world_size):
        kw = dict(batch_size=1, rank=rank, world_size=world_size, seed=5)
        with_workers = Loader(shards_dir, workers=2, **kw)
        batches = list(with_workers.epoch(1))
        _assert_same(batches, list(Loader(shards_dir, workers=0, **kw).epoch(1)))
        _assert_same(list(with_workers.epoch(1, start=2)), batches[2:])  # the persistent workers start again
        seen += [k for b in batches for k in b["key"]]
    assert sorted(seen) == train_keys  # 39 = 3 ranks x 13 batches of 1: nothing dropped


def test_order_depends_only_on_seed_and_epoch(shards_dir):
    a, b = (Loader(shards_dir, batch_size=4, seed=7, workers=0) for _ in range(2))
    assert _keys(a, 0) == _keys(b, 0)
    assert _keys(a, 0) != _keys(a, 1)
    assert _keys(a, 0) != _keys(Loader(shards_dir, batch_size=4, seed=8, workers=0), 0)


@pytest.mark.parametrize("start", [0, 1, 5, 9])
def test_start_gives_the_tail_of_the_epoch(shards_dir, start):
    loader = Loader(shards_dir, batch_size=4, workers=0)
    assert loader.batches_per_epoch == 9
    _assert_same(list(loader.epoch(2, start=start)), list(loader.epoch(2))[start:])


def test_batch_matches_the_shards(shards_dir):
    ref = _reference(shards_dir)
    manifest = load_manifest(shards_dir)
    batch = next(Loader(shards_dir, batch_size=6, workers=0).epoch(0))
    dim, token_dim = manifest["clip"]["dim"], manifest["clip"]["token_dim"]
    lengths = [len(ref[k]["clip_tokens.npy"]) for k in batch["key"]]
    assert batch["image"].shape == (6, 3, 64, 64) and batch["image"].dtype == torch.uint8
    assert batch["clip_text"].shape == batch["clip_image"].shape == (6, dim)
    assert batch["clip_text"].dtype == batch["clip_image"].dtype == torch.float16
    assert batch["tokens"].shape == (6, max(lengths), token_dim) and batch["tokens"].dtype == torch.float16
    assert batch["token_mask"].dtype == torch.bool and batch["attrs"].shape == (6, 40)
    assert len(set(lengths)) > 1  # so the padding below is exercised
    for i, key in enumerate(batch["key"]):
        r = ref[key]
        assert torch.equal(batch["image"][i], torch.from_numpy(r["img.npy"]).permute(2, 0, 1))
        for name in ("clip_text", "clip_image"):
            assert torch.equal(batch[name][i], torch.from_numpy(r[f"{name}.npy"]))
        n = lengths[i]
        assert batch["token_mask"][i].tolist() == [True] * n + [False] * (max(lengths) - n)
        assert torch.equal(batch["tokens"][i, :n], torch.from_numpy(r["clip_tokens.npy"]))
        assert not batch["tokens"][i, n:].any()
        attrs = json.loads(r["json"])["attrs"]
        assert batch["attrs"][i].tolist() == [attrs[a] for a in manifest["attributes"]]
        assert batch["prompt"][i] == r["txt"].decode()


def test_to_float_gives_the_host_conversion_bit_for_bit_wherever_it_runs(shards_dir):
    levels = torch.arange(256, dtype=torch.uint8)
    want = torch.from_numpy(np.arange(256, dtype=np.float32) / np.float32(127.5) - np.float32(1))
    batch = next(Loader(shards_dir, batch_size=5, workers=0).epoch(0))
    old = float_batch(batch)
    for device in ["cpu"] + ["cuda"] * torch.cuda.is_available():
        assert torch.equal(to_float(levels, device).cpu(), want)  # every pixel level, as numpy divides
        for k in ("image", "clip_text", "clip_image", "tokens"):
            got = to_float(batch[k], device)
            assert got.dtype == torch.float32 and got.device.type == device and torch.equal(got.cpu(), old[k])
    assert old["image"].min() >= -1 and old["image"].max() <= 1
    assert to_float(old["image"]) is old["image"]  # float32 (a generated image, an SR pair) passes as it is
    compact = sum(v.nbytes for v in batch.values() if isinstance(v, torch.Tensor))
    assert compact * 2 < sum(v.nbytes for v in old.values() if isinstance(v, torch.Tensor))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_pin_memory_pins_every_tensor_with_and_without_workers(shards_dir):
    for workers in (0, 2):
        batch = next(Loader(shards_dir, batch_size=4, workers=workers, pin_memory=True).epoch(0))
        assert all(v.is_pinned() for v in batch.values() if isinstance(v, torch.Tensor))


def test_manifest_without_token_states_means_no_tokens(shards_copy):
    path = shards_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["clip"]["token_dim"] = None
    path.write_text(json.dumps(manifest))
    batch = next(Loader(shards_copy, batch_size=4, workers=0).epoch(0))
    assert "tokens" not in batch and "token_mask" not in batch and batch["image"].shape == (4, 3, 64, 64)
    with pytest.raises(DataError, match=r"manifest\.json: clip\.token_dim is null"):
        Loader(shards_copy, batch_size=4, tokens=True)
    with pytest.raises(DataError, match="token_dim is null"):
        read_samples(shards_copy, tokens=True)


@pytest.mark.slow
def test_shards_written_without_tokens(no_token_shards):
    batch = next(Loader(no_token_shards, batch_size=4, workers=0).epoch(0))
    assert "tokens" not in batch and "token_mask" not in batch
    assert batch["image"].shape == (4, 3, 64, 64)
    with pytest.raises(DataError, match=r"manifest\.json: clip\.token_dim is null"):
        Loader(no_token_shards, batch_size=4, tokens=True)


def test_tokens_false_skips_them(shards_dir):
    batch = read_samples(shards_dir, split="train", n=2, tokens=False)
    assert "tokens" not in batch and "token_mask" not in batch


def test_read_samples_is_the_first_n_in_key_order_with_extras(shards_dir):
    ref = _reference(shards_dir, "val")
    batch = read_samples(shards_dir, split="val", n=3, extra=("jpg",))
    assert batch["key"] == sorted(ref)[:3]
    assert batch["image"].shape[0] == 3 and batch["tokens"].shape[0] == 3
    jpg = batch["jpg"][0]
    assert isinstance(batch["jpg"], list) and jpg.dtype == np.uint8 and jpg.ndim == 3 and jpg.shape[2] == 3
    assert jpg.shape[0] == jpg.shape[1] > 64  # the native-resolution square crop
    with pytest.raises(DataError, match="n=1000"):
        read_samples(shards_dir, split="val", n=1000)


def test_chosen_rows_and_the_attributes_of_a_whole_split(shards_dir):
    """`split_attributes` reads every sample's attributes from the index; `rows` reads those samples, in order."""
    whole = read_samples(shards_dir, split="val", n=len(_reference(shards_dir, "val")))
    attrs = split_attributes(shards_dir, "val")
    assert attrs.dtype == np.uint8 and np.array_equal(attrs, whole["attrs"].numpy())
    chosen = read_samples(shards_dir, split="val", rows=[3, 0, 3])
    assert chosen["key"] == [whole["key"][i] for i in (3, 0, 3)]
    assert torch.equal(chosen["image"], whole["image"][[3, 0, 3]])
    for rows in ([], [len(attrs)], [-1]):
        with pytest.raises(DataError, match="read_samples: rows must be 0.."):
            read_samples(shards_dir, split="val", rows=rows)


def _patch(sample: dict, rng: np.random.Generator) -> dict:
    """A random 16x16 patch of the full-resolution crop, as a super-resolution trainer would cut."""
    jpg = sample.pop("jpg")
    y, x = rng.integers(0, jpg.shape[0] - 16, size=2)
    return {**sample, "patch": np.ascontiguousarray(jpg[y:y + 16, x:x + 16]), "draw": np.float32(rng.random())}


def test_map_sample_is_deterministic_per_sample_whatever_the_workers(shards_dir):
    kw = dict(batch_size=4, extra=("jpg",), map_sample=_patch, seed=3)
    single = list(Loader(shards_dir, workers=0, **kw).epoch(1))
    _assert_same(list(Loader(shards_dir, workers=2, **kw).epoch(1)), single)
    batch = single[0]
    assert batch["patch"].shape == (4, 16, 16, 3) and batch["patch"].dtype == torch.uint8
    assert batch["image"].shape == (4, 3, 64, 64) and batch["tokens"].dtype == torch.float16
    assert "jpg" not in batch and len(set(batch["draw"].tolist())) == 4
    draws, other_epoch = ({k: d for b in batches for k, d in zip(b["key"], b["draw"].tolist())}
                          for batches in (single, Loader(shards_dir, workers=0, **kw).epoch(2)))
    assert all(draws[k] != other_epoch[k] for k in draws.keys() & other_epoch.keys())


def test_split_smaller_than_a_global_batch_gives_no_batches(shards_dir):
    loader = Loader(shards_dir, batch_size=20, world_size=2, workers=0)
    assert loader.batches_per_epoch == 0 and list(loader.epoch(0)) == []


def test_bad_arguments_are_reported_together(shards_dir):
    with pytest.raises(DataError, match=r"global_batch must be >= world_size \(2\), got 0; rank must be in \[0, "):
        Loader(shards_dir, batch_size=0, rank=2, world_size=2)
    with pytest.raises(DataError, match="exactly one of batch_size"):
        Loader(shards_dir, batch_size=2, global_batch=4)
    loader = Loader(shards_dir, batch_size=4, workers=0)
    with pytest.raises(DataError, match=r"start 10 in \[0, 9\]"):
        loader.epoch(0, start=10)
    with pytest.raises(DataError, match="no split 'dev'"):
        Loader(shards_dir, split="dev", batch_size=4)
    with pytest.raises(DataError, match="no decoder for bin"):
        Loader(shards_dir, batch_size=4, extra=("bin",))


def test_missing_or_invalid_manifest(tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path}/manifest\.json: not found"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"manifest\.json: not readable as JSON"):
        Loader(tmp_path, batch_size=1)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "ddpdiff-shards", "image_size": 0}))
    with pytest.raises(DataError, match=r"manifest\.json: image_size: expected a positive int; attributes"):
        load_manifest(tmp_path)


def test_truncated_shards_are_counted_and_named_in_one_line(shards_copy):
    for name, size in [("train-000002.tar", 20_000), ("train-000004.tar", 70_001)]:  # cut in a member, a header
        tar = shards_copy / "train" / name
        tar.write_bytes(tar.read_bytes()[:size])
    with pytest.raises(DataError) as e:
        Loader(shards_copy, batch_size=4)
    message = str(e.value)
    assert "\n" not in message and message.startswith("2 of 5 shards of split 'train' are unusable: ")
    assert f"{shards_copy}/train/train-000002.tar: truncated: 20000 bytes, but member " in message
    assert f"{shards_copy}/train/train-000004.tar: truncated: 70001 bytes" in message


def test_count_mismatch_and_wrong_array_shape_name_the_file(shards_copy):
    path = shards_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    good = path.read_text()
    manifest["splits"]["train"]["shards"][1]["count"] += 1
    manifest["splits"]["train"]["count"] += 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"train-000001\.tar: 8 samples, but manifest\.json says 9"):
        Loader(shards_copy, batch_size=4)
    path.write_text(good.replace('"image_size": 64', '"image_size": 32'))
    shape = r"array \|u1 \(64, 64, 3\), expected \|u1 \[32x32x3\]"
    with pytest.raises(DataError, match=r"train-000000\.tar: 000001\.img\.npy: " + shape):
        Loader(shards_copy, batch_size=4)


@pytest.mark.slow
def test_bench_runs(shards_dir, python, repo):
    out = subprocess.run([python, "tools/bench_data.py", "--shards", str(shards_dir), "--batch-size", "4",
                          "--epochs", "1", "--workers", "0", "2"], cwd=repo, capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert rows[0]["token_dim"] and [r["workers"] for r in rows[1:]] == [0, 2]
    assert all(r["samples_per_cpu_s"] > 0 for r in rows[1:])


@pytest.mark.parametrize("global_batch, world", [(7, 3), (10, 4), (5, 5)])
def test_a_global_batch_that_does_not_divide_by_the_world_is_shared_exactly(shards_dir, global_batch, world):
    from ddpdiff.data import share

    sizes = [share(global_batch, world, r)[1] for r in range(world)]
    assert sum(sizes) == global_batch and max(sizes) - min(sizes) <= 1
    loaders = [Loader(shards_dir, global_batch=global_batch, rank=r, world_size=world, workers=0)
               for r in range(world)]
    assert len({ld.batches_per_epoch for ld in loaders}) == 1
    orders = [ld.order(0) for ld in loaders]
    assert [o.shape[1] for o in orders] == sizes
    seen = np.concatenate([o.reshape(-1) for o in orders])
    assert len(seen) == len(set(seen.tolist())) == loaders[0].batches_per_epoch * global_batch


# ---- faults: paths, damaged shards and unusable samples

@pytest.mark.parametrize("path", ["/etc/train-000003.tar", "../elsewhere/train-000003.tar",
                                  "train/../../train-000003.tar", "C:/train-000003.tar"])
def test_manifest_paths_outside_the_shard_folder_are_refused(shards_copy, path):
    manifest = json.loads((shards_copy / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][3]["path"] = path
    (shards_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"manifest\.json: splits\.train\.shards\[3\]\.path: expected a relative path "
                                        r"inside the shard folder") as e:
        load_manifest(shards_copy)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"splits\.train\.shards\[3\]\.path"):
        Loader(shards_copy, batch_size=4)


@pytest.mark.parametrize("rename", ["../{}", "/tmp/{}", "sub/{}", "{}/..", ".{}"])
def test_member_names_that_are_not_key_ext_refuse_the_shard(shards_copy, rename):
    shard = shards_copy / "train" / "train-000001.tar"
    victim = None

    def change(name, data):
        nonlocal victim
        victim = victim or name.split(".")[0]
        return (rename.format(name) if name.startswith(victim + ".") else name), data
    rewrite_tar(shard, change)
    first = re.escape(rename.format(f"{victim}.jpg"))
    with pytest.raises(DataError, match=rf"train-000001\.tar: member '{first}' is not KEY\.EXT with a plain key"):
        Loader(shards_copy, batch_size=4, workers=0)


def test_shards_are_checked_against_their_sha256_only_when_asked(shards_copy):
    flipped = shards_copy / "train" / "train-000001.tar"
    data = bytearray(flipped.read_bytes())
    data[3000] ^= 0xFF  # inside the first JPEG: the same size, and the scan cannot notice
    flipped.write_bytes(bytes(data))
    (shards_copy / "val" / "val-000000.tar").unlink()
    assert verify_shards(shards_copy, ("train",)) == [
        f"{flipped}: sha256 {__import__('hashlib').sha256(data).hexdigest()[:16]}... of its {len(data)} bytes, "
        f"but manifest.json says {load_manifest(shards_copy)['splits']['train']['shards'][1]['sha256'][:16]}... "
        "(damaged or replaced)"]
    assert [line.split(":")[0] for line in verify_shards(shards_copy)] == [str(flipped),
                                                                           str(shards_copy / "val/val-000000.tar")]
    assert Loader(shards_copy, batch_size=4, workers=0).batches_per_epoch == 9  # the default reads no more
    with pytest.raises(DataError, match=rf"^{flipped}: sha256 [0-9a-f]{{16}}\.\.\. of its"):
        Loader(shards_copy, batch_size=4, workers=0, verify=True)
    with pytest.raises(DataError, match=r"val-000000\.tar: cannot read: No such file"):
        read_samples(shards_copy, "val", n=2, verify=True)


def _substituted(order: np.ndarray, keys: list[str], bad: set[str]) -> list[list[str]]:
    """The keys of each batch under the documented rule: an unusable sample takes the next usable one's place."""
    out = []
    for row in order:
        names = [keys[i] for i in row]
        usable = [j for j, k in enumerate(names) if k not in bad]
        out.append([k if k not in bad else names[min(usable, key=lambda u: (u - j) % len(names))]
                    for j, k in enumerate(names)])
    return out


@pytest.mark.parametrize("global_batch, world", [(3, 1), (13, 2)])  # every one of the 39 samples is read
def test_unusable_samples_are_replaced_in_their_batch_counted_and_reported(damaged, train_keys, global_batch, world):
    shards_copy, lines = damaged
    reports = [[] for _ in range(world)]
    loaders = [Loader(shards_copy, global_batch=global_batch, rank=r, world_size=world, extra=("jpg",), workers=0,
                      seed=1, report=reports[r].append) for r in range(world)]
    assert [ld.bad for ld in loaders] == [[lines[train_keys[1]]]] * world  # the scan's find, on every rank
    seen = []
    for rank, (ld, report) in enumerate(zip(loaders, reports)):
        batches = list(ld.epoch(2))
        assert [b["key"] for b in batches] == _substituted(ld.order(2), train_keys, set(lines))
        assert all(b["image"].shape[0] == len(b["key"]) and torch.isfinite(b["clip_text"]).all() for b in batches)
        again = Loader(shards_copy, global_batch=global_batch, rank=rank, world_size=world, extra=("jpg",),
                       workers=0, seed=1, report=lambda line: None)
        _assert_same(list(again.epoch(2, start=1)), batches[1:])  # a restart reads the same
        seen += [train_keys[i] for i in ld.order(2).reshape(-1).tolist()]
        assert all(line.startswith(str(shards_copy)) and "replaced by another sample of its batch" in line
                   for line in report)
    assert sorted(seen) == train_keys  # the order is untouched: every sample has its place once, over the ranks
    met = [line for ld in loaders for line in ld.bad]
    assert len(set(met)) == len(lines)  # each found by the rank whose batch held it, the scan's by all
    assert all(any(line.startswith(expected) for line in met) for expected in lines.values())
    assert sum(len(r) for r in reports) == len(lines)  # each reported once: the scan's by rank 0 only


def test_more_unusable_samples_than_max_bad_stop_with_the_list(damaged):
    shards_copy, lines = damaged
    with pytest.raises(DataError, match=r"^1 unusable sample, more than max_bad=0: .*img\.npy: 12278 bytes"):
        Loader(shards_copy, batch_size=3, workers=0, max_bad=0)
    loader = Loader(shards_copy, batch_size=3, workers=0, extra=("jpg",), max_bad=3, report=lambda line: None)
    with pytest.raises(DataError) as e:
        list(loader.epoch(0))
    assert str(e.value).startswith("4 unusable samples, more than max_bad=3: ") and "\n" not in str(e.value)
    assert all(line in str(e.value) for line in lines.values())


def test_read_samples_replaces_unusable_ones_and_refuses_a_batch_of_them(shards_copy):
    first = sorted(_reference(shards_copy, "val"))[:2]
    rewrite_tar(shards_copy / "val" / "val-000000.tar",
             lambda name, data: (name, data[:-2] if name in {f"{k}.img.npy" for k in first} else data))
    reports = []
    batch = read_samples(shards_copy, "val", n=3, report=reports.append)
    assert batch["key"] == [batch["key"][2]] * 3 and len(reports) == 2
    with pytest.raises(DataError, match=r"every sample of a batch of 2 is unusable: .*val-000000\.tar: "):
        read_samples(shards_copy, "val", n=2, report=reports.append)


@pytest.mark.slow
def test_unusable_samples_are_replaced_alike_in_worker_processes(damaged):
    shards_copy, lines = damaged
    kw = dict(batch_size=3, extra=("jpg",), map_sample=_patch, seed=4, report=lambda line: None)
    single, pool = Loader(shards_copy, workers=0, **kw), Loader(shards_copy, workers=2, **kw)
    _assert_same(list(pool.epoch(0)), list(single.epoch(0)))
    assert sorted(pool.bad) == sorted(single.bad) and len(pool.bad) == len(lines)


def _hang(sample: dict, rng: np.random.Generator) -> dict:
    """A map_sample that never returns: a worker stuck as on a stalled filesystem."""
    threading.Event().wait()
    return sample


def test_a_hung_worker_fails_the_rank_within_timeout_s_with_one_line(shards_dir):
    loader = Loader(shards_dir, batch_size=2, workers=1, timeout_s=5, map_sample=_hang)
    started = time.monotonic()
    with pytest.raises(DataError) as e:
        next(loader.epoch(0))
    assert str(e.value) == ("no batch from the 1 loader worker(s) within timeout_s=5 s (data.timeout_s): a worker "
                            "hangs, e.g. reading a shard on a stalled filesystem")
    assert 5 <= time.monotonic() - started < 60
    with pytest.raises(DataError, match=r"^Loader: timeout_s must be >= 0, got -1$"):
        Loader(shards_dir, batch_size=2, workers=1, timeout_s=-1)
