"""Shared fixtures: small synthetic CelebA folders and shards, built once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# One thread per process: the suite starts several processes on a 2-core machine, and OpenMP threads that
# outnumber the cores spin-wait and run many times slower. Subprocesses inherit the variable.
os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "jobs" / "configs"


def load_tool(name: str):
    """A script in tools/ imported as a module (tools/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def overfit_losses(model, cond: dict, size: int, lr: float, steps: int) -> list[float]:
    """Diffusion losses while fitting one fixed batch (same t and noise every step), for the overfit tests."""
    import torch.nn.functional as F

    from ddpdiff.config import DiffusionConfig
    from ddpdiff.diffusion import Diffusion

    x0 = F.interpolate(torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1, size=size,
                       mode="bilinear")
    diff = Diffusion(DiffusionConfig(timesteps=100))
    drop = torch.tensor([True, False, False, False])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = diff.loss(lambda x_t, t: model(x_t, t, cond, drop), x0, generator=torch.Generator().manual_seed(0))[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="session")
def make_shards():
    return load_tool("make_shards")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def celeba_root(tmp_path_factory) -> Path:
    """A 48-image synthetic CelebA root in the official layout."""
    from ddpdiff import synthetic

    return synthetic.make(tmp_path_factory.mktemp("celeba"), num=48, seed=0, workers=1, progress=False)


@pytest.fixture(scope="session")
def shards_dir(celeba_root, tmp_path_factory) -> Path:
    """Shards of `celeba_root` with the tiny random CLIP and token states, 8 samples per shard."""
    from ddpdiff import shards

    out = tmp_path_factory.mktemp("shards")
    shards.write_shards(celeba_root, out, clip_model="tiny", clip_pretrained="none", samples_per_shard=8,
                        workers=0, clip_batch_size=16, progress=False)
    return out


@pytest.fixture(scope="session")
def diffusion_run(shards_dir, tmp_path_factory) -> Path:
    """A 2-step smoke diffusion run on `shards_dir`."""
    from ddpdiff import train

    out = tmp_path_factory.mktemp("diffusion")
    assert train.main(["--config", str(CONFIGS / "smoke.yaml"), "--data.shards", str(shards_dir),
                       "--run.dir", str(out), "--train.max_steps", "2"]) == 0
    return out


@pytest.fixture(scope="session")
def classifier_run(shards_dir, tmp_path_factory) -> Path:
    """A 4-step smoke attribute classifier on `shards_dir`."""
    from ddpdiff import train_classifier

    out = tmp_path_factory.mktemp("classifier")
    assert train_classifier.main(["--config", str(CONFIGS / "classifier_smoke.yaml"), "--data.shards",
                                  str(shards_dir), "--run.dir", str(out), "--classifier.eval_every_steps", "0"]) == 0
    return out


@pytest.fixture(scope="session")
def sr_run(shards_dir, tmp_path_factory) -> Path:
    """A 2-step x8 SRResNet run on `shards_dir`."""
    from ddpdiff import train_sr

    out = tmp_path_factory.mktemp("sr")
    assert train_sr.main(["--config", str(CONFIGS / "sr_smoke.yaml"), "--data.shards", str(shards_dir),
                          "--run.dir", str(out), "--train.max_steps", "2", "--sr.eval_every_steps", "0"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_quick_gelu(tmp_path_factory) -> Path:
    """The tiny CLIP config with "quick_gelu": true, as open_clip's -quickgelu configs have it."""
    import json

    from ddpdiff import clip

    path = tmp_path_factory.mktemp("clip") / "tiny-quickgelu.json"
    path.write_text(json.dumps(json.loads((clip.CONFIG_DIR / "tiny.json").read_text()) | {"quick_gelu": True}))
    return path
