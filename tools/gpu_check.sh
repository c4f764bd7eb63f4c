#!/usr/bin/env bash
# One-shot check of a GPU machine, in one call: environment, a 1-rank NCCL training smoke (bf16, channels_last,
# torch.compile), training throughput, MFU and memory of celeba64 (with and without gradient checkpointing and
# compile) beside bench_memory.py's activation bytes per image for the same config, checkpoint saves blocking
# and in the background, sampling and upsampling speed, make_shards on the GPU, and two deterministic runs
# compared bit for bit. Everything lands in OUT: gpu_check.json (all figures), gpu_check.log (all output), one
# JSON per step.
#
#   bash tools/gpu_check.sh OUT          # on a GPU machine, under 8 minutes on one H100/H200
#   bash tools/gpu_check.sh OUT --cpu    # the same steps at toy sizes on the CPU (tests/test_gpu_check.py)
#
# Run it from the repository root with the project's environment (make venv) or PYTHON=... set. A step that
# fails is recorded as failed in gpu_check.json and the next one runs; the exit status is the number of
# failed steps. docs/benchmarks.md says where its figures go.
set -uo pipefail

out=${1:?usage: tools/gpu_check.sh OUT [--cpu]}
mode=${2:-gpu}
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
exec > >(tee "$out/gpu_check.log") 2>&1

if [ "$mode" = "--cpu" ]; then
    device=cpu images=96 shard_clip=tiny train_cfg=jobs/configs/smoke.yaml sr_cfg=jobs/configs/sr_smoke.yaml
    bench=(--batch 8 --steps 3 --warmup 1) sample=(--num 8 --batch 8 --steps 3 --sr-batch 4) smoke_steps=4
    compile=false  # inductor on the CPU takes minutes; the GPU run compiles
else
    device=cuda images=2000 shard_clip=ViT-B-32 train_cfg=jobs/configs/celeba64.yaml sr_cfg=jobs/configs/sr.yaml
    bench=(--batch 128 --steps 20 --warmup 5) sample=(--num 512 --batch 256 --steps 50 --sr-batch 32) smoke_steps=30
    compile=true
fi
failed=0

step() {  # step NAME COMMAND...: run it, time it, record its status
    local name=$1 start rc
    shift
    echo "=== $name: $*"
    start=$(date +%s%N)
    "$@"
    rc=$?
    echo "{\"status\": $rc, \"milliseconds\": $((($(date +%s%N) - start) / 1000000))}" > "$out/step_$name.json"
    echo "=== $name: exit status $rc"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

step environment "$PYTHON" - "$out/environment.json" <<'PY'
import json, platform, subprocess, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(), "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(),
                memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
                nccl=".".join(map(str, torch.cuda.nccl.version())),
                driver=subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                      capture_output=True, text=True).stdout.strip())
print(json.dumps(info, indent=1))
json.dump(info, open(sys.argv[1], "w"), indent=1)
PY

step synthetic "$PYTHON" tools/make_synthetic_celeba.py --out "$work/celeba" --num "$images"
step shards "$PYTHON" tools/make_shards.py --root "$work/celeba" --out "$work/shards" --clip-model "$shard_clip" \
    --clip-pretrained none --device "$device" --samples-per-shard 500 --no-progress

common=(--config jobs/configs/smoke.yaml --data.shards "$work/shards" --dist.device "$device"
        --train.max_steps "$smoke_steps" --train.global_batch 16 --log.every_steps 5 --sample.every_steps 0)
step train_smoke "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 -m ddpdiff.train "${common[@]}" \
    --run.dir "$work/smoke" --train.precision bf16 --train.channels_last true --train.compile "$compile"

step bench_train "$PYTHON" tools/bench_train.py --config "$train_cfg" --synthetic --dist.device "$device" \
    "${bench[@]}" --grad-checkpointing both --json "$out/bench_train.json"
step bench_train_compile "$PYTHON" tools/bench_train.py --config "$train_cfg" --synthetic --dist.device "$device" \
    "${bench[@]}" --grad-checkpointing off --train.compile "$compile" --json "$out/bench_train_compile.json"
step bench_memory "$PYTHON" tools/bench_memory.py --config "$train_cfg" --grad-checkpointing both \
    --json "$out/bench_memory.json"
step bench_saves "$PYTHON" tools/bench_train.py --config "$train_cfg" --synthetic --dist.device "$device" --batch 8 \
    --steps 1 --warmup 0 --saves 2 --save-dir "$work" --json "$out/bench_saves.json"
step bench_sample "$PYTHON" tools/bench_sample.py --config "$train_cfg" --sr-config "$sr_cfg" --device "$device" \
    "${sample[@]}" --json "$out/bench_sample.json"

for run in a b; do
    step "deterministic_$run" "$PYTHON" -m ddpdiff.train "${common[@]}" --run.dir "$work/det_$run" \
        --train.deterministic true --train.precision bf16
done
step determinism "$PYTHON" - "$work/det_a" "$work/det_b" "$out/determinism.json" <<'PY'
import json, sys
from ddpdiff import checkpoint
a, b = (checkpoint.load_latest(run)[0] for run in sys.argv[1:3])
differ = [f"{part}.{k}" for part in ("model", "ema") for k in a[part] if not a[part][k].equal(b[part][k])]
result = {"step": a["step"], "bitwise_equal": a["step"] == b["step"] and not differ, "differing": differ[:20]}
print(json.dumps(result, indent=1))
json.dump(result, open(sys.argv[3], "w"), indent=1)
sys.exit(0 if result["bitwise_equal"] else 1)
PY

"$PYTHON" - "$out" "$mode" "$failed" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
report = {"mode": "cpu" if sys.argv[2] == "--cpu" else "gpu", "failed_steps": int(sys.argv[3])}
for path in sorted(out.glob("*.json")):
    if path.name != "gpu_check.json":
        report[path.stem] = json.loads(path.read_text())
(out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
print(f"gpu_check: {report['failed_steps']} failed steps; figures in {out / 'gpu_check.json'}")
PY
exit "$failed"
