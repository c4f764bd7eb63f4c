"""Cluster launch on a real two-node SLURM cluster (tools/slurm_cluster.py): sbatch, preemption, submitit.

Nodes n1 and n2 each have two fake GPUs; the ranks train on the CPU with gloo. Every job is submitted from its
own temporary directory, so logs/ and runs/ never touch the repository. Tests that start the cluster are slow; the
launcher's own checks (config, requeue decision) are not.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import tempfile
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
    slurm_cluster.stop(conf.parent)


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
    assert slurm_cluster.start() == Path(cluster["SLURM_CONF"])
    assert slurm_cluster.is_running(Path(cluster["SLURM_CONF"]).parent)


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


def _usr1_after_step_2(env, cwd: Path, nodes: int, gpus_per_node: int, train_args: list,
                       step_timeout_s: float = 120, timeout_s: float = 180) -> tuple[str, dict[str, str], str]:
    """A train.sh job whose batch shell gets USR1 (what SLURM sends before the time limit) once step 2 is
    logged: the job id, its final scontrol record and its log."""
    job = _sbatch(env, cwd, f"--nodes={nodes}", f"--gpus-per-node={gpus_per_node}", TRAIN_SH, *train_args)
    log = cwd / "logs" / f"ddpdiff-train-{job}.out"
    _wait_for(log, "step 2 ", timeout_s=step_timeout_s)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
    info = _wait(env, job, log, timeout_s=timeout_s)
    return job, info, _read(log)


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
    # With loader workers: SLURM's signals reach them too, and they must leave the stop to their rank.
    _, info, text = _usr1_after_step_2(
        cluster, tmp_path, 2, 2, _train_args(shards_dir, "--run.dir", tmp_path / "run", "--data.workers", 2),
        step_timeout_s=300, timeout_s=600)  # 8 workers import torch first
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", text
    # One stop at one agreed step, one requeue, and the second start resumes from exactly that checkpoint.
    stops = [line for line in text.splitlines() if line.startswith("stopped by signal")]
    assert len(stops) == 1 and stops[0].startswith("stopped by signal SIGTERM at step "), text
    step = int(stops[0].split(" at step ")[1].split(";")[0])
    assert text.count("requeueing job") == 1 and "SLURM_RESTART_COUNT=1" in text, text
    assert f"resumed from {tmp_path / 'run'}/checkpoints/step_{step:08d}.pt" in text, text
    _assert_same(_final_model(tmp_path / "run"), _final_model(_reference_run(reference)))


@pytest.mark.slow
def test_usr1_without_a_newer_checkpoint_is_not_requeued(cluster, shards_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("")  # the stop's save fails: nothing newer than at the start
    _, info, text = _usr1_after_step_2(
        cluster, tmp_path, 1, 1, _train_args(shards_dir, "--run.dir", run, "--checkpoint.every_steps", 1000))
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0" and info["Restarts"] == "0", text
    assert "no checkpoint newer than step -1; not requeueing" in text, text


@pytest.mark.slow
def test_a_save_slower_than_torchruns_default_timeout_completes_and_the_restart_cap_ends_the_job(
        cluster, shards_dir, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_SAVE_HOOK)
    # torchrun's own default would SIGKILL the saving rank 30 s after the SIGTERM; train.sh's 300 s, not a value
    # the caller's environment may hold, is what is tested.
    env = {**{k: v for k, v in cluster.items() if k != "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"}, "PYTHONPATH": str(hook),
           "SLOW_SAVE_S": "35", "DDPDIFF_MAX_RESTARTS": "0"}
    job, info, text = _usr1_after_step_2(
        env, tmp_path, 1, 1,
        _train_args(shards_dir, "--run.dir", tmp_path / "run", "--checkpoint.every_steps", 1000))
    assert "slow save: sleeping 35 s" in text and "stopped by signal SIGTERM" in text, text
    saved = _complete_steps(tmp_path / "run")
    assert len(saved) == 1 and 2 <= saved[0] < STEPS, (saved, text)
    # Saved, but DDPDIFF_MAX_RESTARTS=0: the job ends with EX_TEMPFAIL instead of requeueing.
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0" and info["Restarts"] == "0", text
    assert f"checkpoint at step {saved[0]} saved, but job {job} has restarted 0 times" in text, text


@pytest.mark.slow
def test_a_job_whose_training_raises_fails_visibly_and_is_not_requeued(cluster, shards_dir, tmp_path):
    (tmp_path / "run" / "config.yaml").mkdir(parents=True)  # rank 0 alone writes it, and raises
    job = _sbatch(cluster, tmp_path, "--nodes=2", "--gpus-per-node=2", TRAIN_SH,
                  *_train_args(shards_dir, "--run.dir", tmp_path / "run"))
    log = tmp_path / "logs" / f"ddpdiff-train-{job}.out"
    info = _wait(cluster, job, log)
    text = _read(log)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0" and info["Restarts"] == "0", text
    assert "IsADirectoryError" in text, text


# --- numbers and quoting in the scripts ----------------------------------------------------------------------

SHARD_SH = str(REPO / "slurm" / "shard.sh")
INJECTION = "a[$(touch PWNED)]"  # bash arithmetic on this runs the command
# Every word a shell could mangle: spaces, both quotes, a backslash, $, a backtick, a newline, an empty word.
AWKWARD = ["it's a \"dir\"", "$(touch PWNED) `x` $HOME \\n", "line\nbreak", ""]
# Writes the arguments it was started with to $DUMP/<SLURM_JOB_ID or task>.json.
DUMP_ARGV = """\
import json, os, sys
name = os.environ.get("SLURM_ARRAY_TASK_ID") or ("merge" if "--merge" in sys.argv else "run")
with open(os.path.join(os.environ["DUMP"], name + ".json"), "w") as f:
    json.dump(sys.argv[1:], f)
"""


def _fake_commands(folder: Path, **scripts: str) -> dict[str, str]:
    """An environment whose PATH finds the given shell scripts first (for sbatch, srun, scontrol)."""
    folder.mkdir()
    for name, body in scripts.items():
        (folder / name).write_text("#!/bin/sh\n" + body)
        (folder / name).chmod(0o755)
    return {**os.environ, "PATH": f"{folder}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def _dump_python(folder: Path) -> Path:
    """A stand-in for python at a path with a space and a quote, that records its arguments."""
    folder.mkdir(parents=True)
    script = folder / "python"
    script.write_text(f"#!{sys.executable}\n{DUMP_ARGV}")
    script.chmod(0o755)
    return script


@pytest.mark.parametrize("var, value", [("NUM_TASKS", INJECTION), ("NUM_TASKS", "0"), ("NUM_TASKS", "4x"),
                                        ("NUM_TASKS", "-2"), ("CPUS", INJECTION), ("CPUS", "2.5")])
def test_shard_sh_refuses_numbers_that_are_not_positive_integers_and_runs_nothing(tmp_path, var, value):
    env = _fake_commands(tmp_path / "bin", sbatch="touch CALLED\necho 1\n")
    out = subprocess.run(["bash", SHARD_SH, "root", "out"], env={**env, var: value}, cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr == f"shard.sh: {var} must be a positive integer (at most 999999), " \
                                                 f"not '{value}'\n", out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin"]  # no PWNED, no CALLED, no logs/


def test_shard_sh_hands_awkward_arguments_to_the_task_unchanged(tmp_path):
    # The fake sbatch keeps each --wrap command; /bin/sh then runs it as SLURM's batch script would.
    env = _fake_commands(tmp_path / "bin", sbatch='for a; do case $a in --wrap=*) printf %s "${a#--wrap=}" '
                                                   '> "wrap$#";; esac; done\necho $#\n')
    python = _dump_python(tmp_path / "my 'python'")
    root, out_dir = str(tmp_path / AWKWARD[0]), str(tmp_path / "out dir")
    run = subprocess.run(["bash", SHARD_SH, root, out_dir, "--clip-pretrained", *AWKWARD], cwd=tmp_path,
                         env={**env, "PYTHON": str(python), "NUM_TASKS": "3", "CPUS": "2"},
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    (dump := tmp_path / "dump").mkdir()
    for wrap in sorted(tmp_path.glob("wrap*")):
        task = subprocess.run(["/bin/sh", "-c", wrap.read_text()], cwd=tmp_path, capture_output=True, text=True,
                              env={**env, "DUMP": str(dump), "SLURM_ARRAY_TASK_ID": "2" if "--merge" not in
                                   wrap.read_text() else ""})
        assert task.returncode == 0, task.stderr
    shard = REPO / "tools" / "make_shards.py"
    assert json.loads((dump / "2.json").read_text()) == [
        str(shard), "--root", root, "--out", out_dir, "--workers", "2", "--num-tasks", "3", "--no-progress",
        "--clip-pretrained", *AWKWARD, "--task-index", "2"]
    assert json.loads((dump / "merge.json").read_text()) == [str(shard), "--merge", out_dir]
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.slow
def test_shard_sh_array_tasks_on_the_cluster_get_the_arguments_unchanged(cluster, tmp_path):
    python = _dump_python(tmp_path / "my 'python'")
    (dump := tmp_path / "dump").mkdir()
    out_dir = str(tmp_path / "out \"dir\"")
    run = subprocess.run(["bash", SHARD_SH, "/data/celeba root", out_dir, *AWKWARD], cwd=tmp_path,
                         env={**cluster, "PYTHON": str(python), "NUM_TASKS": "2", "CPUS": "1", "DUMP": str(dump)},
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    merge = run.stdout.split()[-4].rstrip(";")  # "submitted array A (2 tasks) and merge job M; logs in logs"
    info = _wait(cluster, merge, tmp_path / "logs" / f"merge-{merge}.out")
    assert info["JobState"] == "COMPLETED", run.stdout
    shard = str(REPO / "tools" / "make_shards.py")
    for task in (0, 1):
        assert json.loads((dump / f"{task}.json").read_text()) == [
            shard, "--root", "/data/celeba root", "--out", out_dir, "--workers", "1", "--num-tasks", "2",
            "--no-progress", *AWKWARD, "--task-index", str(task)]
    assert json.loads((dump / "merge.json").read_text()) == [shard, "--merge", out_dir]
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("var", ["SLURM_JOB_ID", "SLURM_RESTART_COUNT", "DDPDIFF_MAX_RESTARTS"])
def test_train_sh_refuses_environment_numbers_that_are_not_integers(tmp_path, var):
    env = _fake_commands(tmp_path / "bin", srun="exit 0\n", scontrol="echo n1\n")
    env.update(SLURM_JOB_ID="7", SLURM_JOB_NODELIST="n1", SLURM_NNODES="1")
    out = subprocess.run(["bash", TRAIN_SH, "--config", SMOKE, "--run.dir", tmp_path / "run"], env={**env, var: INJECTION},
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr == f"train.sh: {var} must be a non-negative integer, not '{INJECTION}'\n"
    assert not (tmp_path / "PWNED").exists()


def test_train_sh_reads_only_checkpoint_names_it_knows_as_steps(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    for name in ("step_00000004.pt", "step_0+a[$(touch PWNED)].pt"):
        (ckpts / name).write_bytes(b"")
        (ckpts / f"{name}.sha256").write_text("")
    # srun stands in for the training; without USR1 the script reports its status and ends.
    env = _fake_commands(tmp_path / "bin", srun="exit 0\n", scontrol="echo n1\n")
    out = subprocess.run(["bash", TRAIN_SH, "--config", SMOKE, "--run.dir", tmp_path / "run"], cwd=tmp_path,
                         env={**env, "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "1"},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "(newest checkpoint step 4)" in out.stdout and not (tmp_path / "PWNED").exists(), out.stdout


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


def test_submitit_time_out_limit_defaults_to_max_restarts():
    assert submit.parse(["--max-restarts", "7"])[0].max_num_timeout == 7
    assert submit.parse(["--max-restarts", "7", "--max-num-timeout", "2"])[0].max_num_timeout == 2


@pytest.mark.slow
def test_submitit_does_not_requeue_after_more_time_outs_than_max_num_timeout(cluster, shards_dir, tmp_path):
    # --max-restarts would allow a requeue; submitit's own count of time-outs (here 0 allowed) ends the job.
    cmd = [sys.executable, SUBMIT, "--nodes", "1", "--gpus-per-node", "1", "--cpus-per-task", "2",
           "--partition", "debug", "--time", "10", "--max-restarts", "5", "--max-num-timeout", "0",
           *map(str, _train_args(shards_dir, "--run.dir", tmp_path / "run"))]
    out = subprocess.run(cmd, env=cluster, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("submitted job "), out.stdout + out.stderr
    job = out.stdout.split()[2].rstrip(";")
    logs = tmp_path / "logs" / "submitit" / job
    _wait_for(logs / f"{job}_0_log.out", "step 2 ")
    # Within 10 minutes of --time, so submitit counts it as a time-out (what its --signal=USR2@300 sends).
    subprocess.run(["scancel", "--signal=USR2", job], env=cluster, check=True)
    info = _wait(cluster, job, logs / f"{job}_0_log.out")
    text = _read(logs / f"{job}_0_log.out") + _read(logs / f"{job}_0_log.err")
    assert info["Restarts"] == "0" and info["JobState"] != "COMPLETED", text
    assert "this job is timed-out" in text and "Job not requeued because: timed-out too many times" in text, text
    assert "stopped by signal SIGTERM at step" in text and _complete_steps(tmp_path / "run"), text


@pytest.mark.slow
def test_stop_ends_every_daemon_and_removes_the_state(cluster):
    state = Path(cluster["SLURM_CONF"]).parent
    pids = [slurm_cluster._pid(p) for p in slurm_cluster._pidfiles(state)]
    assert all(pids)
    slurm_cluster.stop(state)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not state.exists()
    assert slurm_cluster.HOSTS_MARK not in Path("/etc/hosts").read_text()


# --- the cluster's state directory and munge key --------------------------------------------------------------
# Placed after the stop test: these start clusters of their own on the same ports.

NOBODY = 65534


@pytest.fixture
def own_cluster_starts():
    """For tests that start clusters themselves: no cluster of ours running before, none left after."""
    reason = slurm_cluster.unavailable_reason()
    if reason:
        pytest.skip(f"SLURM test cluster cannot start here: {reason}")
    for state in slurm_cluster.own_states():
        slurm_cluster.stop(state)
    started: list[Path] = []
    yield started
    for state in started:
        slurm_cluster.stop(state)


def _key(state: Path) -> bytes:
    return (state / "munge" / "munge.key").read_bytes()


def test_a_state_directory_others_could_write_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    assert "writable by others (mode 0777)" in slurm_cluster.untrusted_reason(shared)
    assert "is not a directory" in slurm_cluster.untrusted_reason(link)
    assert slurm_cluster.untrusted_reason(tmp_path) is None and slurm_cluster.untrusted_reason(tmp_path / "new") is None


@pytest.mark.slow
def test_a_planted_state_directory_is_neither_used_nor_trusted(own_cluster_starts, tmp_path, capsys):
    # What a local user could leave where the cluster used to live: their own directory with a munge key they
    # know and a pid file naming a process of the victim's; named like the tool's own temporary directories.
    planted = Path(tempfile.gettempdir(), f"{slurm_cluster.STATE_PREFIX}planted-{os.getpid()}")
    (planted / "munge").mkdir(parents=True)
    (planted / "munge" / "munge.key").write_bytes(b"k" * 1024)
    victim = subprocess.Popen(["sleep", "300"])
    try:
        (planted / "slurmctld.pid").write_text(f"{victim.pid}\n")
        for path in (planted, planted / "munge", planted / "munge" / "munge.key", planted / "slurmctld.pid"):
            os.chown(path, NOBODY, NOBODY)
        with pytest.raises(slurm_cluster.ClusterError, match=f"owned by uid {NOBODY}, not by this user"):
            slurm_cluster.start(planted)
        assert slurm_cluster.main(["stop", "--state-dir", str(planted)]) == 1
        assert capsys.readouterr().err.count("\n") == 1
        conf = slurm_cluster.start()  # finds no cluster of its own: a fresh private directory
        state = conf.parent
        own_cluster_starts.append(state)
        assert state != planted and slurm_cluster.is_running(state)
        assert stat.S_IMODE(state.stat().st_mode) == 0o700 and state.stat().st_uid == os.geteuid()
        assert stat.S_IMODE((state / "munge" / "munge.key").stat().st_mode) == 0o400
        assert _key(state) != b"k" * 1024
        assert slurm_cluster.own_states() == [state] and slurm_cluster.main(["stop"]) == 0
        assert victim.poll() is None and _key(planted) == b"k" * 1024
    finally:
        victim.kill()
        victim.wait()
        shutil.rmtree(planted)


@pytest.mark.slow
def test_every_start_writes_a_fresh_munge_key_never_the_one_found(own_cluster_starts, tmp_path):
    state = tmp_path / "state"
    (state / "munge").mkdir(parents=True)
    state.chmod(0o700)
    (state / "munge" / "munge.key").write_bytes(b"k" * 1024)  # left by an earlier cluster, or put there
    keys = []
    for _ in range(2):
        conf = slurm_cluster.start(state)
        own_cluster_starts.append(state)
        assert conf == state / "slurm.conf" and slurm_cluster.is_running(state)
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        keys.append(_key(state))
        slurm_cluster.stop(state)
    assert b"k" * 1024 not in keys and keys[0] != keys[1]
