#!/usr/bin/env bash
# "Large-model precision" on CPU: GPT-2 small shapes in bf16, fusedopt Adam and SGD(momentum) with
# each precision option (none, master, master+rem, fp32-state, master+fp32-state, sr) against
# torch foreach / fused on the same bf16 params. Writes benchmarks/results/mixed-cpu/ unless OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m fusedopt.bench --devices cpu --presets mixed --out "${OUT:-benchmarks/results/mixed-cpu}" "$@"
