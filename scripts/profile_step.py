"""Fused optimizer steps on a GPU, timed: a target for Nsight Compute (ncu) and the A/B timing of
prebuilt extension variants (scripts/gpu_check.sh).

    python scripts/profile_step.py CASE [CASE ...] [--steps 15] [--graph]

CASE is PRESET:DTYPE:OPTIMIZER (DTYPE and OPTIMIZER optional: fp32, adam), e.g. llama:bf16 or
many-small:fp32:sgd. Presets: llama, a 2-layer Llama-7B-shaped list (0.67B params: embeddings,
q/k/v/o, gate/up/down, norms); many-small, 10,000 tensors of 1,024 elements.

Per case, prints the median and fastest step by CUDA events and the effective bandwidth (the
bytes the step must read and write). Eager steps count the host's work before the launch too,
while the GPU waits (about 0.5-1 ms for 10,000 tensors); --graph times replays of one captured
step instead, the kernel alone.
"""

import argparse

import torch

import fusedopt
from fusedopt.bench.presets import llama_shapes

SHAPES = {"llama": lambda: llama_shapes(n_layer=2), "many-small": lambda: [(1024,)] * 10_000}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OPTIMIZERS = {"adam": (lambda ps: fusedopt.Adam(ps, lr=1e-3), 7),  # reads p g m v, writes p m v
              "sgd": (lambda ps: fusedopt.SGD(ps, lr=1e-2, momentum=0.9), 5)}  # p g buf; p buf


def parse_case(text: str) -> tuple[str, str, str]:
    parts = text.split(":")
    preset, dtype, opt = (parts + ["fp32", "adam"][len(parts) - 1:])[:3]
    if len(parts) > 3 or preset not in SHAPES or dtype not in DTYPES or opt not in OPTIMIZERS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected PRESET[:DTYPE[:OPTIMIZER]] with PRESET in {sorted(SHAPES)}, DTYPE in "
            f"{sorted(DTYPES)}, OPTIMIZER in {sorted(OPTIMIZERS)}")
    return preset, dtype, opt


def time_case(preset: str, dtype_name: str, opt_name: str, steps: int, graph: bool) -> str:
    dtype, dev = DTYPES[dtype_name], "cuda"
    gen = torch.Generator(dev).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=dev, dtype=dtype, generator=gen))
              for s in SHAPES[preset]()]
    for p in params:
        p.grad = torch.randn(p.shape, device=dev, dtype=dtype, generator=gen)
    make, bytes_per_elem = OPTIMIZERS[opt_name]
    opt = make(params)
    for _ in range(2):  # lazy state, uploaded tables
        opt.step()
    step = opt.step
    if graph:
        g = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            opt.step()  # an eager step on the capturing stream first
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(g):
            opt.step()
        step = g.replay
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    numel = sum(p.numel() for p in params)
    moved = numel * params[0].element_size() * bytes_per_elem
    median = times[len(times) // 2]
    return (f"{preset}:{dtype_name}:{opt_name}{' graph' if graph else ''}: {len(params)} tensors, "
            f"{numel / 1e6:.1f}M elements, median {median:.3f} ms, fastest {times[0]:.3f} ms, "
            f"{moved / median / 1e6:.0f} GB/s effective")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="+", type=parse_case, metavar="CASE")
    ap.add_argument("--steps", type=int, default=15, help="timed steps per case (default 15)")
    ap.add_argument("--graph", action="store_true", help="time replays of a captured step")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    for preset, dtype, opt in args.cases:
        print(time_case(preset, dtype, opt, args.steps, args.graph), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
