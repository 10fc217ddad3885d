#!/usr/bin/env bash
# GPU validation of fusedopt, sized for one short lease of a GPU machine that has a CUDA build of
# torch, pytest-xdist and no network. Everything lands in OUT_DIR (summary.txt first).
#
#   bash scripts/gpu_check.sh OUT_DIR [PREBUILT_DIR]
#
# PREBUILT_DIR: an extension built elsewhere against the machine's Python and torch (its
# _C*.so and _build_info.py); used when it loads and steps on the GPU, else the extension is
# built here (a few minutes of the lease).
# Phase A: compute-sanitizer memcheck / initcheck over the whole sanitizer run and racecheck /
# synccheck over fusedopt's kernels, in parallel (about a minute on an H200), ptxas register
# counts, then the test suite with CUDA enabled (the emulated-CUDA tests left out: CI runs them).
# Phase B, the GPU to itself: the benchmark, the host cost per tensor, ncu on single steps, and
# the timing of prebuilt variants (PREBUILT_DIR/NAME/) against each other.
# GPU_CHECK_PHASES=A (or B) runs one phase only. Exits 1 if any step failed (failed_steps.txt).
set -uo pipefail
out="${1:?usage: scripts/gpu_check.sh OUT_DIR [PREBUILT_DIR]}"
prebuilt="${2:-}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
rm -f "$out/failed_steps.txt"
cd "$(dirname "$0")/.."
export FUSEDOPT_CUDA=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
t0=$(date +%s)
say() { echo "[$(( $(date +%s) - t0 ))s] $*" | tee -a "$out/summary.txt"; }
step() {  # step NAME SECONDS CMD...: run with a time limit, log to NAME.log, note the exit status
  local name="$1" limit="$2"; shift 2
  say "start $name: $*"
  timeout -k 5 "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  say "end $name: exit $rc$([ $rc -eq 124 ] && echo ' (time limit)')"
  [ $rc -eq 0 ] || echo "$name" >>"$out/failed_steps.txt"  # a file: steps also run in subshells
}
finish() {
  if [ -s "$out/failed_steps.txt" ]; then
    say "failed: $(sort "$out/failed_steps.txt" | tr '\n' ' ')"
    exit 1
  fi
  say "every step passed"
  exit 0
}
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader
  python -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -2
  grep -m1 'model name' /proc/cpuinfo; nproc
  git rev-parse HEAD 2>/dev/null || true
} >"$out/environment.txt" 2>&1
cat "$out/environment.txt" >>"$out/summary.txt"

smoke() {
  python - <<'EOF'
import torch, fusedopt
from fusedopt import _build_info
assert fusedopt.extension_available(), fusedopt.extension_error()
assert _build_info.WITH_CUDA, "extension built without CUDA kernels"
p = torch.nn.Parameter(torch.randn(1000, device="cuda")); p.grad = torch.randn_like(p)
q = torch.nn.Parameter(p.detach().clone()); q.grad = p.grad.clone()
fusedopt.Adam([p], lr=0.1).step(); torch.optim.Adam([q], lr=0.1).step()
torch.testing.assert_close(p, q)
print("smoke: fused Adam step on", torch.cuda.get_device_name(), "matches torch")
EOF
}
if [ -n "$prebuilt" ] && cp "$prebuilt"/_C*.so "$prebuilt"/_build_info.py fusedopt/ && smoke >"$out/smoke.log" 2>&1; then
  say "extension: prebuilt ($prebuilt) loads and steps"
else
  say "extension: building here"
  rm -f fusedopt/_C*.so
  step build 420 env MAX_JOBS="${MAX_JOBS:-16}" python setup.py build_ext --inplace
  smoke >"$out/smoke.log" 2>&1 || { say "smoke failed after build"; echo smoke >>"$out/failed_steps.txt"; }
fi

phases="${GPU_CHECK_PHASES:-A B}"  # A, B or both
if [[ "$phases" == *A* ]]; then
# ---- phase A
san="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
# racecheck and synccheck look inside kernels (shared memory, barriers): fusedopt's alone. memcheck
# and initcheck watch the whole program: under a kernel filter, writes by torch's own kernels go
# unseen, and initcheck then calls every tensor torch filled uninitialized.
ours='regex=(step|grad_norm)_kernel'
limit_a="${PHASE_A_SECONDS:-120}"
sanitize() {  # sanitize TOOL [FILTER]: a filtered run falls back to the whole program if the filter is refused
  local tool="$1" filter="${2:-}"
  if [ -n "$filter" ]; then
    step "sanitizer_$tool" "$limit_a" "$san" --tool "$tool" --kernel-name "$filter" --error-exitcode 1 python scripts/sanitizer_run.py
    grep -q "SUMMARY:" "$out/sanitizer_$tool.log" && return  # it ran (errors or none)
    mv "$out/sanitizer_$tool.log" "$out/sanitizer_${tool}_filter_refused.log"
    sed -i "/^sanitizer_$tool\$/d" "$out/failed_steps.txt"
    say "sanitizer_$tool: no summary with the kernel filter; again over the whole program"
  fi
  step "sanitizer_$tool" "$limit_a" "$san" --tool "$tool" --error-exitcode 1 python scripts/sanitizer_run.py
}
sanitize memcheck &
sanitize initcheck &
sanitize racecheck "$ours" &
sanitize synccheck "$ours" &
for cu in fused_step_kernels grad_norm_kernels; do
  /usr/local/cuda/bin/nvcc -std=c++17 -O3 -c "csrc/cuda/$cu.cu" -o "/tmp/$cu.o" -gencode=arch=compute_90,code=sm_90 \
    -Xptxas -v >"$out/ptxas_$cu.log" 2>&1 \
    && /usr/local/cuda/bin/cuobjdump --dump-resource-usage "/tmp/$cu.o" >>"$out/ptxas_$cu.log" 2>&1
done
wait
# The suite alone on the GPU (CUDA tests enabled; the emulated-CUDA tests are CI's). A run cut
# short by the time limit still says which tests failed (-v, and test_times.tsv).
timeout_opt=""
python -c "import pytest_timeout" 2>/dev/null && timeout_opt="--timeout=120"
# tests/conftest.py writes each test's outcome and seconds to test_times.tsv as it finishes.
rm -f "$out/test_times.tsv"
FUSEDOPT_TEST_LOG="$out/test_times.tsv" OMP_NUM_THREADS=2 step tests "${TESTS_SECONDS:-300}" \
  python -m pytest -v -ra -n "${TEST_WORKERS:-14}" -k "not emul" -p no:cacheprovider $timeout_opt --durations=20
touch "$out/test_times.tsv"
awk -F'\t' '$1 == "failed"' "$out/test_times.tsv" >"$out/tests_failed.tsv"
sort -t$'\t' -k2,2 -rn "$out/test_times.tsv" | head -30 >"$out/tests_slowest.tsv"
say "tests: $(awk -F'\t' '$1 == "passed"' "$out/test_times.tsv" | wc -l) passed, $(wc -l <"$out/tests_failed.tsv") failed (tests_failed.tsv; slowest: tests_slowest.tsv)"
say "phase A done"
fi
[[ "$phases" == *B* ]] || finish

# ---- phase B: the GPU to itself
step bench_adam "${BENCH_SECONDS:-150}" python -m fusedopt.bench --devices cuda --presets llama many-small gpt2-small \
  --dtypes fp32 bf16 --optimizers adam --budget 0.3 --no-progress --out "$out/bench_adam"
step host_cost 60 python benchmarks/bench_host_cost.py --device cuda --reps 20
for preset in llama many-small; do
  step "ncu_$preset" 60 ncu --clock-control none --kernel-name regex:step_kernel --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
    python scripts/profile_step.py "$preset" --steps 2
done
# Variants: every PREBUILT_DIR/NAME/ that holds an extension (scripts/prebuild_for_gpu_machine.sh
# NAME) is timed against the others on the same steps, graph-captured (the kernel alone), in two
# rounds of alternating processes.
variants=()
for d in "${prebuilt:-/nonexistent}"/*/; do
  ls "$d"_C*.so >/dev/null 2>&1 && variants+=("$(basename "$d")")
done
if [ ${#variants[@]} -gt 0 ]; then
  for v in "${variants[@]}"; do
    rm -rf "/tmp/variant_$v" && mkdir -p "/tmp/variant_$v" && cp -r fusedopt "/tmp/variant_$v/"
    rm -f "/tmp/variant_$v"/fusedopt/_C*.so
    cp "$prebuilt/$v"/_C*.so "$prebuilt/$v"/_build_info.py "/tmp/variant_$v/fusedopt/"
  done
  for round in 1 2; do
    for v in "${variants[@]}"; do
      echo "== variant $v, round $round" >>"$out/variants.log"
      PYTHONPATH="/tmp/variant_$v" step "variant_${v}_$round" 90 python scripts/profile_step.py \
        llama:fp32 llama:bf16 llama:fp32:sgd many-small:fp32 --graph
      cat "$out/variant_${v}_$round.log" >>"$out/variants.log"
    done
  done
fi
step bench_sgd "${BENCH_SECONDS:-120}" python -m fusedopt.bench --devices cuda --presets llama many-small gpt2-small \
  --dtypes fp32 bf16 --optimizers sgd --budget 0.3 --no-progress --out "$out/bench_sgd"
finish
