"""Cluster launch on a real two-node SLURM cluster (tools/slurm_cluster.py): sbatch, preemption, submitit.

Nodes n1 and n2 each have two fake GPUs; the ranks train on the CPU with gloo. Every job is submitted from its
own temporary directory, so logs/ and runs/ never touch the repository. Tests that start the cluster are slow; the
launcher's own checks (config, requeue decision) are not.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, REPO

SMOKE = str(CONFIGS / "smoke.yaml")
TRAIN_SH = str(REPO / "slurm" / "train.sh")
SUBMIT = str(REPO / "jobs" / "submit.py")
# Long enough that a signal sent at step 2 lands well before the end, short enough for a CPU.
STEPS = 16
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _script(path: Path):
    """A script (tools/, jobs/ are not packages) imported as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


slurm_cluster = _script(REPO / "tools" / "slurm_cluster.py")
submit = _script(REPO / "jobs" / "submit.py")


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


def _wait_for(path: Path, text: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in _read(path):
            return
        time.sleep(0.2)
    pytest.fail(f"no {text!r} in {path} after {timeout_s:.0f}s\n{_read(path)}")


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


def _complete_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:13]) for p in (run_dir / "checkpoints").glob("step_*.pt.sha256"))


# Imported by every Python process of a job when its directory is on PYTHONPATH: the first checkpoint save of
# the training sleeps SLOW_SAVE_S seconds first, like a large checkpoint on a slow file system.
SLOW_SAVE_HOOK = """\
import os, sys, time
if "ddpdiff.train" in sys.orig_argv:
    from ddpdiff import checkpoint
    save = checkpoint.save

    def slow_save(run_dir, *args, **kwargs):
        if not checkpoint.candidates(run_dir):
            print("slow save: sleeping", os.environ["SLOW_SAVE_S"], "s", flush=True)
            time.sleep(float(os.environ["SLOW_SAVE_S"]))
        return save(run_dir, *args, **kwargs)

    checkpoint.save = slow_save
"""


# --- the cluster itself -------------------------------------------------------------------------------------

@pytest.mark.slow
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


@pytest.mark.slow
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
    _wait_for(log, "waiting")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster, check=True)
    info = _wait(cluster, job, log)
    text = _read(log)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, text
    assert "trapped USR1" in text and "start restarts=1" in text, text


# --- slurm/train.sh -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(cluster, shards_dir, tmp_path_factory) -> tuple[dict, Path]:
    """An uninterrupted 2-node x 2-GPU train.sh run in the config's run directory: its final record and log."""
    cwd = tmp_path_factory.mktemp("reference")
    job = _sbatch(cluster, cwd, "--nodes=2", "--gpus-per-node=2", TRAIN_SH, *_train_args(shards_dir))
    log = cwd / "logs" / f"ddpdiff-train-{job}.out"
    info = _wait(cluster, job, log)
    return info, log


def _reference_run(reference) -> Path:
    return reference[1].parents[1] / "runs" / "smoke"  # smoke.yaml's run.dir, under the job's directory


@pytest.mark.slow
def test_train_sh_runs_four_ranks_on_two_nodes_to_completion(reference):
    info, log = reference
    text = _read(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "0", text
    assert "world_size=4 ranks_per_node=2" in text and f"done: {STEPS} steps" in text, text
    assert _final_model(_reference_run(reference))


@pytest.mark.slow
def test_a_second_sbatch_of_the_same_command_resumes_where_the_first_ended(cluster, shards_dir, reference):
    cwd = reference[1].parents[1]
    job = _sbatch(cluster, cwd, "--nodes=2", "--gpus-per-node=2", TRAIN_SH, *_train_args(shards_dir))
    log = cwd / "logs" / f"ddpdiff-train-{job}.out"
    info = _wait(cluster, job, log)
    text = _read(log)
    assert info["JobState"] == "COMPLETED", text
    assert f"resumed from runs/smoke/checkpoints/step_{STEPS:08d}.pt" in text and "step 1 " not in text, text


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes_to_the_uninterrupted_result(cluster, shards_dir, reference, tmp_path):
    job = _sbatch(cluster, tmp_path, "--nodes=2", "--gpus-per-node=2", TRAIN_SH,
                  *_train_args(shards_dir, "--run.dir", tmp_path / "run"))
    log = tmp_path / "logs" / f"ddpdiff-train-{job}.out"
    _wait_for(log, "step 2 ")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster, check=True)
    info = _wait(cluster, job, log)
    text = _read(log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and int(info["Restarts"]) >= 1, text
    assert "stopped by signal SIGTERM" in text and "requeueing job" in text, text
    assert "SLURM_RESTART_COUNT=1" in text and "resumed from" in text, text
    _assert_same(_final_model(tmp_path / "run"), _final_model(_reference_run(reference)))


@pytest.mark.slow
def test_usr1_without_a_newer_checkpoint_is_not_requeued(cluster, shards_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("")  # the stop's save fails: nothing newer than at the start
    job = _sbatch(cluster, tmp_path, "--nodes=1", "--gpus-per-node=1", TRAIN_SH,
                  *_train_args(shards_dir, "--run.dir", run, "--checkpoint.every_steps", 1000))
    log = tmp_path / "logs" / f"ddpdiff-train-{job}.out"
    _wait_for(log, "step 2 ")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster, check=True)
    info = _wait(cluster, job, log)
    text = _read(log)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0" and info["Restarts"] == "0", text
    assert "no checkpoint newer than step -1; not requeueing" in text, text


@pytest.mark.slow
def test_a_save_slower_than_torchruns_default_timeout_completes_and_the_restart_cap_ends_the_job(
        cluster, shards_dir, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_SAVE_HOOK)
    # torchrun's own default would SIGKILL the saving rank 30 s after the SIGTERM.
    env = {**cluster, "PYTHONPATH": str(hook), "SLOW_SAVE_S": "35", "DDPDIFF_MAX_RESTARTS": "0"}
    job = _sbatch(env, tmp_path, "--nodes=1", "--gpus-per-node=1", TRAIN_SH,
                  *_train_args(shards_dir, "--run.dir", tmp_path / "run", "--checkpoint.every_steps", 1000))
    log = tmp_path / "logs" / f"ddpdiff-train-{job}.out"
    _wait_for(log, "step 2 ")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster, check=True)
    info = _wait(cluster, job, log)
    text = _read(log)
    assert "slow save: sleeping 35 s" in text and "stopped by signal SIGTERM" in text, text
    saved = _complete_steps(tmp_path / "run")
    assert len(saved) == 1 and 2 <= saved[0] < STEPS, (saved, text)
    # Saved, but DDPDIFF_MAX_RESTARTS=0: the job ends with EX_TEMPFAIL instead of requeueing.
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0" and info["Restarts"] == "0", text
    assert f"checkpoint at step {saved[0]} saved, but job {job} has restarted 0 times" in text, text


@pytest.mark.slow
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

def test_submit_rejects_a_bad_config_key_before_submitting(tmp_path):
    out = subprocess.run([sys.executable, SUBMIT, "--folder", tmp_path / "submitit", "--config", SMOKE,
                          "--train.max_stpes", "3"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith("submit.py: error: unknown config key 'train.max_stpes'"), out.stderr
    assert len(out.stderr.splitlines()) == 1 and not (tmp_path / "submitit").exists(), out.stderr


@pytest.mark.parametrize("status, newest, restarts, requeued", [
    (75, 4, 0, True),   # stopped early with a newer checkpoint
    (0, 4, 2, True),    # what the training reported for the same before it had status 75
    (75, 2, 0, False),  # nothing newer than the checkpoint the start resumed from
    (1, 4, 0, False),   # the training failed
    (75, 4, 3, False),  # --max-restarts reached
])
def test_submitit_checkpoint_requeues_only_after_a_newer_checkpoint_and_below_the_cap(
        tmp_path, monkeypatch, status, newest, restarts, requeued):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for step in {2, newest}:
        (ckpts / f"step_{step:08d}.pt").write_bytes(b"")
        (ckpts / f"step_{step:08d}.pt.sha256").write_text("")
    (ckpts / "step_00000009.pt").write_bytes(b"")  # no checksum: an unfinished save does not count
    monkeypatch.setenv("SLURM_RESTART_COUNT", str(restarts))
    train = submit.Train(str(tmp_path), max_restarts=3)
    train._start_step = 2  # the checkpoint this start resumed from
    train._proc = subprocess.Popen(["sh", "-c", f"exit {status}"])
    train._proc.wait()
    again = train.checkpoint(["--train.max_steps", "8"])
    assert (again is not None) == requeued
    if requeued:
        assert again.function.run_dir == str(tmp_path) and again.args == (["--train.max_steps", "8"],)


def _plant_result(folder: Path, job: str, task: int, outcome: str) -> None:
    (folder / f"{job}_{task}_result.pkl").write_bytes(pickle.dumps((outcome, 0 if outcome == "success" else "planted")))


@pytest.mark.slow
def test_submitit_wait_survives_a_timeout_signal_and_matches_the_uninterrupted_run(
        cluster, shards_dir, reference, tmp_path, procs):
    cmd = [sys.executable, SUBMIT, "--nodes", "2", "--gpus-per-node", "2", "--cpus-per-task", "2",
           "--partition", "debug", "--time", "10", "--wait", *map(str, _train_args(shards_dir))]
    proc = procs.start(cmd, env=cluster, cwd=tmp_path)
    first = proc.read_until("^submitted job ", timeout=120)
    job = first.split()[2].rstrip(";")
    logs = tmp_path / "logs" / "submitit" / str(job)
    try:
        _wait_for(logs / f"{job}_0_log.out", "step 2 ")
        # What SLURM sends before the time limit (submitit's --signal=USR2@...), sent now.
        subprocess.run(["scancel", "--signal=USR2", job], env=cluster, check=True)
        _wait_for(logs / f"{job}_0_log.out", f"Requeued job {job}")
        # The race --wait must not lose: result files of the torn-down attempt (rank 1 failed when the requeue
        # stopped it) that the next attempt has not yet replaced. submitit's own wait reads them at once.
        for task in range(4):
            _plant_result(logs, job, task, "error" if task == 1 else "success")
        out = proc.wait(timeout=240)
    finally:
        if proc.returncode is None:
            subprocess.run(["scancel", job], env=cluster, capture_output=True)
    text = _read(logs / f"{job}_0_log.out") + _read(logs / f"{job}_0_log.err")
    assert proc.returncode == 0, out + text
    assert "stopped by signal SIGTERM" in text and f"Requeued job {job}" in text and "resumed from" in text, text
    assert "SLURM_RESTART_COUNT=1, run dir runs/smoke" in text, text
    # The other ranks left no result of the interrupted attempt: each reported once, at the end.
    for task in range(1, 4):
        rank_log = _read(logs / f"{job}_{task}_log.out")
        assert rank_log.count("Job completed successfully") == 1, rank_log
    _assert_same(_final_model(tmp_path / "runs" / "smoke"), _final_model(_reference_run(reference)))


@pytest.mark.slow
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
