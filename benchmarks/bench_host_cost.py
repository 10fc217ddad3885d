"""Host cost per tensor of one optimizer step: fusedopt against torch fused, on 10,000
one-element float32 params (the update math is then negligible, so the step time is the per-tensor
bookkeeping: reading grads and states, validation, the work list, the kernel's per-tensor setup).

Reported: "host µs per tensor" = the median step time / the number of tensors, per optimizer and
implementation (fusedopt, fusedopt on params flattened by fusedopt.flatten_, torch fused), from
interleaved repeats. On CUDA it is the time until step() returns (the kernels
run asynchronously), measured with the queue drained before each step.

    python benchmarks/bench_host_cost.py [--tensors 10000] [--reps 30] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fusedopt  # noqa: E402

OPTIMIZERS = {
    "adam": (lambda ps: fusedopt.Adam(ps, lr=1e-3), lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True)),
    "sgd": (lambda ps: fusedopt.SGD(ps, lr=1e-3, momentum=0.9),
            lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, fused=True)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tensors", type=int, default=10_000)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)

    def params():
        ps = [torch.nn.Parameter(torch.randn(1, generator=g).to(device)) for _ in range(args.tensors)]
        for p in ps:
            p.grad = torch.randn(1, generator=g).to(device)
        return ps

    print(f"{args.tensors:,} one-element float32 params on {device}, {torch.get_num_threads()} CPU threads, "
          f"median of {args.reps} interleaved steps; host µs per tensor = step time / tensors")
    for name, (make_fused, make_torch) in OPTIMIZERS.items():
        flat = params()
        fusedopt.flatten_(flat)  # one buffer for the params, one for the grads
        steps = {"fusedopt": make_fused(params()).step, "fusedopt flat": make_fused(flat).step,
                 "torch fused": make_torch(params()).step}
        times = {k: [] for k in steps}
        for rep in range(args.reps + 3):
            for impl, step in (steps.items() if rep % 2 else reversed(list(steps.items()))):
                sync()
                t0 = time.perf_counter()
                step()
                dt = time.perf_counter() - t0
                if rep >= 3:
                    times[impl].append(dt)
        med = {k: statistics.median(v) * 1e6 / args.tensors for k, v in times.items()}
        print(f"  {name:5s} host µs per tensor: fusedopt {med['fusedopt']:.3f}, fusedopt flat "
              f"{med['fusedopt flat']:.3f} (fusedopt.flatten_), torch fused {med['torch fused']:.3f} "
              f"({med['torch fused'] / med['fusedopt']:.1f}x / {med['torch fused'] / med['fusedopt flat']:.1f}x)")


if __name__ == "__main__":
    main()
