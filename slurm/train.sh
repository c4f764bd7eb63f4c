#!/bin/bash
# Train on a SLURM allocation: one torchrun agent per node, one training process per GPU.
#
#   mkdir -p logs   # SLURM opens the log file before this script runs and fails if logs/ is missing
#   sbatch [sbatch options] slurm/train.sh --config jobs/configs/celeba64.yaml --data.shards DIR [--section.field value ...]
#
# Submit from the repository root with the virtual environment on PATH (source .venv/bin/activate): the job
# inherits the submitting shell's environment. Options given to sbatch override the defaults below, e.g.
# `sbatch --nodes=4 --gpus-per-node=4 --cpus-per-task=16 --time=2-00:00:00 slurm/train.sh ...`.
#
# Run directory: the config's run.dir (or --run.dir), so a requeued job, or the same command submitted again,
# resumes from its newest checkpoint. A bad config key or value fails the job before the training starts.
# Preemption and time limits: SLURM sends USR1 to this script 300 s before the limit (by hand:
# `scancel --signal=USR1 --batch JOB`). The script then sends SIGTERM to the training step (srun would turn a
# SIGTERM of its own into a kill, and torchrun does not forward USR1), every rank agrees on a step, rank 0
# saves a checkpoint, and the script requeues the job if that checkpoint is newer than the one this start
# began from and the job has been requeued fewer than DDPDIFF_MAX_RESTARTS (default 100) times; the next start
# resumes from it. A run that finishes or fails without USR1 is never requeued.
#SBATCH --job-name=ddpdiff-train
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=1
# Per node: 8 ranks, each with a main process and data.workers (2) loader processes, plus headroom.
#SBATCH --cpus-per-task=32
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

set -uo pipefail

# Numbers from the environment, checked before any use: bash arithmetic would run code in a value like
# 'a[$(cmd)]', and `[ -ge ]` on garbage fails, which would requeue without limit.
for var in SLURM_JOB_ID SLURM_RESTART_COUNT DDPDIFF_MAX_RESTARTS; do
    if [ -n "${!var+set}" ] && ! [[ ${!var} =~ ^[0-9]{1,9}$ ]]; then
        echo "train.sh: $var must be a non-negative integer, not '${!var}'" >&2
        exit 2
    fi
done

if ! command -v torchrun >/dev/null; then
    echo "train.sh: torchrun is not on PATH; activate the virtual environment before sbatch" >&2
    exit 2
fi

# GPUs SLURM gave this node (CUDA_VISIBLE_DEVICES as a fallback for --gpus without a per-node count).
gpus=${SLURM_GPUS_ON_NODE:-}
if [ -z "$gpus" ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    gpus=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
fi
gpus=${gpus:-1}

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# Derived from the job id so a requeued job uses the same port and concurrent jobs rarely collide.
MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export MASTER_ADDR MASTER_PORT
# Let glibc reuse freed memory instead of returning it to the OS: the loader's fresh batch tensors then stop
# faulting in page by page, which doubles its samples/s per core (docs/benchmarks.md, "Data loading").
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-4294967296} MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-4294967296}

# The run directory of the resolved config; a bad key or value ends the job here (status 2), not on every rank.
run_dir=$(python -c 'import sys; from ddpdiff import config
print(config.parse_args("", sys.argv[1:], prog="train.sh")[0].run.dir)' "$@") || exit

# Step of the newest complete checkpoint (ddpdiff.checkpoint writes step_XXXXXXXX.pt.sha256 after the .pt), or -1.
newest_step() {
    local sum step=-1
    for sum in "$run_dir"/checkpoints/step_[0-9]*.pt.sha256; do
        [ -f "${sum%.sha256}" ] || continue
        step=${sum##*/step_}
        step=${step%.pt.sha256}
        [[ $step =~ ^[0-9]+$ ]] || continue  # only the names checkpoint writes: no arithmetic on others
        step=$((10#$step))
    done
    echo "$step"
}
start_step=$(newest_step)
restarts=${SLURM_RESTART_COUNT:-0}
max_restarts=${DDPDIFF_MAX_RESTARTS:-100}
# torchrun SIGKILLs workers still running this long after it forwards a SIGTERM; its default (30 s) can cut off
# rank 0 in the middle of the save that USR1 asked for, so allow the whole lead time of --signal above. torchrun
# reads the variable from torch 2.12 on, the floor in pyproject.toml; older ones keep 30 s whatever it says.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}

echo "train.sh: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST ($SLURM_NNODES nodes x $gpus GPUs)," \
     "SLURM_RESTART_COUNT=$restarts, rendezvous $MASTER_ADDR:$MASTER_PORT," \
     "run dir $run_dir (newest checkpoint step $start_step)"

stopping=0
on_usr1() {
    stopping=1
    echo "train.sh: USR1 received: asking training to checkpoint and stop"
    # Without --batch/--full this signals the job steps (the training) but not this script.
    scancel --signal=TERM "$SLURM_JOB_ID"
}
trap on_usr1 USR1

srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_NNODES" --nproc_per_node "$gpus" \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" \
    -m ddpdiff.train "$@" &
step=$!
# A trapped signal interrupts `wait`; keep waiting until the step itself has exited.
wait "$step"
rc=$?
while kill -0 "$step" 2>/dev/null; do
    wait "$step"
    rc=$?
done

if [ "$stopping" = 0 ]; then
    echo "train.sh: training step exited with status $rc"
    exit "$rc"
fi
# torchrun exits non-zero after forwarding SIGTERM even when every rank saved and exited (with status 0, or 75
# for stopped early), so the checkpoints, not the status, tell whether this start got anywhere.
newest=$(newest_step)
if [ "$newest" -le "$start_step" ]; then
    echo "train.sh: training step exited with status $rc after USR1 and no checkpoint newer than step" \
         "$start_step; not requeueing job $SLURM_JOB_ID"
    exit 1
fi
if [ "$restarts" -ge "$max_restarts" ]; then
    echo "train.sh: checkpoint at step $newest saved, but job $SLURM_JOB_ID has restarted $restarts times" \
         "(DDPDIFF_MAX_RESTARTS=$max_restarts); not requeueing: submit the same command again to go on"
    exit 75
fi
echo "train.sh: training step exited with status $rc after USR1, checkpoint at step $newest; requeueing job" \
     "$SLURM_JOB_ID"
scontrol requeue "$SLURM_JOB_ID" || exit 1
exit 0
