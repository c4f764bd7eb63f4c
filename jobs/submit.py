#!/usr/bin/env python3
"""Submit ddpdiff training to SLURM with submitit, or run the same job on this machine with --local.

  python jobs/submit.py --nodes 2 --gpus-per-node 8 --partition gpu --time 2-00:00:00 \\
      --config jobs/configs/celeba64.yaml --data.shards data/celeba/shards

Arguments this script does not know go to `python -m ddpdiff.train` unchanged, after the same config check the
training makes: a bad key or value ends this script with status 2 before anything is queued (--dry-run prints
the resolved config). The job runs one task per GPU; each task starts `python -m ddpdiff.train` with RANK,
WORLD_SIZE and MASTER_ADDR/PORT taken from the job, in the config's run directory (run.dir), so submitting the
same command again resumes. Before the time limit (and when sent the signal by hand: `scancel --signal=USR2
JOB`) submitit calls the job's checkpoint(): the training saves a checkpoint at a step all ranks agree on, and
the same call is requeued if that checkpoint is newer than the one the start began from and the job has
restarted fewer than --max-restarts times; the next start resumes from it. A preemption that sends SIGTERM
saves the same way. Logs go to logs/submitit/.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import submitit

from ddpdiff import config

# Seconds between the warning signal and the time limit: enough for every rank to reach a step and save.
SIGNAL_DELAY_S = 300
# Requeues allowed per job. Each must follow a newer checkpoint, so this only stops a job that keeps being
# preempted; at a 4-hour limit it still allows 16 days.
MAX_RESTARTS = 100
# SLURM job states after which the job will not run again (a requeued one passes through REQUEUED, PENDING).
FINAL_STATES = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "TIMEOUT"}
POLL_S = 5


def newest_step(run_dir: str | Path) -> int:
    """Step of the run's newest complete checkpoint, or -1. ddpdiff.checkpoint writes step_XXXXXXXX.pt.sha256
    after the .pt, so a checkpoint with both is complete (read here without importing torch)."""
    sums = Path(run_dir, "checkpoints").glob("step_*.pt.sha256")
    return max((int(s.name[len("step_"):-len(".pt.sha256")]) for s in sums if s.with_suffix("").is_file()),
               default=-1)


class Train(submitit.helpers.Checkpointable):
    """One task of the job: runs the training in a child process that it can ask to checkpoint."""

    def __init__(self, run_dir: str, max_restarts: int) -> None:
        self.run_dir, self.max_restarts = run_dir, max_restarts
        self._proc: subprocess.Popen | None = None
        self._start_step = -1
        self._stopped = False

    def _note_stop(self, previous, signum, frame) -> None:
        """Remember that a warning or preemption signal came, then let submitit's handler act on it."""
        self._stopped = True
        previous(signum, frame)

    def __call__(self, argv: list[str]) -> int:
        job = submitit.JobEnvironment()
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        # What torchrun sets for its workers: a collective past dist.timeout_s aborts the process, not hangs it.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        preempt = signal.Signals["SIG" + job.USR_SIG]
        for sig in (preempt, signal.SIGTERM):
            signal.signal(sig, functools.partial(self._note_stop, signal.getsignal(sig)))

        def ignore_preempt_signal() -> None:
            # SLURM delivers the warning signal to every process of the task; only this parent may act on it.
            signal.signal(preempt, signal.SIG_IGN)

        self._start_step = newest_step(self.run_dir)
        if job.global_rank == 0:
            print(f"submit.py: job {job.job_id}, SLURM_RESTART_COUNT={os.environ.get('SLURM_RESTART_COUNT', 0)}, "
                  f"run dir {self.run_dir}, newest checkpoint step {self._start_step}", flush=True)
        cmd = [sys.executable, "-m", "ddpdiff.train", *argv]
        self._proc = subprocess.Popen(cmd, preexec_fn=ignore_preempt_signal)
        code = self._proc.wait()
        if self._stopped or code in (os.EX_TEMPFAIL, -signal.SIGTERM):
            # Stopped for a requeue or preemption. A result from this attempt would be read as the job's by
            # `--wait` if it outlived the next attempt's, so leave none: SLURM (or srun, when rank 0 ends the
            # job) kills this task. Waiting longer than the lead time means nobody will.
            time.sleep(SIGNAL_DELAY_S)
            raise RuntimeError(f"rank {job.global_rank}: training stopped early (status {code}) and the job was "
                               f"neither requeued nor ended within {SIGNAL_DELAY_S} s")
        if code != 0:
            raise RuntimeError(f"rank {job.global_rank}: python -m ddpdiff.train exited with status {code}")
        return code

    def _stop_training(self) -> int | None:
        """SIGTERM the training and reap it; its exit status (None if it never started)."""
        if self._proc is None:
            return None
        # One rank stopping is enough: the loop makes every rank agree on the step and rank 0 saves.
        self._proc.send_signal(signal.SIGTERM)
        # This runs in a signal handler that interrupted `self._proc.wait()` in __call__, which holds Popen's
        # lock: a second wait() would deadlock, so reap the child directly.
        try:
            return os.waitstatus_to_exitcode(os.waitpid(self._proc.pid, 0)[1])
        except ChildProcessError:  # it had ended and been reaped before the signal
            return self._proc.returncode

    def checkpoint(self, argv: list[str]) -> submitit.helpers.DelayedSubmission | None:
        """Called by submitit on rank 0 at the warning signal: stop the training, then requeue the same call if
        it saved a newer checkpoint (status 0, or 75 for stopped early) and the job may restart again."""
        code = self._stop_training()
        newest, restarts = newest_step(self.run_dir), int(os.environ.get("SLURM_RESTART_COUNT", 0))
        if code not in (0, os.EX_TEMPFAIL):
            reason = f"the training exited with status {code}"
        elif newest <= self._start_step:
            reason = f"no checkpoint newer than step {self._start_step}"
        elif restarts >= self.max_restarts:
            reason = (f"checkpoint at step {newest} saved, but the job has restarted {restarts} times "
                      f"(--max-restarts {self.max_restarts}); submit the same command again to go on")
        else:
            return submitit.helpers.DelayedSubmission(Train(self.run_dir, self.max_restarts), argv)
        print(f"submit.py: not requeueing: {reason}", file=sys.stderr, flush=True)
        return None  # submitit then ends the job with an error


def minutes(text: str) -> int:
    """SLURM's time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) as whole minutes."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a SLURM time: {text!r} (e.g. 90, 4:00:00, 2-00:00:00)")
    days, a, b, c = m.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = int(a) * 3600 + int(b) * 60 + int(c)
    else:  # MM[:SS]
        seconds = int(a) * 60 + int(b or 0)
    return max(1, -(-seconds // 60))


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Training arguments: see `python -m ddpdiff.train --help`.")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1; --local allows only 1)")
    p.add_argument("--gpus-per-node", type=int, default=8,
                   help="GPUs per node, one training process each (default 8)")
    p.add_argument("--cpus-per-task", type=int, default=4,
                   help="CPUs per training process, for it and its data loader workers (default 4)")
    p.add_argument("--partition", help="SLURM partition (default: the cluster's default partition)")
    p.add_argument("--time", type=minutes, default=minutes("1-00:00:00"),
                   help="time limit per start, in SLURM's format (default 1-00:00:00); "
                        "a job that reaches it checkpoints and is requeued")
    p.add_argument("--max-restarts", type=int, default=MAX_RESTARTS,
                   help=f"requeues allowed, for time limits and preemptions together (SLURM_RESTART_COUNT; "
                        f"default {MAX_RESTARTS})")
    p.add_argument("--max-num-timeout", type=int,
                   help="requeues allowed after time-outs, counted over the whole job (submitit's "
                        "max_num_timeout; its own default is 3); default: --max-restarts")
    p.add_argument("--name", default="ddpdiff-train", help="job name (default ddpdiff-train)")
    p.add_argument("--folder", type=Path, default=Path("logs/submitit"),
                   help="submitit's folder for logs and pickles (default logs/submitit)")
    p.add_argument("--local", action="store_true",
                   help="run with submitit's local executor on this machine instead of SLURM")
    p.add_argument("--wait", action="store_true",
                   help="wait for the job to end for good; exit 0 if every task succeeded, 1 otherwise")
    args, train_argv = p.parse_known_args(argv)
    if args.nodes < 1 or args.gpus_per_node < 1 or args.cpus_per_task < 1:
        p.error("--nodes, --gpus-per-node and --cpus-per-task must be at least 1")
    if args.max_num_timeout is None:
        args.max_num_timeout = args.max_restarts
    if args.max_restarts < 0 or args.max_num_timeout < 0:
        p.error("--max-restarts and --max-num-timeout must be at least 0")
    if args.local and args.nodes != 1:
        p.error(f"--local runs on this machine only: use --nodes 1, not {args.nodes}")
    return args, train_argv


def slurm_state(job_id: str) -> str | None:
    """The job's state from the controller, or from accounting once the controller has forgotten it (MinJobAge);
    None when neither knows the job."""
    live = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if live.returncode == 0:
        return re.search(r"\bJobState=(\S+)", live.stdout).group(1)
    acct = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True)
    if acct.returncode == 0 and acct.stdout.split():
        return acct.stdout.split()[0]  # "CANCELLED by 0" -> CANCELLED
    return None if "Invalid job id" in live.stderr else "UNKNOWN"  # no answer: ask again


def wait_until_final(job_id: str) -> str:
    """Poll SLURM until the job has ended for good. Its result files are only the final attempt's from then on:
    a task of an interrupted attempt could have left one that the next attempt has not yet replaced."""
    while (state := slurm_state(job_id)) not in FINAL_STATES and state is not None:
        time.sleep(POLL_S)
    return state or "gone from SLURM"


def main(argv: list[str] | None = None) -> int:
    args, train_argv = parse(argv)
    cfg, _ = config.parse_args(__doc__, train_argv, prog="submit.py", root=config.Config)
    cluster = "local" if args.local else "slurm"
    executor = submitit.AutoExecutor(folder=args.folder / "%j", cluster=cluster,
                                     **{f"{cluster}_max_num_timeout": args.max_num_timeout})
    executor.update_parameters(name=args.name, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                               tasks_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
                               timeout_min=args.time)
    if not args.local:
        # --requeue: clusters with JobRequeue=0 refuse `scontrol requeue` for jobs submitted without it.
        # --kill-on-bad-exit: a task that fails (or rank 0 ending the job) stops the others at once.
        executor.update_parameters(slurm_signal_delay_s=SIGNAL_DELAY_S, slurm_additional_parameters={"requeue": True},
                                   slurm_srun_args=["--kill-on-bad-exit=1"],
                                   **({"slurm_partition": args.partition} if args.partition else {}))
    job = executor.submit(Train(cfg.run.dir, args.max_restarts), train_argv)
    print(f"submitted job {job.job_id}; logs in {job.paths.stdout.parent}", flush=True)
    if not args.wait:
        return 0
    state = "ended" if args.local else wait_until_final(job.job_id)
    try:
        job.results()
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as e:
        print(f"job {job.job_id} failed ({state}):\n{e}", file=sys.stderr)
        return 1
    print(f"job {job.job_id} completed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
