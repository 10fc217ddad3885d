"""Host cost per tensor of one optimizer step: fusedopt against torch fused, on 10,000
one-element float32 params (the update math is then negligible, so the step time is the per-tensor
bookkeeping: reading grads and states, validation, the work list, the kernel's per-tensor setup).

Reported: "host µs per tensor" = the median step time / the number of tensors, per optimizer and
implementation (fusedopt, fusedopt on params flattened by fusedopt.flatten_, torch fused), with
blocks of 10 steps of each implementation alternating, in two conditions:
- cold: before each timed step a 64 MB buffer is written through, on all threads, as a training
  step's forward and backward would: the caches hold none of the optimizer's objects, and the
  thread pool is awake;
- warm: steps back to back.
On CUDA it is the time until step() returns (the kernels run asynchronously), measured with the
queue drained before each step.

(Steps of one implementation interleaved step by step with another's measure the machine more
than the step: after torch fused's 30 ms single-threaded step the idle second core of a VM can
take from 0.1 to several ms to wake, and the two optimizers' objects evict each other.)

    python benchmarks/bench_host_cost.py [--tensors 10000] [--reps 60] [--device cpu|cuda]
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

BLOCK = 10  # steps timed in a row per implementation and condition
OPTIMIZERS = {
    "adam": (lambda ps: fusedopt.Adam(ps, lr=1e-3), lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True)),
    "sgd": (lambda ps: fusedopt.SGD(ps, lr=1e-3, momentum=0.9),
            lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, fused=True)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tensors", type=int, default=10_000)
    ap.add_argument("--reps", type=int, default=60)
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

    flush = torch.zeros(16 * 2**20, device=device)  # 64 MB of float32

    print(f"{args.tensors:,} one-element float32 params on {device}, {torch.get_num_threads()} CPU threads, "
          f"median of {args.reps // BLOCK * BLOCK} steps in blocks of {BLOCK}; host µs per tensor = step time / "
          "tensors; cold: after a 64 MB write on all threads, warm: back to back")
    for name, (make_fused, make_torch) in OPTIMIZERS.items():
        flat = params()
        fusedopt.flatten_(flat)  # one buffer for the params, one for the grads
        steps = {"fusedopt": make_fused(params()).step, "fusedopt flat": make_fused(flat).step,
                 "torch fused": make_torch(params()).step}
        for step in steps.values():  # lazy state, plans
            step()
        times = {(k, cond): [] for k in steps for cond in ("cold", "warm")}
        # blocks of steps of one implementation (a training loop steps one optimizer), the
        # implementations alternating block by block so that they share the machine's drift
        for block in range(args.reps // BLOCK):
            for impl, step in (steps.items() if block % 2 else reversed(list(steps.items()))):
                for cond in ("cold", "warm"):
                    step()
                    for _ in range(BLOCK):
                        if cond == "cold":
                            flush.add_(1.0)
                        sync()
                        t0 = time.perf_counter()
                        step()
                        times[(impl, cond)].append(time.perf_counter() - t0)  # CUDA: until launched
        med = {k: statistics.median(v) * 1e6 / args.tensors for k, v in times.items()}
        for cond in ("cold", "warm"):
            fo, fl, to = med[("fusedopt", cond)], med[("fusedopt flat", cond)], med[("torch fused", cond)]
            print(f"  {name:5s} {cond}: host µs per tensor: fusedopt {fo:.3f}, fusedopt flat {fl:.3f} "
                  f"(fusedopt.flatten_), torch fused {to:.3f} ({to / fo:.1f}x / {to / fl:.1f}x)")


if __name__ == "__main__":
    main()
