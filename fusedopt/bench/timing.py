"""Timing primitives: per-step timers (CPU wall clock, CUDA events), CUDA-graph capture of a
step, and the streaming-bandwidth reference each result is compared against.

Reference bandwidth
-------------------
CPU: an in-place scale, ``x.mul_(c)`` over a 256 MiB float32 buffer (far beyond any LLC),
counting 2 * nbytes (one read + one write per element). Chosen over ``torch.add(a, b, out=c)``
because it has the same access pattern as an optimizer step: every tensor an optimizer writes
(p, exp_avg, exp_avg_sq, momentum_buffer) is updated *in place*, i.e. each written cache line
was just read. An out-of-place kernel writes to lines it never read, which on x86 without
non-temporal stores costs a hidden read-for-ownership (write-allocate): c is really moved
twice while the byte count credits it once, so add(out=) under-states achievable bandwidth
(by about a quarter) and would flatter the optimizers. The kernel runs on torch's intra-op
thread pool, the same threads the optimizer kernels use.

GPU: a device-to-device copy (``dst.copy_(src)``) of 1 GiB, counting read + write bytes,
timed with CUDA events: the usual practical HBM roofline.

Each sample is the median over repetitions (the max is kept in the JSON as well); the
benchmark takes one sample per timing round and uses the median of those samples.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch

__all__ = ["time_steps", "stream_bandwidth", "StreamReference", "capture_step", "synchronize"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    step: Callable[[], object],
    device: torch.device,
    *,
    warmup: int,
    reps: int | None,
    min_reps: int = 3,
    max_reps: int = 20,
    budget_s: float = 1.0,
) -> list[float]:
    """Run ``step`` ``warmup`` times untimed, then time each further call; milliseconds.

    ``reps`` fixed: exactly that many timed calls. ``reps=None`` (auto): keep timing until
    ``budget_s`` seconds of timed steps have accumulated, with at least ``min_reps`` and at
    most ``max_reps`` calls. CPU: ``time.perf_counter`` around each call. CUDA: a pair of
    events around each call on the current stream (GPU time, launch gaps included),
    synchronised once per batch of calls, so host timing does not serialise the queue.
    """
    device = torch.device(device)
    for _ in range(warmup):
        step()
    synchronize(device)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if device.type == "cuda":
            return _time_cuda(step, device, reps, min_reps, max_reps, budget_s)
        return _time_cpu(step, reps, min_reps, max_reps, budget_s)
    finally:
        if gc_was_enabled:
            gc.enable()


def _time_cpu(step, reps, min_reps, max_reps, budget_s) -> list[float]:
    out: list[float] = []
    spent = 0.0
    while True:
        t0 = time.perf_counter()
        step()
        dt = time.perf_counter() - t0
        out.append(dt * 1e3)
        spent += dt
        if reps is not None:
            if len(out) >= reps:
                return out
        elif len(out) >= max_reps or (len(out) >= min_reps and spent >= budget_s):
            return out


def _time_cuda(step, device, reps, min_reps, max_reps, budget_s) -> list[float]:
    out: list[float] = []
    spent = 0.0
    with torch.cuda.device(device):
        while True:
            n = reps if reps is not None else max(1, min(min_reps if not out else 10, max_reps - len(out)))
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
            for start, end in events:
                start.record()
                step()
                end.record()
            torch.cuda.synchronize(device)
            for start, end in events:
                ms = start.elapsed_time(end)
                out.append(ms)
                spent += ms / 1e3
            if reps is not None or len(out) >= max_reps or spent >= budget_s:
                return out


def capture_step(step: Callable[[], object], device: torch.device, warmup: int = 3) -> Callable[[], None]:
    """Warm ``step`` up on a side stream, capture one call in a CUDA graph, return ``replay``.

    The warm-up creates the optimizer state (lazily allocated on the first step) outside the
    capture, as CUDA graphs require.
    """
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(max(1, warmup)):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    torch.cuda.synchronize(device)
    return graph.replay  # the bound method keeps the graph alive


class StreamReference:
    """The streaming kernel of the module docstring, with its buffers kept for repeated samples.

    ``measure(reps)`` returns ``{"gbps": median, "gbps_max": best, "times_ms": [...]}``. The
    benchmark samples it between timing rounds, so the reference follows bandwidth drift
    (a shared host's memory bus) the same way the optimizer timings do.
    """

    def __init__(self, device: torch.device, nbytes: int | None = None):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            n = (nbytes or (1 << 30)) // 4
            self._src = torch.ones(n, dtype=torch.float32, device=self.device)
            self._dst = torch.empty_like(self._src)
            self.method = f"device-to-device copy, dst.copy_(src) of {n * 4 / 2**20:.0f} MiB, read+write bytes"
        else:
            n = (nbytes or (256 << 20)) // 4
            self._x = torch.ones(n, dtype=torch.float32)
            self._flip = 0
            self.method = (f"in-place x.mul_(c) over {n * 4 / 2**20:.0f} MiB float32, read+write bytes, "
                           f"{torch.get_num_threads()} threads")
        self.bytes_per_rep = 2 * n * 4

    def _kernel(self) -> None:
        if self.device.type == "cuda":
            self._dst.copy_(self._src)
        else:
            self._x.mul_(1.0001 if self._flip & 1 else 1 / 1.0001)
            self._flip += 1

    def measure(self, reps: int = 10, warmup: int = 2) -> dict:
        times = time_steps(self._kernel, self.device, warmup=warmup, reps=reps)
        return {
            "gbps": self.bytes_per_rep / (statistics.median(times) / 1e3) / 1e9,
            "gbps_max": self.bytes_per_rep / (min(times) / 1e3) / 1e9,
            "times_ms": times,
        }

    def close(self) -> None:
        for name in ("_src", "_dst", "_x"):
            if hasattr(self, name):
                delattr(self, name)


def stream_bandwidth(device: torch.device, nbytes: int | None = None, reps: int = 10) -> dict:
    """One-off measurement with :class:`StreamReference`: ``gbps`` (median), ``gbps_max``,
    ``method``, ``bytes_per_rep``, ``times_ms``."""
    ref = StreamReference(device, nbytes)
    try:
        return {**ref.measure(reps, warmup=3), "method": ref.method, "bytes_per_rep": ref.bytes_per_rep}
    finally:
        ref.close()
