"""SRResNet training (`ddpdiff.train_sr`): training pairs, the loop run, PSNR against bicubic, DDP."""

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ddpdiff import checkpoint, config, dist, train_sr
from ddpdiff.models import SRMeta
from ddpdiff.pipeline import load_network

from conftest import CONFIGS

SMOKE = str(CONFIGS / "sr_smoke.yaml")


def _args(shards, run_dir, *extra):
    return ["--config", SMOKE, "--data.shards", str(shards), "--run.dir", str(run_dir), *map(str, extra)]


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    return {e.step: e.value for e in events.Scalars(tag)}, events.Tags()


def test_pairs_are_a_patch_and_its_antialiased_bicubic_downsample():
    crop = np.random.default_rng(0).integers(0, 256, (90, 100, 3), dtype=np.uint8)
    hr, lr = train_sr.hr_lr(crop, 64, 8, np.random.default_rng(1))
    assert hr.shape == (3, 64, 64) and lr.shape == (3, 8, 8) and hr.dtype == lr.dtype == np.float32
    assert hr.min() >= -1 and hr.max() <= 1
    hr_pixels = Image.fromarray(np.round((hr.transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8))
    expected = np.asarray(hr_pixels.resize((8, 8), Image.Resampling.BICUBIC), np.float32) / 127.5 - 1
    np.testing.assert_allclose(lr, expected.transpose(2, 0, 1), atol=1e-6)
    assert not np.array_equal(hr, train_sr.hr_lr(crop, 64, 8, np.random.default_rng(2))[0])  # random place

    centre, _ = train_sr.hr_lr(crop, 64, 8)
    np.testing.assert_array_equal(centre, crop[13:77, 18:82].transpose(2, 0, 1) / np.float32(127.5) - 1)
    small, small_lr = train_sr.hr_lr(crop, 128, 4)  # resized up to fit
    assert small.shape == (3, 128, 128) and small_lr.shape == (3, 32, 32)


def test_smoke_run_logs_psnr_against_bicubic_and_checkpoints_the_network(shards_dir, tmp_path, capsys):
    run = tmp_path / "sr"
    assert train_sr.main(_args(shards_dir, run)) == 0
    out = capsys.readouterr().out
    assert "model=srresnet scale=8" in out and "psnr_sr=" in out and "psnr_bicubic=" in out
    state = checkpoint.load(checkpoint.resolve(run))
    assert state["meta"] == {"model": "srresnet", "scale": 8, "channels": 16, "num_blocks": 2}
    load_network(run, SRMeta)  # strict: the same network
    psnr_sr, tags = _scalars(run, "eval/psnr_sr")
    psnr_bicubic, _ = _scalars(run, "eval/psnr_bicubic")
    assert sorted(psnr_sr) == sorted(psnr_bicubic) == [0, 2, 4]
    assert len(set(psnr_bicubic.values())) == 1 and 5 < psnr_bicubic[0] < 60  # fixed crops, one baseline
    assert psnr_sr[4] != psnr_sr[0]
    assert {"train/loss", "train/psnr", "eval/psnr_gain"} <= set(tags["scalars"])
    assert "eval/bicubic_sr_hr" in tags["images"]


def test_config_problems_are_reported_together(shards_dir, tmp_path, capsys):
    assert train_sr.main(_args(shards_dir, tmp_path / "r", "--sr.hr_patch", 60, "--sr.eval_images", 99)) == 2
    err = capsys.readouterr().err.strip()
    assert "sr.hr_patch 60 is not a positive multiple of sr.scale 8" in err
    assert "sr.eval_images 99 is outside 1..4" in err and err.count("\n") == 0
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_training_beats_bicubic_on_the_val_split(shards_dir, tmp_path):
    run = tmp_path / "sr"
    assert train_sr.main(_args(shards_dir, run, "--sr.scale", 4, "--train.max_steps", 250, "--train.lr", 3e-3,
                               "--train.ema_decay", 0.9, "--sr.eval_every_steps", 250,
                               "--checkpoint.every_steps", 250)) == 0
    psnr_sr, _ = _scalars(run, "eval/psnr_sr")
    psnr_bicubic, _ = _scalars(run, "eval/psnr_bicubic")
    assert psnr_sr[0] < psnr_bicubic[0]
    assert psnr_sr[250] > psnr_bicubic[250] + 0.5


class _Recorder:
    """A Monitor that keeps the scalars it is given."""

    def __init__(self):
        self.values = {}

    def scalars(self, step, values, console=True):
        self.values.update(values)

    def images(self, *args, **kwargs):
        pass


@pytest.mark.slow
def test_two_rank_run_splits_evaluation_and_matches_one_process(shards_dir, tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(30500 + os.getpid() % 1000), "-m", "ddpdiff.train_sr", *_args(shards_dir, run)]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "world_size=2" in proc.stdout and proc.stdout.count("psnr_sr=") == 3  # rank 0 alone prints

    state, _ = checkpoint.load_latest(run)
    cfg = config.from_dict(state["config"], config.SRTrainerConfig)
    model, _, _ = load_network(run, SRMeta, "cpu")
    recorder = _Recorder()
    train_sr.SRTask(cfg, dist.Env()).evaluate(4, model, recorder)
    logged, _ = _scalars(run, "eval/psnr_sr")
    assert recorder.values["eval/psnr_sr"] == pytest.approx(logged[4], abs=1e-4)
