"""Host cost per tensor of one optimizer step (``fusedopt-bench --host-cost``).

fusedopt against torch fused on N one-element float32 params (10,000 by default): the update math
is then negligible, so the step time is the per-tensor bookkeeping (reading grads and states,
validation, the work list, the kernel's per-tensor setup). Reported: "host µs per tensor" = the
median step time / N, per optimizer and implementation (fusedopt; fusedopt on params flattened by
``fusedopt.flatten_``; torch fused), with blocks of 10 steps of each implementation alternating,
in two conditions:

- cold: before each timed step a 64 MB buffer is written through, on all threads, as a training
  step's forward and backward would: the caches hold none of the optimizer's objects, and the
  thread pool is awake;
- warm: steps back to back.

On CUDA it is the time until ``step()`` returns (the kernels run asynchronously), measured with
the queue drained before each step.

Steps of one implementation interleaved step by step with another's measure the machine more
than the step: after torch fused's 30 ms single-threaded step the idle second core of a VM can
take from 0.1 to several ms to wake, and the two optimizers' objects evict each other. Hence
blocks.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

BLOCK = 10  # steps timed in a row per implementation and condition
CONDITIONS = ("cold", "warm")
IMPLS = ("fusedopt", "fusedopt-flat", "torch-fused")
OPTIMIZERS = ("adam", "sgd")


def _constructors(name: str) -> tuple[Callable, Callable]:
    import fusedopt

    if name == "adam":
        return (lambda ps: fusedopt.Adam(ps, lr=1e-3), lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True))
    if name == "sgd":
        return (lambda ps: fusedopt.SGD(ps, lr=1e-3, momentum=0.9),
                lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, fused=True))
    raise ValueError(f"host cost: unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def measure(device: str | torch.device, tensors: int = 10_000, reps: int = 60,
            optimizers: tuple[str, ...] | list[str] = OPTIMIZERS, seed: int = 0) -> dict:
    """Time the three implementations on ``tensors`` one-element params; ``reps`` timed steps per
    implementation and condition (whole blocks of BLOCK). Returns a JSON-ready dict."""
    import fusedopt

    if tensors < 1:
        raise ValueError(f"host cost: tensors must be >= 1, got {tensors}")
    if reps < BLOCK:
        raise ValueError(f"host cost: reps must be >= {BLOCK} (steps are timed in blocks of {BLOCK}), got {reps}")
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(seed)

    def params():
        ps = [torch.nn.Parameter(torch.randn(1, generator=g).to(device)) for _ in range(tensors)]
        for p in ps:
            p.grad = torch.randn(1, generator=g).to(device)
        return ps

    flush = torch.zeros(16 * 2**20, device=device)  # 64 MB of float32
    rows = []
    for name in optimizers:
        make_fused, make_torch = _constructors(name)
        flat = params()
        fusedopt.flatten_(flat)  # one buffer for the params, one for the grads
        steps = {"fusedopt": make_fused(params()).step, "fusedopt-flat": make_fused(flat).step,
                 "torch-fused": make_torch(params()).step}
        for step in steps.values():  # lazy state, plans
            step()
        times = {(k, cond): [] for k in steps for cond in CONDITIONS}
        # blocks of steps of one implementation (a training loop steps one optimizer), the
        # implementations alternating block by block so that they share the machine's drift
        for block in range(reps // BLOCK):
            for impl, step in (steps.items() if block % 2 else reversed(list(steps.items()))):
                for cond in CONDITIONS:
                    step()
                    for _ in range(BLOCK):
                        if cond == "cold":
                            flush.add_(1.0)
                        sync()
                        t0 = time.perf_counter()
                        step()
                        times[(impl, cond)].append(time.perf_counter() - t0)  # CUDA: until launched
        sync()
        for (impl, cond), ts in times.items():
            rows.append({"optimizer": name, "impl": impl, "condition": cond,
                         "us_per_tensor": statistics.median(ts) * 1e6 / tensors,
                         "times_ms": [t * 1e3 for t in ts]})
    return {"device": str(device), "tensors": tensors, "steps": reps // BLOCK * BLOCK, "block": BLOCK,
            "cpu_threads": torch.get_num_threads(), "results": rows}


def format_lines(res: dict) -> str:
    """The measurement as text: one line per optimizer and condition."""
    lines = [f"{res['tensors']:,} one-element float32 params on {res['device']}, {res['cpu_threads']} CPU threads, "
             f"median of {res['steps']} steps in blocks of {res['block']}; host µs per tensor = step time / "
             "tensors; cold: after a 64 MB write on all threads, warm: back to back"]
    us = {(r["optimizer"], r["impl"], r["condition"]): r["us_per_tensor"] for r in res["results"]}
    for name in dict.fromkeys(r["optimizer"] for r in res["results"]):
        for cond in CONDITIONS:
            fo, fl, to = (us[(name, impl, cond)] for impl in IMPLS)
            lines.append(f"  {name:5s} {cond}: host µs per tensor: fusedopt {fo:.3f}, fusedopt flat {fl:.3f} "
                         f"(fusedopt.flatten_), torch fused {to:.3f} ({to / fo:.1f}x / {to / fl:.1f}x)")
    return "\n".join(lines)
