#!/usr/bin/env bash
# fusedopt RMSprop / Adagrad / Lion on CPU, fp32, GPT-2 small and 10,000 x 1,024 tensors, against
# torch's for-loop / foreach / fused (torch has no fused RMSprop and no Lion).
# Writes benchmarks/results/new-optimizers-cpu/ unless OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m fusedopt.bench --devices cpu --presets gpt2-small many-small --optimizers rmsprop adagrad lion \
    --out "${OUT:-benchmarks/results/new-optimizers-cpu}" "$@"
