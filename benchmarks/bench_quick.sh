#!/usr/bin/env bash
# Seconds-long smoke run on tiny presets (what tests/bench runs); numbers are not meaningful.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m fusedopt.bench --quick --out "${OUT:-out/bench-quick}" "$@"
