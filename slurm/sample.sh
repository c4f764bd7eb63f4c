#!/bin/bash
# Sample faces from a trained run on one GPU of a SLURM node.
#
#   mkdir -p logs   # SLURM opens the log file before this script runs and fails if logs/ is missing
#   sbatch slurm/sample.sh --checkpoint runs/celeba64 --attributes Smiling,Blond_Hair --out samples/celeba64
#
# The arguments go to `python -m ddpdiff.sample` unchanged (see its --help). Submit from the repository root
# with the virtual environment on PATH (source .venv/bin/activate): the job inherits the submitting shell's
# environment. Sampling is a single process; it needs no requeue, since rerunning it rewrites the same files.
#SBATCH --job-name=ddpdiff-sample
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --output=logs/%x-%j.out

set -euo pipefail

if ! command -v python >/dev/null || ! python -c "import ddpdiff" 2>/dev/null; then
    echo "sample.sh: no python with ddpdiff on PATH; activate the virtual environment before sbatch" >&2
    exit 2
fi
echo "sample.sh: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST"
exec srun python -m ddpdiff.sample "$@"
