#!/bin/bash
# The GPU correctness run (about 4 minutes on an H100/H200), from the repository root, with ../shared/gpu copied
# into the checkout as .gpu/ (ignored by git):
#   bash perf/gpu_suite.sh
# 1. The test suite on CUDA, the compiled kernels: every test on cuda tensors, the CUDA-only ones included
#    (CUDA-graph capture, mode="reduce-overhead", test_inductor_training_step, SyncBatchNormAct captured over
#    NCCL), the fuzz suite with $FUZZ_CASES cases (default 1000) where the CPU runs 64.
# 2. `tritonbn-perf sync`: SyncBatchNormAct against nn.SyncBatchNorm + activation, a world of one GPU over NCCL.
# 3. .gpu/compile.py: the ResNet-50 training step under torch.compile, plain against tritonbn.fuse.
# Files to commit land in $OUT (default perf/results/<device>/suite/): pytest.txt, pytest-summary.txt, sync.csv,
# sync.txt, compile.txt and gpu_suite.log. Like perf/gpu_tune.sh it installs nothing: the working tree's
# packages from a copy on PYTHONPATH, the tests from the checkout.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh"
OUT=${OUT:-$ROOT/perf/results/$DEVICE/suite}
export TRITONBN_FUZZ_CASES=${FUZZ_CASES:-1000}
mkdir -p "$OUT"
{
  provenance
  echo "== pytest $(date +%T) (fuzz cases: $TRITONBN_FUZZ_CASES)"
  (cd /tmp && timeout 170 python3 -m pytest "$ROOT/tests" -q -n 12 -p no:cacheprovider -rfE) > "$OUT/pytest.txt" 2>&1
  echo "pytest rc=$?"
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest.txt" | tail -40 | tee "$OUT/pytest-summary.txt"
  echo "== sync $(date +%T)"
  timeout 60 python3 -m tritonbn.perf.cli sync --out "$OUT/sync.csv" > "$OUT/sync.txt" 2>&1; echo "sync rc=$?"
  tail -20 "$OUT/sync.txt"
  echo "== compile $(date +%T)"
  if [[ -f "$ROOT/.gpu/compile.py" ]]; then
    (cd /tmp && timeout 120 python3 "$ROOT/.gpu/compile.py" 64) > "$OUT/compile.txt" 2>&1; echo "compile rc=$?"
    cat "$OUT/compile.txt"
  else
    echo "no .gpu/compile.py: copy ../shared/gpu to .gpu first"
  fi
  echo "== done $(date +%T)"
} 2>&1 | tee "$OUT/gpu_suite.log"
