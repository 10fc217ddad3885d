#!/usr/bin/env bash
# GPU benchmark: every visible GPU, fp32 and bf16, CUDA-graph variants included (they are in
# the default --impls on CUDA). Results go to benchmarks/results/gpu/ unless OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m fusedopt.bench --devices cuda --dtypes fp32 bf16 --out "${OUT:-benchmarks/results/gpu}" "$@"
