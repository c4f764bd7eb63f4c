"""Cluster launch on a real two-node SLURM cluster (tools/slurm_cluster.py): sbatch, preemption, submitit.

Nodes n1 and n2 each have two fake GPUs; the ranks train on the CPU with gloo. Every job is submitted from its
own temporary directory, so logs/ and runs/ never touch the repository.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, REPO

pytestmark = pytest.mark.slow

SMOKE = str(CONFIGS / "smoke.yaml")
TRAIN_SH = str(REPO / "slurm" / "train.sh")
SUBMIT = str(REPO / "jobs" / "submit.py")
# Long enough that a signal sent at step 2 lands well before the end, short enough for a CPU.
STEPS = 16
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

_spec = importlib.util.spec_from_file_location("slurm_cluster", REPO / "tools" / "slurm_cluster.py")
slurm_cluster = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(slurm_cluster)


@pytest.fixture(scope="module")
def cluster():
    """The environment for SLURM commands; starts the cluster (or reuses a running one) and stops it at the end."""
    reason = slurm_cluster.unavailable_reason()
    if reason:
        if os.environ.get("CI") and os.geteuid() == 0:
            pytest.fail(f"CI must run the SLURM tests (.ci/run installs the packages): {reason}")
        pytest.skip(f"SLURM test cluster cannot start here: {reason}")
    conf = slurm_cluster.start()
    env = {**os.environ, "SLURM_CONF": str(conf),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    yield env
    slurm_cluster.stop()


def _sbatch(env, cwd: Path, *args) -> str:
    (cwd / "logs").mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["sbatch", "--parsable", *map(str, args)], env=env, cwd=cwd,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def _job(env, job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        return {}
    return dict(field.split("=", 1) for field in out.stdout.split() if "=" in field)


def _wait(env, job_id: str, log: Path, timeout_s: float = 180) -> dict[str, str]:
    """The job's final scontrol record, once it has ended for good (a requeued job starts again first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = _job(env, job_id)
        if not info:
            pytest.fail(f"job {job_id} left the queue unseen\n{_read(log)}")
        if info["JobState"] in DONE:
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], env=env)
    pytest.fail(f"job {job_id} still {info['JobState']} after {timeout_s:.0f}s\n{_read(log)}")


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"(no {path})"


def _wait_for_line(path: Path, prefix: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(line.startswith(prefix) for line in _read(path).splitlines()):
            return
        time.sleep(0.2)
    pytest.fail(f"no line starting {prefix!r} in {path} after {timeout_s:.0f}s\n{_read(path)}")


def _final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    newest = sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1]
    state = torch.load(newest, weights_only=True)
    assert state["step"] == STEPS, newest
    return state["model"]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"parameters differ from the uninterrupted run: {different[:5]}"


def _train_args(shards: Path, *extra) -> list[str]:
    return ["--config", SMOKE, "--data.shards", shards, "--train.max_steps", STEPS, "--log.every_steps", 1, *extra]


# --- the cluster itself -------------------------------------------------------------------------------------

def test_two_node_job_sees_both_nodes_and_its_gpus(cluster, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n"
                      "srun bash -c 'echo \"task $SLURM_PROCID on $SLURMD_NODENAME gpus=$SLURM_GPUS_ON_NODE "
                      "cuda=$CUDA_VISIBLE_DEVICES\"'\n")
    job = _sbatch(cluster, tmp_path, "--nodes=2", "--gpus-per-node=2", "--ntasks-per-node=1",
                  "--output=logs/%j.out", script)
    log = tmp_path / "logs" / f"{job}.out"
    info = _wait(cluster, job, log)
    assert info["JobState"] == "COMPLETED", _read(log)
    lines = sorted(line for line in _read(log).splitlines() if line.startswith("task"))
    assert lines == ["task 0 on n1 gpus=2 cuda=0,1", "task 1 on n2 gpus=2 cuda=0,1"], _read(log)
    # Starting a running cluster again changes nothing.
    slurm_cluster.start()
    assert slurm_cluster.is_running()


def test_usr1_reaches_the_batch_trap_and_requeue_increments_restart_count(cluster, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\n"
                      "echo \"start restarts=${SLURM_RESTART_COUNT:-0}\"\n"
                      "[ \"${SLURM_RESTART_COUNT:-0}\" -ge 1 ] && exit 0\n"
                      "trap 'echo trapped USR1; scontrol requeue $SLURM_JOB_ID; exit 0' USR1\n"
                      "echo waiting\n"
                      "while true; do sleep 0.2; done\n")
    job = _sbatch(cluster, tmp_path, "--requeue", "--open-mode=append", "--output=logs/%j.out", script)
    log = tmp_path / "logs" / f"{job}.out"
    _wait_for_line(log, "waiting")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster, check=True)
    info = _wait(cluster, job, log)
    text = _read(log)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, text
    assert "trapped USR1" in text and "start restarts=1" in text, text


# --- slurm/train.sh -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(cluster, shards_dir, tmp_path_factory) -> tuple[dict, Path]:
    """An uninterrupted 2-node x 2-GPU train.sh run: its final scontrol record and log."""
    cwd = tmp_path_factory.mktemp("reference")
    job = _sbatch(cluster, cwd, "--nodes=2", "--gpus-per-node=2", TRAIN_SH, *_train_args(shards_dir))
    log = cwd / "logs" / f"ddpdiff-train-{job}.out"
    info = _wait(cluster, job, log)
    return info, log


def test_train_sh_runs_four_ranks_on_two_nodes_to_completion(reference):
    info, log = reference
    text = _read(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "0", text
    assert "world_size=4 ranks_per_node=2" in text and f"done: {STEPS} steps" in text, text
    # No --run.dir given: the run directory is named after the job.
    run_dir = log.parents[1] / "runs" / f"slurm-{info['JobId']}"
    assert _final_model(run_dir)


def test_usr1_checkpoints_requeues_and_resumes_to_the_uninterrupted_result(cluster, shards_dir, reference, tmp_path):
    job = _sbatch(cluster, tmp_path, "--nodes=2", "--gpus-per-node=2", TRAIN_SH,
                  *_train_args(shards_dir, "--run.dir", tmp_path / "run"))
    log = tmp_path / "logs" / f"ddpdiff-train-{job}.out"
    _wait_for_line(log, "step 2 ")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster, check=True)
    info = _wait(cluster, job, log)
    text = _read(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and int(info["Restarts"]) >= 1, text
    assert "stopped by signal SIGTERM" in text and "requeueing job" in text, text
    assert "SLURM_RESTART_COUNT=1" in text and "resumed from" in text, text
    run_ref = reference[1].parents[1] / "runs" / f"slurm-{reference[0]['JobId']}"
    _assert_same(_final_model(tmp_path / "run"), _final_model(run_ref))


def test_a_job_whose_training_raises_fails_visibly_and_is_not_requeued(cluster, shards_dir, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")  # rank 0 cannot create its run directory under a file
    job = _sbatch(cluster, tmp_path, "--nodes=2", "--gpus-per-node=2", TRAIN_SH,
                  *_train_args(shards_dir, "--run.dir", blocker / "run"))
    log = tmp_path / "logs" / f"ddpdiff-train-{job}.out"
    info = _wait(cluster, job, log)
    text = _read(log)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0" and info["Restarts"] == "0", text
    assert "NotADirectoryError" in text or "FileExistsError" in text, text


# --- jobs/submit.py -----------------------------------------------------------------------------------------

def test_submitit_wait_survives_a_timeout_signal_and_matches_the_uninterrupted_run(
        cluster, shards_dir, reference, tmp_path):
    cmd = [sys.executable, SUBMIT, "--nodes", "2", "--gpus-per-node", "2", "--cpus-per-task", "2",
           "--partition", "debug", "--time", "10", "--wait",
           *map(str, _train_args(shards_dir, "--run.dir", tmp_path / "run"))]
    proc = subprocess.Popen(cmd, env=cluster, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    first = proc.stdout.readline()
    job = first.split()[2].rstrip(";") if first.startswith("submitted job ") else None
    logs = tmp_path / "logs" / "submitit" / str(job)
    try:
        assert job, first
        _wait_for_line(logs / f"{job}_0_log.out", "step 2 ")
        # What SLURM sends before the time limit (submitit's --signal=USR2@...), sent now.
        subprocess.run(["scancel", "--signal=USR2", job], env=cluster, check=True)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            if job:
                subprocess.run(["scancel", job], env=cluster, capture_output=True)
    text = _read(logs / f"{job}_0_log.out") + _read(logs / f"{job}_0_log.err")
    assert proc.returncode == 0, first + out + text
    assert "stopped by signal SIGTERM" in text and f"Requeued job {job}" in text and "resumed from" in text, text
    run_ref = reference[1].parents[1] / "runs" / f"slurm-{reference[0]['JobId']}"
    _assert_same(_final_model(tmp_path / "run"), _final_model(run_ref))


def test_stop_ends_every_daemon_and_removes_the_state(cluster):
    state = slurm_cluster.DEFAULT_STATE
    pids = [slurm_cluster._pid(p) for p in slurm_cluster._pidfiles(state)]
    assert all(pids)
    slurm_cluster.stop()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not state.exists()
    assert slurm_cluster.HOSTS_MARK not in Path("/etc/hosts").read_text()
