"""The op layer: schemas, fake implementations (opcheck), validation messages, GradScaler
semantics of the raw ops, and the shared work list."""

import pytest
import torch

from fusedopt import _extension
from fusedopt.ops import ADAM_COLUMNS, SGD_COLUMNS, hyper_table

from emulated_cuda import DEVICES  # "cpu", "emul" (emulated CUDA kernels), "cuda"

pytestmark = pytest.mark.skipif(not _extension.extension_available(), reason="needs the compiled extension")


def adam_row(**kw):
    row = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=0, maximize=0,
               decoupled=0, lr_index=-1, sched_begin=0, sched_count=0)
    row.update(kw)
    return row


def sgd_row(**kw):
    row = dict(lr=1e-2, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=0, maximize=0, lr_index=-1,
               sched_begin=0, sched_count=0)
    row.update(kw)
    return row


def adam_args(device, shapes=((7,), (3, 5)), dtype=torch.float32, amsgrad=False, scaler=False):
    g = torch.Generator().manual_seed(1)
    mk = lambda s: torch.randn(s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    params = [mk(s) for s in shapes]
    grads = [mk(s) for s in shapes]
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    maxs = [torch.zeros_like(p) for p in params] if amsgrad else []
    steps = [torch.zeros((), dtype=torch.float32, device=device) for _ in params]
    hyper = hyper_table([adam_row(amsgrad=int(amsgrad))], ADAM_COLUMNS)
    extra = (torch.tensor([4.0], device=device), torch.zeros(1, device=device)) if scaler else (None, None)
    return (params, grads, exp_avgs, exp_avg_sqs, maxs, steps, [len(params)], hyper, []) + extra


def sgd_args(device, shapes=((7,), (3, 5)), fresh=(0,), scaler=False):
    g = torch.Generator().manual_seed(2)
    params = [torch.randn(s, generator=g).to(device) for s in shapes]
    grads = [torch.randn(s, generator=g).to(device) for s in shapes]
    bufs = [torch.zeros_like(p) for p in params]
    hyper = hyper_table([sgd_row()], SGD_COLUMNS)
    extra = (torch.tensor([2.0], device=device), torch.zeros(1, device=device)) if scaler else (None, None)
    return (params, grads, bufs, [len(params)], hyper, [], list(fresh)) + extra


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("scaler", [False, True])
def test_opcheck_adam(device, amsgrad, scaler):
    torch.library.opcheck(torch.ops.fusedopt.adam_.default, adam_args(device, amsgrad=amsgrad, scaler=scaler),
                          {"schedule_state": []})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scaler", [False, True])
def test_opcheck_sgd(device, scaler):
    torch.library.opcheck(torch.ops.fusedopt.sgd_.default, sgd_args(device, scaler=scaler), {"schedule_state": []})


def _schedule_kwargs(device, rows=((0, 1, 0.1, 0.01, 10, 0, 0, 0),)):
    """A one-group in-kernel schedule: LINEAR from 0.1 to 0.01 over 10 steps."""
    return {"schedule": torch.tensor(rows, dtype=torch.float64),
            "schedule_state": [torch.zeros(1, dtype=torch.int64, device=device),
                               torch.zeros((), dtype=torch.float64, device=device)]}


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_with_in_kernel_schedule(device):
    args = list(adam_args(device))
    args[7] = hyper_table([adam_row(sched_begin=0, sched_count=1)], ADAM_COLUMNS)
    torch.library.opcheck(torch.ops.fusedopt.adam_.default, tuple(args), _schedule_kwargs(device))
    sargs = list(sgd_args(device))
    sargs[4] = hyper_table([sgd_row(sched_begin=0, sched_count=1)], SGD_COLUMNS)
    torch.library.opcheck(torch.ops.fusedopt.sgd_.default, tuple(sargs), _schedule_kwargs(device))


@pytest.mark.parametrize("device", DEVICES)
def test_in_kernel_schedule_uses_lr_t_then_stores_lr_t_plus_1(device):
    params, grads, bufs, sizes, _, lrs, fresh, _, _ = sgd_args(device, fresh=())
    hyper = hyper_table([sgd_row(momentum=0.0, lr=99.0, sched_begin=0, sched_count=1)], SGD_COLUMNS)
    kw = _schedule_kwargs(device)
    counter, lr_out = kw["schedule_state"]
    for t in range(12):
        p0 = [p.clone() for p in params]
        torch.ops.fusedopt.sgd_(params, grads, [], sizes, hyper, lrs, [], None, None, **kw)
        lr_t = 0.1 + (0.01 - 0.1) * min(t, 10) / 10  # LINEAR phase, computed here independently
        for p, q, g in zip(params, p0, grads):
            torch.testing.assert_close(p, q - torch.tensor(lr_t, dtype=torch.float32) * g, rtol=1e-6, atol=1e-7)
        assert counter.item() == t + 1
        assert lr_out.item() == pytest.approx(0.1 + (0.01 - 0.1) * min(t + 1, 10) / 10, rel=1e-12)
    # a skipped step neither uses nor advances the schedule
    kw_skip = dict(kw)
    torch.ops.fusedopt.sgd_(params, grads, [], sizes, hyper, lrs, [], None, torch.ones(1, device=device), **kw_skip)
    assert counter.item() == 12


def test_schedule_validation_messages():
    params, grads, bufs, sizes, _, lrs, _, _, _ = sgd_args("cpu", fresh=())
    hyper = hyper_table([sgd_row(momentum=0.0, sched_begin=0, sched_count=2)], SGD_COLUMNS)
    kw = _schedule_kwargs("cpu")
    with pytest.raises(RuntimeError, match=r"names schedule rows \[0, 2\) but the table has 1 rows"):
        torch.ops.fusedopt.sgd_(params, grads, [], sizes, hyper, lrs, [], None, None, **kw)
    hyper = hyper_table([sgd_row(momentum=0.0, sched_begin=0, sched_count=1)], SGD_COLUMNS)
    with pytest.raises(RuntimeError, match=r"no schedule table"):
        torch.ops.fusedopt.sgd_(params, grads, [], sizes, hyper, lrs, [], None, None, schedule_state=[])
    with pytest.raises(RuntimeError, match=r"schedule_state must hold the step counter and one lr tensor"):
        torch.ops.fusedopt.sgd_(params, grads, [], sizes, hyper, lrs, [], None, None,
                                schedule=kw["schedule"], schedule_state=kw["schedule_state"][:1])
    with pytest.raises(RuntimeError, match=r"schedule_state\[0\] must be a one-element int64"):
        torch.ops.fusedopt.sgd_(params, grads, [], sizes, hyper, lrs, [], None, None, schedule=kw["schedule"],
                                schedule_state=[torch.zeros(1), kw["schedule_state"][1]])


@pytest.mark.parametrize("device", DEVICES)
def test_found_inf_skips_everything_and_grad_scale_unscales(device):
    args = list(adam_args(device, amsgrad=True, scaler=True))
    before = [[t.clone() for t in lst] for lst in args[:6]]
    args[10] = torch.ones(1, device=device)  # found_inf set: nothing may change, steps included
    torch.ops.fusedopt.adam_(*args, schedule_state=[])
    for lst, old in zip(args[:6], before):
        for t, o in zip(lst, old):
            assert torch.equal(t, o)
    args[10] = torch.zeros(1, device=device)
    torch.ops.fusedopt.adam_(*args, schedule_state=[])
    for g, g0 in zip(args[1], before[1]):  # grads unscaled in place by 1/4
        torch.testing.assert_close(g, g0 / 4, rtol=0, atol=0)
    assert all(s.item() == 1.0 for s in args[5])


@pytest.mark.parametrize("device", DEVICES)
def test_fresh_momentum_buffer_takes_the_gradient(device):
    params, grads, bufs, sizes, hyper, lrs, _, gs, fi = sgd_args(device)
    hyper = hyper_table([sgd_row(dampening=0.5)], SGD_COLUMNS)
    p0 = [p.clone() for p in params]
    torch.ops.fusedopt.sgd_(params, grads, bufs, sizes, hyper, lrs, [0], None, None, schedule_state=[])
    # params[0]: fresh buffer = grad; params[1]: buffer = 0.9 * 0 + (1 - 0.5) * grad
    torch.testing.assert_close(bufs[0], grads[0], rtol=0, atol=0)
    torch.testing.assert_close(bufs[1], 0.5 * grads[1])
    torch.testing.assert_close(params[0], p0[0] - 1e-2 * grads[0])


def test_validation_messages():
    base = adam_args("cpu")

    def call(**changes):
        names = ["params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps",
                 "group_sizes", "hyper", "lr_tensors", "grad_scale", "found_inf"]
        args = dict(zip(names, base))
        args.update(changes)
        torch.ops.fusedopt.adam_(*[args[n] for n in names], schedule_state=[])

    p, g = base[0], base[1]
    with pytest.raises(RuntimeError, match=r"must have the same length"):
        call(grads=g[:1])
    with pytest.raises(TypeError, match=r"grads\[1\] has dtype Double but params\[1\] has dtype Float"):
        call(grads=[g[0], g[1].double()])
    with pytest.raises(RuntimeError, match=r"grads\[0\] has shape \[8\] but params\[0\] has shape \[7\]"):
        call(grads=[torch.zeros(8), g[1]])
    with pytest.raises(RuntimeError, match=r"grads\[0\] is sparse"):
        call(grads=[torch.zeros(7).to_sparse(), g[1]])
    with pytest.raises(RuntimeError, match=r"group_sizes add up to 1 but 2 params"):
        call(group_sizes=[1])
    with pytest.raises(RuntimeError, match=r"hyper has shape"):
        call(hyper=torch.zeros(2, len(ADAM_COLUMNS), dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"hyper must be a 2-D float64 CPU tensor"):
        call(hyper=base[7].float())
    with pytest.raises(TypeError, match=r"params\[0\] has dtype Int"):
        call(params=[torch.zeros(7, dtype=torch.int32), p[1]],
             grads=[torch.zeros(7, dtype=torch.int32), g[1]],
             exp_avgs=[torch.zeros(7, dtype=torch.int32), base[2][1]],
             exp_avg_sqs=[torch.zeros(7, dtype=torch.int32), base[3][1]])
    gappy = torch.zeros(3, 10)[:, :5]
    with pytest.raises(RuntimeError, match=r"params\[1\] of shape \[3, 5\] .* view with gaps"):
        call(params=[p[0], gappy])
    with pytest.raises(RuntimeError, match=r"state_steps\[0\] must have one element"):
        call(state_steps=[torch.zeros(2), base[5][1]])
    with pytest.raises(RuntimeError, match=r"amsgrad group but max_exp_avg_sqs has only 0"):
        call(hyper=hyper_table([adam_row(amsgrad=1)], ADAM_COLUMNS))
    with pytest.raises(RuntimeError, match=r"found_inf must have exactly one element"):
        call(found_inf=torch.zeros(2))
    with pytest.raises(RuntimeError, match=r"refers to lr_tensors\[0\] but only 0"):
        call(hyper=hyper_table([adam_row(lr_index=0)], ADAM_COLUMNS))


def test_sgd_validation_messages():
    params, grads, bufs, sizes, hyper, lrs, fresh, gs, fi = sgd_args("cpu")
    with pytest.raises(RuntimeError, match=r"momentum but momentum_buffers has only 1"):
        torch.ops.fusedopt.sgd_(params, grads, bufs[:1], sizes, hyper, lrs, [], None, None, schedule_state=[])
    with pytest.raises(RuntimeError, match=r"fresh_buffers names params\[5\]"):
        torch.ops.fusedopt.sgd_(params, grads, bufs, sizes, hyper, lrs, [5], None, None, schedule_state=[])


def test_cpu_lr_tensor_is_read():
    args = list(adam_args("cpu"))
    args[7] = hyper_table([adam_row(lr=123.0, lr_index=0)], ADAM_COLUMNS)
    args[8] = [torch.tensor(0.0)]  # lr 0: params must not move
    p0 = [p.clone() for p in args[0]]
    torch.ops.fusedopt.adam_(*args, schedule_state=[])
    for p, q in zip(args[0], p0):
        assert torch.equal(p, q)


# -- the shared work list ------------------------------------------------------------------

@pytest.mark.parametrize("numels,chunk,parts", [
    ([5, 0, 3], 2, 2),
    ([1] * 1000, 7, 3),
    ([10**6, 3, 17, 0, 65536, 65537], 65536, 2),
    ([4097, 1, 7], 1024, 5),
    ([], 16, 4),
    ([100], 1000, 8),
])
def test_work_list_covers_every_element_once_and_balances(numels, chunk, parts):
    chunks, bounds = _extension.require().work_list(numels, chunk, parts)
    covered = {t: 0 for t in range(len(numels))}
    for t, begin, end in chunks:
        assert 0 < end - begin <= chunk
        assert begin == covered[t], "chunks of a tensor must be contiguous and in order"
        covered[t] = end
    assert [covered[t] for t in range(len(numels))] == numels
    assert [c[0] for c in chunks] == sorted(c[0] for c in chunks)
    assert len(bounds) == parts + 1 and bounds[0] == 0 and bounds[-1] == len(chunks)
    assert bounds == sorted(bounds)
    total = sum(numels)
    for i in range(parts):
        share = sum(e - b for _, b, e in chunks[bounds[i]:bounds[i + 1]])
        # each part holds its fair share give or take one chunk
        assert abs(share - total / parts) <= chunk + 1


def test_work_list_rejects_bad_input():
    C = _extension.require()
    with pytest.raises(ValueError, match="chunk size must be positive"):
        C.work_list([3], 0, 1)
    with pytest.raises(ValueError, match="parts must be positive"):
        C.work_list([3], 4, 0)
    with pytest.raises(ValueError, match="negative tensor size"):
        C.work_list([-1], 4, 1)


# -- the in-kernel schedule evaluator (csrc/update_rules.h) against the Python reference -----

@pytest.mark.parametrize("kind", range(9))
def test_cpp_schedule_evaluator_matches_the_python_reference(kind):
    from fusedopt.lr_scheduler import evaluate_phases

    C = _extension.require()
    g = torch.Generator().manual_seed(kind)
    for flag in (0.0, 1.0):
        # two phases: the second starts at 17, so the lookup of the active phase is exercised too
        a, b = (0.05 + torch.rand(2, generator=g) * 0.5).tolist()
        n = float(torch.randint(3, 40, (1,), generator=g))
        first = (0.0, float(kind), a, b, n, 0.97, 1.7, flag)
        second = (17.0, float(kind), b, a * 0.1, n + 5, 0.9, 0.5, flag)
        rows = [v for phase in (first, second) for v in phase]
        for t in [0, 1, 2, n - 1, n, n + 1, 16, 17, 18, 17 + n, 150]:
            expected = evaluate_phases([first, second], t)
            assert C.schedule_lr(rows, float(t)) == pytest.approx(expected, rel=1e-12, abs=1e-15), (kind, flag, t)


def test_cpp_schedule_evaluator_rejects_bad_rows():
    with pytest.raises(ValueError, match="multiple of 8"):
        _extension.require().schedule_lr([0.0] * 7, 1.0)


def test_compacted_list_errors_name_the_param_they_belong_to():
    # max_exp_avg_sqs only holds the amsgrad group's tensors: its entry 0 belongs to params[1]
    params, grads, m, v, _, steps, _, _, lrs, _, _ = adam_args("cpu")
    hyper = hyper_table([adam_row(), adam_row(amsgrad=1)], ADAM_COLUMNS)
    with pytest.raises(RuntimeError, match=r"max_exp_avg_sqs\[0\] has shape \[2\] but params\[1\] has shape \[3, 5\]"):
        torch.ops.fusedopt.adam_(params, grads, m, v, [torch.zeros(2)], steps, [1, 1], hyper, lrs,
                                 schedule_state=[])


ADAM_KW = dict(amsgrad=False, beta1=0.9, beta2=0.99, lr=1e-2, weight_decay=0.0, eps=1e-8, maximize=False)
SGD_KW = dict(weight_decay=0.0, momentum=0.9, lr=0.1, dampening=0.5, nesterov=False, maximize=False)


def test_a_meta_tensor_among_real_ones_is_refused_not_skipped():
    # the fake implementations are the ops' Meta kernels: a call with any meta tensor reaches them
    import fusedopt.ops as fo

    p, step = torch.randn(3), torch.tensor(0.0)
    with pytest.raises(RuntimeError, match=r"grads\[0\] is on meta but params\[0\] is on cpu"):
        fo.adam([p], [torch.empty(3, device="meta")], [torch.zeros(3)], [torch.zeros(3)], [], [step], **ADAM_KW)
    with pytest.raises(RuntimeError, match=r"grads\[1\] is on meta but grads\[0\] is on cpu"):
        torch.ops.fusedopt.grad_norm_([torch.randn(3), torch.empty(3, device="meta")], 2.0, 1.0, torch.empty(2))
    # all on meta (a model traced on the meta device): nothing to do, no error
    m = lambda: torch.empty(3, device="meta")  # noqa: E731
    fo.adam([m()], [m()], [m()], [m()], [], [torch.empty((), device="meta")], **ADAM_KW)


@pytest.mark.parametrize("how", ["skipped", "raised"])
def test_functional_sgd_keeps_a_buffer_only_from_a_step_that_ran(how):
    import fusedopt.ops as fo

    bufs = [None]
    if how == "skipped":
        fo.sgd([torch.zeros(4)], [torch.ones(4)], bufs, found_inf=torch.tensor(1.0), **SGD_KW)
    else:
        with pytest.raises(RuntimeError, match="shape"):
            fo.sgd([torch.zeros(4)], [torch.ones(5)], bufs, **SGD_KW)
    assert bufs == [None]
    p = torch.zeros(4)
    fo.sgd([p], [torch.ones(4)], bufs, **SGD_KW)
    ref_p, ref_bufs = torch.zeros(4), [None]
    from torch.optim.sgd import sgd as torch_sgd

    torch_sgd([ref_p], [torch.ones(4)], ref_bufs, foreach=False, **SGD_KW)
    assert torch.equal(bufs[0], ref_bufs[0]) and torch.equal(p, ref_p)  # the first buffer is the grad


def test_functional_lists_must_match_the_params():
    import fusedopt.ops as fo

    P = [torch.randn(4) for _ in range(3)]
    Z = lambda k: [torch.zeros(4) for _ in range(k)]  # noqa: E731
    steps = [torch.tensor(0.0) for _ in range(3)]
    with pytest.raises(ValueError, match="ops.adam: grads has length 2 but params has length 3"):
        fo.adam(P, Z(2), Z(3), Z(3), [], steps, **ADAM_KW)
    with pytest.raises(ValueError, match="ops.adam: exp_avg_sqs has length 4"):
        fo.adam(P, Z(3), Z(3), Z(4), [], steps, **ADAM_KW)
    with pytest.raises(ValueError, match="ops.adam: max_exp_avg_sqs has length 0"):
        fo.adam(P, Z(3), Z(3), Z(3), [], steps, **dict(ADAM_KW, amsgrad=True))
    with pytest.raises(ValueError, match="ops.sgd: momentum_buffer_list has length 2"):
        fo.sgd(P, Z(3), [None, None], **SGD_KW)
    fo.sgd(P, Z(3), [], **dict(SGD_KW, momentum=0.0))  # no buffers without momentum, as torch


@pytest.mark.parametrize("device", DEVICES)
def test_tensors_a_step_writes_must_not_share_memory(device):
    """Every chunk of a call is updated at once: a param given twice (or overlapping views, or
    shared states) would race. Refused, naming both, before anything is written."""
    x = torch.randn(1 << 15, device=device)
    x0 = x.clone()
    args = adam_args(device, shapes=((1 << 15,), (1 << 15,)))
    params, grads, exp_avgs, exp_avg_sqs = args[0], args[1], args[2], args[3]
    with pytest.raises(RuntimeError, match=r"params\[0\] and params\[1\] share memory"):
        torch.ops.fusedopt.adam_([x, x], *args[1:], schedule_state=[])
    with pytest.raises(RuntimeError, match=r"params\[0\] and params\[1\] share memory"):
        torch.ops.fusedopt.adam_([x[:20000], x[10000:30000]], [g[:20000] for g in grads], [e[:20000] for e in exp_avgs],
                                 [e[:20000] for e in exp_avg_sqs], *args[4:], schedule_state=[])
    with pytest.raises(RuntimeError, match=r"the 'exp_avg_sq' states of params\[0\] and params\[1\] share memory"):
        torch.ops.fusedopt.adam_(params, grads, exp_avgs, [exp_avg_sqs[0], exp_avg_sqs[0]], *args[4:],
                                 schedule_state=[])
    assert torch.equal(x, x0)
    assert all(float(s) == 0 for s in args[5])
    # grads may be shared when nothing writes them (no grad scale)
    torch.ops.fusedopt.adam_(params, [grads[0], grads[0]], exp_avgs, exp_avg_sqs, *args[4:], schedule_state=[])


def test_lr_index_must_name_an_lr_tensor_or_the_column():
    args = list(adam_args("cpu"))
    for bad in (-2.0, 0.5):
        args[7] = hyper_table([adam_row(lr_index=bad)], ADAM_COLUMNS)
        with pytest.raises(RuntimeError, match=f"group 0 has lr_index {bad:g}; it must be -1"):
            torch.ops.fusedopt.adam_(*args[:8], [torch.tensor(0.1)], *args[9:], schedule_state=[])


@pytest.mark.parametrize("runs", [1, 3, 40, 300])
def test_overlap_is_found_among_params_in_any_address_order(runs):
    # views of one buffer, listed as `runs` ascending runs (a few jumps, as allocations give, up
    # to many, as a shuffle gives); apart they step, one view overlapping another is refused
    buf = torch.zeros(600 * 8)
    order = [k for r in range(runs) for k in range(r, 600, runs)][::-1 if runs == 300 else 1]
    views = [buf[8 * k: 8 * k + 8] for k in order]
    hyper = hyper_table([sgd_row(momentum=0.0)], SGD_COLUMNS)
    grads = [torch.ones(8) for _ in views]
    torch.ops.fusedopt.sgd_(views, grads, [], [len(views)], hyper, [], [], None, None, schedule_state=[])
    assert torch.equal(buf, torch.full_like(buf, -1e-2))
    clash = buf[8 * order[77] + 3: 8 * order[77] + 11]  # straddles two views
    with pytest.raises(RuntimeError, match=r"params\[\d+\] and params\[600\] share memory"):
        torch.ops.fusedopt.sgd_(views + [clash], grads + [torch.ones(8)], [], [len(views) + 1], hyper, [], [],
                                None, None, schedule_state=[])
    assert torch.equal(buf, torch.full_like(buf, -1e-2))
