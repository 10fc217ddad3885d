"""A clipped Adam step on the CPU: fusedopt.Adam(max_grad_norm=1.0) against
torch.nn.utils.clip_grad_norm_(foreach=True) + torch.optim.Adam(fused=True), and against
fusedopt.Adam without clipping (what the clip costs).

GPT-2 small parameter list (148 tensors, 124.4M elements; fusedopt/bench/presets.py), float32.
Each repeat times the three back to back in a rotating order (interleaved) on their own params and
states, with the same fresh grads (copied in untimed before each call, since torch's clip rewrites
them). max_norm 1.0 is far below the grads' norm (~11,000): every step clips. Reported: the median
step time in ms and the ratios.

    python benchmarks/bench_clip_step.py [--reps 9] [--threads N]
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
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-norm", type=float, default=1.0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=g) for s in gpt2_shapes()]

    def params():
        return [torch.nn.Parameter(torch.zeros_like(x)) for x in grads]

    p_torch, p_fused, p_plain, p_tplain = params(), params(), params(), params()
    o_torch = torch.optim.Adam(p_torch, lr=1e-4, fused=True)
    o_fused = fusedopt.Adam(p_fused, lr=1e-4, max_grad_norm=args.max_norm)
    o_plain = fusedopt.Adam(p_plain, lr=1e-4)
    o_tplain = torch.optim.Adam(p_tplain, lr=1e-4, fused=True)
    # As many bytes as all the grads, in one tensor: its sum is one plain read of them, the least
    # any norm pass can cost on this machine.
    flat = torch.cat([x.flatten() for x in grads])

    def torch_step():
        torch.nn.utils.clip_grad_norm_(p_torch, args.max_norm, foreach=True)
        o_torch.step()

    cases = {"torch clip_grad_norm_(foreach) + fused Adam": (p_torch, torch_step),
             "fusedopt Adam(max_grad_norm)": (p_fused, o_fused.step),
             "fusedopt Adam, no clipping": (p_plain, o_plain.step),
             "torch fused Adam, no clipping": (p_tplain, o_tplain.step),
             "one read of as many bytes as the grads (sum)": ([], flat.sum)}
    times = {k: [] for k in cases}
    names = list(cases)
    for rep in range(args.warmup + args.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            ps, step = cases[name]
            for p, x in zip(ps, grads):
                if p.grad is None:
                    p.grad = x.clone()
                else:
                    p.grad.copy_(x)
            t0 = time.perf_counter()
            step()
            dt = time.perf_counter() - t0
            if rep >= args.warmup:
                times[name].append(dt * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    numel = sum(x.numel() for x in grads)
    print(f"GPT-2 small, float32, {numel / 1e6:.1f}M elements, {torch.get_num_threads()} threads, "
          f"{args.reps} interleaved repeats, max_norm {args.max_norm} (grad norm {float(o_fused.grad_norm):.1f})")
    for k, v in med.items():
        print(f"  {k:48s} {v:8.1f} ms")
    t, f, p, tp, read = (med[n] for n in names)
    print(f"  speedup over torch clip + fused Adam: {t / f:.2f}x;  clipping costs {100 * (f / p - 1):.0f}% "
          f"over fusedopt Adam without it")
    # What a clipped step costs at this machine's bandwidth: the faster unclipped Adam plus one
    # read of the grads (torch's sum as the read; fusedopt's norm reads a little faster, with
    # several streams a core). The speedup over torch's clip + step is bounded near t / reference.
    reference = min(p, tp) + read
    print(f"  reference (the faster unclipped Adam + one read of the grads): {reference:.1f} ms, "
          f"{t / reference:.2f}x torch's clip + step; the clipped step is {f - reference:+.1f} ms from it")


if __name__ == "__main__":
    main()
