#!/usr/bin/env bash
# The GPU measurements of issue 12 in one call (sized for ~7 minutes on one H100/H200-class GPU; each part has its
# own time limit, and whatever a part wrote before its limit is kept):
#   1. bench_core.py --device cuda: ViT-B/16 at 224 px, batch 128, bf16 autocast, tasks 1/10/20; step-time
#      ratios (paired with a plain LoRA step), peak memory, flops, inference at batch 1 and 128;
#   2. sim_imagenet_r.py: ImageNet-R N=10 through the real engine (random-init ViT-B/16, synthetic data of the
#      real split's size), 1 of 20 epochs per task run and extrapolated; peak memory; bf16 vs fp32 on 2 tasks.
# Usage: bash benchmarks/gpu_check.sh [--cpu-tiny] [OUT_DIR]
#   OUT_DIR defaults to $OUT, else runs/gpu-check; PYTHON picks the interpreter.
#   --cpu-tiny: check this script end to end without a GPU. The same two parts run on CPU at tiny sizes (bench_core
#   --quick with the GPU run's modes, bf16 autocast and spawned processes; sim_imagenet_r --tiny); ~2-3 minutes on
#   2 cores, and its numbers say nothing about a GPU. Without the flag nothing changes: CUDA is required.
# Output: OUT_DIR/{bench_core,sim}.{md,json,log}; the run directories of the simulation under OUT_DIR/sim-runs.
set -uo pipefail
tiny=0
if [ "${1:-}" = "--cpu-tiny" ]; then
  tiny=1
  shift
fi
out="${1:-${OUT:-runs/gpu-check}}"
py="${PYTHON:-python}"
here="$(cd "$(dirname "$0")" && pwd)"
export PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"
if [ "$tiny" = 1 ]; then
  bench_args=(--device cpu --quick --modes auto,stacked --infer-modes auto --amp bf16 --start-method spawn)
  sim_args=(--tiny --device cpu)
else
  "$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" \
    || exit 2
  bench_args=(--device cuda)
  sim_args=(--device cuda)
fi
status=0
timeout 250 "$py" "$here/bench_core.py" "${bench_args[@]}" --json "$out/bench_core.json" \
  > "$out/bench_core.md" 2> "$out/bench_core.log" || { rc=$?; status=1; echo "bench_core: exit $rc (see $out/bench_core.log)"; }
timeout 200 "$py" "$here/sim_imagenet_r.py" "${sim_args[@]}" --out "$out/sim-runs" --json "$out/sim.json" \
  > "$out/sim.md" 2> "$out/sim.log" || { rc=$?; status=1; echo "sim_imagenet_r: exit $rc (see $out/sim.log)"; }
cat "$out/bench_core.md" "$out/sim.md"
exit $status
