"""fusedopt.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_(foreach=True) on the CPU.

Grads of the exact GPT-2 small parameter list (148 tensors, 124.4M elements; see
fusedopt/bench/presets.py), float32 unless --dtype says otherwise. Each repeat times both
implementations back to back, in alternating order (interleaved), on the same grads. First the
reduction alone (torch.ops.fusedopt.grad_norm_ against torch.nn.utils.get_total_norm(foreach=True)),
then clip_grad_norm_ in two cases:
"below" (max_norm far above the norm: coefficient 1; torch still multiplies every grad by it,
fusedopt on the CPU skips that identity) and "above" (max_norm 1.0, far below the norm of ~11,000:
every call scales every grad; the grads are restored from a copy, untimed, before each call). Reported: the median of the
repeats, in ms, and the grad bytes per second each call covers. The returned norms are printed
too: torch's float32 norm of GPT-2's 38.6M-element embedding grad is off by ~0.3% (float32
accumulation), fusedopt's is the correctly rounded one.

    python benchmarks/bench_clip.py [--reps 15] [--threads N] [--dtype float32] [--norm-type 2]
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
from fusedopt.bench.presets import gpt2_shapes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    ap.add_argument("--norm-type", type=float, default=2.0)
    args = ap.parse_args()
    if not fusedopt.extension_available():
        sys.exit(f"fusedopt extension not available: {fusedopt.extension_error()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    shapes = gpt2_shapes()
    g = torch.Generator().manual_seed(0)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.empty(s, dtype=dtype))
        p.grad = torch.randn(s, generator=g, dtype=torch.float32).to(dtype)
        params.append(p)
    grads = [p.grad for p in params]
    saved = [x.clone() for x in grads]
    numel = sum(p.numel() for p in params)
    grad_bytes = numel * params[0].element_size()

    print(f"GPT-2 small grads: {len(params)} tensors, {numel / 1e6:.1f}M elements, {args.dtype}, "
          f"norm_type {args.norm_type}, {torch.get_num_threads()} threads, {args.reps} interleaved repeats")
    out = torch.empty(2, dtype=torch.float64 if dtype == torch.float64 else torch.float32)

    def fused_norm():
        torch.ops.fusedopt.grad_norm_(grads, args.norm_type, 1.0, out)
        return out[0]

    for case, max_norm in (("norm only", None), ("below", 1e30), ("above", 1.0)):
        if max_norm is None:  # the reduction alone: the op against torch's get_total_norm
            impls = {
                "fusedopt": fused_norm,
                "torch foreach": lambda: torch.nn.utils.get_total_norm(grads, args.norm_type, foreach=True),
            }
        else:
            impls = {
                "fusedopt": lambda: fusedopt.clip_grad_norm_(params, max_norm, args.norm_type),
                "torch foreach": lambda: torch.nn.utils.clip_grad_norm_(params, max_norm, args.norm_type,
                                                                        foreach=True),
            }
        norms = {}
        for _ in range(args.warmup):
            for name, fn in impls.items():
                torch._foreach_copy_(grads, saved)
                norms[name] = float(fn())
        times: dict[str, list[float]] = {name: [] for name in impls}
        names = list(impls)
        for r in range(args.reps):
            for name in (names if r % 2 == 0 else names[::-1]):
                torch._foreach_copy_(grads, saved)
                t0 = time.perf_counter()
                impls[name]()
                times[name].append(time.perf_counter() - t0)
        print("the total norm alone (grad_norm_ vs get_total_norm)" if max_norm is None
              else f"clip_grad_norm_, max_norm {max_norm:g} ({case} the norm)")
        base = statistics.median(times["torch foreach"])
        for name in names:
            med = statistics.median(times[name])
            print(f"  {name:14s} median {med * 1e3:8.2f} ms  (min {min(times[name]) * 1e3:7.2f})  "
                  f"{grad_bytes / med / 1e9:6.1f} GB/s of grads  speedup {base / med:5.2f}x  "
                  f"norm {norms[name]:.9g}")


if __name__ == "__main__":
    main()
