"""A few fused optimizer steps on a GPU, as a target for Nsight Compute (ncu) or a plain timing.

    python scripts/profile_step.py llama|many-small [--dtype fp32|bf16] [--optimizer adam|sgd] [--steps 4]

llama: a 1-layer Llama-7B-shaped list (0.46B params: embeddings, q/k/v/o, gate/up/down, norms);
many-small: 10,000 tensors of 1,024 elements. Prints the median step time from CUDA events and the
effective bandwidth (the bytes the step must read and write), so the same script
also checks the numbers ncu reports.
"""

import argparse

import torch

import fusedopt
from fusedopt.bench.presets import llama_shapes

SHAPES = {"llama": lambda: llama_shapes(n_layer=1), "many-small": lambda: [(1024,)] * 10_000}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset", choices=sorted(SHAPES))
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    dtype, dev = DTYPES[args.dtype], "cuda"
    shapes = SHAPES[args.preset]()
    gen = torch.Generator(dev).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=dev, dtype=dtype, generator=gen)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device=dev, dtype=dtype, generator=gen)
    opt = (fusedopt.Adam(params, lr=1e-3) if args.optimizer == "adam"
           else fusedopt.SGD(params, lr=1e-2, momentum=0.9))
    times = []
    for _ in range(args.steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        opt.step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    numel = sum(p.numel() for p in params)
    # bytes per element: Adam reads p, g, m, v and writes p, m, v; SGD with momentum reads p, g, buf
    # and writes p, buf (the state has the param's dtype)
    moved = numel * params[0].element_size() * (7 if args.optimizer == "adam" else 5)
    ms = sorted(times[1:] or times)[len(times[1:] or times) // 2]
    print(f"{args.preset} {args.dtype} {args.optimizer}: {len(params)} tensors, {numel / 1e6:.1f}M elements, "
          f"median step {ms:.3f} ms, {moved / ms / 1e6:.0f} GB/s effective")


if __name__ == "__main__":
    main()
