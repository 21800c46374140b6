#!/bin/bash
# The one GPU command of the kernel work (about 6 minutes on an H100/H200; run from the repository root there):
#   bash perf/gpu_tune.sh
# 1. `tritonbn-perf tune`: every candidate configuration of ResNet-50's batch-norm shapes (batch 64), bf16 and
#    fp32, channels_last and NCHW, forward, backward and eval, checked against float64 and timed on the device
#    (CUDA-graph replay); the fastest correct one per case into kernels/tuning.json. Cases are tuned in order of
#    importance (bf16 channels_last first) until its budget is spent.
# 2. `tritonbn-perf sweep` with the new table against eager (cuDNN) and torch.compile: device and e2e time, the
#    share of copy bandwidth over the memory floor.
# 3. `tritonbn-perf host-floor` on CUDA (about 15 s): host time per training call of eager, of an
#    autograd.Function that only allocates what a fused call allocates, of tritonbn and of its launches alone.
# Files to commit land in $OUT (default perf/results/<device>/): tuning.json (also written to kernels/), tune.csv,
# sweep.csv, host_floor.txt and gpu_tune.log. Then, on any machine: `tritonbn-perf report $OUT/sweep.csv --out $OUT`.
# It installs nothing: like ../shared/gpu/check.sh it runs the working tree's packages from a copy on PYTHONPATH.
set -euo pipefail
source "$(dirname "$0")/gpu_common.sh"
OUT=${OUT:-$ROOT/perf/results/$DEVICE}
TUNE_BUDGET=${TUNE_BUDGET:-170}
SWEEP_BUDGET=${SWEEP_BUDGET:-130}
mkdir -p "$OUT"
CLI="python3 -m tritonbn.perf.cli"
{
  provenance
  echo "== tune $(date +%T)"
  timeout $((TUNE_BUDGET + 120)) $CLI tune --dtype bf16,fp32 --layout nhwc,nchw --budget-s "$TUNE_BUDGET" \
    --compile-workers 14 --out "$OUT/tune.csv" --table "$PKG/tritonbn/kernels/tuning.json" || echo "tune rc=$?"
  cp "$PKG/tritonbn/kernels/tuning.json" "$ROOT/kernels/tuning.json"
  cp "$PKG/tritonbn/kernels/tuning.json" "$OUT/tuning.json"
  echo "== sweep $(date +%T)"
  timeout $((SWEEP_BUDGET + 60)) $CLI sweep --preset resnet50 --batch 64 --dtype bf16,fp32 --layout nhwc,nchw \
    --mode fwd_bwd,eval --backend tritonbn,eager,compile --budget-s "$SWEEP_BUDGET" --no-progress \
    --out "$OUT/sweep.csv" || echo "sweep rc=$?"
  echo "== host-floor $(date +%T)"
  timeout 120 $CLI host-floor --device cuda --calls 500 --batches 9 | tee "$OUT/host_floor.txt" || echo "host-floor rc=$?"
  echo "== done $(date +%T)"
} 2>&1 | tee "$OUT/gpu_tune.log"
