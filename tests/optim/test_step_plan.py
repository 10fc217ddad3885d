"""The validated step plan (csrc/eager_entry.cpp's StepPlan): a plan checks params, grads and state
once, and each later step re-reads only the grads and the params' storage. These tests make every
change that plan could miss between steps and check that the step notices it as torch does, or
raises the error a fresh optimizer raises: grads swapped for misfits, state dicts edited through
every dict method, plain dicts assigned as state, and the state_dict / pickling of tracked dicts.
float64 on CPU (CUDA too where present), so parity is checked at 1e-12."""

import copy
import io
import pickle

import pytest
import torch

from optim_parity_utils import (
    MagnitudeTracker,
    assert_pair_close,
    build_pair,
    feed_same_grads,
    fused_cls,
    make_gen,
    run_with_edits,
)

from test_optim_semantics import CTORS, DT, NAMES

GROUPS = [([(4,), (3, 5)], {}), ([(6,)], {"lr": 0.02})]
STATE_KEY = {"SGD": "momentum_buffer", "Adam": "exp_avg", "AdamW": "exp_avg_sq"}


def _plans(opt):
    return [b.step_plan for b in opt._plan.batches]


def _stepped_pair(name, device, seed, steps=3):
    """A (torch, fusedopt) pair after ``steps`` steps on the same grads, and its grad generator."""
    ref, fo = build_pair(name, GROUPS, dtype=DT, device=device, ctor=CTORS[name])
    gen = make_gen(seed)
    for _ in range(steps):
        feed_same_grads(ref, fo, gen, dtype=DT)
        ref.step()
        fo.step()
    return ref, fo, gen


@pytest.mark.parametrize("name", NAMES)
def test_plain_params_step_through_a_step_plan(name, device):
    """The fast path is really taken (else the other tests would test the slower entry only)."""
    ref, fo, _ = _stepped_pair(name, device, 1)
    assert all(type(p).__name__ == "StepPlan" for p in _plans(fo.opt)), _plans(fo.opt)
    assert_pair_close(ref, fo, DT, "3 steps through the plan")


def _misfit(kind, p):
    """A grad for ``p`` that fusedopt must refuse, swapped in the way users can."""
    if kind == "dtype":  # .data= swaps a tensor's dtype behind autograd's back
        p.grad.data = p.grad.data.float()
    elif kind == "shape":
        p.grad.data = torch.zeros(p.numel() + 1, dtype=p.dtype, device=p.device)
    elif kind == "strides":  # same shape, transposed memory
        p.grad = torch.randn(p.shape[::-1], dtype=p.dtype, device=p.device).t()
    elif kind == "sparse":
        p.grad = p.grad.to_sparse()
    elif kind == "device":
        other = "cpu" if p.device.type == "cuda" else "cuda"
        p.grad.data = p.grad.data.to(other)
    return {"dtype": "dtype", "shape": "shape", "strides": "strides", "sparse": "sparse",
            "device": "is on"}[kind]


MISFITS = ["dtype", "shape", "strides", "sparse",
           pytest.param("device", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                           reason="needs a second device type"))]


@pytest.mark.parametrize("kind", MISFITS)
@pytest.mark.parametrize("name", NAMES)
def test_grads_swapped_for_misfits_get_the_errors_of_a_fresh_step(name, kind, device):
    """After steps through a plan, param 1's grad is replaced by one of another dtype / shape /
    layout / device, or a sparse one: the step raises what a fresh optimizer raises for the same
    grads, names the problem, and changes nothing; with a good grad back, steps go on like torch."""
    ref, fo, gen = _stepped_pair(name, device, 2)
    feed_same_grads(ref, fo, gen, dtype=DT)
    good = fo.params[1].grad.clone()
    word = _misfit(kind, fo.params[1])
    before = [p.detach().clone() for p in fo.params]
    with pytest.raises((RuntimeError, TypeError)) as planned:
        fo.opt.step()
    for p, b in zip(fo.params, before):
        assert torch.equal(p.detach(), b), "a refused step changed a param"
    fresh = fused_cls(name)(
        [dict(params=g["params"], **{k: v for k, v in g.items() if k != "params"}) for g in fo.opt.param_groups])
    fresh.load_state_dict(fo.opt.state_dict())
    with pytest.raises(type(planned.value)) as fresh_err:
        fresh.step()
    assert str(planned.value) == str(fresh_err.value)
    assert word in str(planned.value), str(planned.value)
    fo.params[1].grad = good
    tr = MagnitudeTracker()
    for t in range(3):
        if t:
            feed_same_grads(ref, fo, gen, dtype=DT)
        ref.step()
        fo.step()
        tr.update(ref)
        assert_pair_close(ref, fo, DT, f"step {t} after a refused {kind} grad", tracker=tr)


def _edit(how, st, key, value):
    if how == "setitem":
        st[key] = value
    elif how == "update":
        st.update({key: value})
    elif how == "ior":
        st |= {key: value}
    elif how == "del-setdefault":
        del st[key]
        st.setdefault(key, value)
    elif how == "pop-setitem":
        st.pop(key)
        st[key] = value
    elif how == "popitem-restore":  # the last entry popped, then every entry put back with key's new
        items = dict(st)
        st.popitem()
        items[key] = value
        st.update(items)
    elif how == "clear-update":
        items = dict(st)
        st.clear()
        items[key] = value
        st.update(items)


def _run_with_edits(name, device, seed, steps, edit, what):
    return run_with_edits(name, GROUPS, dtype=DT, device=device, ctor=CTORS[name], seed=seed, steps=steps,
                          edit=edit, what=what)


@pytest.mark.parametrize("how", ["setitem", "update", "ior", "del-setdefault", "pop-setitem", "popitem-restore",
                                 "clear-update"])
@pytest.mark.parametrize("name", NAMES)
def test_state_tensors_replaced_through_any_dict_method_are_honoured(name, how, device):
    """A state tensor replaced by a new one through any dict method takes effect at the next step,
    as in torch, which reads the state dicts every step."""
    key = STATE_KEY[name]

    def edit(t, side):
        if t in (3, 6):
            for i in (0, 2):
                st = side.opt.state[side.params[i]]
                _edit(how, st, key, st[key].clone() * (0.5 if t == 3 else 2.0))

    _run_with_edits(name, device, 3, 8, edit, f"{key} replaced by {how} before steps 3 and 6")


@pytest.mark.parametrize("how", ["data", "set_"])
@pytest.mark.parametrize("name", NAMES)
def test_state_tensor_storage_swapped_in_place_is_honoured(name, how, device):
    """``state[key].data = t`` or ``state[key].set_(t)`` keeps the tensor object (and its dict entry)
    but moves its elements: the next step updates the new storage, as torch does."""
    key = STATE_KEY[name]

    def edit(t, side):
        if t in (3, 5):
            for p in side.params[1:]:
                held = side.opt.state[p][key]
                new = held.detach().clone() * (0.5 if t == 3 else 2.0)
                if how == "data":
                    held.data = new
                else:
                    held.set_(new)

    _run_with_edits(name, device, 8, 7, edit, f"{key} storage swapped by {how} before steps 3 and 5")


@pytest.mark.parametrize("name", NAMES)
def test_plain_dict_assigned_as_a_params_state_is_read_every_step(name, device):
    """``opt.state[p] = d`` with a plain dict the optimizer cannot track: later edits of ``d`` still
    take effect, as in torch."""
    key = STATE_KEY[name]
    held = {}

    def edit(t, side):
        if t == 2:
            p = side.params[1]
            held[side] = side.opt.state[p] = dict(side.opt.state[p])
        if t == 5:
            held[side][key] = held[side][key].clone() * 3.0

    _run_with_edits(name, device, 4, 8, edit, "plain dict assigned at 2, edited at 5")


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_save_load_pickle_and_deepcopy_see_plain_dicts(name, device):
    """The tracked state dicts leave as plain dicts: state_dict() loads with torch.load(weights_only=True),
    a pickled / deep-copied optimizer holds no fusedopt class in its state and steps on like the original."""
    _, fo = build_pair(name, GROUPS, dtype=DT, device=device, ctor=CTORS[name])
    gen = make_gen(5)
    for _ in range(2):
        feed_same_grads(fo, fo, gen, dtype=DT)
        fo.step()
    sd = fo.opt.state_dict()
    assert all(type(v) is dict for v in sd["state"].values())
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert sorted(loaded["state"]) == sorted(sd["state"])
    assert "fusedopt" not in str(pickle.dumps(sd))
    assert b"fusedopt" not in pickle.dumps(fo.opt.state)  # pickled as a plain defaultdict of dicts
    twin = copy.deepcopy(fo.opt)
    assert twin.state is not fo.opt.state and all(isinstance(v, dict) for v in twin.state.values())
    params = [p for g in twin.param_groups for p in g["params"]]
    for p, q in zip(fo.params, params):
        q.grad = p.grad.clone()
    fo.step()
    twin.step()
    for p, q in zip(fo.params, params):
        torch.testing.assert_close(q, p, rtol=0, atol=0)


def test_profiler_sees_the_fused_step(device):
    """The plan calls the kernel without the dispatcher; the profiler still sees one fusedopt::step_."""
    _, fo = build_pair("Adam", GROUPS, dtype=DT, device=device, ctor=CTORS["Adam"])
    gen = make_gen(6)
    feed_same_grads(fo, fo, gen, dtype=DT)
    fo.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fo.step()
    names = [e.name for e in prof.events()]
    assert names.count("fusedopt::step_") == 1, [n for n in names if "fusedopt" in n]


def test_every_step_reaches_the_emulated_kernel_emul(emulated_cuda_module):
    """Under the emulated CUDA backend (kernels registered over fusedopt's CPU ones), the plan's
    steps go through the op: every step is one emulated launch, none runs the CPU kernel."""
    import emulated_cuda

    with emulated_cuda.emulated(emulated_cuda_module):
        ref, fo = build_pair("Adam", GROUPS, dtype=DT, device="cpu", ctor=CTORS["Adam"])
        gen = make_gen(7)
        for t in range(4):
            feed_same_grads(ref, fo, gen, dtype=DT)
            launches = emulated_cuda_module.launches()
            ref.step()
            fo.step()
            assert emulated_cuda_module.launches() == launches + 1, f"step {t}"
        assert_pair_close(ref, fo, DT, "4 emulated steps")


@pytest.mark.parametrize("name", NAMES)
def test_param_replaced_in_its_group_list_is_stepped_instead(name, device):
    """``group['params'][1] = q`` keeps the list object and its length: the step must update ``q``
    and leave the old param alone, as torch (which iterates the lists every step) does."""
    extra = torch.randn(3, 5, generator=make_gen(90), dtype=DT)
    replaced = {}

    def edit(t, side):
        if t == 3:
            q = torch.nn.Parameter(extra.clone().to(device))
            replaced[side] = side.params[1]
            side.opt.param_groups[0]["params"][1] = q
            side.params[1] = q

    _, fo = _run_with_edits(name, device, 9, 6, edit, "param 1 replaced in its group's list before step 3")
    old = replaced[fo]
    frozen = old.detach().clone()
    fo.params[1].grad = torch.ones_like(fo.params[1])
    old.grad = torch.ones_like(old)
    fo.step()
    assert torch.equal(old.detach(), frozen), "the param taken out of its group was still updated"


# Enough params that the step's per-param check runs as two threads' shares (StepPlan's
# kCheckGrain is 2,048 params), in two groups: every change below hits the last param, which only
# the second share reads.
MANY = [([(1,)] * 1300, {}), ([(2,)] * 800, {"lr": 0.02})]


@pytest.mark.parametrize("change", ["state-data", "grad-lost", "grad-misfit"])
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_a_plan_checked_by_threads_notices_a_change_in_its_last_param(name, change, device, two_threads):
    """2,100 params, the step's check split over two threads: the last param's state storage
    swapped (honoured, as torch), its grad lost (skipped, as torch) or swapped for a misfit (the
    fresh step's error, nothing changed)."""
    key = STATE_KEY[name]
    if change == "state-data":
        def edit(t, side):
            if t == 3:
                held = side.opt.state[side.params[-1]][key]
                held.data = held.detach().clone() * 0.5

        run_with_edits(name, MANY, dtype=DT, device=device, ctor=CTORS[name], seed=11,
                       steps=5, edit=edit, what=f"last {key} swapped by .data")
        return
    ref, fo = build_pair(name, MANY, dtype=DT, device=device, ctor=CTORS[name])
    gen = make_gen(12)
    for _ in range(2):
        feed_same_grads(ref, fo, gen, dtype=DT)
        ref.step()
        fo.step()
    if change == "grad-lost":
        mask = [True] * (len(fo.params) - 1) + [False]
        feed_same_grads(ref, fo, gen, dtype=DT, mask=mask)
        ref.step()
        fo.step()
        assert_pair_close(ref, fo, DT, "a step without the last param's grad")
        return
    feed_same_grads(ref, fo, gen, dtype=DT)
    fo.params[-1].grad.data = fo.params[-1].grad.data.float()
    before = [p.detach().clone() for p in fo.params]
    with pytest.raises((RuntimeError, TypeError), match="dtype"):
        fo.opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(fo.params, before)), "a refused step changed a param"


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_step_counters_edited_in_place_or_shared_count_like_torch(name, two_threads):
    """The plan's CPU step bumps a one-chunk tensor's step counter inside its chunk, on either
    thread, when no two params share a counter (else all counters first, serially). Counters set
    in place to different values (no dict edit: the plan is kept), one counter then shared by two
    params (torch's foreach and fused steps bump it once per param before any update, so both step
    with the count + 2), and tensors on both sides of the 65,536-element chunk: params and
    counters as torch's foreach step computes them, in float64 to 1e-12."""
    shapes = [(3,), (70_000,), (5, 7), (1,), (65_536,), (65_537,), (2, 2)]
    gen = torch.Generator().manual_seed(21)
    start = [torch.randn(s, generator=gen, dtype=DT) for s in shapes]
    ref_params = [torch.nn.Parameter(t.clone()) for t in start]
    fo_params = [torch.nn.Parameter(t.clone()) for t in start]
    ref = getattr(torch.optim, name)(ref_params, lr=0.01, foreach=True)
    fo = fused_cls(name)(fo_params, lr=0.01)

    def step_both(steps):
        for _ in range(steps):
            for rp, fp in zip(ref_params, fo_params):
                g = torch.randn(rp.shape, generator=gen, dtype=DT)
                rp.grad, fp.grad = g.clone(), g.clone()
            ref.step()
            fo.step()

    def check(what):
        for i, (rp, fp) in enumerate(zip(ref_params, fo_params)):
            torch.testing.assert_close(fp.detach(), rp.detach(), rtol=1e-12, atol=1e-12,
                                       msg=lambda m: f"{what}, param {i}: {m}")
            assert fo.state[fp]["step"].item() == ref.state[rp]["step"].item(), (what, i)

    step_both(2)
    check("2 steps")
    for i, (rp, fp) in enumerate(zip(ref_params, fo_params)):
        ref.state[rp]["step"].fill_(10 + 3 * i)
        fo.state[fp]["step"].fill_(10 + 3 * i)
    step_both(2)
    check("counters set in place to different values")
    for opt, ps in ((ref, ref_params), (fo, fo_params)):
        opt.state[ps[3]]["step"] = opt.state[ps[0]]["step"]
    step_both(2)
    check("one counter shared by a one-element and a 3-element param")
    assert fo.state[fo_params[0]]["step"].item() == 10 + 2 + 4, "the shared counter counts both params"
    for opt, ps in ((ref, ref_params), (fo, fo_params)):
        opt.state[ps[3]]["step"] = opt.state[ps[3]]["step"].clone()
    step_both(2)
    check("the counter no longer shared")


@pytest.mark.parametrize("unscaling", [False, True], ids=["plain", "grad-scale"])
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_every_step_through_the_plan_bumps_each_written_tensor_once(name, unscaling, two_threads):
    """The plan bumps versions in its per-param check, on both threads' shares: after each step
    every param's version (and, when a GradScaler's grad_scale has the kernel write the grads back
    unscaled, every grad's) is one more, as torch's fused in-place op leaves it; and so autograd
    refuses a backward through weights a later step changed, as test_package checks for the first."""
    torch.manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(*shape, dtype=DT)) for shape, _ in [((1,), 0)] * 1300 + [((2,), 0)] * 800]
    opt = fused_cls(name)(params, lr=0.01, **({"momentum": 0.9} if name == "SGD" else {}))
    if unscaling:
        opt.grad_scale = torch.tensor(4.0)
        opt.found_inf = torch.tensor(0.0)
    for step in range(4):
        for p in params:
            p.grad = torch.randn_like(p)
        before = [(p._version, p.grad._version) for p in params]
        opt.step()
        assert all(type(b.step_plan).__name__ == "StepPlan" for b in opt._plan.batches)
        bumped = [(p._version - v, p.grad._version - g) for p, (v, g) in zip(params, before)]
        expected = (1, 1 if unscaling else 0)
        wrong = [i for i, d in enumerate(bumped) if d != expected]
        assert not wrong, f"step {step}: params {wrong[:5]}... bumped {bumped[wrong[0]]}, not {expected}"
    loss = sum((p * p).sum() for p in params[-3:])  # saves the last params for its backward
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
