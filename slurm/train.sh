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
# Run directory: runs/slurm-JOBID unless --run.dir is given, so a requeued job resumes its own checkpoints.
# Preemption and time limits: SLURM sends USR1 to this script 300 s before the limit (by hand:
# `scancel --signal=USR1 --batch JOB`). The script then sends SIGTERM to the training step (srun would turn a
# SIGTERM of its own into a kill, and torchrun does not forward USR1), every rank agrees on a step, rank 0
# saves a checkpoint, and the script requeues the job; the next start resumes from that checkpoint. A run that
# finishes or fails without USR1 is never requeued.
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

echo "train.sh: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST ($SLURM_NNODES nodes x $gpus GPUs)," \
     "SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}, rendezvous $MASTER_ADDR:$MASTER_PORT"

stopping=0
on_usr1() {
    stopping=1
    echo "train.sh: USR1 received: asking training to checkpoint and stop"
    # Without --batch/--full this signals the job steps (the training) but not this script.
    scancel --signal=TERM "$SLURM_JOB_ID"
}
trap on_usr1 USR1

# --run.dir goes first so a --run.dir in the arguments overrides it (later flags win).
srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_NNODES" --nproc_per_node "$gpus" \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$SLURM_JOB_ID" \
    -m ddpdiff.train --run.dir "runs/slurm-$SLURM_JOB_ID" "$@" &
step=$!
# A trapped signal interrupts `wait`; keep waiting until the step itself has exited.
wait "$step"
rc=$?
while kill -0 "$step" 2>/dev/null; do
    wait "$step"
    rc=$?
done

if [ "$stopping" = 1 ]; then
    # torchrun exits non-zero after forwarding SIGTERM even when every rank saved and exited cleanly.
    echo "train.sh: training step exited with status $rc after USR1; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || exit 1
    exit 0
fi
echo "train.sh: training step exited with status $rc"
exit "$rc"
