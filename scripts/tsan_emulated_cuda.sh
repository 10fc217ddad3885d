#!/usr/bin/env bash
# Runs the CUDA kernels, emulated on CPU threads, under ThreadSanitizer (on demand; no GPU, no
# torch needed): any data race between blocks or threads of a block is reported and fails the run.
# Usage: bash scripts/tsan_emulated_cuda.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
OUT="${1:-build/tsan}"
mkdir -p "$OUT"
if [[ ! -f "$CUDA_HOME/include/cuda_runtime.h" ]]; then
  echo "tsan_emulated_cuda: no CUDA headers under CUDA_HOME=$CUDA_HOME" >&2
  exit 2
fi
g++ -std=c++20 -O1 -g -fsanitize=thread -Wall -Wno-unknown-pragmas \
  -I"$CUDA_HOME/include" -I"$CUDA_HOME/include/cccl" -Icsrc/cuda/emulation \
  csrc/cuda/emulation/race_driver.cpp csrc/cuda/emulation/emulated_kernels.cpp csrc/cuda/host_tables.cpp \
  -o "$OUT/race_driver"
# halt_on_error: the first race fails the script
TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 ${TSAN_OPTIONS:-}" "$OUT/race_driver"
