"""fusedopt.clip_grad_norm_ and its op torch.ops.fusedopt.grad_norm_, against
torch.nn.utils.clip_grad_norm_ as the oracle, on fresh random data.

Tolerances, from the dtypes: fusedopt accumulates in float64 and rounds the norm once, torch
computes a norm per tensor in the grads' dtype (float32 accumulation for the 16-bit types) and then
the norm of those. For float32 grads fusedopt's norm is within an ulp of the exact one; torch's
2-norm is off by up to ~20 float32 ulps (1.2e-6 relative) on 2 * 10^5 elements, its 1- and 3-norms
by more (1e-6 to 4e-6), so the two agree within RTOL below. float64 grads: both are float64-accurate. float16 / bfloat16 grads: torch
rounds each per-tensor norm and the total to the dtype, so the returned norms may differ by one or
two units in the last place of the dtype (2^-10 and 2^-7 relative). The clipped grads inherit the
norm's relative difference, plus half an ulp of their dtype for the rounding of the product.
"""

import math
import zlib

import pytest
import torch

import fusedopt
from emulated_cuda import DEVICES

pytestmark = pytest.mark.skipif(not fusedopt.extension_available(), reason="needs the compiled extension")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INF = math.inf
# relative tolerance of the total norm, by dtype and by whether the order is 2 or inf (torch's
# float32 2-norm and max are near exact) or another p
RTOL = {
    torch.float32: (4e-6, 2e-5),
    torch.float64: (1e-12, 1e-12),
    torch.float16: (2 * 2.0**-10, 2 * 2.0**-10),
    torch.bfloat16: (2 * 2.0**-7, 2 * 2.0**-7),
}
SHAPES = [(1000,), (300, 70), (3,), (), (70000,), (17, 5, 4)]


def rtol_for(dtype, norm_type):
    return RTOL[dtype][0 if norm_type in (2.0, INF) else 1]


def make_params(shapes, dtypes, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    params = []
    for i, s in enumerate(shapes):
        dtype = dtypes[i % len(dtypes)]
        p = torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype))
        p.grad = (torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dtype)
        params.append(p)
    return params


def clone_params(params):
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


def assert_close_rel(actual, expected, rtol, what=""):
    assert actual.dtype == expected.dtype, what
    assert actual.device == expected.device, what
    a, e = actual.double(), expected.double()
    if not torch.isfinite(e).all():
        torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True, msg=what)
        return
    torch.testing.assert_close(a, e, rtol=rtol, atol=1e-30, msg=what)


def grads_close(fused, ref, dtype_rtol):
    for pf, pr in zip(fused, ref):
        if pr.grad is None:
            assert pf.grad is None
            continue
        # the norm's difference, plus the rounding of the product in the grad's dtype (whose
        # subnormals are spaced by smallest_normal * eps)
        info = torch.finfo(pr.grad.dtype)
        torch.testing.assert_close(pf.grad.double(), pr.grad.double(), rtol=dtype_rtol + info.eps,
                                   atol=info.smallest_normal * info.eps, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# the drop-in function


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_type", [2.0, INF, 1.0, 3.0])
@pytest.mark.parametrize("clipped", [True, False], ids=["above", "below"])
def test_matches_torch(device, dtype, norm_type, clipped):
    params = make_params(SHAPES, [dtype], seed=zlib.crc32(f"{dtype}{norm_type}{clipped}".encode()))
    ref = clone_params(params)
    exact = torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() for p in params]), norm_type)
    max_norm = float(exact) * (0.25 if clipped else 4.0)
    total = fusedopt.clip_grad_norm_(params, max_norm, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type)
    rtol = rtol_for(dtype, norm_type)
    assert_close_rel(total, expected, rtol)
    assert total.shape == ()
    grads_close(params, ref, rtol)
    if not clipped:  # coefficient 1: the grads are unchanged bit for bit, as torch leaves them
        for pf, pr in zip(params, ref):
            assert torch.equal(pf.grad, pr.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_one_norm_in_the_promoted_dtype(device):
    for dtypes, result in [([torch.float32, torch.bfloat16, torch.float16], torch.float32),
                           ([torch.bfloat16, torch.float16], torch.float32),
                           ([torch.float16, torch.float32, torch.float64, torch.bfloat16], torch.float64)]:
        params = make_params(SHAPES, dtypes, seed=3)
        ref = clone_params(params)
        total = fusedopt.clip_grad_norm_(params, 1.0)
        expected = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        assert total.dtype == expected.dtype == result
        # the 16-bit grads' norms are rounded to their dtype by torch before the total
        assert_close_rel(total, expected, 2 * 2.0**-9)
        grads_close(params, ref, 2 * 2.0**-9)


@pytest.mark.parametrize("device", DEVICES)
def test_float32_norm_is_correctly_rounded_and_no_farther_from_torch_than_torch_is_from_exact(device):
    """fusedopt's float32 2-norm is within one float32 ulp of the exact norm (float64 accumulation,
    one rounding). torch's is not: its float32 accumulation is off by up to ~20 ulps on 200,000
    elements. So fusedopt differs from torch by at most torch's own error plus one ulp."""
    for seed in range(5):
        params = make_params([(4096,), (1000, 33), (7,), (200_000,)], [torch.float32], seed=seed)
        grads = [p.grad for p in params]
        out = torch.empty(2)
        torch.ops.fusedopt.grad_norm_(grads, 2.0, 1.0, out)
        theirs = torch.nn.utils.get_total_norm(grads, 2.0)
        exact = float(torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads])))
        ulp = float(torch.nextafter(out[0], torch.tensor(INF)) - out[0])
        assert abs(float(out[0]) - exact) <= ulp
        assert abs(float(out[0]) - float(theirs)) <= abs(float(theirs) - exact) + ulp


@pytest.mark.parametrize("device", DEVICES)
def test_no_grads_and_empty_lists(device):
    assert torch.equal(fusedopt.clip_grad_norm_([], 1.0), torch.nn.utils.clip_grad_norm_([], 1.0))
    params = [torch.nn.Parameter(torch.randn(3))]  # no grad
    total = fusedopt.clip_grad_norm_(params, 1.0)
    assert total.dtype == torch.float32 and float(total) == 0.0 and params[0].grad is None
    with pytest.warns(UserWarning, match="empty generator"):
        fusedopt.clip_grad_norm_((p for p in []), 1.0)
    out = torch.full((2,), 7.0)
    torch.ops.fusedopt.grad_norm_([], 2.0, 0.5, out)
    assert out.tolist() == [0.0, 1.0]


@pytest.mark.parametrize("device", DEVICES)
def test_empty_tensors(device):
    params = make_params([(0,), (5, 0), (40,), (0,)], [torch.float32], seed=4)
    ref = clone_params(params)
    total = fusedopt.clip_grad_norm_(params, 0.5)
    expected = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    assert_close_rel(total, expected, 1e-6)
    grads_close(params, ref, 1e-6)
    only_empty = make_params([(0,), (0, 3)], [torch.bfloat16], seed=5)
    assert float(fusedopt.clip_grad_norm_(only_empty, 1.0)) == 0.0
    # torch has no inf norm of an empty tensor, and says so; so does fusedopt, with its words
    for foreach in (None, False):
        with pytest.raises(RuntimeError) as theirs:
            torch.nn.utils.clip_grad_norm_(clone_params(params), 1.0, INF, foreach=foreach)
        with pytest.raises(RuntimeError) as ours:
            fusedopt.clip_grad_norm_(params, 1.0, INF, foreach=foreach)
        assert str(ours.value) == str(theirs.value)
    # the op itself defines the norm of nothing as 0
    out = torch.empty(2)
    torch.ops.fusedopt.grad_norm_([p.grad for p in params], INF, 1.0, out)
    assert float(out[0]) == float(torch.cat([p.grad.flatten() for p in params]).abs().max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("norm_type", [2.0, INF])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_grads(device, bad, norm_type, dtype):
    params = make_params(SHAPES, [dtype], seed=6)
    params[4].grad[12345] = bad
    ref = clone_params(params)
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.utils.clip_grad_norm_(clone_params(params), 1.0, norm_type, error_if_nonfinite=True)
    before = [p.grad.clone() for p in params]
    with pytest.raises(RuntimeError) as ours:
        fusedopt.clip_grad_norm_(params, 1.0, norm_type, error_if_nonfinite=True)
    assert str(ours.value) == str(theirs.value)
    for p, b in zip(params, before):  # raised before scaling, as torch does
        assert torch.equal(p.grad.nan_to_num(), b.nan_to_num())
    total = fusedopt.clip_grad_norm_(params, 1.0, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type)
    torch.testing.assert_close(total, expected, equal_nan=True, rtol=0, atol=0)
    for pf, pr in zip(params, ref):  # scaled by NaN or 0, as torch's
        torch.testing.assert_close(pf.grad, pr.grad, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_dense_views_and_strided_views(device):
    g = torch.Generator().manual_seed(7)
    base = [torch.randn(64, 48, generator=g), torch.randn(8, 6, 5, 4, generator=g),
            torch.randn(300, generator=g)]
    grads = [base[0].t(),  # dense, transposed
             base[1].to(memory_format=torch.channels_last),  # dense, channels last
             base[2][::3]]  # gaps: read through a dense copy
    params = []
    for gr in grads:
        p = torch.nn.Parameter(torch.zeros(gr.shape))
        p.grad = gr.clone() if gr.is_contiguous() else gr
        params.append(p)
    ref = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.detach().clone(memory_format=torch.preserve_format)
        ref.append(q)
    total = fusedopt.clip_grad_norm_(params, 0.1)
    expected = torch.nn.utils.clip_grad_norm_(ref, 0.1)
    assert_close_rel(total, expected, 1e-6)
    grads_close(params, ref, 1e-6)
    assert grads[2].data_ptr() == params[2].grad.data_ptr()  # the view itself was scaled


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("foreach", [None, True, False])
def test_foreach_argument(device, foreach):
    params = make_params(SHAPES, [torch.float32, torch.bfloat16], seed=8)
    ref = clone_params(params)
    total = fusedopt.clip_grad_norm_(params, 0.3, foreach=foreach)
    expected = torch.nn.utils.clip_grad_norm_(ref, 0.3, foreach=foreach)
    assert_close_rel(total, expected, 2 * 2.0**-9)
    grads_close(params, ref, 2 * 2.0**-9)


def test_single_tensor_and_generator_arguments():
    params = make_params([(100,)], [torch.float32], seed=9)
    ref = clone_params(params)
    total = fusedopt.clip_grad_norm_(params[0], 0.5)
    expected = torch.nn.utils.clip_grad_norm_(ref[0], 0.5)
    assert_close_rel(total, expected, 1e-6)
    params = make_params([(100,), (7,)], [torch.float32], seed=10)
    ref = clone_params(params)
    total = fusedopt.clip_grad_norm_((p for p in params), 0.5)
    expected = torch.nn.utils.clip_grad_norm_((p for p in ref), 0.5)
    assert_close_rel(total, expected, 1e-6)
    grads_close(params, ref, 1e-6)


@pytest.mark.parametrize("norm_type", [0.0, -1.0, -INF, 0.5])
def test_other_orders_fall_back_to_torch_or_are_fused(norm_type):
    params = make_params(SHAPES, [torch.float32], seed=11)
    ref = clone_params(params)
    total = fusedopt.clip_grad_norm_(params, 0.5, norm_type)
    expected = torch.nn.utils.clip_grad_norm_(ref, 0.5, norm_type)
    assert_close_rel(total, expected, 2e-5)
    grads_close(params, ref, 2e-5)


def test_complex_and_sparse_grads_fall_back_to_torch():
    p = torch.nn.Parameter(torch.randn(10, dtype=torch.complex64))
    p.grad = torch.randn(10, dtype=torch.complex64)
    q = torch.nn.Parameter(p.detach().clone())
    q.grad = p.grad.clone()
    assert torch.equal(fusedopt.clip_grad_norm_([p], 0.1), torch.nn.utils.clip_grad_norm_([q], 0.1))
    assert torch.equal(p.grad, q.grad)


def test_return_value_is_torchs_for_the_bit_identical_norm():
    """Given the same total norm, the clip coefficient is torch's bit for bit (torch evaluates
    max_norm / (norm + 1e-6) as reciprocal(norm + 1e-6) * max_norm, in the norm's dtype)."""
    g = torch.Generator().manual_seed(12)
    for dtype in (torch.float32, torch.float64):
        for _ in range(200):
            x = torch.randn(int(torch.randint(1, 50, (1,), generator=g)), generator=g,
                            dtype=dtype) * float(torch.rand(1, generator=g) * 10)
            max_norm = float(torch.rand(1, generator=g) * 3)
            out = torch.empty(2, dtype=dtype)
            torch.ops.fusedopt.grad_norm_([x], 2.0, max_norm, out)
            coef = torch.clamp(max_norm / (out[0] + 1e-6), max=1.0)
            assert torch.equal(out[1], coef), (out, coef, max_norm)


@pytest.mark.parametrize("shapes", [
    [(1 << 20,), (3000, 70), (5,), (1 << 17,), (99_999,)],
    [(1 + k % 4,) for k in range(3000)],  # few elements in many tensors: also run on both threads
], ids=["large", "many-tiny"])
def test_cpu_norm_is_bit_identical_across_thread_counts(shapes):
    params = make_params(shapes, [torch.float32, torch.bfloat16, torch.float64, torch.float16], seed=13)
    grads = [p.grad for p in params]
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            for norm_type in (2.0, INF, 1.0, 3.0):
                out = torch.empty(2)
                torch.ops.fusedopt.grad_norm_(grads, norm_type, 1.0, out)
                results.setdefault(norm_type, []).append(out.clone())
    finally:
        torch.set_num_threads(before)
    for outs in results.values():
        for o in outs[1:]:
            assert torch.equal(o, outs[0])


# ---------------------------------------------------------------------------------------------
# the op


def unscaled(g, inv_scale):
    """What GradScaler.unscale_ stores: the product in float (double for float64), rounded to the
    grad's dtype."""
    if g.dtype == torch.float64:
        return g * float(inv_scale)
    return (g.float() * inv_scale).to(g.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", [2.0, INF])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float64])
def test_grad_scale_gives_the_norm_of_the_unscaled_grads(device, norm_type, scale_dtype):
    """(The emulated backend reads a float32 grad_scale in the kernel, as from device memory, and
    a float64 one on the host, as the real glue reads a CPU grad_scale.)"""
    params = make_params(SHAPES, DTYPES, seed=14, scale=1024.0)  # finite in float16 too
    grads = [p.grad for p in params]
    before = [g.clone() for g in grads]
    scale = torch.tensor([1024.0 * 3], dtype=scale_dtype)  # an inexact reciprocal
    inv = torch.tensor(1.0, dtype=torch.float64).div(scale.double()).float()  # as GradScaler
    out = torch.empty(2, dtype=torch.float64)
    torch.ops.fusedopt.grad_norm_(grads, norm_type, 1.0, out, scale)
    expected = torch.empty(2, dtype=torch.float64)
    torch.ops.fusedopt.grad_norm_([unscaled(g, inv) for g in grads], norm_type, 1.0, expected)
    assert torch.isfinite(expected).all() and 0.1 < float(expected[0]) < 1e4
    if device == "cpu":
        assert torch.equal(out, expected)
    else:  # the kernel's own rounding of 1 / scale
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=0)
    for g, b in zip(grads, before):  # only read
        assert torch.equal(g, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64])
def test_opcheck(device, with_scale, out_dtype):
    params = make_params([(40,), (3, 5), (0,), ()], DTYPES, seed=15)
    args = ([p.grad for p in params], 2.0, 1.0, torch.empty(2, dtype=out_dtype))
    kwargs = {"grad_scale": torch.tensor([1024.0])} if with_scale else {}
    torch.library.opcheck(torch.ops.fusedopt.grad_norm_.default, args, kwargs)
    torch.library.opcheck(torch.ops.fusedopt.grad_norm_.default, ([], INF, 0.5, torch.empty(2)))


def test_validation_messages():
    op = torch.ops.fusedopt.grad_norm_
    g = [torch.randn(3), torch.randn(4)]
    with pytest.raises(TypeError, match=r"out must be float32 \(or float64\), got Half"):
        op(g, 2.0, 1.0, torch.empty(2, dtype=torch.half))
    with pytest.raises(RuntimeError, match="out must be a contiguous tensor of 2 elements"):
        op(g, 2.0, 1.0, torch.empty(3))
    with pytest.raises(RuntimeError, match="norm_type must be a positive number or inf, got 0"):
        op(g, 0.0, 1.0, torch.empty(2))
    with pytest.raises(RuntimeError, match="norm_type must be a positive number or inf, got -inf"):
        op(g, -INF, 1.0, torch.empty(2))
    with pytest.raises(TypeError, match=r"grads\[1\] has dtype Long"):
        op([g[0], torch.ones(3, dtype=torch.long)], 2.0, 1.0, torch.empty(2))
    with pytest.raises(RuntimeError, match=r"grads\[1\] of shape \[5\] and strides \[2\] is a view "
                       "with gaps or overlaps"):
        op([g[0], torch.randn(10)[::2]], 2.0, 1.0, torch.empty(2))
    with pytest.raises(RuntimeError, match=r"grads\[0\] is not a dense tensor"):
        op([torch.randn(3).to_sparse()], 2.0, 1.0, torch.empty(2))
    with pytest.raises(RuntimeError, match="grad_scale must have exactly one element"):
        op(g, 2.0, 1.0, torch.empty(2), torch.ones(2))


def test_torch_compile_traces_clip_grad_norm():
    params = make_params(SHAPES, [torch.float32, torch.bfloat16], seed=16)
    ref = clone_params(params)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def clip(ps):
        return fusedopt.clip_grad_norm_(ps, 0.5)

    total = clip(params)
    expected = fusedopt.clip_grad_norm_(ref, 0.5)
    assert torch.equal(total, expected)
    for pf, pr in zip(params, ref):
        assert torch.equal(pf.grad, pr.grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_grads_on_two_devices_get_one_norm():
    params = make_params(SHAPES, [torch.float32], seed=17)
    for p in params[::2]:
        p.data = p.data.cuda()
        p.grad = p.grad.cuda()
    ref = clone_params(params)
    total = fusedopt.clip_grad_norm_(params, 0.5)
    expected = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    assert_close_rel(total, expected, 1e-6)
    grads_close(params, ref, 1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_norm_syncs_nothing_and_captures_in_a_graph():
    params = make_params([(4096,), (1000, 33), (7,)], [torch.float32], seed=18)
    for p in params:
        p.data = p.data.cuda()
        p.grad = p.grad.cuda()
    grads = [p.grad for p in params]
    out = torch.empty(2, device="cuda")
    torch.ops.fusedopt.grad_norm_(grads, 2.0, 1.0, out)  # the eager call uploads the table
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.ops.fusedopt.grad_norm_(grads, 2.0, 1.0, out)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.ops.fusedopt.grad_norm_(grads, 2.0, 1.0, out)
        with torch.cuda.graph(graph, stream=s):
            torch.ops.fusedopt.grad_norm_(grads, 2.0, 1.0, out)
    torch.cuda.current_stream().wait_stream(s)
    for g in grads:
        g.mul_(2)
    graph.replay()
    expected = torch.nn.utils.get_total_norm(grads)
    torch.testing.assert_close(out[0], expected, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# the CUDA kernel, run on CPU threads (tests/emulated_cuda.py): launch geometries, block orders


# (grid, block, chunk_elems): one thread; one block; odd sizes; more blocks than chunks
GEOMETRIES = [(1, 1, 64), (1, 32, 8), (3, 7, 16), (20, 96, 64), (8, 33, 24), (64, 2, 8)]


def _emul_geometries():
    for grid, block, chunk in GEOMETRIES:
        for concurrent, seed in ((True, 0), (False, 5)):
            order = "concurrent" if concurrent else f"serial{seed}"
            yield pytest.param((grid, block, chunk), id=f"emul-g{grid}-b{block}-c{chunk}-{order}",
                               marks=pytest.mark.emulated_cuda(grid=grid, block=block, chunk_elems=chunk,
                                                               concurrent=concurrent, seed=seed))


def _misaligned(n, dtype, g):
    """A tensor one element past an aligned allocation (CPU allocations are 64-byte aligned), so
    not 16-byte aligned: the kernel's scalar path."""
    base = torch.empty(n + 1, dtype=dtype)
    assert base.data_ptr() % 16 == 0
    return base[1:].copy_(torch.randn(n, generator=g, dtype=torch.float64).to(dtype))


@pytest.mark.parametrize("geometry", list(_emul_geometries()))
@pytest.mark.parametrize("norm_type", [2.0, INF, 3.0])
def test_emulated_kernel_geometries(geometry, norm_type, emulated_cuda_module):
    g = torch.Generator().manual_seed(19)
    grads = [torch.randn(s, generator=g, dtype=torch.float64).to(dt)
             for s, dt in [((130,), torch.float32), ((0,), torch.float32), ((3, 41), torch.bfloat16),
                           ((), torch.float16), ((257,), torch.float64), ((64,), torch.float16)]]
    grads += [_misaligned(37, torch.float32, g), _misaligned(50, torch.bfloat16, g)]
    exact = float(torch.linalg.vector_norm(torch.cat([x.double().flatten() for x in grads]), norm_type))
    launches = emulated_cuda_module.launches()
    outs = []
    for _ in range(3):  # the completion counter returns to zero: every call is right
        out = torch.empty(2, dtype=torch.float64)
        torch.ops.fusedopt.grad_norm_(grads, norm_type, 0.5, out)
        outs.append(out)
    assert emulated_cuda_module.launches() == launches + 3
    assert math.isclose(float(outs[0][0]), exact, rel_tol=1e-13)
    assert float(outs[0][1]) == min(0.5 / (float(outs[0][0]) + 1e-6), 1.0) or math.isclose(
        float(outs[0][1]), 0.5 / (float(outs[0][0]) + 1e-6), rel_tol=1e-15)
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


@pytest.mark.parametrize("grid", [1, 3, 17, 64])
def test_emulated_norm_does_not_depend_on_grid_or_block_order(grid, emulated_cuda_module):
    """Per-chunk partials reduced in an order fixed by the chunk index and the block size: the bits
    are the same for every grid and every order in which blocks run."""
    import emulated_cuda

    g = torch.Generator().manual_seed(20)
    grads = [torch.randn(n, generator=g) for n in (1000, 33, 4096, 7)]
    results = []
    for concurrent, seed in ((True, 0), (False, 1), (False, 99)):
        with emulated_cuda.emulated(emulated_cuda_module, grid=grid, block=8, chunk_elems=16,
                                    concurrent=concurrent, seed=seed):
            out = torch.empty(2)
            torch.ops.fusedopt.grad_norm_(grads, 2.0, 1.0, out)
            results.append(out)
    with emulated_cuda.emulated(emulated_cuda_module, grid=1, block=8, chunk_elems=16):
        reference = torch.empty(2)
        torch.ops.fusedopt.grad_norm_(grads, 2.0, 1.0, reference)
    for r in results:
        assert torch.equal(r, reference)


@pytest.mark.emulated_cuda(grid=16, block=32, chunk_elems=64)
def test_emulated_10000_tensors(emulated_cuda_module):
    g = torch.Generator().manual_seed(21)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in torch.randint(0, 90, (10_000,), generator=g).tolist()]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    ref = clone_params(params)
    launches = emulated_cuda_module.launches()
    total = fusedopt.clip_grad_norm_(params, 1.0)
    assert emulated_cuda_module.launches() == launches + 1
    expected = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    assert_close_rel(total, expected, 4e-6)
    grads_close(params, ref, 4e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("value", [1e-25, 1e-20, 3e-19])
@pytest.mark.parametrize("n", [127, 128, 129, 1000, 70_000])
def test_float32_squares_below_the_float_range_get_their_true_norm(device, value, n):
    """Squares below about 1e-38 are subnormal (1e-20 squared: a few significant bits) or 0 in
    float (1e-25): a float32 grad of such elements still gets its norm within an ulp of exact,
    and a chunk of zeros a norm of exactly 0."""
    g = torch.full((n,), value)
    g[::3] *= -1.5
    out = torch.empty(2, device=device)
    torch.ops.fusedopt.grad_norm_([g.to(device)], 2.0, 1.0, out)
    out = out.cpu()
    exact = math.sqrt(math.fsum(float(x) ** 2 for x in g.double()))
    ulp = float(torch.nextafter(out[0], torch.tensor(INF)) - out[0])
    assert abs(float(out[0]) - exact) <= ulp, (float(out[0]), exact)
    zeros = torch.zeros(n, device=device)
    zeros[::5] = -0.0
    out_z = torch.full((2,), -1.0, device=device)
    torch.ops.fusedopt.grad_norm_([zeros], 2.0, 1.0, out_z)
    assert float(out_z[0]) == 0.0
