"""fusedopt.RMSprop, fusedopt.Adagrad and fusedopt.Lion.

RMSprop and Adagrad are checked against torch.optim's for-loop implementation (foreach=False):
numerical parity over every option on and off (group 0 holds a grid point, group 1 the same point
with every boolean flipped and other alpha/eps/lr, group 2 only a different lr), float32 /
float64 (whole 50-step runs) and bfloat16 (per step, re-synced float32 oracle), odd sizes
(1, 37, 105, 1000, 4099 elements), tensor lr, state keys / dtypes, constructor signature /
defaults / validation messages, state_dicts both ways, every torch lr_scheduler, GradScaler
(skipped steps change nothing), pickling, and the fused-op contract (one op call per device per
step, opcheck-clean).

Lion has no torch.optim oracle: new_optim_utils.LionRef is the paper's pseudo-code evaluated in
float64.  float32 / bfloat16 runs are checked one step at a time against that rule applied to
fusedopt's own state (assert_lion_step, which argues the tolerance and the sign(0) band);
float64 runs are compared over whole runs (1e-12); plus hand-computed steps and a tiny model
that must train.

Tolerances: optim_parity_utils.float_tolerance (float32 1e-6, float64 1e-12, relative, over a
whole run) and assert_half_step_close (2 ulp of the half type per step + evaluation-order noise);
the arguments are in their docstrings and hold unchanged here: every rule is elementwise with
the same structure as Adam's (products, sums, a sqrt and a division, no data-dependent branches
except Lion's sign, which is handled explicitly).
"""

from __future__ import annotations

import copy
import inspect
import itertools
import pickle
import warnings
from collections import Counter

import pytest
import torch
from torch.optim import lr_scheduler as L
from torch.utils._pytree import tree_flatten, tree_map

from optim_parity_utils import (
    RecordFusedOps,
    MagnitudeTracker,
    Side,
    copy_hparams,
    leaf,
    make_gen,
    roundtrip,
    state_of,
    step_value,
)
from new_optim_utils import (
    assert_lion_state_keys,
    assert_lion_step,
    assert_pair_close_any,
    build_pair,
    fused_cls,
    is_pristine_state,
    lion_snapshot,
    lion_step_count_ok,
    ref_cls,
    ref_kwargs,
    run_half_parity,
    run_parity,
)

STEPS = 50
SHAPES = ([(1,), (4099,)], [(37,), (3, 5, 7)], [(1000,)])
HALF_SHAPES = ([(1,), (7,)], [(3, 5, 7)], [(257,)])
FULL_DTYPES = [torch.float32, torch.float64]


def lr_value(value, lr_kind, dtype, one_dim=False):
    """float lr or a 1-element tensor lr (float64 for float64 params: torch's for-loop computes
    with the tensor's dtype, a float32 lr would make torch itself round the step size)."""
    if lr_kind == "float":
        return value
    t = torch.tensor(value, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return t.reshape(1) if one_dim else t


def case_id(case):
    return "-".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in case.items())


# ===================================================================================== RMSprop
# 2^3 on (momentum, centered, maximize); weight_decay and capturable follow as products, and group
# 1 flips momentum / centered / maximize / weight_decay: across the two groups every combination
# of the four group options is stepped.
RMS_CASES = [
    dict(momentum=0.9 if a else 0.0, centered=bool(b), maximize=bool(c), weight_decay=0.01 if a ^ b ^ c else 0.0,
         capturable=bool(a ^ c))
    for a, b, c in itertools.product((0, 1), repeat=3)
]


def rms_groups(case, lr_kind, dtype):
    ctor = dict(case, lr=lr_value(1e-3, lr_kind, dtype))
    flipped = dict(
        momentum=0.0 if case["momentum"] else 0.8,
        centered=not case["centered"],
        maximize=not case["maximize"],
        weight_decay=0.0 if case["weight_decay"] else 0.01,
        alpha=0.9,
        eps=1e-6,
        lr=lr_value(3e-3, lr_kind, dtype, one_dim=True),
    )
    g2 = dict(lr=2e-3, alpha=0.95, eps=1e-2)  # an eps large enough that its placement shows
    if case["momentum"]:
        g2["momentum"] = 0.5
    return ctor, [(SHAPES[0], {}), (SHAPES[1], flipped), (SHAPES[2], g2)]


def with_lr_kind(cases):
    """Half of the grid points run with float lrs, half with tensor lrs (ctor: 0-dim tensor, group 1:
    1-element tensor, group 2: float - mixed in one optimizer); each at float32 and float64."""
    return [pytest.param(c, "float" if i % 2 == 0 else "tensor", id=f"{case_id(c)}-{'float' if i % 2 == 0 else 'tensor'}-lr")
            for i, c in enumerate(cases)]


@pytest.mark.parametrize("dtype", FULL_DTYPES, ids=str)
@pytest.mark.parametrize("case,lr_kind", with_lr_kind(RMS_CASES))
def test_rmsprop_parity_grid(case, dtype, lr_kind, device):
    ctor, groups = rms_groups(case, lr_kind, dtype)
    run_parity("RMSprop", groups, dtype=dtype, device=device, steps=STEPS, ctor=ctor)


# ===================================================================================== Adagrad
# 2^3 on (lr_decay, weight_decay, maximize), initial_accumulator_value as their product; group 1
# flips them.  Its initial_accumulator_value entry is what torch ignores (the accumulators are
# created in the constructor from the constructor's value): a drop-in ignores it too.
ADA_CASES = [
    dict(lr_decay=0.01 if a else 0.0, weight_decay=0.1 if b else 0.0, maximize=bool(c),
         initial_accumulator_value=0.1 if a ^ b ^ c else 0.0)
    for a, b, c in itertools.product((0, 1), repeat=3)
]


def ada_groups(case, lr_kind, dtype):
    ctor = dict(case, lr=lr_value(1e-2, lr_kind, dtype))
    flipped = dict(
        lr_decay=0.0 if case["lr_decay"] else 0.02,
        weight_decay=0.0 if case["weight_decay"] else 0.1,
        maximize=not case["maximize"],
        initial_accumulator_value=0.5,
        eps=1e-6,
        lr=lr_value(3e-2, lr_kind, dtype, one_dim=True),
    )
    return ctor, [(SHAPES[0], {}), (SHAPES[1], flipped), (SHAPES[2], dict(lr=2e-2, eps=1e-2))]


@pytest.mark.parametrize("dtype", FULL_DTYPES, ids=str)
@pytest.mark.parametrize("case,lr_kind", with_lr_kind(ADA_CASES))
def test_adagrad_parity_grid(case, dtype, lr_kind, device):
    ctor, groups = ada_groups(case, lr_kind, dtype)
    run_parity("Adagrad", groups, dtype=dtype, device=device, steps=STEPS, ctor=ctor)


# ============================================================================== bfloat16 (torch)
HALF_CASES = [
    ("RMSprop", RMS_CASES[0], "float"),
    ("RMSprop", RMS_CASES[7], "tensor"),  # momentum + centered + maximize + weight decay
    ("RMSprop", RMS_CASES[5], "float"),
    ("Adagrad", ADA_CASES[0], "tensor"),
    ("Adagrad", ADA_CASES[7], "float"),
]


@pytest.mark.parametrize("name,case,lr_kind", HALF_CASES, ids=[f"{n}-{case_id(c)}-{k}" for n, c, k in HALF_CASES])
def test_bfloat16_parity_per_step(name, case, lr_kind, device):
    """bf16 params and state: each step within one bf16 rounding of the float32 oracle re-synced
    to fusedopt's state (optim_parity_utils.assert_half_step_close)."""
    dtype = torch.bfloat16
    ctor, groups = (rms_groups if name == "RMSprop" else ada_groups)(case, lr_kind, dtype)
    groups = [(shapes, hp) for shapes, (_, hp) in zip(HALF_SHAPES, groups)]
    run_half_parity(name, groups, dtype=dtype, device=device, steps=STEPS, ctor=ctor)


# ========================================================================================= Lion
LION_CASES = [dict(weight_decay=0.0, maximize=False), dict(weight_decay=0.1, maximize=True)]


def lion_groups(case, lr_kind, dtype):
    ctor = dict(case, lr=lr_value(1e-3, lr_kind, dtype), betas=(0.9, 0.99))
    flipped = dict(weight_decay=0.0 if case["weight_decay"] else 0.1, maximize=not case["maximize"],
                   betas=(0.95, 0.98), lr=lr_value(3e-3, lr_kind, dtype, one_dim=True))
    return ctor, [(SHAPES[0], {}), (SHAPES[1], flipped), (SHAPES[2], dict(lr=2e-3, betas=(0.8, 0.999)))]


def lion_run_per_step(fo, dtype, device, steps, gen, what, mask_fn=None):
    for t in range(1, steps + 1):
        before = lion_snapshot(fo)
        grads = []
        for i, p in enumerate(fo.params):
            if mask_fn is not None and not mask_fn(t, i):
                p.grad = None
                grads.append(None)
                continue
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
            p.grad = g.clone()
            grads.append(g)
        fo.step()
        for i, (p, g) in enumerate(zip(fo.params, grads)):
            if g is not None:
                assert torch.equal(p.grad, g), f"{what} step {t}: step() modified p.grad of param {i}"
        assert_lion_step(fo, before, grads, dtype, f"{what} step {t}")


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", LION_CASES, ids=case_id)
def test_lion_every_step_follows_the_paper(case, dtype, lr_kind, device):
    """50 steps, three groups with different lr / betas / weight_decay / maximize; every step of
    every element against the paper's rule in float64 (tolerance: assert_lion_step)."""
    ctor, groups = lion_groups(case, lr_kind, dtype)
    _, fo = build_pair("Lion", groups, dtype=dtype, device=device, ctor=ctor, seed=21)
    lion_run_per_step(fo, dtype, device, STEPS, make_gen(22), f"Lion {case_id(case)} {dtype}")
    for p in fo.params:
        lion_step_count_ok(fo, p, STEPS, "Lion")


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("case", LION_CASES, ids=case_id)
def test_lion_float64_run_matches_reference(case, lr_kind, device):
    """Whole 50-step float64 run against LionRef (float_tolerance(float64) = 1e-12: a sign flip
    needs |c| within ~1e-16 relative of 0, which random data does not produce)."""
    ctor, groups = lion_groups(case, lr_kind, torch.float64)
    run_parity("Lion", groups, dtype=torch.float64, device=device, steps=STEPS, ctor=ctor)


def test_lion_hand_computed_steps(device):
    """Three steps of one 4-element param, every value worked out by hand from the pseudo-code
    (all numbers exact in binary up to the final roundings; checked at 1e-6 relative in float32).
    Element 2 has grad 0 and m 0 on the first step: sign(0) = 0, so it only decays."""
    lr, b1, b2, wd = 0.125, 0.5, 0.75, 0.5
    p = torch.tensor([1.0, -2.0, 0.5, 4.0], device=device, requires_grad=True)
    opt = fused_cls("Lion")([p], lr=lr, betas=(b1, b2), weight_decay=wd)
    P = [1.0, -2.0, 0.5, 4.0]
    M = [0.0, 0.0, 0.0, 0.0]
    grads = [[1.0, -1.0, 0.0, 2.0], [-4.0, -1.0, 0.0, -1.0], [1.0, 3.0, -2.0, 0.0]]
    for g in grads:
        p.grad = torch.tensor(g, device=device)
        opt.step()
        for j in range(4):
            c = b1 * M[j] + (1 - b1) * g[j]
            s = (c > 0) - (c < 0)
            P[j] = P[j] * (1 - lr * wd) - lr * s
            M[j] = b2 * M[j] + (1 - b2) * g[j]
        torch.testing.assert_close(p.detach().cpu(), torch.tensor(P), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["exp_avg"].cpu(), torch.tensor(M), rtol=1e-6, atol=1e-7)
    # step 1 by hand: c = [.5, -.5, 0, 1] -> p = p*(15/16) - [1/8, -1/8, 0, 1/8]
    # -> [0.8125, -1.75, 0.46875, 3.625]  (recomputed above; spelled out for the reader)


def test_lion_maximize_is_minimize_of_negated_grad(device):
    ps = [leaf(torch.randn(37, generator=make_gen(1)), torch.float32, device) for _ in range(2)]
    a = fused_cls("Lion")([ps[0]], lr=1e-2, weight_decay=0.1, maximize=True)
    b = fused_cls("Lion")([ps[1]], lr=1e-2, weight_decay=0.1)
    gen = make_gen(2)
    for _ in range(5):
        g = torch.randn(37, generator=gen).to(device)
        ps[0].grad, ps[1].grad = g.clone(), -g
        a.step()
        b.step()
    # both see the same effective gradient -g: identical params and exp_avg, bit for bit
    assert torch.equal(ps[0], ps[1])
    assert torch.equal(a.state[ps[0]]["exp_avg"], b.state[ps[1]]["exp_avg"])


def test_lion_trains_a_tiny_model(device):
    """A 2-layer tanh MLP (4-16-1) fitting a fixed random teacher of the same shape on 128
    points: Lion(lr=1e-2, wd=0.01) must bring the training MSE down by at least 10x in 150
    full-batch steps (LionRef gets 32x: 14.0 -> 0.44, a 3x margin; Lion moves every weight by
    ~lr per step, so a broken sign / momentum / decay rule stalls at or above the initial loss)."""
    gen = make_gen(123)
    teacher = [torch.randn(4, 16, generator=gen), torch.randn(16, generator=gen), torch.randn(16, 1, generator=gen)]
    x = torch.randn(128, 4, generator=gen)
    y = torch.tanh(x @ teacher[0] + teacher[1]) @ teacher[2]
    x, y = x.to(device), y.to(device)
    ps = [leaf(torch.randn(s, generator=gen) * 0.5, torch.float32, device) for s in ((4, 16), (16,), (16, 1))]
    opt = fused_cls("Lion")(ps, lr=1e-2, weight_decay=0.01)

    def loss_fn():
        return ((torch.tanh(x @ ps[0] + ps[1]) @ ps[2] - y) ** 2).mean()

    first = loss_fn().item()
    for _ in range(150):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    last = loss_fn().item()
    assert last < first / 10, f"Lion did not train: loss {first:.4g} -> {last:.4g} (expected a 10x drop)"


# ======================================================================== shared: odd inputs
def _small_ctor(name):
    return {
        "RMSprop": dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01),
        "Adagrad": dict(lr=0.05, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1),
        "Lion": dict(lr=0.01, weight_decay=0.1),
    }[name]


@pytest.mark.parametrize("name", ["RMSprop", "Adagrad", "Lion"])
def test_params_without_grads_are_skipped(name, device):
    """Some params have no grad on some steps (torch skips them: no state update, no step count
    for them; Adagrad's untouched accumulators stay at the initial value)."""
    mask = lambda t, n: [(t + i) % 3 != 0 for i in range(n)]  # noqa: E731
    specs = [([(1,), (37,), (3, 5)], {}), ([(6,), ()], {"lr": 0.02})]
    run_parity(name, specs, dtype=torch.float64, device=device, steps=STEPS, ctor=_small_ctor(name),
               grad_mask_fn=mask, check_every=1)


@pytest.mark.parametrize("name", ["RMSprop", "Adagrad", "Lion"])
def test_mixed_dtypes_in_one_group(name, device):
    """float32 and float64 params in one group (one fused call per device handles both)."""
    ctor = _small_ctor(name)
    ref32, fo32 = build_pair(name, [([(5,), (33,)], {})], dtype=torch.float32, device=device, ctor=ctor, seed=3)
    ref64, fo64 = build_pair(name, [([(6,), (17,)], {})], dtype=torch.float64, device=device, ctor=ctor, seed=4)
    ref = Side(ref_cls(name)(ref32.params + ref64.params, **ref_kwargs(name, ctor)), ref32.params + ref64.params)
    fo = Side(fused_cls(name)(fo32.params + fo64.params, **ctor), fo32.params + fo64.params)
    gen = make_gen(9)
    tr = MagnitudeTracker()
    for _ in range(STEPS):
        for p_r, p_f in zip(ref.params, fo.params):
            g = torch.randn(p_f.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=p_f.dtype)
            p_f.grad, p_r.grad = g.clone(), g.clone()
        ref.step()
        fo.step()
        tr.update(ref)
    r32, f32 = Side(ref.opt, ref.params[:2]), Side(fo.opt, fo.params[:2])
    r64, f64 = Side(ref.opt, ref.params[2:]), Side(fo.opt, fo.params[2:])
    if name == "Lion":
        # float32 sign decisions may legitimately differ from the float64 reference near c = 0
        # over a whole run (see assert_lion_step); compare the float64 half here, the float32 half
        # is covered step by step in test_lion_every_step_follows_the_paper
        assert_pair_close_any(name, r64, f64, torch.float64, "Lion mixed-dtype group, float64 params")
        return
    trk32, trk64 = MagnitudeTracker(), MagnitudeTracker()
    trk32.m = {(i, k): v for (i, k), v in tr.m.items() if i < 2}
    trk64.m = {(i - 2, k): v for (i, k), v in tr.m.items() if i >= 2}
    assert_pair_close_any(name, r32, f32, torch.float32, f"{name} mixed-dtype group, float32 params", tracker=trk32)
    assert_pair_close_any(name, r64, f64, torch.float64, f"{name} mixed-dtype group, float64 params", tracker=trk64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["RMSprop", "Adagrad", "Lion"])
def test_params_on_cpu_and_cuda_in_one_optimizer(name):
    ctor = _small_ctor(name)
    ref_c, fo_c = build_pair(name, [([(5,), (300,)], {})], dtype=torch.float64, device="cpu", ctor=ctor, seed=3)
    ref_g, fo_g = build_pair(name, [([(6,), (301,)], {})], dtype=torch.float64, device="cuda", ctor=ctor, seed=4)
    ref = Side(ref_cls(name)([{"params": ref_c.params}, {"params": ref_g.params, "lr": 0.02}], **ref_kwargs(name, ctor)),
               ref_c.params + ref_g.params)
    fo = Side(fused_cls(name)([{"params": fo_c.params}, {"params": fo_g.params, "lr": 0.02}], **ctor), fo_c.params + fo_g.params)
    gen, tr = make_gen(9), MagnitudeTracker()
    for _ in range(STEPS):
        for p_r, p_f in zip(ref.params, fo.params):
            g = torch.randn(p_f.shape, generator=gen, dtype=torch.float64).to(p_f.device)
            p_f.grad, p_r.grad = g.clone(), g.clone()
        ref.step()
        fo.step()
        tr.update(ref)
    assert_pair_close_any(name, ref, fo, torch.float64, f"{name} cpu+cuda", tracker=tr)


# ================================================================================ state layout
RMS_STATE_CONFIGS = [
    dict(lr=0.01),
    dict(lr=0.01, momentum=0.9),
    dict(lr=0.01, centered=True),
    dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.1, maximize=True),
]
STATE_DTYPES = [torch.float32, torch.float64, torch.bfloat16]


@pytest.mark.parametrize("dtype", STATE_DTYPES, ids=str)
@pytest.mark.parametrize("ctor", RMS_STATE_CONFIGS, ids=case_id)
def test_rmsprop_state_keys_and_dtypes(ctor, dtype, device):
    """No state before the first step; then exactly step + square_avg (+ momentum_buffer iff
    momentum > 0, + grad_avg iff centered), in the param dtype / shape / device, step a float 0-dim
    tensor counting steps - as torch."""
    # group 1 toggles momentum / centered so both layouts live in one optimizer
    g1 = {"momentum": 0.0 if ctor.get("momentum") else 0.5, "centered": not ctor.get("centered", False)}
    ref, fo = build_pair("RMSprop", [([(3, 4), (5,)], {}), ([(7,)], g1)], dtype=dtype, device=device, ctor=ctor)
    assert len(fo.opt.state) == 0 and fo.opt.state_dict()["state"] == {}
    gen = make_gen(5)
    for t in range(1, 4):
        for p_r, p_f in zip(ref.params, fo.params):
            g = torch.randn(p_f.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
            p_f.grad, p_r.grad = g.clone(), g.clone()
        ref.step()
        fo.step()
        for i, (pr, pf) in enumerate(zip(ref.params, fo.params)):
            grp = fo.opt.param_groups[0 if i < 2 else 1]
            expected = {"step", "square_avg"} | ({"momentum_buffer"} if grp["momentum"] > 0 else set()) | (
                {"grad_avg"} if grp["centered"] else set())
            sr, sf = ref.opt.state[pr], fo.opt.state[pf]
            assert set(sr) == expected  # (test sanity: torch's layout)
            assert set(sf) == expected, f"param {i}: fusedopt state keys {sorted(sf)}, torch {sorted(expected)}"
            assert step_value(sf["step"]) == t
            for k in expected - {"step"}:
                assert sf[k].dtype == sr[k].dtype == dtype and sf[k].shape == pf.shape and sf[k].device == pf.device, k


@pytest.mark.parametrize("dtype", STATE_DTYPES, ids=str)
@pytest.mark.parametrize("iav", [0.0, 0.25])
def test_adagrad_state_exists_after_construction(iav, dtype, device):
    """torch.optim.Adagrad creates step (0) and sum (filled with initial_accumulator_value, param
    dtype) for every param in its constructor; so must fusedopt (state_dict included)."""
    ref, fo = build_pair("Adagrad", [([(3, 4), (5,)], {}), ([(7,)], {"lr": 0.1})], dtype=dtype, device=device,
                         ctor=dict(initial_accumulator_value=iav))
    for i, (pr, pf) in enumerate(zip(ref.params, fo.params)):
        sr, sf = state_of(ref.opt, pr), state_of(fo.opt, pf)
        assert set(sf) == set(sr) == {"step", "sum"}, f"param {i}: fusedopt state right after construction: {sorted(sf)}"
        assert step_value(sf["step"]) == 0
        assert sf["sum"].dtype == dtype and sf["sum"].shape == pf.shape and sf["sum"].device == pf.device
        assert torch.equal(sf["sum"], sr["sum"])
    sd_r, sd_f = ref.opt.state_dict(), fo.opt.state_dict()
    assert sorted(sd_f["state"]) == sorted(sd_r["state"]) == list(range(3))
    gen = make_gen(6)
    for t in range(1, 3):
        for p_r, p_f in zip(ref.params, fo.params):
            g = torch.randn(p_f.shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
            p_f.grad, p_r.grad = g.clone(), g.clone()
        ref.step()
        fo.step()
        for pf in fo.params:
            assert set(fo.opt.state[pf]) == {"step", "sum"} and step_value(fo.opt.state[pf]["step"]) == t
            assert fo.opt.state[pf]["sum"].dtype == dtype


@pytest.mark.parametrize("dtype", STATE_DTYPES, ids=str)
def test_lion_state_keys_and_dtypes(dtype, device):
    """No state before the first step; then exp_avg in the param dtype / shape / device (+ an
    optional float step counter)."""
    _, fo = build_pair("Lion", [([(3, 4), (5,)], {}), ([(7,)], {"lr": 0.1})], dtype=dtype, device=device,
                       ctor=dict(lr=0.01))
    assert fo.opt.state_dict()["state"] == {}
    gen = make_gen(5)
    for t in range(1, 4):
        for p in fo.params:
            p.grad = torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype)
        fo.step()
        for i, p in enumerate(fo.params):
            assert_lion_state_keys(fo.opt.state[p], p, f"after step {t}")
            lion_step_count_ok(fo, p, t, f"after step {t}")


# ================================================================================= constructor
def params(n=2):
    return [leaf(torch.randn(3), torch.float32, "cpu") for _ in range(n)]


def outcome(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - we compare whatever torch raises
        return type(e), str(e)
    return None


def _sig_rows(cls):
    return [(p.name, p.kind, p.default) for p in inspect.signature(cls.__init__).parameters.values()]


@pytest.mark.parametrize("name", ["RMSprop", "Adagrad"])
def test_constructor_signature_matches_torch(name):
    # torch's signature exactly, then fusedopt's keyword-only precision options (defaults: torch's
    # behaviour)
    K = inspect.Parameter.KEYWORD_ONLY
    assert _sig_rows(fused_cls(name)) == _sig_rows(getattr(torch.optim, name)) + [
        ("master_weights", K, False), ("master_remainders", K, False), ("state_dtype", K, None),
        ("stochastic_rounding", K, False), ("max_grad_norm", K, None), ("grad_norm_type", K, 2.0)]


def test_lion_signature():
    """Lion(params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False) as specified;
    further keyword-only arguments (e.g. foreach) are tolerated if they have defaults."""
    P, K = inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY
    rows = _sig_rows(fused_cls("Lion"))
    assert rows[:5] == [("self", P, inspect.Parameter.empty), ("params", P, inspect.Parameter.empty),
                        ("lr", P, 1e-4), ("betas", P, (0.9, 0.99)), ("weight_decay", P, 0.0)], rows
    rest = {n: (k, d) for n, k, d in rows[5:]}
    assert rest.get("maximize") == (K, False), rows
    for n, (k, d) in rest.items():
        assert k == K and d is not inspect.Parameter.empty, f"unexpected Lion argument {n} ({k}, default {d})"


@pytest.mark.parametrize("name", ["RMSprop", "Adagrad", "Lion"])
def test_is_a_torch_optimizer_with_amp_flag(name):
    opt = fused_cls(name)(params())
    assert isinstance(opt, torch.optim.Optimizer)
    assert "closure" in inspect.signature(opt.step).parameters
    assert getattr(opt, "_step_supports_amp_scaling", False) is True
    if name != "Lion":
        assert isinstance(opt, getattr(torch.optim, name))


def T(*v):
    return torch.tensor(v if len(v) > 1 else v[0])


RMS_BAD = [
    dict(lr=-0.1), dict(lr=-1e-12), dict(lr=float("nan")), dict(lr=torch.tensor([0.1, 0.2])), dict(lr=torch.tensor(-0.1)),
    dict(eps=-1e-8), dict(momentum=-0.5), dict(weight_decay=-1e-4), dict(alpha=-0.1),
    dict(fused=True),  # torch.optim.RMSprop has no `fused` argument
]
ADA_BAD = [
    dict(lr=-0.1), dict(lr=float("nan")), dict(lr=torch.tensor([0.1, 0.2])), dict(lr=torch.tensor(-0.1)),
    dict(lr_decay=-0.1), dict(weight_decay=-1e-4), dict(initial_accumulator_value=-0.1), dict(eps=-1e-10),
    dict(fused=True, foreach=True), dict(fused=True, differentiable=True), dict(capturable=True),
]
BAD = [("RMSprop", kw) for kw in RMS_BAD] + [("Adagrad", kw) for kw in ADA_BAD]


def _id(kw):
    return ",".join(f"{k}={v!r}".replace(" ", "") for k, v in kw.items())


@pytest.mark.parametrize("name,kwargs", BAD, ids=[f"{n}-{_id(k)}" for n, k in BAD])
def test_invalid_arguments_raise_like_torch(name, kwargs):
    expected = outcome(lambda: getattr(torch.optim, name)(params(), **kwargs))
    assert expected is not None, f"test case is not invalid for torch: {kwargs}"
    got = outcome(lambda: fused_cls(name)(params(), **kwargs))
    assert got is not None, f"fusedopt.{name} accepted {kwargs}; torch raises {expected[0].__name__}: {expected[1]}"
    assert got[0] is expected[0] and got[1] == expected[1], f"fusedopt: {got}, torch: {expected}"


BAD_PARAMS = {
    "tensor_not_iterable": lambda: torch.randn(3, requires_grad=True),
    "empty_list": lambda: [],
    "non_leaf": lambda: [torch.randn(3, requires_grad=True) * 2],
    "duplicate_across_groups": lambda: (lambda p: [{"params": [p]}, {"params": [p]}])(params(1)[0]),
}


@pytest.mark.parametrize("what", list(BAD_PARAMS))
@pytest.mark.parametrize("name", ["RMSprop", "Adagrad"])
def test_invalid_params_raise_like_torch(name, what):
    obj = BAD_PARAMS[what]()
    expected = outcome(lambda: getattr(torch.optim, name)(obj))
    got = outcome(lambda: fused_cls(name)(obj))
    assert expected is not None
    assert got is not None and got[0] is expected[0] and got[1] == expected[1], f"fusedopt: {got}, torch: {expected}"


@pytest.mark.parametrize("name", ["RMSprop", "Adagrad"])
def test_differentiable_is_rejected(name):
    """torch accepts differentiable=True; fusedopt (no autograd through the fused step) raises a
    RuntimeError at construction, as fusedopt.SGD / Adam do."""
    with pytest.raises(RuntimeError, match="differentiable"):
        fused_cls(name)(params(), differentiable=True)


LION_BAD = [
    dict(lr=-0.1), dict(lr=-1e-12), dict(betas=(-0.1, 0.99)), dict(betas=(1.5, 0.99)), dict(betas=(0.9, -0.5)),
    dict(betas=(0.9, 1.5)), dict(weight_decay=-0.1),
]


@pytest.mark.parametrize("kwargs", LION_BAD, ids=_id)
def test_lion_validation_in_torch_style(kwargs):
    """ValueError with torch's wording; torch.optim.Adam words exactly these checks ('Invalid
    learning rate: -0.1', 'Invalid beta parameter at index 0: 1.5', 'Invalid weight_decay value:
    -0.1'), so it gives the expected message for the same value."""
    expected = outcome(lambda: torch.optim.Adam(params(), **kwargs))
    assert expected is not None and expected[0] is ValueError
    got = outcome(lambda: fused_cls("Lion")(params(), **kwargs))
    assert got == expected, f"fusedopt.Lion({kwargs}): {got}, expected {expected}"


def test_lion_accepts_valid_arguments_and_defaults():
    opt = fused_cls("Lion")(params())
    d = opt.defaults
    assert (d["lr"], d["betas"], d["weight_decay"], d["maximize"]) == (1e-4, (0.9, 0.99), 0.0, False)
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["weight_decay"], g["maximize"]) == (1e-4, (0.9, 0.99), 0.0, False)
    opt = fused_cls("Lion")(params(), lr=torch.tensor(0.01), betas=(0.0, 0.5), weight_decay=0.0, maximize=True)
    assert torch.is_tensor(opt.param_groups[0]["lr"]) and opt.param_groups[0]["maximize"] is True
    r = repr(opt)
    assert r.startswith("Lion (") and "Parameter Group 0" in r and "betas: (0.0, 0.5)" in r


GOOD = {
    "RMSprop": [
        {}, dict(lr=0.1, alpha=0.9, eps=1e-6, weight_decay=0.1, momentum=0.9, centered=True),
        dict(maximize=True, capturable=True), dict(lr=torch.tensor(0.01)), dict(foreach=True), dict(foreach=False),
        dict(differentiable=False),
    ],
    "Adagrad": [
        {}, dict(lr=0.1, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.5, eps=1e-6),
        dict(maximize=True), dict(lr=torch.tensor(0.01)), dict(foreach=True), dict(fused=True), dict(foreach=False, fused=False),
    ],
}
GOOD_CASES = [(n, kw) for n, v in GOOD.items() for kw in v]


def _same(a, b):
    if torch.is_tensor(b):
        return torch.is_tensor(a) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(b, tuple):
        return isinstance(a, tuple) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("name,kwargs", GOOD_CASES, ids=[f"{n}-{_id(k)}" for n, k in GOOD_CASES])
def test_defaults_param_groups_and_repr_equal_torch(name, kwargs):
    ref = getattr(torch.optim, name)(params(), **kwargs)
    fo = fused_cls(name)(params(), **kwargs)
    assert set(fo.defaults) == set(ref.defaults), sorted(set(fo.defaults) ^ set(ref.defaults))
    for k, v in ref.defaults.items():
        assert _same(fo.defaults[k], v), f"defaults[{k!r}]: fusedopt {fo.defaults[k]!r} != torch {v!r}"
    for gf, gt in zip(fo.param_groups, ref.param_groups):
        assert set(gf) == set(gt)
        for k in gt:
            if k != "params":
                assert _same(gf[k], gt[k]), f"param_group[{k!r}]: fusedopt {gf[k]!r} != torch {gt[k]!r}"
    assert repr(fo) == repr(ref)


def test_rmsprop_and_adagrad_documented_defaults():
    d = fused_cls("RMSprop")(params()).defaults
    assert (d["lr"], d["alpha"], d["eps"], d["weight_decay"], d["momentum"], d["centered"], d["capturable"],
            d["maximize"]) == (1e-2, 0.99, 1e-8, 0, 0, False, False, False)
    d = fused_cls("Adagrad")(params()).defaults
    assert (d["lr"], d["lr_decay"], d["weight_decay"], d["initial_accumulator_value"], d["eps"], d["maximize"]) == (
        1e-2, 0, 0, 0, 1e-10, False)


@pytest.mark.parametrize("foreach", [None, False, True])
@pytest.mark.parametrize("name", ["RMSprop", "Adagrad"])
def test_foreach_is_accepted_and_ignored(name, foreach, device):
    ctor = dict(_small_ctor(name), foreach=foreach)
    run_parity(name, [([(5,), (3, 4)], {})], dtype=torch.float64, device=device, steps=STEPS, ctor=ctor, check_every=25)


# ================================================================================= state_dicts
DT = torch.float64
K1, K2 = 7, 9
SD_CONFIGS = [
    ("RMSprop", dict(lr=0.01)),
    ("RMSprop", dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01)),
    ("Adagrad", dict(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1)),
    ("Adagrad", dict(lr=0.05, weight_decay=0.1, maximize=True)),
    ("Lion", dict(lr=0.01, weight_decay=0.1)),
]
SD_IDS = [f"{n}-{case_id(c)}" for n, c in SD_CONFIGS]


def sd_groups(name):
    second = {"lr": 0.02}
    if name == "RMSprop":
        second.update(alpha=0.9, momentum=0.5)
    elif name == "Lion":
        second["betas"] = (0.8, 0.95)
    else:
        second["lr_decay"] = 0.05
    return [([(3, 4), (5,)], {}), ([(7,)], second)]


def steps(sides, gen, n, tracker=None):
    for _ in range(n):
        g = [torch.randn(p.shape, generator=gen, dtype=DT).to(p.device) for p in sides[0].params]
        for s in sides:
            s.set_grads(g)
            s.step()
        if tracker is not None:
            tracker.update(sides[0])


def as_default_checkpoint(sd):
    """A checkpoint of a default-constructed torch optimizer: foreach=None (and fused=None where the
    class has it) - the oracle is built with explicit False."""
    sd = dict(sd)
    sd["param_groups"] = [dict(g, **{k: None for k in ("foreach", "fused") if k in g}) for g in sd["param_groups"]]
    return sd


def fresh(name, like, ctor, *, fused):
    """A new optimizer (fusedopt's or the oracle's class) over clones of ``like``'s params."""
    params_ = [leaf(p.detach(), p.dtype, p.device) for p in like.params]
    groups, i = [], 0
    for g in like.opt.param_groups:
        n = len(g["params"])
        hp = {k: v for k, v in g.items() if k not in ("params", "initial_lr", "fused", "foreach", "capturable", "differentiable")}
        groups.append({"params": params_[i : i + n], **copy_hparams(hp)})
        i += n
    opt = fused_cls(name)(groups, **copy_hparams(ctor)) if fused else ref_cls(name)(groups, **ref_kwargs(name, copy_hparams(ctor)))
    return Side(opt, params_)


def _compare_layout(sd_ref, sd_fo):
    assert sorted(sd_fo["state"]) == sorted(sd_ref["state"])
    for k in sd_ref["state"]:
        assert set(sd_fo["state"][k]) == set(sd_ref["state"][k])
    assert len(sd_fo["param_groups"]) == len(sd_ref["param_groups"])
    for gr, gf in zip(sd_ref["param_groups"], sd_fo["param_groups"]):
        assert set(gf) == set(gr), f"param_group keys differ: {sorted(set(gf) ^ set(gr))}"
        for key in gr:
            if key in ("fused", "foreach"):
                continue
            a, b = gf[key], gr[key]
            assert (torch.is_tensor(a) and torch.equal(a, b)) if torch.is_tensor(b) else a == b, key


TORCH_SD = [(c, i) for c, i in zip(SD_CONFIGS, SD_IDS) if c[0] != "Lion"]


@pytest.mark.parametrize("name,ctor", [c for c, _ in TORCH_SD], ids=[i for _, i in TORCH_SD])
def test_state_dict_layout_matches_torch(name, ctor, device):
    ref, fo = build_pair(name, sd_groups(name), dtype=DT, device=device, ctor=ctor)
    steps([ref, fo], make_gen(5), 3)
    _compare_layout(ref.opt.state_dict(), fo.opt.state_dict())
    _compare_layout(ref.opt.state_dict(), roundtrip(fo.opt.state_dict()))  # weights_only checkpoint


@pytest.mark.parametrize("name,ctor", [c for c, _ in TORCH_SD], ids=[i for _, i in TORCH_SD])
def test_torch_checkpoint_resumes_in_fusedopt(name, ctor, device):
    ref, _ = build_pair(name, sd_groups(name), dtype=DT, device=device, ctor=ctor)
    gen, tr = make_gen(11), MagnitudeTracker()
    steps([ref], gen, K1, tr)
    fo = fresh(name, ref, ctor, fused=True)
    fo.opt.load_state_dict(roundtrip(as_default_checkpoint(ref.opt.state_dict())))
    assert_pair_close_any(name, ref, fo, DT, "right after load", tracker=tr)
    steps([ref, fo], gen, K2, tr)
    assert_pair_close_any(name, ref, fo, DT, f"{K2} steps after resuming a torch checkpoint in fusedopt", tracker=tr)


@pytest.mark.parametrize("name,ctor", SD_CONFIGS, ids=SD_IDS)
def test_fusedopt_checkpoint_resumes_in_reference(name, ctor, device):
    """fusedopt state_dict -> torch.optim (LionRef for Lion: exp_avg means the paper's m);
    compared with a reference run that never stopped."""
    ref, fo = build_pair(name, sd_groups(name), dtype=DT, device=device, ctor=ctor)
    gen, tr = make_gen(11), MagnitudeTracker()
    steps([ref, fo], gen, K1, tr)
    back = fresh(name, fo, ctor, fused=False)
    back.opt.load_state_dict(roundtrip(fo.opt.state_dict()))
    for g in back.opt.param_groups:
        assert not g.get("differentiable", False)
    steps([ref, back], gen, K2, tr)
    assert_pair_close_any(name, ref, back, DT, "reference resumed from a fusedopt checkpoint vs uninterrupted", tracker=tr)


@pytest.mark.parametrize("name,ctor", SD_CONFIGS, ids=SD_IDS)
def test_fusedopt_resume_is_bitwise_exact(name, ctor, device):
    _, fo = build_pair(name, sd_groups(name), dtype=DT, device=device, ctor=ctor)
    gen = make_gen(11)
    steps([fo], gen, K1)
    resumed = fresh(name, fo, ctor, fused=True)
    resumed.opt.load_state_dict(roundtrip(fo.opt.state_dict()))
    steps([fo, resumed], gen, K2)
    for i, (a, b) in enumerate(zip(fo.params, resumed.params)):
        assert torch.equal(a, b), f"param {i} differs after resuming fusedopt from its own checkpoint"
        sa, sb = state_of(fo.opt, a), state_of(resumed.opt, b)
        assert set(sa) == set(sb)
        for k in sa:
            assert torch.equal(torch.as_tensor(sa[k]).cpu(), torch.as_tensor(sb[k]).cpu()), k


@pytest.mark.parametrize("step_as", ["float", "int"])
@pytest.mark.parametrize("name,ctor", [c for c, _ in TORCH_SD], ids=[i for _, i in TORCH_SD])
def test_old_checkpoint_with_python_number_step_loads(name, ctor, step_as, device):
    ref, _ = build_pair(name, sd_groups(name), dtype=DT, device=device, ctor=ctor)
    gen, tr = make_gen(13), MagnitudeTracker()
    steps([ref], gen, K1, tr)
    old = copy.deepcopy(as_default_checkpoint(ref.opt.state_dict()))
    for st in old["state"].values():
        st["step"] = int(st["step"].item()) if step_as == "int" else float(st["step"].item())
    fo = fresh(name, ref, ctor, fused=True)
    fo.opt.load_state_dict(copy.deepcopy(old))
    for p in fo.params:
        assert step_value(fo.opt.state[p]["step"]) == K1
    steps([ref, fo], gen, K2, tr)
    assert_pair_close_any(name, ref, fo, DT, "resumed from an old-style checkpoint", tracker=tr)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name,ctor", SD_CONFIGS, ids=SD_IDS)
def test_deepcopy_and_pickle(name, ctor, how, device):
    """A copied optimizer (over copied params) steps exactly like the original and shares no
    state with it."""
    _, fo = build_pair(name, sd_groups(name), dtype=DT, device=device, ctor=ctor)
    gen = make_gen(17)
    steps([fo], gen, 3)
    opt2 = copy.deepcopy(fo.opt) if how == "deepcopy" else pickle.loads(pickle.dumps(fo.opt))
    params2 = [p for g in opt2.param_groups for p in g["params"]]
    assert all(a is not b for a, b in zip(params2, fo.params))
    other = Side(opt2, params2)
    steps([fo, other], gen, 4)
    for a, b in zip(fo.params, other.params):
        assert torch.equal(a, b)
    before = [p.detach().clone() for p in fo.params]
    steps([other], gen, 1)
    for a, b in zip(fo.params, before):
        assert torch.equal(a, b)


# ================================================================================== schedulers
SCHED_STEPS = 60


def _warm_lambda(e):
    return min(1.0, (e + 1) / 10) * 0.99**e


def _mult(e):
    return 0.97


def make_schedulers(name):
    """Every torch lr_scheduler.  CyclicLR / OneCycleLR cycle the momentum where torch can
    (RMSprop: 'momentum'; Lion: 'betas'[0]); Adagrad has neither, so cycle_momentum=False."""
    cyc = name != "Adagrad"
    return {
        "LambdaLR": lambda o: L.LambdaLR(o, [_warm_lambda, lambda e: 0.95**e]),
        "MultiplicativeLR": lambda o: L.MultiplicativeLR(o, _mult),
        "StepLR": lambda o: L.StepLR(o, step_size=10, gamma=0.5),
        "MultiStepLR": lambda o: L.MultiStepLR(o, milestones=[10, 30, 45], gamma=0.3),
        "ConstantLR": lambda o: L.ConstantLR(o, factor=0.25, total_iters=20),
        "LinearLR": lambda o: L.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=30),
        "ExponentialLR": lambda o: L.ExponentialLR(o, gamma=0.98),
        "SequentialLR": lambda o: L.SequentialLR(o, [L.LinearLR(o, 0.1, 1.0, 10), L.ExponentialLR(o, 0.97)], [10]),
        "CosineAnnealingLR": lambda o: L.CosineAnnealingLR(o, T_max=25, eta_min=1e-4),
        "ChainedScheduler": lambda o: L.ChainedScheduler([L.ConstantLR(o, 0.5, 15), L.ExponentialLR(o, 0.98)]),
        "ReduceLROnPlateau": lambda o: L.ReduceLROnPlateau(o, mode="min", factor=0.5, patience=3, cooldown=2),
        "CyclicLR": lambda o: L.CyclicLR(o, base_lr=[1e-3, 2e-3], max_lr=[1e-2, 3e-2], step_size_up=15, cycle_momentum=cyc),
        "CyclicLR-triangular2": lambda o: L.CyclicLR(o, 1e-3, 1e-2, step_size_up=7, step_size_down=11, mode="triangular2",
                                                     cycle_momentum=cyc),
        "CosineAnnealingWarmRestarts": lambda o: L.CosineAnnealingWarmRestarts(o, T_0=10, T_mult=2, eta_min=1e-5),
        "OneCycleLR": lambda o: L.OneCycleLR(o, max_lr=[1e-2, 2e-2], total_steps=SCHED_STEPS + 10, cycle_momentum=cyc),
        "OneCycleLR-linear-3phase": lambda o: L.OneCycleLR(o, max_lr=1e-2, total_steps=SCHED_STEPS + 10,
                                                           anneal_strategy="linear", three_phase=True, cycle_momentum=cyc),
        "PolynomialLR": lambda o: L.PolynomialLR(o, total_iters=50, power=2.0),
    }


SCHED_NAMES = list(make_schedulers("RMSprop"))
TENSOR_LR_SCHEDS = ("ReduceLROnPlateau", "CyclicLR")  # tensor lr: one reactive, one momentum-cycling
SCHED_CASES = [
    (n, s, k) for n in ("RMSprop", "Adagrad", "Lion") for s in SCHED_NAMES for k in ("float", "tensor")
    if k == "float" or s in TENSOR_LR_SCHEDS
]


def plateau_metric(t):
    return 1.0 / (1 + t // 12) + (0.01 if t % 12 > 6 else 0.0)


def sched_setup(name, lr_kind):
    lr = 0.01 if lr_kind == "float" else torch.tensor(0.01, dtype=DT)
    lr2 = 0.02 if lr_kind == "float" else torch.tensor(0.02, dtype=DT)
    if name == "RMSprop":
        ctor, g2 = dict(lr=lr, momentum=0.9, centered=True, weight_decay=1e-3), {"lr": lr2, "momentum": 0.8, "alpha": 0.9}
    elif name == "Adagrad":
        ctor, g2 = dict(lr=lr, lr_decay=0.01, weight_decay=1e-3), {"lr": lr2, "eps": 1e-6}
    else:
        ctor, g2 = dict(lr=lr, weight_decay=0.1), {"lr": lr2, "betas": (0.85, 0.98)}
    return ctor, [([(7,), (3, 5)], {}), ([(4, 4)], g2)]


def sched_step(s, t):
    if isinstance(s, L.ReduceLROnPlateau):
        s.step(plateau_metric(t))
    else:
        s.step()


def assert_same_lr(a, b, what):
    if torch.is_tensor(b):
        assert torch.is_tensor(a) and a.dtype == b.dtype and torch.equal(a, b), f"{what}: {a} != {b}"
    elif isinstance(b, tuple):
        assert isinstance(a, tuple) and len(a) == len(b), f"{what}: {a!r} != {b!r}"
        for x, y in zip(a, b):
            assert_same_lr(x, y, what)
    else:
        assert type(a) is type(b) and a == b, f"{what}: fusedopt {a!r} != reference {b!r}"


def assert_same_schedule(ref, fo, s_ref, s_fo, what):
    for i, (a, b) in enumerate(zip(s_fo.get_last_lr(), s_ref.get_last_lr(), strict=True)):
        assert_same_lr(a, b, f"{what}: get_last_lr()[{i}]")
    for i, (gf, gr) in enumerate(zip(fo.opt.param_groups, ref.opt.param_groups)):
        for k in ("lr", "momentum", "betas"):
            if k in gr:
                assert_same_lr(gf[k], gr[k], f"{what}: param_groups[{i}][{k!r}]")


def run_sched(name, sched_name, lr_kind, device, n):
    ctor, groups = sched_setup(name, lr_kind)
    ref, fo = build_pair(name, groups, dtype=DT, device=device, ctor=ctor, seed=31)
    make = make_schedulers(name)[sched_name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s_ref, s_fo = make(ref.opt), make(fo.opt)
    assert_same_schedule(ref, fo, s_ref, s_fo, "after scheduler construction")
    gen, tr, lrs = make_gen(32), MagnitudeTracker(), []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for t in range(n):
            steps([ref, fo], gen, 1)
            sched_step(s_ref, t)
            sched_step(s_fo, t)
            tr.update(ref)
            assert_same_schedule(ref, fo, s_ref, s_fo, f"{sched_name} step {t}")
            lrs.append(tuple(float(g["lr"]) for g in fo.opt.param_groups))
    bad = [str(x.message) for x in w if "optimizer.step()" in str(x.message)]
    assert not bad, f"scheduler warnings with fusedopt.{name}: {bad}"
    return ref, fo, s_ref, s_fo, tr, lrs


@pytest.mark.parametrize("name,sched_name,lr_kind", SCHED_CASES, ids=[f"{n}-{s}-{k}" for n, s, k in SCHED_CASES])
def test_scheduler_drives_like_reference(name, sched_name, lr_kind, device):
    """Identical lr (and momentum / betas) trajectories, bit for bit, and matching params and
    state after 60 float64 steps (1e-12)."""
    ref, fo, _, _, tr, lrs = run_sched(name, sched_name, lr_kind, device, SCHED_STEPS)
    assert len(set(lrs)) > 1, "the schedule should change the lr (test sanity)"
    assert_pair_close_any(name, ref, fo, DT, f"{name}+{sched_name} after {SCHED_STEPS} steps", tracker=tr)
    if lr_kind == "tensor":
        assert all(torch.is_tensor(g["lr"]) for g in fo.opt.param_groups)


CKPT_CASES = [("RMSprop", "OneCycleLR"), ("RMSprop", "CyclicLR"), ("Adagrad", "CyclicLR"), ("Adagrad", "LambdaLR"),
              ("Lion", "OneCycleLR"), ("Lion", "CosineAnnealingWarmRestarts")]


@pytest.mark.parametrize("name,sched_name", CKPT_CASES, ids=[f"{n}-{s}" for n, s in CKPT_CASES])
def test_scheduler_checkpoint_mid_run_resumes_exactly(name, sched_name, device):
    ckpt_at = 25
    ref, fo, s_ref, s_fo, tr, _ = run_sched(name, sched_name, "float", device, ckpt_at)
    ckpt = roundtrip({"opt": fo.opt.state_dict(), "sched": s_fo.state_dict(), "params": [p.detach() for p in fo.params]})
    ctor, groups = sched_setup(name, "float")
    _, fo2 = build_pair(name, groups, dtype=DT, device=device, ctor=ctor, seed=999)
    with torch.no_grad():
        for p, v in zip(fo2.params, ckpt["params"]):
            p.copy_(v)
    s_fo2 = make_schedulers(name)[sched_name](fo2.opt)
    s_fo2.load_state_dict(ckpt["sched"])
    fo2.opt.load_state_dict(ckpt["opt"])
    gen = make_gen(77)
    for t in range(ckpt_at, SCHED_STEPS):
        steps([ref, fo, fo2], gen, 1)
        for s in (s_ref, s_fo, s_fo2):
            sched_step(s, t)
        tr.update(ref)
        assert_same_schedule(fo, fo2, s_fo, s_fo2, f"resumed {sched_name} step {t}")
    for i, (a, b) in enumerate(zip(fo.params, fo2.params)):
        assert torch.equal(a, b), f"param {i}: resumed run differs from the uninterrupted one"
    assert_pair_close_any(name, ref, fo, DT, "uninterrupted fusedopt vs reference", tracker=tr)


def test_adagrad_cycle_momentum_rejected_like_torch():
    """Adagrad has neither 'momentum' nor 'betas': CyclicLR / OneCycleLR with cycle_momentum=True
    raise the same ValueError for fusedopt.Adagrad as for torch.optim.Adagrad."""
    for make in (lambda o: L.CyclicLR(o, 1e-3, 1e-2), lambda o: L.OneCycleLR(o, max_lr=1e-2, total_steps=10)):
        expected = outcome(lambda: make(torch.optim.Adagrad(params())))
        assert expected is not None and expected[0] is ValueError
        assert outcome(lambda: make(fused_cls("Adagrad")(params()))) == expected


EDITS = {
    "RMSprop": [("lr", 0.05), ("alpha", 0.5), ("eps", 1e-2), ("weight_decay", 0.1), ("maximize", True), ("momentum", 0.5)],
    "Adagrad": [("lr", 0.05), ("lr_decay", 0.5), ("eps", 1e-2), ("weight_decay", 0.1), ("maximize", True)],
    "Lion": [("lr", 0.05), ("betas", (0.5, 0.9)), ("weight_decay", 0.3), ("maximize", True), ("betas", (0.0, 0.5))],
}


@pytest.mark.parametrize("name", ["RMSprop", "Adagrad", "Lion"])
def test_hand_edited_hyperparameters_take_effect_next_step(name, device):
    """param_group entries changed between steps are used by the very next step (no cached copy)."""
    ctor = dict(_small_ctor(name))
    ref, fo = build_pair(name, [([(7,), (3, 5)], {}), ([(4, 4)], {"lr": 0.02})], dtype=DT, device=device, ctor=ctor, seed=41)
    edits = {3 + 3 * i: e for i, e in enumerate(EDITS[name])}
    gen, tr = make_gen(42), MagnitudeTracker()
    for t in range(3 + 3 * len(edits)):
        if t in edits:
            k, v = edits[t]
            for side in (ref, fo):
                side.opt.param_groups[t % 2][k] = v
        steps([ref, fo], gen, 1, tr)
        assert_pair_close_any(name, ref, fo, DT, f"{name} step {t} (edits {edits})", tracker=tr)


# ======================================================================================== AMP
AMP_DT = torch.float32
INF_STEPS = (0, 1, 5)
AMP_STEPS = 14
AMP_CASES = [
    ("RMSprop", dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.01)),
    ("RMSprop", dict(lr=0.01, maximize=True)),
    ("Adagrad", dict(lr=0.05, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1)),
    ("Lion", dict(lr=0.01, weight_decay=0.1)),
]
AMP_IDS = [f"{n}-{case_id(c)}" for n, c in AMP_CASES]
AMP_SHAPES = [(5, 4), (4,), (4, 1), (1,)]


def forward(ps, x):
    w1, b1, w2, b2 = ps
    return torch.tanh(x @ w1 + b1) @ w2 + b2


def full_snapshot(side):
    return [(p.detach().clone(), {k: (v.detach().clone() if torch.is_tensor(v) else v)
                                  for k, v in state_of(side.opt, p).items()}) for p in side.params]


def assert_unchanged_by_skipped_step(name, side, snap, t):
    for i, (p, (p0, st0)) in enumerate(zip(side.params, snap)):
        assert torch.equal(p.detach(), p0), f"skipped step {t} changed param {i}"
        st = state_of(side.opt, p)
        if not st0:
            assert not st or is_pristine_state(name, st), f"skipped step {t} wrote state of param {i}: {sorted(st)}"
            continue
        assert set(st) == set(st0), f"skipped step {t} changed the state keys of param {i}"
        for k, v0 in st0.items():
            assert torch.equal(torch.as_tensor(st[k]), torch.as_tensor(v0)), f"skipped step {t} changed state[{k!r}] of param {i}"


@pytest.mark.parametrize("explicit_unscale", [False, True], ids=["scaler.step", "unscale_+step"])
@pytest.mark.parametrize("name,ctor", AMP_CASES, ids=AMP_IDS)
def test_grad_scaler_parity_and_skipped_steps(name, ctor, explicit_unscale, device):
    """torch.amp.GradScaler drives fusedopt through grad_scale / found_inf (in-kernel unscale and
    skip) and the reference through its unscale-then-maybe-step path.  Steps with an injected inf
    leave params, state and step counters bitwise unchanged (Adagrad's constructor-made state
    included); scales and results match the reference at the float32 tolerance (the scale is a
    power of two: scaling is exact in both paths).  Lion: the float64-evaluated reference rounds
    once per step like a fused kernel; a sign decision could only differ for |c| within ~1e-7
    relative of 0 (probability ~1e-4 for these 630 element-steps)."""
    ref, fo = build_pair(name, [(AMP_SHAPES[:2], {}), (AMP_SHAPES[2:], {"lr": ctor["lr"] * 0.5})], dtype=AMP_DT,
                         device=device, ctor=ctor, seed=7)
    assert fo.opt._step_supports_amp_scaling is True
    scalers = {"ref": torch.amp.GradScaler(device), "fo": torch.amp.GradScaler(device)}
    gen, tr = make_gen(8), MagnitudeTracker()
    tr.update(ref)
    for t in range(AMP_STEPS):
        x = torch.randn(16, 5, generator=gen).to(device)
        y = torch.randn(16, 1, generator=gen).to(device)
        for key, side in (("ref", ref), ("fo", fo)):
            scaler = scalers[key]
            side.opt.zero_grad()
            scaler.scale(((forward(side.params, x) - y) ** 2).mean()).backward()
            if t in INF_STEPS:
                with torch.no_grad():
                    side.params[t % len(side.params)].grad.view(-1)[0] = float("inf")
            if explicit_unscale:
                scaler.unscale_(side.opt)
            snap = full_snapshot(side)
            scaler.step(side.opt)
            scaler.update()
            if t in INF_STEPS:
                assert_unchanged_by_skipped_step(name, side, snap, t)
        assert scalers["fo"].get_scale() == scalers["ref"].get_scale(), f"scale diverged at step {t}"
        tr.update(ref)
        assert_pair_close_any(name, ref, fo, AMP_DT, f"{name} AMP after step {t}", tracker=tr, tolerate_pristine=True)
    assert scalers["fo"].get_scale() < 2.0**16
    for p in fo.params:
        st = state_of(fo.opt, p)
        if "step" in st:
            assert step_value(st["step"]) == AMP_STEPS - len(INF_STEPS)


@pytest.mark.parametrize("name,ctor", AMP_CASES, ids=AMP_IDS)
def test_grad_scaler_with_nan_grad(name, ctor, device):
    _, fo = build_pair(name, [(AMP_SHAPES, {})], dtype=AMP_DT, device=device, ctor=ctor, seed=7)
    scaler = torch.amp.GradScaler(device)
    x = torch.randn(16, 5, generator=make_gen(1)).to(device)
    for t in range(3):
        fo.opt.zero_grad()
        scaler.scale((forward(fo.params, x) ** 2).mean()).backward()
        if t == 2:
            fo.params[0].grad.view(-1)[3] = float("nan")
        snap = full_snapshot(fo)
        scaler.step(fo.opt)
        scaler.update()
    assert_unchanged_by_skipped_step(name, fo, snap, 2)


# ============================================================================ fused-op contract


OP_SCENARIOS = {
    "rmsprop-groups": ("RMSprop", dict(lr=1e-2, momentum=0.9, centered=True), {"momentum": 0.0, "centered": False, "lr": 0.02},
                       torch.float32, False),
    "rmsprop-tensor-lr-bf16": ("RMSprop", dict(lr=torch.tensor(1e-2), weight_decay=0.1), {"maximize": True}, torch.bfloat16, False),
    "rmsprop-amp": ("RMSprop", dict(lr=1e-2, momentum=0.9), {}, torch.float32, True),
    "adagrad-groups": ("Adagrad", dict(lr=1e-2, lr_decay=0.1), {"lr": torch.tensor(0.02), "maximize": True}, torch.float64, False),
    "adagrad-amp": ("Adagrad", dict(lr=1e-2, initial_accumulator_value=0.1), {}, torch.float32, True),
    "lion-groups": ("Lion", dict(lr=1e-3, weight_decay=0.1), {"betas": (0.8, 0.9), "maximize": True}, torch.float32, False),
    "lion-amp": ("Lion", dict(lr=torch.tensor(1e-3)), {}, torch.float32, True),
}


def record(scenario, device, nsteps=3):
    name, ctor, extra, dtype, amp = OP_SCENARIOS[scenario]
    ref, fo = build_pair(name, [([(3,), (2, 5)], {}), ([(7,)], extra)], dtype=dtype, device=device, ctor=ctor)
    gen = make_gen(3)
    scaler = torch.amp.GradScaler(device) if amp else None
    if amp:
        scaler.scale(torch.ones((), device=device))
    per_step = []
    for t in range(nsteps):
        for p in fo.params:
            p.grad = torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype)
            if amp:
                p.grad.mul_(scaler.get_scale())
        if amp and t == 1:
            fo.params[0].grad.view(-1)[0] = float("inf")  # a skipped step: found_inf = 1
        rec = RecordFusedOps()
        with rec:
            scaler.step(fo.opt) if amp else fo.opt.step()
        if amp:
            scaler.update()
        per_step.append(rec.calls)
    return per_step


@pytest.mark.parametrize("scenario", list(OP_SCENARIOS))
def test_one_fused_op_call_per_step(scenario, device):
    """All groups on one device: exactly one call into torch.ops.fusedopt per step (first step with
    fresh state, later steps, AMP-skipped step) - the same op every step."""
    per_step = record(scenario, device)
    names = [[c[0]._schema.name for c in calls] for calls in per_step]
    for t, n in enumerate(names):
        assert len(n) == 1, f"step {t}: fused op calls {n}, expected exactly one"
    assert len({n[0] for n in names}) == 1, names


@pytest.mark.parametrize("scenario", list(OP_SCENARIOS))
def test_opcheck(scenario, device):
    """torch.library.opcheck (schema / mutation annotations, fake tensor kernel, autograd
    registration, AOT dispatch) on exactly the calls the optimizers make."""
    for calls in record(scenario, device):
        for func, args, kwargs in calls:
            torch.library.opcheck(func, args, kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["RMSprop", "Adagrad", "Lion"])
def test_one_op_per_device_with_cpu_and_cuda_params(name):
    ps = [torch.randn(4, requires_grad=True), torch.randn(5, device="cuda", requires_grad=True),
          torch.randn(6, device="cuda", requires_grad=True)]
    opt = fused_cls(name)([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.02}], **_small_ctor(name))
    for p in ps:
        p.grad = torch.ones_like(p)
    rec = RecordFusedOps()
    with rec:
        opt.step()

    def dev(args, kwargs):
        flat, _ = tree_flatten((args, kwargs))
        devs = {t.device.type for t in flat if isinstance(t, torch.Tensor) and t.device.type != "cpu"}
        return devs.pop() if len(devs) == 1 else "cpu"

    assert Counter(dev(a, k) for _, a, k in rec.calls) == Counter({"cpu": 1, "cuda": 1})
