#!/bin/bash
# Shard CelebA over a SLURM array, then merge the tasks' files into one OUT/manifest.json.
#
#   slurm/shard.sh CELEBA_ROOT OUT [make_shards.py flags...]      e.g. --clip-pretrained /weights/vitb32.bin
#
# Submits an array of NUM_TASKS tasks (default 8; task I runs make_shards.py --num-tasks NUM_TASKS
# --task-index I) and a merge job that starts only once every task succeeded. Rerun a failed or preempted
# task with the same flags plus --resume (NUM_TASKS=8 slurm/shard.sh ROOT OUT ... --resume, or sbatch
# --array=I of that one task), then merge: tools/make_shards.py --merge OUT. Logs go to $LOGS (./logs).
# Compute nodes are usually offline: pass --clip-pretrained a local weights file.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
ROOT=$1 OUT=$2
shift 2
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
NUM_TASKS=${NUM_TASKS:-8}
CPUS=${CPUS:-16}
LOGS=${LOGS:-logs}

# Checked before any use: bash arithmetic would run code in a value like 'a[$(cmd)]' and read garbage as 0.
for var in NUM_TASKS CPUS; do
    if ! [[ ${!var} =~ ^[1-9][0-9]{0,5}$ ]]; then
        echo "shard.sh: $var must be a positive integer (at most 999999), not '${!var}'" >&2
        exit 2
    fi
done

# The words quoted for /bin/sh, which runs sbatch --wrap: each in single quotes, a quote inside as '\''.
sh_words() {
    local word quoted=()
    for word; do quoted+=("'${word//\'/\'\\\'\'}'"); done
    echo "${quoted[*]}"
}

mkdir -p "$LOGS"
task=$(sbatch --parsable --job-name=ddpdiff-shard --array=0-$((NUM_TASKS - 1)) \
    --cpus-per-task="$CPUS" --gres=gpu:1 --mem=32G --time=04:00:00 --output="$LOGS/shard-%A_%a.out" \
    --wrap="$(sh_words "$PYTHON" "$REPO/tools/make_shards.py" --root "$ROOT" --out "$OUT" \
        --workers "$CPUS" --num-tasks "$NUM_TASKS" --no-progress "$@") --task-index \"\$SLURM_ARRAY_TASK_ID\"")
merge=$(sbatch --parsable --job-name=ddpdiff-shard-merge --dependency=afterok:"$task" \
    --cpus-per-task=1 --mem=4G --time=00:15:00 --output="$LOGS/merge-%j.out" \
    --wrap="$(sh_words "$PYTHON" "$REPO/tools/make_shards.py" --merge "$OUT")")
echo "submitted array $task ($NUM_TASKS tasks) and merge job $merge; logs in $LOGS"
