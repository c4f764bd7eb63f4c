#!/usr/bin/env python3
"""Submit ddpdiff training to SLURM with submitit, or run the same job on this machine with --local.

  python jobs/submit.py --nodes 2 --gpus-per-node 8 --partition gpu --time 2-00:00:00 \\
      --config jobs/configs/celeba64.yaml --data.shards data/celeba64/shards

Arguments this script does not know go to `python -m ddpdiff.train` unchanged. The job runs one task per GPU;
each task starts `python -m ddpdiff.train` with RANK, WORLD_SIZE and MASTER_ADDR/PORT taken from the job, in
the run directory runs/submitit-JOBID unless --run.dir is given. Before the time limit (and when sent the
signal by hand: `scancel --signal=USR2 JOB`) submitit calls the job's checkpoint(): the training saves a
checkpoint at a step all ranks agree on, and the same call is requeued, so the next start resumes from it.
A preemption that sends SIGTERM saves the same way. Logs go to logs/submitit/.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import submitit

# Seconds between the warning signal and the time limit: enough for every rank to reach a step and save.
SIGNAL_DELAY_S = 300


class Train(submitit.helpers.Checkpointable):
    """One task of the job: runs the training in a child process that it can ask to checkpoint."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None

    def __call__(self, argv: list[str]) -> int:
        job = submitit.JobEnvironment()
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        # What torchrun sets for its workers: a collective past dist.timeout_s aborts the process, not hangs it.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        preempt = signal.Signals["SIG" + job.USR_SIG]

        def ignore_preempt_signal() -> None:
            # SLURM delivers the warning signal to every process of the task; only this parent may act on it.
            signal.signal(preempt, signal.SIG_IGN)

        cmd = [sys.executable, "-m", "ddpdiff.train", "--run.dir", f"runs/submitit-{job.job_id}", *argv]
        self._proc = subprocess.Popen(cmd, preexec_fn=ignore_preempt_signal)
        code = self._proc.wait()
        if code != 0:
            raise RuntimeError(f"rank {job.global_rank}: python -m ddpdiff.train exited with status {code}")
        return code

    def checkpoint(self, argv: list[str]) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 at the warning signal: save, then requeue the same call."""
        if self._proc is not None:
            # One rank stopping is enough: the loop makes every rank agree on the step and rank 0 saves.
            self._proc.send_signal(signal.SIGTERM)
            # This runs in a signal handler that interrupted `self._proc.wait()` in __call__, which holds
            # Popen's lock: a second wait() would deadlock, so reap the child directly.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self._proc.pid, 0)
        return submitit.helpers.DelayedSubmission(Train(), argv)


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
    p.add_argument("--name", default="ddpdiff-train", help="job name (default ddpdiff-train)")
    p.add_argument("--folder", type=Path, default=Path("logs/submitit"),
                   help="submitit's folder for logs and pickles (default logs/submitit)")
    p.add_argument("--local", action="store_true",
                   help="run with submitit's local executor on this machine instead of SLURM")
    p.add_argument("--wait", action="store_true",
                   help="wait for the job to end; exit 0 if every task succeeded, 1 otherwise")
    args, train_argv = p.parse_known_args(argv)
    if args.nodes < 1 or args.gpus_per_node < 1 or args.cpus_per_task < 1:
        p.error("--nodes, --gpus-per-node and --cpus-per-task must be at least 1")
    if args.local and args.nodes != 1:
        p.error(f"--local runs on this machine only: use --nodes 1, not {args.nodes}")
    return args, train_argv


def main(argv: list[str] | None = None) -> int:
    args, train_argv = parse(argv)
    executor = submitit.AutoExecutor(folder=args.folder / "%j", cluster="local" if args.local else "slurm")
    executor.update_parameters(name=args.name, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                               tasks_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
                               timeout_min=args.time)
    if not args.local:
        # --requeue: clusters with JobRequeue=0 refuse `scontrol requeue` for jobs submitted without it.
        executor.update_parameters(slurm_signal_delay_s=SIGNAL_DELAY_S, slurm_additional_parameters={"requeue": True},
                                   **({"slurm_partition": args.partition} if args.partition else {}))
    job = executor.submit(Train(), train_argv)
    print(f"submitted job {job.job_id}; logs in {job.paths.stdout.parent}", flush=True)
    if not args.wait:
        return 0
    try:
        job.results()
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as e:
        print(f"job {job.job_id} failed:\n{e}", file=sys.stderr)
        return 1
    print(f"job {job.job_id} completed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
