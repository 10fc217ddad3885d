"""Host cost per tensor of one optimizer step, fusedopt against torch fused: the same as
``python -m fusedopt.bench --host-cost`` (fusedopt/bench/host_cost.py says what is measured and
how), kept with this script's own flags for the scripts that call it (scripts/gpu_check.sh).

    python benchmarks/bench_host_cost.py [--tensors 10000] [--reps 60] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fusedopt.bench.__main__ import main as bench_main  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tensors", type=int, default=10_000)
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    return bench_main(["--host-cost", "--devices", args.device, "--tensors", str(args.tensors),
                       "--reps", str(args.reps)])


if __name__ == "__main__":
    sys.exit(main())
