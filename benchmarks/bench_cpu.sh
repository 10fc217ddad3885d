#!/usr/bin/env bash
# CPU benchmark with the settings used for benchmarks/results/cpu/ (the CLI defaults:
# fp32; gpt2-small, many-small, huge, llama; sgd, adam, adamw; auto reps, 2 warm-up steps).
# Run it on an otherwise idle machine: the CLI warns when the load average says otherwise.
# Extra arguments are passed through, e.g.  benchmarks/bench_cpu.sh --dtypes fp32 bf16
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m fusedopt.bench --devices cpu --out "${OUT:-benchmarks/results/cpu}" "$@"
