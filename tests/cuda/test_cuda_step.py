"""CUDA-only behaviour of the fused step (skipped without a GPU; the parity suite in tests/optim
runs on CUDA too when one is present): one launch per step, graph capture with a scheduler
driving a device-tensor lr, GradScaler skips, many tensors, a tensor over 2**31 elements, mixed
dtypes, several devices, and a clean exit after steps."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusedopt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _params(shapes, dtype=torch.float32, seed=0, device="cuda"):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]


def _fill_grads(params, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(device=p.device, dtype=p.dtype)


def _kernel_launches(fn):
    """Kernel launches (not memcpys) recorded by the profiler while fn runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    return kernels


@pytest.mark.parametrize("cls,kw", [(fusedopt.Adam, dict(amsgrad=True)), (fusedopt.AdamW, {}),
                                    (fusedopt.SGD, dict(momentum=0.9))])
def test_one_kernel_launch_per_step(cls, kw):
    ps = [torch.nn.Parameter(p) for p in _params([(1000,)] * 300 + [(4097,), (3, 5)])]
    half = [torch.nn.Parameter(p) for p in _params([(64,)] * 10, dtype=torch.bfloat16)]
    opt = cls([{"params": ps}, {"params": half, "lr": 1e-4}], lr=1e-3, **kw)
    _fill_grads(ps + half, 0)
    opt.step()  # lazy state, table upload
    opt.step()
    kernels = _kernel_launches(opt.step)
    assert len(kernels) == 1, [k.name for k in kernels]


def test_capture_whole_training_step_with_scheduler_driving_tensor_lr():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
    ref = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
    ref.load_state_dict(model.state_dict())
    lr = torch.tensor(0.01, device="cuda")
    opt = fusedopt.AdamW(model.parameters(), lr=lr, capturable=True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.01, foreach=False)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=3, gamma=0.5)
    x = torch.randn(16, 32, device="cuda")
    y = torch.randn(16, 8, device="cuda")

    def train_step(m, o):
        o.zero_grad(set_to_none=False)
        loss = torch.nn.functional.mse_loss(m(x), y)
        loss.backward()
        o.step()
        return loss

    # warm up on a side stream (lazy state), as torch's CUDA graph recipe does
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            train_step(model, opt)
            sched.step()
            train_step(ref, ref_opt)
            ref_sched.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(model, opt)
    for _ in range(10):
        graph.replay()
        sched.step()  # writes the new lr into the tensor the captured kernel reads
        train_step(ref, ref_opt)
        ref_sched.step()
    torch.cuda.synchronize()
    assert opt.param_groups[0]["lr"].item() == pytest.approx(ref_opt.param_groups[0]["lr"])
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls,kw", [(fusedopt.Adam, {}), (fusedopt.SGD, dict(momentum=0.9, dampening=0.1))])
def test_grad_scaler_with_injected_infs(cls, kw):
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4).cuda()
    ref = torch.nn.Linear(16, 4).cuda()
    ref.load_state_dict(model.state_dict())
    opt = cls(model.parameters(), lr=0.01, **kw)
    ref_opt = getattr(torch.optim, cls.__name__)(ref.parameters(), lr=0.01, foreach=False, **kw)
    scaler, ref_scaler = torch.amp.GradScaler("cuda"), torch.amp.GradScaler("cuda")
    for step in range(8):
        x = torch.randn(8, 16, device="cuda")
        for m, o, sc in ((model, opt, scaler), (ref, ref_opt, ref_scaler)):
            o.zero_grad()
            sc.scale(m(x).square().mean()).backward()
            if step in (0, 1, 5):
                next(m.parameters()).grad.view(-1)[0] = float("inf")
            before = [t.clone() for st in o.state.values() for t in st.values() if torch.is_tensor(t)]
            params_before = [p.detach().clone() for p in m.parameters()]
            sc.step(o)
            sc.update()
            if m is model and step in (0, 1, 5):
                after = [t for st in o.state.values() for t in st.values() if torch.is_tensor(t)]
                assert all(torch.equal(a, b) for a, b in zip(after, before))
                assert all(torch.equal(p, q) for p, q in zip(m.parameters(), params_before))
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_ten_thousand_tensors_and_mixed_dtypes_match_torch():
    shapes = [(1024,)] * 10_000 + [(7,), (4097,), (65537,)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        init = _params(shapes[:40] if dtype != torch.float32 else shapes, dtype=dtype, seed=1)
        ours = [torch.nn.Parameter(p.clone()) for p in init]
        ref = [torch.nn.Parameter(p.clone().float()) for p in init]
        opt = fusedopt.AdamW(ours, lr=1e-3)
        ref_opt = torch.optim.AdamW(ref, lr=1e-3, foreach=True)
        for step in range(3):
            _fill_grads(ours, step)
            for p, q in zip(ref, ours):
                p.grad = q.grad.float()
            opt.step()
            ref_opt.step()
        tol = {torch.float32: 1e-5, torch.float64: 1e-6}.get(dtype, 3e-2)
        for p, q in zip(ref, ours):
            torch.testing.assert_close(q.float(), p, rtol=tol, atol=tol)


def test_mixed_dtypes_in_one_optimizer_one_launch():
    f32 = [torch.nn.Parameter(p) for p in _params([(100,), (33,)])]
    bf16 = [torch.nn.Parameter(p) for p in _params([(100,)], dtype=torch.bfloat16)]
    f64 = [torch.nn.Parameter(p) for p in _params([(9,)], dtype=torch.float64)]
    opt = fusedopt.Adam(f32 + bf16 + f64, lr=1e-2)
    _fill_grads(f32 + bf16 + f64, 3)
    opt.step()
    assert len(_kernel_launches(opt.step)) == 1
    assert all(opt.state[p]["step"].item() == 2 for p in f32 + bf16 + f64)


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory < 40 * 2**30,
                    reason="needs 40 GiB of GPU memory")
def test_tensor_over_two_to_the_31_elements():
    n = 2**31 + 129  # 64-bit offsets and a tail past the 32-bit boundary
    p = torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16, device="cuda"))
    p.grad = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    p.grad[-1] = 2.0
    opt = fusedopt.SGD([p], lr=0.5)
    opt.step()
    torch.cuda.synchronize()
    for i in (0, 2**31 - 1, 2**31, 2**31 + 64, n - 2):
        assert p[i].item() == -0.5, i
    assert p[-1].item() == -1.0
    assert (p == -0.5).sum().item() == n - 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_params_on_two_devices_one_launch_each():
    a = [torch.nn.Parameter(p) for p in _params([(100,)] * 3, device="cuda:0")]
    b = [torch.nn.Parameter(p) for p in _params([(100,)] * 3, device="cuda:1")]
    opt = fusedopt.Adam(a + b, lr=1e-2)
    _fill_grads(a + b, 0)
    opt.step()
    kernels = _kernel_launches(opt.step)
    assert sorted(k.device_index for k in kernels) == [0, 1]


def test_capturing_the_step_that_creates_sgd_momentum_buffers_raises():
    p = torch.nn.Parameter(torch.randn(64, device="cuda"))
    opt = fusedopt.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.randn_like(p)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="creates momentum buffers"):
        with torch.cuda.graph(graph):
            opt.step()


def test_capturing_a_step_no_eager_step_has_seen_raises():
    p = torch.nn.Parameter(torch.randn(64, device="cuda"))
    opt = fusedopt.Adam([p], lr=0.1, capturable=True)
    p.grad = torch.randn_like(p)
    opt.step()  # lazy state; tables of this grad cached
    p.grad = torch.randn_like(p)  # a new grad tensor: a table no eager step uploaded
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="Take one eager optimizer step"):
        with torch.cuda.graph(graph):
            opt.step()


def test_cached_tables_used_from_another_stream():
    """The same optimizer stepping on two streams in turn reuses its uploaded tables and counters:
    each use waits for the last one on the other stream."""
    ps = [torch.nn.Parameter(p) for p in _params([(100_000,), (513,)])]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = fusedopt.Adam(ps, lr=1e-2)
    ref_opt = torch.optim.Adam(ref, lr=1e-2, foreach=False)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for step in range(6):
        _fill_grads(ps, step)
        _fill_grads(ref, step)
        s = streams[step % 2]
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            opt.step()
        torch.cuda.current_stream().wait_stream(s)
        ref_opt.step()
    torch.cuda.synchronize()
    for p, q in zip(ps, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert opt.state[p]["step"].item() == 6


@pytest.mark.parametrize("side_stream", [False, True])
def test_process_exits_cleanly_after_steps(side_stream):
    """The tables the steps cached on the device outlive the interpreter: the process must still
    exit with status 0. (They were once freed by a static destructor after torch had torn down its
    CUDA streams, which aborted every process that had stepped: "Unrecognized stream".)"""
    code = (
        "import torch, fusedopt\n"
        "p = torch.nn.Parameter(torch.randn(70_000, device='cuda'))\n"
        "opt = fusedopt.Adam([p], lr=1e-3)\n"
        f"s = torch.cuda.Stream() if {side_stream} else torch.cuda.current_stream()\n"
        "with torch.cuda.stream(s):\n"
        "    for _ in range(2):\n"
        "        p.grad = torch.randn_like(p)\n"
        "        opt.step()\n"
        "torch.cuda.synchronize()\n"
        "print('stepped', int(opt.state[p]['step'].item()))\n"
    )
    root = str(Path(fusedopt.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "stepped 2"
