# One-off A/B timing of prebuilt extension variants (not committed): median step time, CUDA events.
import sys, torch, fusedopt
from fusedopt.bench.presets import llama_shapes
tag = sys.argv[1]
cases = [("llama", torch.float32, "adam"), ("llama", torch.bfloat16, "adam"), ("many-small", torch.float32, "adam"),
         ("llama", torch.float32, "sgd")]
for preset, dtype, optname in cases:
    shapes = llama_shapes(n_layer=2) if preset == "llama" else [(1024,)] * 10_000
    gen = torch.Generator("cuda").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype, generator=gen)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda", dtype=dtype, generator=gen)
    opt = fusedopt.Adam(params, lr=1e-3) if optname == "adam" else fusedopt.SGD(params, lr=1e-2, momentum=0.9)
    for _ in range(3):
        opt.step()
    ts = []
    for _ in range(15):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); opt.step(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    ts.sort()
    numel = sum(p.numel() for p in params)
    moved = numel * params[0].element_size() * (7 if optname == "adam" else 5)
    print(f"{tag:3s} {preset:10s} {str(dtype)[6:]:9s} {optname}: median {ts[7]:.3f} ms min {ts[0]:.3f} ms "
          f"{moved / ts[7] / 1e6:.0f} GB/s", flush=True)
    del opt, params
    torch.cuda.empty_cache()
