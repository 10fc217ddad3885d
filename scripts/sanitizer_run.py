"""A short fused-optimizer run for compute-sanitizer (memcheck / racecheck / initcheck).

Covers several param groups, mixed dtypes, odd sizes, empty params, amsgrad, SGD momentum with a
fresh buffer, GradScaler skips, 10,000 tensors, an in-kernel schedule, two optimizers stepping on
two streams, gradient clipping (alone and in the step), and a captured CUDA graph replayed with a
changing lr. (The tensor over 2**31 elements is in tests/cuda: under memcheck it would take too
long.)
"""

import torch

import fusedopt


def main() -> None:
    torch.manual_seed(0)
    dev = "cuda"
    shapes = [(1,), (7,), (0,), (4097,), (3, 5, 7), (65537,)] + [(1024,)] * 200
    for cls, kw in ((fusedopt.SGD, dict(momentum=0.9, dampening=0.1)),
                    (fusedopt.SGD, dict(momentum=0.9, nesterov=True)),
                    (fusedopt.Adam, dict(amsgrad=True, weight_decay=0.1)),
                    (fusedopt.AdamW, dict(maximize=True))):
        f32 = [torch.nn.Parameter(torch.randn(s, device=dev)) for s in shapes]
        bf16 = [torch.nn.Parameter(torch.randn(s, device=dev, dtype=torch.bfloat16)) for s in shapes[:4]]
        f16 = [torch.nn.Parameter(torch.randn(s, device=dev, dtype=torch.float16)) for s in shapes[:4]]
        f64 = [torch.nn.Parameter(torch.randn(s, device=dev, dtype=torch.float64)) for s in shapes[:3]]
        opt = cls([{"params": f32}, {"params": bf16 + f16, "lr": 1e-4}, {"params": f64, "lr": 1e-3}], lr=1e-2, **kw)
        # GradScaler cannot unscale bf16 grads (torch has no such kernel): its optimizer holds the
        # fp32 and fp16 params, with a state of its own
        scaled = cls([{"params": f32}, {"params": f16, "lr": 1e-4}], lr=1e-2, **kw)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**20)
        for step in range(4):
            for p in f32 + bf16 + f16 + f64:
                p.grad = torch.randn_like(p)
            opt.step()
            if step == 1:
                f32[3].grad[5] = float("inf")  # the scaler skips this step
            scaler.scale(torch.zeros((), device=dev, requires_grad=True)).backward()
            scaler.step(scaled)
            scaler.update()
    # 10,000 small tensors with an in-kernel schedule
    # Params and grads are views of one tensor each: one launch apiece instead of 10,000, each of
    # which costs milliseconds under the sanitizer. A one-element gap after each param keeps the
    # params apart, so that the step sees 10,000 slots and merges none.
    sizes = [1 + i % 37 for i in range(10_000)]
    pool = torch.randn(sum(sizes) + len(sizes), device=dev)
    many = [torch.nn.Parameter(t[:-1]) for t in pool.split([s + 1 for s in sizes])]
    opt = fusedopt.AdamW(many, lr=1e-3)
    sched = fusedopt.lr_scheduler.in_kernel(fusedopt.lr_scheduler.WarmupCosine(opt, warmup_steps=2, total_steps=10))
    for _ in range(3):
        for p, g in zip(many, torch.randn(sum(sizes), device=dev).split(sizes)):
            p.grad = g
        opt.step()
        sched.step()
    # two optimizers, each on its own stream, stepping at the same time
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    pairs = []
    for k, s in enumerate(streams):
        ps = [torch.nn.Parameter(torch.randn(70_000 + k, device=dev)) for _ in range(3)]
        pairs.append((fusedopt.Adam(ps, lr=1e-3) if k else fusedopt.SGD(ps, lr=1e-2, momentum=0.9), ps, s))
    for _ in range(3):
        for opt, ps, s in pairs:
            for p in ps:
                p.grad = torch.randn_like(p)
            s.wait_stream(torch.cuda.current_stream())
        for opt, ps, s in pairs:
            with torch.cuda.stream(s):
                opt.step()
        for _, _, s in pairs:
            torch.cuda.current_stream().wait_stream(s)
    # the grad-norm kernel: clipping alone, on mixed dtypes, and inside the step
    mixed = ([torch.nn.Parameter(torch.randn(s, device=dev)) for s in shapes[:40]]
             + [torch.nn.Parameter(torch.randn(s, device=dev, dtype=torch.bfloat16)) for s in shapes[:6]])
    opt = fusedopt.Adam(mixed, lr=1e-3, max_grad_norm=1.0)
    for _ in range(2):
        for p in mixed:
            p.grad = torch.randn_like(p)
        fusedopt.clip_grad_norm_(mixed, 5.0)
        opt.step()
    # graph capture with a tensor lr changed between replays
    model = torch.nn.Linear(64, 64).to(dev)
    lr = torch.tensor(0.01, device=dev)
    opt = fusedopt.AdamW(model.parameters(), lr=lr, capturable=True)
    x = torch.randn(8, 64, device=dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            opt.zero_grad(set_to_none=False)
            model(x).square().mean().backward()
            opt.step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        opt.zero_grad(set_to_none=False)
        model(x).square().mean().backward()
        opt.step()
    for i in range(3):
        lr.fill_(0.01 / (i + 1))
        g.replay()
    torch.cuda.synchronize()
    print("sanitizer run: ok")


if __name__ == "__main__":
    main()
