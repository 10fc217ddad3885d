#!/usr/bin/env bash
# GPU validation of fusedopt on a machine with a GPU, a CUDA build of torch and no network:
# builds the extension in place against the installed torch, runs the whole test suite (CUDA
# tests enabled), compute-sanitizer memcheck / racecheck / initcheck / synccheck over a short optimizer
# run, and the CUDA benchmarks. Everything lands in the folder given as the first argument.
#
#   bash scripts/gpu_check.sh OUT_DIR
set -uo pipefail
out="${1:?usage: scripts/gpu_check.sh OUT_DIR}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
status=0
run() {  # run NAME CMD...: log to $out/NAME.log, remember failures, keep going
  local name="$1"; shift
  echo "== $name: $*" | tee -a "$out/summary.txt"
  "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc" | tee -a "$out/summary.txt"
  [ $rc -eq 0 ] || status=1
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  git rev-parse HEAD 2>/dev/null || true
} >"$out/environment.txt" 2>&1
export FUSEDOPT_CUDA=1 MAX_JOBS="${MAX_JOBS:-8}" PYTHONUNBUFFERED=1
run build pip install --no-build-isolation --no-deps -e .
# registers per kernel: __launch_bounds__(512) must keep every kernel launchable (<= 128)
run ptxas /usr/local/cuda/bin/nvcc -std=c++20 -O3 -c csrc/cuda/fused_step_kernels.cu -o "$out/kernels.o" \
  -gencode=arch=compute_90,code=sm_90 -gencode=arch=compute_100,code=sm_100 -Xptxas -v
run tests python -m pytest -ra
sanitizer="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
for tool in memcheck racecheck initcheck synccheck; do
  run "sanitizer_$tool" "$sanitizer" --tool "$tool" --error-exitcode 1 python scripts/sanitizer_run.py
done
run bench python -m fusedopt.bench --devices cuda --out "$out/bench"
exit $status
