"""Device choice, CPU budget and the refusal to fall back to the CPU silently (`ddpdiff.dist`)."""

import subprocess

import pytest
import torch

from ddpdiff import dist

from conftest import CONFIGS

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA is unusable")


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES", "LOCAL_RANK", "SLURM_CPUS_PER_TASK",
                 "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@no_cuda
def test_cpu_when_nothing_asks_for_gpus(clean_env):
    assert dist.expects_gpus() is None
    assert dist.pick_device("auto") == torch.device("cpu") == dist.pick_device("cpu")


@no_cuda
@pytest.mark.parametrize("name, value", [("CUDA_VISIBLE_DEVICES", "0,1"), ("SLURM_GPUS_ON_NODE", "8")])
def test_a_launch_that_expects_gpus_never_falls_back_to_the_cpu(clean_env, name, value):
    clean_env.setenv(name, value)
    assert dist.expects_gpus() == f"{name}={value}"
    with pytest.raises(dist.DeviceError) as e:
        dist.pick_device("auto")
    message = str(e.value)
    assert message.startswith(f"{name}={value} asks for GPUs, but CUDA is unusable: torch ")
    assert "download.pytorch.org/whl" in message and "--dist.device cpu" in message and "\n" not in message
    assert dist.pick_device("cpu") == torch.device("cpu")  # the explicit way out


@no_cuda
def test_asking_for_cuda_without_it_is_an_error(clean_env):
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "")  # hidden on purpose: expects nothing
    assert dist.expects_gpus() is None and dist.pick_device("auto").type == "cpu"
    with pytest.raises(dist.DeviceError, match=r"^dist.device=cuda asks for GPUs"):
        dist.pick_device("cuda")


@no_cuda
def test_the_trainer_exits_2_with_one_line(python, repo, shards_dir, tmp_path):
    cmd = [python, "-m", "ddpdiff.train", "--config", str(CONFIGS / "smoke.yaml"), "--data.shards", str(shards_dir),
           "--run.dir", str(tmp_path / "run"), "--dist.device", "auto"]  # smoke.yaml itself asks for the CPU
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("python -m ddpdiff.train: error: CUDA_VISIBLE_DEVICES=0 asks for GPUs")
    assert not (tmp_path / "run").exists()


def test_cpus_per_rank_follows_slurm_and_torchrun(clean_env):
    clean_env.setenv("SLURM_CPUS_PER_TASK", "32")
    assert dist.cpus_per_rank(8) == 32  # one SLURM task per rank (srun, submitit)
    clean_env.setenv("TORCHELASTIC_RUN_ID", "x")
    assert dist.cpus_per_rank(8) == 4  # torchrun's 8 ranks share the task's 32
    assert dist.cpus_per_rank(64) == 1
