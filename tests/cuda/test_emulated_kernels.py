"""The CUDA kernels executed on the CPU (tests/emulated_cuda.py): launch geometries from one thread
to many blocks, blocks run concurrently or one by one in shuffled orders, chunks much smaller than
the tensors, misaligned tensors (the scalar path), empty tensors, device-resident scalars read by
the kernel, in-kernel schedules, and 10,000 tensors, all against torch.optim.

The parity suite (tests/optim, tests/ops, tests/lr_scheduler) also runs every device-parametrized
test on the emulated kernels, as its "emul" variants; `pytest -k emul` selects all of them.
"""

import pytest
import torch
from torch.optim import lr_scheduler as tls

import fusedopt
from emulated_cuda import DEVICES
from fusedopt.lr_scheduler import WarmupCosine, in_kernel
from fusedopt.ops import ADAM_COLUMNS, SGD_COLUMNS, hyper_table

pytestmark = pytest.mark.skipif(not fusedopt.extension_available(), reason="needs the compiled extension")


def emul(**kw):
    return pytest.mark.emulated_cuda(**kw)


# (grid, block, chunk_elems, concurrent, seed): one thread; one block; more blocks than chunks
# and fewer; odd block sizes; whole blocks run one at a time in shuffled orders.
GEOMETRIES = [
    (1, 1, 64, True, 0),
    (1, 32, 8, True, 0),
    (3, 7, 16, True, 0),
    (20, 96, 64, True, 0),
    (8, 33, 24, False, 1),
    (16, 5, 8, False, 7),
    (64, 2, 8, False, 12345),
]


def _geometry_params():
    for grid, block, chunk, concurrent, seed in GEOMETRIES:
        order = "concurrent" if concurrent else f"serial{seed}"
        yield pytest.param((grid, block, chunk), id=f"emul-g{grid}-b{block}-c{chunk}-{order}", marks=emul(
            grid=grid, block=block, chunk_elems=chunk, concurrent=concurrent, seed=seed))


def _leaves(shapes, dtype, seed, misalign=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        v = torch.randn(s, generator=g, dtype=torch.float64).to(dtype)
        if misalign:  # a param 4 bytes past a 16-byte boundary: the kernels' scalar path
            base = torch.empty(v.numel() + 1, dtype=dtype)
            v = base[1:].view(v.shape).copy_(v)
        out.append(torch.nn.Parameter(v))
    return out


def _run_pair(fused, ref, params_f, params_r, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for pf, pr in zip(params_f, params_r):
            grad = torch.randn(pf.shape, generator=g, dtype=torch.float64)
            pf.grad, pr.grad = grad.to(pf.dtype), grad.to(pr.dtype)
        fused.step()
        ref.step()


SHAPES = [(3,), (), (0,), (70,), (129,), (4, 33), (64,), (5, 0)]


@pytest.mark.parametrize("geometry", list(_geometry_params()))
@pytest.mark.parametrize("name,kw", [("Adam", dict(amsgrad=True, weight_decay=0.1)),
                                     ("AdamW", dict(weight_decay=0.01, maximize=True)),
                                     ("SGD", dict(momentum=0.9, nesterov=True, weight_decay=0.01)),
                                     ("SGD", dict(momentum=0.5, dampening=0.3))])
def test_emulated_geometries_match_torch(geometry, name, kw):
    """Every launch geometry and block order gives torch's results: chunks split tensors across
    blocks, a block takes many chunks, and the last block of each tensor bumps its step counter."""
    ps_f = _leaves(SHAPES, torch.float32, 0) + _leaves([(37,), (2, 9)], torch.float32, 1, misalign=True)
    ps_r = [torch.nn.Parameter(p.detach().clone()) for p in ps_f]
    groups_f = [{"params": ps_f[:5]}, {"params": ps_f[5:], "lr": 0.02}]
    groups_r = [{"params": ps_r[:5]}, {"params": ps_r[5:], "lr": 0.02}]
    fused = getattr(fusedopt, name)(groups_f, lr=0.01, **kw)
    ref = getattr(torch.optim, name)(groups_r, lr=0.01, foreach=False, **kw)
    _run_pair(fused, ref, ps_f, ps_r, steps=4, seed=2)
    for pf, pr in zip(ps_f, ps_r):
        # float32 math in the same order as torch's for-loop; slack for the last bits
        torch.testing.assert_close(pf, pr, rtol=2e-6, atol=1e-7)
        if name != "SGD":
            assert fused.state[pf]["step"].item() == ref.state[pr]["step"].item() == 4
        else:
            torch.testing.assert_close(fused.state[pf]["momentum_buffer"],
                                       ref.state[pr]["momentum_buffer"], rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_zero_element_params_advance_their_step(device, name):
    """torch counts a step for every param with a grad, empty ones too (the CUDA kernel used to
    skip them: an empty tensor had no chunk)."""
    ps = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in [(0,), (3, 0), (4,)]]
    opt = getattr(fusedopt, name)(ps, lr=0.1)
    for _ in range(3):
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
    assert [opt.state[p]["step"].item() for p in ps] == [3.0, 3.0, 3.0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_in_kernel_schedule_advances_when_every_tensor_is_empty(device, name):
    ps = [torch.nn.Parameter(torch.zeros(0, device=device)), torch.nn.Parameter(torch.zeros(2, 0, device=device))]
    kw = dict(momentum=0.9) if name == "SGD" else {}
    opt = getattr(fusedopt, name)(ps, lr=0.1, **kw)
    sched = in_kernel(tls.StepLR(opt, step_size=1, gamma=0.5))
    for _ in range(3):
        for p in ps:
            p.grad = torch.zeros_like(p)
        opt.step()
        sched.step()
    assert sched.last_epoch == 3
    assert sched.get_last_lr() == pytest.approx([0.1 * 0.5**3])
    if name == "AdamW":
        assert [opt.state[p]["step"].item() for p in ps] == [3.0, 3.0]


def _adam_op_args(lr_column, lr_tensors, lr_index, grad_scale=None, found_inf=None):
    g = torch.Generator().manual_seed(4)
    shapes = [(50,), (3, 7)]
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    row = dict(lr=lr_column, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=0, maximize=0,
               decoupled=0, lr_index=lr_index, sched_begin=0, sched_count=0)
    return (params, grads, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params], [],
            [torch.zeros(()) for _ in params], [len(params)], hyper_table([row], ADAM_COLUMNS), lr_tensors,
            grad_scale, found_inf)


@pytest.mark.parametrize("device", DEVICES)
def test_tensor_lr_is_read_where_it_lives(device):
    """An lr tensor: the CPU kernel reads its value on the host; the emulated CUDA kernel reads it
    through its pointer, as the GPU reads a device lr (so a graph replay sees scheduler writes).
    The lr column holds a decoy that neither may use."""
    out = []
    for lr in (0.5, 0.25):
        args = _adam_op_args(lr_column=123.0, lr_tensors=[torch.tensor(lr)], lr_index=0)
        before = [p.clone() for p in args[0]]
        torch.ops.fusedopt.adam_(*args, schedule_state=[])
        out.append([(b - p).abs().max().item() for b, p in zip(before, args[0])])
    # Adam's first step moves every element by about lr (|m_hat / sqrt(v_hat)| = 1)
    assert out[0] == pytest.approx([0.5, 0.5], rel=1e-3) and out[1] == pytest.approx([0.25, 0.25], rel=1e-3)


def _sgd_op_args(grad_scale, found_inf):
    g = torch.Generator().manual_seed(5)
    params = [torch.randn(s, generator=g) for s in [(50,), (3, 7)]]
    grads = [torch.randn(p.shape, generator=g) for p in params]
    row = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=0, maximize=0, lr_index=-1,
               sched_begin=0, sched_count=0)
    bufs = [torch.ones_like(p) for p in params]
    return (params, grads, bufs, [len(params)], hyper_table([row], SGD_COLUMNS), [], [], grad_scale, found_inf)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rule", ["adam", "sgd"])
def test_found_inf_skips_and_grad_scale_unscales_in_place(device, rule):
    """found_inf and grad_scale are read by the kernel where they live (device memory on a GPU):
    a nonzero found_inf changes nothing at all; otherwise the grads are unscaled in place."""
    scale, found = torch.tensor([4.0]), torch.tensor([1.0])
    if rule == "adam":
        args, op = _adam_op_args(0.1, [], -1, grad_scale=scale, found_inf=found), torch.ops.fusedopt.adam_
        state = args[2] + args[3] + args[5]
    else:
        args, op = _sgd_op_args(scale, found), torch.ops.fusedopt.sgd_
        state = args[2]
    before = [t.clone() for t in args[0] + args[1] + state]
    op(*args, schedule_state=[])
    assert all(torch.equal(a, b) for a, b in zip(before, args[0] + args[1] + state))
    found.zero_()
    op(*args, schedule_state=[])
    n = len(args[0])
    for g_before, g_after in zip(before[n:2 * n], args[1]):
        torch.testing.assert_close(g_after, g_before * 0.25, rtol=0, atol=0)
    if rule == "adam":
        assert all(s.item() == 1 for s in args[5])
    for p_before, p_after in zip(before[:n], args[0]):
        assert not torch.equal(p_before, p_after)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_counters_and_schedule_over_many_launches(device, name):
    """30 launches reusing the same tables: the completion counters must return to zero after every
    launch, or the step counters and the in-kernel schedule drift."""
    ps_f = _leaves([(300,), (129,), (5,)], torch.float32, 3)
    ps_r = [torch.nn.Parameter(p.detach().clone()) for p in ps_f]
    kw = dict(momentum=0.9) if name == "SGD" else dict(weight_decay=0.05)
    fused = getattr(fusedopt, name)(ps_f, lr=0.05, **kw)
    ref = getattr(torch.optim, name)(ps_r, lr=0.05, foreach=False, **kw)
    sched_f = in_kernel(WarmupCosine(fused, warmup_steps=5, total_steps=30))
    sched_r = WarmupCosine(ref, warmup_steps=5, total_steps=30)
    g = torch.Generator().manual_seed(9)
    for _ in range(30):
        for pf, pr in zip(ps_f, ps_r):
            grad = torch.randn(pf.shape, generator=g)
            pf.grad, pr.grad = grad.clone(), grad.clone()
        fused.step()
        ref.step()
        sched_f.step()
        sched_r.step()
    assert sched_f.last_epoch == 30
    assert sched_f.get_last_lr() == pytest.approx(sched_r.get_last_lr(), rel=1e-6)
    for pf, pr in zip(ps_f, ps_r):
        torch.testing.assert_close(pf, pr, rtol=1e-5, atol=1e-6)
        if name == "AdamW":
            assert fused.state[pf]["step"].item() == 30


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_ten_thousand_tensors(device, name):
    """10,000 small params of assorted sizes in one launch, against torch's foreach path."""
    g = torch.Generator().manual_seed(11)
    sizes = torch.randint(0, 40, (10_000,), generator=g).tolist()
    ps_f = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in sizes]
    ps_r = [torch.nn.Parameter(p.detach().clone()) for p in ps_f]
    kw = dict(momentum=0.9) if name == "SGD" else {}
    fused = getattr(fusedopt, name)(ps_f, lr=0.01, **kw)
    ref = getattr(torch.optim, name)(ps_r, lr=0.01, foreach=True, **kw)
    for _ in range(2):
        for pf, pr in zip(ps_f, ps_r):
            grad = torch.randn(pf.shape, generator=g)
            pf.grad, pr.grad = grad.clone(), grad.clone()
        fused.step()
        ref.step()
    torch.testing.assert_close(torch.cat([p.detach() for p in ps_f]), torch.cat([p.detach() for p in ps_r]),
                               rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("geometry", [pytest.param((4, 32, 64), id="emul-g4-b32", marks=emul(grid=4, block=32, chunk_elems=64))])
def test_emulated_step_is_one_launch_per_device(geometry, emulated_cuda_module):
    ps = _leaves([(1000,), (3, 5), (0,)], torch.float32, 5) + _leaves([(64,)], torch.bfloat16, 6)
    opt = fusedopt.AdamW([{"params": ps[:3]}, {"params": ps[3:], "lr": 1e-4}], lr=1e-3)
    for p in ps:
        p.grad = torch.ones_like(p)
    before = emulated_cuda_module.launches()
    opt.step()
    opt.step()
    assert emulated_cuda_module.launches() - before == 2


def test_emulated_sgd_matches_the_sgd_op_schema(emulated_cuda_module):
    """The emulated backend takes the ops' arguments in schema order (a drifted binding would
    silently swap lists); checked on the op itself with momentum buffers marked fresh."""
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(9, generator=g), torch.randn(2, 3, generator=g)]
    grads = [torch.randn(p.shape, generator=g) for p in params]
    bufs = [torch.full_like(p, 7.0) for p in params]
    row = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=0, maximize=0, lr_index=-1,
               sched_begin=0, sched_count=0)
    expected = [p - 0.1 * gr for p, gr in zip(params, grads)]
    emulated_cuda_module.sgd_(params, grads, bufs, [2], hyper_table([row], SGD_COLUMNS), [], [0, 1], None, None,
                              [], None)
    for p, e, b, gr in zip(params, expected, bufs, grads):
        torch.testing.assert_close(p, e)
        torch.testing.assert_close(b, gr)  # a fresh buffer takes the gradient itself


def _stochastic_run(steps=3):
    """bf16 params stepped by SGD and Adam with stochastic rounding from seed 0; odd sizes so that
    the vector units and the scalar tail both round."""
    gen = torch.Generator().manual_seed(11)
    out = []
    for name, kw in (("SGD", dict(lr=1e-3, momentum=0.9)), ("Adam", dict(lr=1e-4))):
        params = [torch.randn(n, generator=gen).to(torch.bfloat16).requires_grad_() for n in (37, 1000, 4099)]
        opt = getattr(fusedopt, name)(params, stochastic_rounding=True, **kw)
        torch.manual_seed(0)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(torch.bfloat16)
            opt.step()
        out += [p.detach().view(torch.int16).clone() for p in params]
    return out


@pytest.mark.parametrize("geometry", [GEOMETRIES[1], GEOMETRIES[3], GEOMETRIES[6]],
                         ids=lambda g: f"emul-g{g[0]}-b{g[1]}-c{g[2]}")
def test_stochastic_rounding_bits_match_the_cpu_kernel_emul(geometry, emulated_cuda_module):
    """Every element draws its rounding bits from (seed, tensor, element, step) alone, so the CUDA
    kernel (emulated, at any grid, block and chunking) rounds exactly as the CPU kernel does: a
    kernel that reused bits across elements or threads would differ."""
    import emulated_cuda

    reference = _stochastic_run()  # the CPU kernel
    grid, block, chunk, concurrent, seed = geometry
    with emulated_cuda.emulated(emulated_cuda_module, grid=grid, block=block, chunk_elems=chunk,
                                concurrent=concurrent, seed=seed):
        launches = emulated_cuda_module.launches()
        emulated = _stochastic_run()
        assert emulated_cuda_module.launches() > launches  # the emulated kernel did run
    for k, (e, r) in enumerate(zip(emulated, reference)):
        assert torch.equal(e, r), f"tensor {k}: {(e != r).sum().item()} of {e.numel()} params round differently"


# (optimizer, kwargs) for every rule: each has its own kernels for launches of one storage type.
_RULES = [("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
          ("SGD", dict(lr=0.05)),
          ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
          ("AdamW", dict(lr=0.01, maximize=True)),
          ("RMSprop", dict(lr=0.01, momentum=0.9, centered=True)),
          ("Adagrad", dict(lr=0.1, lr_decay=0.01, weight_decay=0.1)),
          ("Lion", dict(lr=0.01, weight_decay=0.1))]


def _uniform_or_mixed_run(module, name, kw, dtype, extra=None, steps=3):
    """Steps params of `dtype` (odd sizes and a misaligned one: vector and scalar paths) alone, or
    with `extra` (a param of another kind) in a second group of the same launch; returns the
    params' bits and the storage each launch's kernel was compiled for."""
    ps = _leaves([(37,), (1000,), (4, 33), (0,)], dtype, 21) + _leaves([(77,)], dtype, 22, misalign=True)
    groups = [{"params": ps}] + ([{"params": [extra]}] if extra is not None else [])
    opt = getattr(fusedopt, name)(groups, **kw)
    gen = torch.Generator().manual_seed(23)
    storages = set()
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        if extra is not None:  # its own values: the params' grads are the same in both runs
            extra.grad = torch.ones_like(extra)
        opt.step()
        storages.add(module.last_launch_storage())
    return [p.detach().clone() for p in ps], storages


@pytest.mark.parametrize("geometry", [pytest.param((3, 16, 64), id="emul-g3-b16-c64",
                                                   marks=emul(grid=3, block=16, chunk_elems=64))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name,kw", _RULES)
def test_uniform_storage_kernel_matches_the_mixed_kernel(geometry, dtype, name, kw, emulated_cuda_module):
    """A launch whose params, grads and states are all float32 (or all bfloat16) runs the kernel
    compiled for that type alone; the same params stepped in a launch that also holds a float64
    param run the kernel that switches on each role's type. Both must give the same bits, and each
    launch must have picked the kernel its tensors call for."""
    uniform, used = _uniform_or_mixed_run(emulated_cuda_module, name, kw, dtype)
    assert used == {str(dtype).removeprefix("torch.")}
    extra = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    mixed, used = _uniform_or_mixed_run(emulated_cuda_module, name, kw, dtype, extra=extra)
    assert used == {"mixed"}
    for k, (u, m) in enumerate(zip(uniform, mixed)):
        assert torch.equal(u.view(-1).view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           m.view(-1).view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), \
            f"param {k}: {(u != m).sum().item()} of {u.numel()} elements differ"


@pytest.mark.parametrize("geometry", [pytest.param((3, 16, 64), id="emul-g3-b16-c64",
                                                   marks=emul(grid=3, block=16, chunk_elems=64))])
@pytest.mark.parametrize("dtype,kw", [
    (torch.bfloat16, dict(master_weights=True)),
    (torch.bfloat16, dict(master_weights=True, master_remainders=True)),
    (torch.bfloat16, dict(stochastic_rounding=True)),
    (torch.bfloat16, dict(state_dtype=torch.float32)),
    (torch.float32, dict(state_dtype=torch.bfloat16)),
    (torch.float16, {}),
    (torch.float64, {}),
], ids=["bf16-master", "bf16-remainder", "bf16-stochastic", "bf16-f32-states", "f32-bf16-states", "f16", "f64"])
def test_launches_that_need_more_than_one_storage_type_run_the_mixed_kernel(geometry, dtype, kw,
                                                                            emulated_cuda_module):
    """Masters, stochastic rounding, states of another type than the param, and the types without
    a kernel of their own go to the kernel that switches on each role's type."""
    _, used = _uniform_or_mixed_run(emulated_cuda_module, "Adam", dict(lr=0.01, **kw), dtype)
    assert used == {"mixed"}
