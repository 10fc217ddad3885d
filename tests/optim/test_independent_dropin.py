"""Independent, adversarial drop-in checks of fusedopt against torch.optim (CPU only).

Every test builds the same params twice (fresh random data), drives torch.optim and fusedopt
with identical grads, and compares. torch.optim is the oracle: a drop-in must behave like it.
Float32 tolerance: rtol=1e-5, atol=1e-6 (the CPU kernels are meant to match torch closely);
float64: rtol=1e-12, atol=1e-13; 16-bit types get a tolerance argued at each test.
"""

import collections
import copy
import io
import math
import pickle
import warnings

import pytest
import torch
from torch.optim import lr_scheduler as S

import fusedopt
from torch_oracle import require_oracle_for_missing_state

pytestmark = pytest.mark.skipif(not fusedopt.extension_available(), reason="needs the compiled extension")

NAMES = ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad"]

# option sets that exercise the state of every optimizer
STATEFUL = {
    "SGD": dict(lr=0.1, momentum=0.9),
    "Adam": dict(lr=0.01, amsgrad=True),
    "AdamW": dict(lr=0.01, weight_decay=0.1),
    "RMSprop": dict(lr=0.01, centered=True, momentum=0.5),
    "Adagrad": dict(lr=0.1, lr_decay=0.01),
}

SHAPES = ((7,), (3, 5), (64,))
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-13),
       torch.complex64: dict(rtol=1e-5, atol=1e-6), torch.complex128: dict(rtol=1e-12, atol=1e-13)}


# ------------------------------------------------------------------------------------ helpers
def T(name):
    return getattr(torch.optim, name)


def F(name):
    return getattr(fusedopt, name)


def make_params(shapes=SHAPES, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        if dtype.is_complex:
            t = torch.randn(s, generator=g, dtype=torch.complex128).to(dtype)
        else:
            t = torch.randn(s, generator=g, dtype=torch.float64).to(dtype)
        out.append(t.requires_grad_())
    return out


def clone_params(ps):
    return [p.detach().clone().requires_grad_() for p in ps]


def set_grads(pt, pf, gen, scale=1.0):
    for a, b in zip(pt, pf):
        if a.dtype.is_complex:
            gr = torch.randn(a.shape, generator=gen, dtype=torch.complex128).to(a.dtype)
        else:
            gr = (torch.randn(a.shape, generator=gen, dtype=torch.float64) * scale).to(a.dtype)
        a.grad = gr.clone()
        b.grad = gr.clone()


def assert_params_close(pt, pf, **tol):
    for i, (a, b) in enumerate(zip(pt, pf)):
        kw = tol or TOL[a.dtype]
        torch.testing.assert_close(b.detach(), a.detach(), **kw, msg=lambda m: f"param {i}: {m}")


def assert_state_close(ot, of, pt, pf, **tol):
    for i, (a, b) in enumerate(zip(pt, pf)):
        sa, sb = ot.state[a], of.state[b]
        assert set(sa) == set(sb), f"param {i}: state keys torch {sorted(sa)} fusedopt {sorted(sb)}"
        for k in sa:
            va, vb = sa[k], sb[k]
            if torch.is_tensor(va):
                assert torch.is_tensor(vb), (i, k, type(vb))
                assert va.dtype == vb.dtype and va.shape == vb.shape, (i, k, va.dtype, vb.dtype, va.shape, vb.shape)
                kw = tol or TOL.get(va.dtype, dict(rtol=1e-5, atol=1e-6))
                torch.testing.assert_close(vb, va, **kw, msg=lambda m: f"param {i} state {k!r}: {m}")
            else:
                assert va == vb, (i, k, va, vb)


def pair(name, kw, shapes=SHAPES, dtype=torch.float32, groups=None, seed=0):
    pt = make_params(shapes, dtype, seed)
    pf = clone_params(pt)
    ot = T(name)(pt if groups is None else groups(pt), **kw)
    of = F(name)(pf if groups is None else groups(pf), **kw)
    return pt, pf, ot, of


def run_steps(pt, pf, ot, of, steps, gen):
    for _ in range(steps):
        set_grads(pt, pf, gen)
        ot.step()
        of.step()


def outcome(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - whatever torch raises is the oracle
        return type(e), str(e)
    return None


def _norm_msg(m):
    return m.replace("fusedopt.", "").strip()


def assert_same_outcome(t, f, what=""):
    if t is None:
        assert f is None, f"{what}: torch accepts, fusedopt raises {f}"
        return
    assert f is not None, f"{what}: torch raises {t[0].__name__}: {t[1]}; fusedopt accepts"
    assert f[0] is t[0], f"{what}: torch raises {t[0].__name__}: {t[1]}; fusedopt {f[0].__name__}: {f[1]}"
    a, b = _norm_msg(t[1]), _norm_msg(f[1])
    assert a == b or a in b or b in a, f"{what}: messages differ: torch {t[1]!r}, fusedopt {f[1]!r}"


# ================================================================ 1. constructor validation
BAD_ARGS = {
    "SGD": [dict(lr=-0.1), dict(momentum=-0.1), dict(weight_decay=-1e-3), dict(nesterov=True),
            dict(nesterov=True, momentum=0.9, dampening=0.1), dict(lr=torch.tensor([0.1, 0.2])),
            dict(fused=True, foreach=True), dict(lr=torch.tensor(-1.0))],
    "Adam": [dict(lr=-1e-3), dict(eps=-1e-8), dict(betas=(1.0, 0.9)), dict(betas=(0.9, 1.0)),
             dict(betas=(-0.5, 0.9)), dict(weight_decay=-0.1), dict(lr=float("nan")),
             dict(lr=torch.tensor(0.1), foreach=True), dict(lr=torch.tensor([0.1, 0.2])),
             dict(fused=True, foreach=True), dict(betas=(torch.tensor(0.9), 0.999))],
    "AdamW": [dict(lr=-1e-3), dict(eps=-1.0), dict(betas=(1.5, 0.9)), dict(weight_decay=-0.1),
              dict(lr=torch.tensor(0.1), foreach=True)],
    "RMSprop": [dict(lr=-1.0), dict(eps=-1.0), dict(momentum=-1.0), dict(weight_decay=-1.0),
                dict(alpha=-0.5), dict(lr=torch.tensor([0.1, 0.2])), dict(lr=float("nan"))],
    "Adagrad": [dict(lr=-1.0), dict(lr_decay=-1.0), dict(weight_decay=-1.0), dict(initial_accumulator_value=-1.0),
                dict(eps=-1.0), dict(fused=True, foreach=True), dict(fused=True, differentiable=True),
                dict(lr=float("nan"))],
}
BAD_ARG_CASES = [(n, kw) for n, cases in BAD_ARGS.items() for kw in cases]


@pytest.mark.parametrize("name,kwargs", BAD_ARG_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_ARG_CASES)])
def test_bad_hyperparameters_rejected_like_torch(name, kwargs):
    t = outcome(lambda: T(name)(make_params(), **kwargs))
    assert t is not None, f"not a bad case for torch: {kwargs}"
    f = outcome(lambda: F(name)(make_params(), **kwargs))
    assert_same_outcome(t, f, f"{name}({kwargs})")


GOOD_ARGS = [("Adam", dict(lr=torch.tensor(1e-3))), ("Adam", dict(lr=torch.tensor(1e-3), fused=True)),
             ("AdamW", dict(lr=torch.tensor([1e-3]))), ("SGD", dict(lr=torch.tensor(0.1), momentum=0.9)),
             ("SGD", dict(lr=torch.tensor(0.1), fused=True)), ("RMSprop", dict(lr=torch.tensor(0.01))),
             ("Adagrad", dict(lr=torch.tensor(0.01), fused=True)), ("Adam", dict(lr=0.0)),
             ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)), ("Adam", dict(betas=(0.0, 0.0)))]


@pytest.mark.parametrize("name,kwargs", GOOD_ARGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(GOOD_ARGS)])
def test_valid_hyperparameters_accepted_and_step_like_torch(name, kwargs):
    pt, pf, ot, of = pair(name, copy.deepcopy(kwargs))
    # lr tensors must not be shared between the two optimizers
    of.param_groups[0]["lr"] = copy.deepcopy(ot.param_groups[0]["lr"])
    run_steps(pt, pf, ot, of, 4, torch.Generator().manual_seed(1))
    assert_params_close(pt, pf)
    assert {k: v for k, v in ot.param_groups[0].items() if k not in ("params", "lr")} == \
           {k: v for k, v in of.param_groups[0].items() if k not in ("params", "lr")}


def _p(n=1):
    return [torch.randn(3, requires_grad=True) for _ in range(n)]


BAD_PARAMS = {
    "single_tensor": lambda: torch.randn(3, requires_grad=True),
    "empty_list": lambda: [],
    "empty_generator": lambda: iter([]),
    "missing_params_key": lambda: [{"lr": 0.1}],
    "non_leaf": lambda: [torch.randn(3, requires_grad=True) * 2],
    "duplicate_across_groups": lambda: (lambda p: [{"params": [p]}, {"params": [p]}])(_p()[0]),
    "group_params_is_set": lambda: [{"params": set(_p(2))}],
    "not_tensors": lambda: [1.0, 2.0],
    "named_and_unnamed_mixed": lambda: [{"params": [("a", _p()[0])]}, {"params": _p()}],
}


@pytest.mark.parametrize("what", list(BAD_PARAMS))
@pytest.mark.parametrize("name", NAMES)
def test_bad_params_rejected_like_torch(name, what):
    obj = BAD_PARAMS[what]()
    # a one-shot iterator can be consumed once: give each its own
    t = outcome(lambda: T(name)(BAD_PARAMS[what]() if what == "empty_generator" else obj))
    f = outcome(lambda: F(name)(BAD_PARAMS[what]() if what == "empty_generator" else obj))
    assert t is not None
    assert_same_outcome(t, f, f"{name} params={what}")


@pytest.mark.parametrize("name", NAMES)
def test_duplicate_param_in_one_group_like_torch(name):
    p = torch.randn(3, requires_grad=True)
    with warnings.catch_warnings(record=True) as wt:
        warnings.simplefilter("always")
        t = outcome(lambda: T(name)([p, p]))
    with warnings.catch_warnings(record=True) as wf:
        warnings.simplefilter("always")
        f = outcome(lambda: F(name)([p, p]))
    assert_same_outcome(t, f, "duplicate param")
    assert bool(wt) == bool(wf), ([str(w.message) for w in wt], [str(w.message) for w in wf])


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad"])
def test_differentiable_accepted_or_refused_clearly(name):
    # torch accepts differentiable=True at construction; a drop-in may refuse it, but clearly
    f = outcome(lambda: F(name)(make_params(), differentiable=True))
    if f is not None:
        assert "differentiable" in f[1], f


def test_add_param_group_errors_like_torch():
    for name in NAMES:
        for bad in ("dup", "not_dict_params", "missing_required"):
            def build(mod):
                ps = make_params()
                o = getattr(mod, name)(ps[:2], lr=0.1)
                if bad == "dup":
                    o.add_param_group({"params": [ps[0]]})
                elif bad == "not_dict_params":
                    o.add_param_group({"params": ps[2]})  # a tensor is fine: torch wraps it
                    o.add_param_group({"params": [ps[2] * 2]})  # non-leaf
                else:
                    o.defaults["lr"] = torch.optim.optimizer.required
                    o.add_param_group({"params": [ps[2]]})
            assert_same_outcome(outcome(lambda: build(torch.optim)), outcome(lambda: build(fusedopt)), f"{name} {bad}")


# ============================================================================ 2. state_dict
def _describe_sd(sd):
    state = {k: {kk: (type(v).__name__, getattr(v, "dtype", None), tuple(getattr(v, "shape", ())))
                 for kk, v in s.items()} for k, s in sd["state"].items()}
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return state, groups


SD_CASES = [("SGD", dict(lr=0.1)), ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
            ("Adam", dict()), ("Adam", dict(amsgrad=True, weight_decay=0.1, maximize=True)),
            ("Adam", dict(decoupled_weight_decay=True)), ("AdamW", dict(amsgrad=True)),
            ("RMSprop", dict()), ("RMSprop", dict(centered=True, momentum=0.9)),
            ("Adagrad", dict(initial_accumulator_value=0.3)), ("Adam", dict(fused=True)),
            ("SGD", dict(lr=0.1, momentum=0.5, foreach=True))]


@pytest.mark.parametrize("name,kw", SD_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SD_CASES)])
def test_state_dict_structure_identical_before_and_after_steps(name, kw):
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.005}]  # noqa: E731
    pt, pf, ot, of = pair(name, kw, groups=groups)
    assert _describe_sd(ot.state_dict()) == _describe_sd(of.state_dict())
    run_steps(pt, pf, ot, of, 3, torch.Generator().manual_seed(2))
    st, sf = ot.state_dict(), of.state_dict()
    assert set(st) == set(sf)
    assert _describe_sd(st) == _describe_sd(sf)
    for k, s in sf["state"].items():
        if "step" in s:
            assert s["step"].dtype == st["state"][k]["step"].dtype and s["step"].shape == torch.Size([])


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_fusedopt_torch_fusedopt_mid_training(name):
    kw = STATEFUL[name]
    gen_seed = 3
    # the uninterrupted torch run
    ref = make_params()
    o_ref = T(name)(ref, **kw)
    g = torch.Generator().manual_seed(gen_seed)
    dummy = clone_params(ref)
    for _ in range(9):
        set_grads(ref, dummy, g)
        o_ref.step()
    # fusedopt 3 steps -> torch 3 steps -> fusedopt 3 steps, through state_dicts and fresh objects
    ps = make_params()
    g = torch.Generator().manual_seed(gen_seed)
    dummy = clone_params(ps)
    o = F(name)(ps, **kw)
    for phase, mod in enumerate((fusedopt, torch.optim, fusedopt)):
        if phase:
            sd = copy.deepcopy(o.state_dict())
            o = getattr(mod, name)(ps, **kw)
            o.load_state_dict(sd)
        for _ in range(3):
            set_grads(ps, dummy, g)
            o.step()
    assert_params_close(ref, ps)
    assert_state_close(o_ref, o, ref, ps)


@pytest.mark.parametrize("name", NAMES)
def test_torch_save_load_weights_only_round_trip(name):
    kw = STATEFUL[name]
    pt, pf, ot, of = pair(name, kw)
    g = torch.Generator().manual_seed(4)
    run_steps(pt, pf, ot, of, 3, g)
    buf = io.BytesIO()
    torch.save(of.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    of2 = F(name)(pf, **kw)
    of2.load_state_dict(sd)
    run_steps(pt, pf, ot, of2, 3, g)
    assert_params_close(pt, pf)
    assert_state_close(ot, of2, pt, pf)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", NAMES)
def test_copied_optimizer_continues_like_copied_torch(name, how):
    kw = STATEFUL[name]
    pt, pf, ot, of = pair(name, kw)
    g = torch.Generator().manual_seed(5)
    run_steps(pt, pf, ot, of, 3, g)
    cp = copy.deepcopy if how == "deepcopy" else (lambda o: pickle.loads(pickle.dumps(o)))
    ot2, of2 = cp(ot), cp(of)
    assert type(of2) is type(of)
    pt2, pf2 = ot2.param_groups[0]["params"], of2.param_groups[0]["params"]
    before = [p.detach().clone() for p in pf]
    run_steps(pt2, pf2, ot2, of2, 3, g)
    assert_params_close(pt2, pf2)
    assert_state_close(ot2, of2, pt2, pf2)
    # the original is independent of the copy
    for a, b in zip(before, pf):
        assert torch.equal(a, b.detach())


@pytest.mark.parametrize("name", NAMES)
def test_load_into_optimizer_before_first_step_from_torch(name):
    kw = STATEFUL[name]
    pt = make_params()
    ot = T(name)(pt, **kw)
    g = torch.Generator().manual_seed(6)
    dummy = clone_params(pt)
    for _ in range(3):
        set_grads(pt, dummy, g)
        ot.step()
    pf = clone_params(pt)
    of = F(name)(pf, **kw)
    of.load_state_dict(copy.deepcopy(ot.state_dict()))
    assert _describe_sd(of.state_dict()) == _describe_sd(ot.state_dict())
    run_steps(pt, pf, ot, of, 3, g)
    assert_params_close(pt, pf)
    assert_state_close(ot, of, pt, pf)


@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_mismatch_raises_like_torch(name):
    kw = STATEFUL[name]
    pt, pf, ot, of = pair(name, kw)
    run_steps(pt, pf, ot, of, 2, torch.Generator().manual_seed(0))
    for target in ("size", "groups"):
        def load(mod, src):
            ps = make_params()
            if target == "size":
                o = getattr(mod, name)(ps[:2], **kw)
            else:
                o = getattr(mod, name)([{"params": ps[:2]}, {"params": ps[2:]}], **kw)
            o.load_state_dict(src.state_dict())
        assert_same_outcome(outcome(lambda: load(torch.optim, ot)), outcome(lambda: load(fusedopt, of)), target)


@pytest.mark.parametrize("name", NAMES)
def test_setstate_of_old_pickle_missing_newer_keys(name):
    keep = {"params", "lr", "momentum", "dampening", "nesterov", "betas", "eps", "weight_decay", "amsgrad",
            "alpha", "centered", "lr_decay", "initial_accumulator_value"}
    res = []
    for mod in (torch.optim, fusedopt):
        ps = make_params()
        o = getattr(mod, name)(ps, **STATEFUL[name])
        st = dict(o.__getstate__())
        st["param_groups"] = [{k: v for k, v in grp.items() if k in keep} for grp in st["param_groups"]]
        cls = getattr(mod, name)
        o2 = cls.__new__(cls)
        o2.__setstate__(st)
        for p in ps:
            p.grad = torch.ones_like(p)
        o2.step()
        res.append(({k: v for k, v in o2.param_groups[0].items() if k != "params"}, [p.detach().clone() for p in ps]))
    assert res[0][0] == res[1][0]
    for a, b in zip(res[0][1], res[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["Adam", "RMSprop"])
def test_state_with_missing_key_errors_like_torch(name):
    """torch raises KeyError naming the missing state entry; the drop-in should too (or at least
    name the key), not blame the grads."""
    res = []
    key = {"Adam": "exp_avg", "RMSprop": "square_avg"}[name]
    for mod in (torch.optim, fusedopt):
        p = torch.randn(3, requires_grad=True)
        o = getattr(mod, name)([p], lr=0.1)
        p.grad = torch.ones(3)
        o.step()
        del o.state[p][key]
        res.append(outcome(o.step))
    t, f = res
    assert t is not None and t[0] is KeyError
    assert f is not None, "fusedopt stepped with a state missing " + key
    assert f[0] is KeyError or key in f[1], f"torch: {t}, fusedopt: {f}"


# ========================================================================= 3. behaviour flags
FLAG_CASES = [
    ("SGD", dict(lr=0.1)), ("SGD", dict(lr=0.1, momentum=0.9)), ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.05)),
    ("SGD", dict(lr=0.1, momentum=0.9, maximize=True, weight_decay=0.1)),
    ("Adam", dict(lr=0.01)), ("Adam", dict(lr=0.01, amsgrad=True, maximize=True)),
    ("Adam", dict(lr=0.01, weight_decay=0.2)), ("Adam", dict(lr=0.01, weight_decay=0.2, decoupled_weight_decay=True)),
    ("Adam", dict(lr=0.01, betas=(0.0, 0.5), eps=1e-3)),
    ("AdamW", dict(lr=0.01)), ("AdamW", dict(lr=0.01, weight_decay=0.5, amsgrad=True, maximize=True)),
    ("RMSprop", dict(lr=0.01)), ("RMSprop", dict(lr=0.01, centered=True)), ("RMSprop", dict(lr=0.01, momentum=0.9)),
    ("RMSprop", dict(lr=0.01, centered=True, momentum=0.9, weight_decay=0.1, maximize=True, alpha=0.7)),
    ("Adagrad", dict(lr=0.1)), ("Adagrad", dict(lr=0.1, lr_decay=0.1, initial_accumulator_value=0.5)),
    ("Adagrad", dict(lr=0.1, weight_decay=0.1, maximize=True, eps=1e-3)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,kw", FLAG_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(FLAG_CASES)])
def test_flag_parity(name, kw, dtype):
    groups = lambda ps: [{"params": ps[:1]}, {"params": ps[1:], "lr": kw["lr"] * 0.5}]  # noqa: E731
    pt, pf, ot, of = pair(name, kw, dtype=dtype, groups=groups)
    run_steps(pt, pf, ot, of, 12, torch.Generator().manual_seed(11))
    assert_params_close(pt, pf)
    assert_state_close(ot, of, pt, pf)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=["c64", "c128"])
@pytest.mark.parametrize("name,kw", [("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)),
                                     ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1, maximize=True)),
                                     ("AdamW", dict(lr=0.01)),
                                     ("RMSprop", dict(lr=0.01, centered=True, momentum=0.5)),
                                     ("Adagrad", dict(lr=0.1, lr_decay=0.01))],
                         ids=["SGD", "Adam", "AdamW", "RMSprop", "Adagrad"])
def test_complex_params_match_torch_or_raise(name, kw, dtype):
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    pt = make_params(dtype=dtype) + make_params(((4,),), dtype=real, seed=3)  # mixed with a real param
    pf = clone_params(pt)
    ot = T(name)(pt, **kw)
    of = F(name)(pf, **kw)
    g = torch.Generator().manual_seed(12)
    for _ in range(5):
        set_grads(pt, pf, g)
        ot.step()
        r = outcome(of.step)
        if r is not None:
            assert "complex" in r[1].lower(), f"unclear error for complex params: {r}"
            return
    assert_params_close(pt, pf)
    assert_state_close(ot, of, pt, pf)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("name,kw", [("SGD", dict(lr=0.1)), ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
                                     ("Adam", dict(lr=0.01, eps=1e-3)), ("AdamW", dict(lr=0.01, eps=1e-3)),
                                     ("RMSprop", dict(lr=0.01, eps=1e-3)), ("Adagrad", dict(lr=0.1))],
                         ids=["SGD", "SGDm", "Adam", "AdamW", "RMSprop", "Adagrad"])
def test_half_precision_one_step_within_rounding(name, kw, dtype):
    # torch computes in the 16-bit type op by op (several roundings), fusedopt in float32 with one
    # rounding: after one step they may differ by a few ulps of the param plus the rounding of
    # the update (relative to lr). eps is raised so float16's underflow does not make torch divide
    # by zero (torch gives inf there).
    pt, pf, ot, of = pair(name, kw, shapes=((200,), (13, 7)), dtype=dtype)
    run_steps(pt, pf, ot, of, 1, torch.Generator().manual_seed(13))
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
    for a, b in zip(pt, pf):
        assert b.dtype == dtype
        torch.testing.assert_close(b.detach().float(), a.detach().float(), rtol=4 * ulp, atol=kw["lr"] * 8 * ulp)


@pytest.mark.parametrize("name", NAMES)
def test_zero_size_and_0dim_params(name):
    kw = STATEFUL[name]
    pt, pf, ot, of = pair(name, kw, shapes=((0,), (3, 0), (), (1,), (5,)))
    run_steps(pt, pf, ot, of, 3, torch.Generator().manual_seed(14))
    assert_params_close(pt, pf)
    assert_state_close(ot, of, pt, pf)
    assert _describe_sd(ot.state_dict()) == _describe_sd(of.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_param_that_never_gets_a_grad_and_grads_that_come_and_go(name):
    kw = STATEFUL[name]
    pt, pf, ot, of = pair(name, kw, shapes=((4,), (5,), (6,), (7,)))
    g = torch.Generator().manual_seed(15)
    for s in range(8):
        set_grads(pt, pf, g)
        pt[0].grad = pf[0].grad = None  # never a grad
        if s % 3 == 1:
            pt[2].grad = pf[2].grad = None  # intermittent
        ot.step()
        of.step()
    assert_params_close(pt, pf)
    assert_state_close(ot, of, pt, pf)
    assert _describe_sd(ot.state_dict()) == _describe_sd(of.state_dict())


@pytest.mark.parametrize("name,kw", [("SGD", dict(lr=0.1)), ("SGD", dict(lr=0.1, momentum=0.9)), ("Adam", {}),
                                     ("AdamW", {}), ("RMSprop", {}), ("Adagrad", dict(lr=0.1))],
                         ids=["SGD", "SGDm", "Adam", "AdamW", "RMSprop", "Adagrad"])
def test_sparse_grads_match_torch_or_raise_clearly(name, kw):
    res = []
    for mod in (torch.optim, fusedopt):
        p = torch.ones(4, 3, requires_grad=True)
        o = getattr(mod, name)([p], **kw)
        p.grad = torch.sparse_coo_tensor([[0, 2]], torch.full((2, 3), 0.5), (4, 3))
        r = outcome(o.step)
        res.append((r, p.detach().clone()))
    (t, pt), (f, pf) = res
    if t is not None:
        assert f is not None and f[0] is t[0], (t, f)
        assert "sparse" in f[1].lower()
    elif f is not None:
        assert "sparse" in f[1].lower(), f  # refused, clearly
    else:
        torch.testing.assert_close(pf, pt)


@pytest.mark.parametrize("name", ["SGD", "Adagrad"])
def test_sparse_grads_refused_clearly_where_torch_steps_them(name):
    """torch.optim.SGD and Adagrad step sparse gradients; fusedopt's fused step is dense only
    (README): it refuses them with an error that says so and points to torch, changing nothing."""
    kw = dict(lr=0.1, momentum=0.9) if name == "SGD" else dict(lr=0.1)
    q = torch.ones(4, 3, requires_grad=True)
    of = F(name)([q], **kw)
    q.grad = torch.sparse_coo_tensor([[0, 2]], torch.full((2, 3), 0.5), (4, 3))
    with pytest.raises(RuntimeError, match=f"sparse gradients.*torch.optim.{name}"):
        of.step()
    assert torch.equal(q.detach(), torch.ones(4, 3))
    assert len(of.state[q]) == 0 or all(not torch.is_tensor(v) or v.abs().sum() == 0
                                         for k, v in of.state[q].items() if k != "sum")


@pytest.mark.parametrize("name,kw", [("SGD", dict(lr=0.1)), ("SGD", dict(lr=0.1, momentum=0.9)),
                                     ("Adam", dict(lr=0.01, amsgrad=True)), ("AdamW", dict(lr=0.01)),
                                     ("RMSprop", dict(lr=0.01, centered=True, momentum=0.9)),
                                     ("Adagrad", dict(lr=0.1)), ("Adam", dict(lr=0.01, eps=0.0)),
                                     ("RMSprop", dict(lr=0.01, eps=0.0))],
                         ids=["SGD", "SGDm", "Adam-ams", "AdamW", "RMSprop", "Adagrad", "Adam-eps0", "RMSprop-eps0"])
def test_nonfinite_and_zero_grads_propagate_like_torch(name, kw):
    pt = [torch.randn(8, requires_grad=True)]
    pf = clone_params(pt)
    ot, of = T(name)(pt, **kw), F(name)(pf, **kw)
    inf, nan = float("inf"), float("nan")
    for gr in (torch.tensor([1., 0, nan, inf, -inf, 2, 0, 0]), torch.tensor([1., 0, 1, 1, 1, nan, 0, -1]),
               torch.zeros(8), torch.randn(8)):
        pt[0].grad, pf[0].grad = gr.clone(), gr.clone()
        ot.step()
        of.step()
        torch.testing.assert_close(pf[0].detach(), pt[0].detach(), rtol=1e-5, atol=1e-6, equal_nan=True)
        for k, v in ot.state[pt[0]].items():
            torch.testing.assert_close(of.state[pf[0]][k], v, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("name,kw", [("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True)),
                                     ("Adam", dict(weight_decay=0.1, maximize=True, amsgrad=True)),
                                     ("AdamW", dict(maximize=True)),
                                     ("RMSprop", dict(weight_decay=0.1, maximize=True, centered=True, momentum=0.9)),
                                     ("Adagrad", dict(weight_decay=0.1, maximize=True)),
                                     ("Lion", dict(weight_decay=0.1, maximize=True))],
                         ids=["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Lion"])
def test_step_leaves_grads_untouched(name, kw):
    p = torch.randn(50, requires_grad=True)
    g = torch.randn(50)
    p.grad = g.clone()
    o = F(name)([p], **kw)
    o.step()
    o.step()
    assert torch.equal(p.grad, g)


@pytest.mark.parametrize("layout", ["transposed_grad", "channels_last_param_contiguous_grad", "expanded_grad"])
@pytest.mark.parametrize("name", ["SGD", "Adam", "RMSprop", "Adagrad"])
def test_grad_laid_out_unlike_param_is_refused_clearly(name, layout):
    """torch.optim steps a grad whose strides differ from its param's (assigned by hand); fusedopt's
    kernels walk a param and its grad with one index, so it refuses such a grad (README), naming
    the strides, and changes nothing. (Grads from autograd follow the param's layout.)"""
    g = torch.Generator().manual_seed(16)
    if layout == "channels_last_param_contiguous_grad":
        p = torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last).requires_grad_()
        grad = torch.randn(2, 3, 4, 5, generator=g)
    elif layout == "transposed_grad":
        p = torch.randn(4, 6, generator=g).requires_grad_()
        grad = torch.randn(6, 4, generator=g).t()
    else:
        p = torch.randn(4, 6, generator=g).requires_grad_()
        grad = torch.randn(1, 6, generator=g).expand(4, 6)
    before = p.detach().clone()
    kw = dict(lr=0.1, momentum=0.9) if name == "SGD" else dict(lr=0.01)
    of = F(name)([p], **kw)
    p.grad = grad
    with pytest.raises(RuntimeError, match="strides.*laid out like"):
        of.step()
    assert torch.equal(p.detach(), before)
    p.grad = grad.contiguous(memory_format=torch.channels_last if p.dim() == 4 else torch.contiguous_format)
    of.step()  # the same values laid out like the param are stepped
    assert not torch.equal(p.detach(), before)


@pytest.mark.parametrize("new", [dict(momentum=0.9), dict(momentum=0.9, dampening=0.5), dict(momentum=0.9, nesterov=True)])
def test_sgd_momentum_switched_on_mid_run(new):
    pt, pf, ot, of = pair("SGD", dict(lr=0.1))
    g = torch.Generator().manual_seed(17)
    run_steps(pt, pf, ot, of, 3, g)
    for o in (ot, of):
        o.param_groups[0].update(new)
    run_steps(pt, pf, ot, of, 3, g)
    assert_params_close(pt, pf)
    assert_state_close(ot, of, pt, pf)


def test_sizes_that_cross_chunk_boundaries_and_many_params():
    shapes = [(1,), (17,), (4099,), (8193,), (1023,), (3, 0), ()] + [(i % 5 + 1,) for i in range(2600)]
    groups = lambda ps: [{"params": ps[:1000]}, {"params": ps[1000:2200], "lr": 0.003, "weight_decay": 0.1},  # noqa: E731
                         {"params": ps[2200:], "lr": 0.02}]
    for name, kw in [("Adam", dict(lr=0.01)), ("SGD", dict(lr=0.1, momentum=0.9))]:
        pt, pf, ot, of = pair(name, kw, shapes=shapes, groups=groups)
        g = torch.Generator().manual_seed(18)
        for s in range(3):
            set_grads(pt, pf, g)
            for i in range(s, len(pt), 7):
                pt[i].grad = pf[i].grad = None
            ot.step()
            of.step()
        assert_params_close(pt, pf)
        assert_state_close(ot, of, pt, pf)


# ================================================================================ 4. closures
@pytest.mark.parametrize("name", NAMES + ["Lion"])
def test_closure_called_with_grad_enabled_and_loss_returned(name):
    p = torch.randn(4, requires_grad=True)
    o = F(name)([p], lr=0.01)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        o.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = o.step(closure)
    assert calls == [True]
    assert torch.is_tensor(loss) and loss.requires_grad
    assert o.step(lambda: 7) == 7
    assert o.step() is None
    with torch.enable_grad():
        o.step()
        assert torch.is_grad_enabled()
    with torch.no_grad():
        o.step()
        assert not torch.is_grad_enabled()


@pytest.mark.parametrize("name", NAMES)
def test_closure_trajectory_matches_torch(name):
    kw = STATEFUL[name]
    pt, pf, ot, of = pair(name, kw)
    target = torch.randn(64)
    losses = []
    for o, ps in ((ot, pt), (of, pf)):
        seq = []
        for _ in range(5):
            def closure():
                o.zero_grad()
                loss = sum(((p.reshape(-1)[:3] - target[:3]) ** 2).sum() for p in ps)
                loss.backward()
                return loss
            seq.append(float(o.step(closure)))
        losses.append(seq)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    assert_params_close(pt, pf)


# ============================================================================ 5. LR schedulers
SCHEDULERS = {
    "StepLR": lambda o: S.StepLR(o, 5, 0.5),
    "MultiStepLR": lambda o: S.MultiStepLR(o, [3, 7, 20], 0.3),
    "ExponentialLR": lambda o: S.ExponentialLR(o, 0.93),
    "CosineAnnealingLR": lambda o: S.CosineAnnealingLR(o, 10, eta_min=1e-4),
    "CosineAnnealingWarmRestarts": lambda o: S.CosineAnnealingWarmRestarts(o, 7, T_mult=2, eta_min=1e-4),
    "OneCycleLR": lambda o: S.OneCycleLR(o, max_lr=0.05, total_steps=40),
    "OneCycleLR-3phase-linear": lambda o: S.OneCycleLR(o, max_lr=[0.05, 0.02], total_steps=40, three_phase=True,
                                                       anneal_strategy="linear"),
    "CyclicLR-momentum": lambda o: S.CyclicLR(o, 1e-3, 0.05, step_size_up=4, mode="triangular2",
                                              base_momentum=0.8, max_momentum=0.95),
    "CyclicLR-exp_range": lambda o: S.CyclicLR(o, 1e-3, 0.05, step_size_up=3, mode="exp_range", gamma=0.97,
                                               cycle_momentum=False),
    "LinearLR": lambda o: S.LinearLR(o, 0.1, 1.0, 8),
    "ConstantLR": lambda o: S.ConstantLR(o, 0.3, 6),
    "PolynomialLR": lambda o: S.PolynomialLR(o, 20, 2.0),
    "SequentialLR": lambda o: S.SequentialLR(o, [S.LinearLR(o, 0.1, 1.0, 5), S.ExponentialLR(o, 0.9)], [5]),
    "ChainedScheduler": lambda o: S.ChainedScheduler([S.ConstantLR(o, 0.5, 4), S.ExponentialLR(o, 0.95)]),
    "LambdaLR": lambda o: S.LambdaLR(o, lambda e: 1 / (1 + e)),
    "MultiplicativeLR": lambda o: S.MultiplicativeLR(o, lambda e: 0.95),
    "ReduceLROnPlateau": lambda o: S.ReduceLROnPlateau(o, patience=1, factor=0.5),
    "SWALR": lambda o: torch.optim.swa_utils.SWALR(o, swa_lr=0.005, anneal_epochs=6),
}
SCHED_OPTS = [("SGD", dict(lr=0.01, momentum=0.9)), ("Adam", dict(lr=0.01, amsgrad=True)),
              ("RMSprop", dict(lr=0.01, momentum=0.9))]


def _metric(s):
    return [1.0, 0.9, 0.95, 0.96, 0.97, 0.5][s % 6]


def _step_both(pt, pf, ot, of, st, sf, g, s, sched):
    """One training iteration of the torch and the fusedopt side: the same grads, each optimizer's
    step, then each scheduler's (ReduceLROnPlateau on the same metric)."""
    set_grads(pt, pf, g)
    ot.step()
    of.step()
    if sched == "ReduceLROnPlateau":
        st.step(_metric(s))
        sf.step(_metric(s))
    else:
        st.step()
        sf.step()


@pytest.mark.parametrize("ckpt", [None, 13], ids=["straight", "ckpt13"])
@pytest.mark.parametrize("opt", [n for n, _ in SCHED_OPTS])
@pytest.mark.parametrize("sched", list(SCHEDULERS))
def test_scheduler_trajectory_and_checkpoint(sched, opt, ckpt):
    kw = dict(SCHED_OPTS)[opt]
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.02}]  # noqa: E731
    pt, pf, ot, of = pair(opt, kw, groups=groups)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st, sf = SCHEDULERS[sched](ot), SCHEDULERS[sched](of)
        g = torch.Generator().manual_seed(20)
        for s in range(32):
            _step_both(pt, pf, ot, of, st, sf, g, s, sched)
            if s == ckpt:  # resume fusedopt from fresh objects
                osd, ssd = copy.deepcopy(of.state_dict()), copy.deepcopy(sf.state_dict())
                of = F(opt)(groups(pf), **kw)
                sf = SCHEDULERS[sched](of)
                of.load_state_dict(osd)
                sf.load_state_dict(ssd)
            for gt, gf in zip(ot.param_groups, of.param_groups):
                assert float(gf["lr"]) == pytest.approx(float(gt["lr"]), rel=1e-12, abs=1e-15), s
                for k in ("momentum", "betas"):
                    assert gt.get(k) == gf.get(k), (s, k, gt.get(k), gf.get(k))
    assert_params_close(pt, pf)
    assert_state_close(ot, of, pt, pf)


TENSOR_LR_CASES = [(s, o) for s in ["StepLR", "OneCycleLR", "CosineAnnealingWarmRestarts", "ReduceLROnPlateau"]
                   for o in ["SGD", "Adam", "AdamW", "Adagrad"] if not (s == "OneCycleLR" and o == "Adagrad")]


@pytest.mark.parametrize("sched,opt", TENSOR_LR_CASES)
def test_scheduler_with_tensor_lr(sched, opt):
    kw = dict(lr=torch.tensor(0.01))
    if opt == "SGD":
        kw["momentum"] = 0.9
    pt = make_params()
    pf = clone_params(pt)
    ot = T(opt)(pt, **copy.deepcopy(kw))
    of = F(opt)(pf, **copy.deepcopy(kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st, sf = SCHEDULERS[sched](ot), SCHEDULERS[sched](of)
        g = torch.Generator().manual_seed(21)
        for s in range(30):
            _step_both(pt, pf, ot, of, st, sf, g, s, sched)
            assert torch.is_tensor(of.param_groups[0]["lr"]) == torch.is_tensor(ot.param_groups[0]["lr"])
            assert float(of.param_groups[0]["lr"]) == pytest.approx(float(ot.param_groups[0]["lr"]), rel=1e-6)
    assert_params_close(pt, pf)


def test_cycle_momentum_without_momentum_raises_like_torch():
    for sched in ("OneCycleLR", "CyclicLR-momentum"):
        t = outcome(lambda: SCHEDULERS[sched](T("Adagrad")(make_params())))
        f = outcome(lambda: SCHEDULERS[sched](F("Adagrad")(make_params())))
        assert t is not None
        assert_same_outcome(t, f, sched)


def test_onecycle_cycles_lion_beta1():
    p = make_params()
    o = fusedopt.Lion(p, lr=1e-4)
    s = S.OneCycleLR(o, max_lr=1e-3, total_steps=10)
    b1 = []
    for _ in range(9):
        for q in p:
            q.grad = torch.ones_like(q)
        o.step()
        s.step()
        b1.append(o.param_groups[0]["betas"][0])
    assert len(set(b1)) > 3 and all(0.85 - 1e-9 <= b <= 0.95 + 1e-9 for b in b1)


@pytest.mark.parametrize("name", NAMES)
def test_scheduler_order_warning_like_torch(name):
    res = []
    for mod in (torch.optim, fusedopt):
        for order in ("right", "wrong"):
            p = torch.randn(3, requires_grad=True)
            o = getattr(mod, name)([p], lr=0.1)
            s = S.StepLR(o, 2)
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                p.grad = torch.ones(3)
                if order == "right":
                    o.step()
                    s.step()
                else:
                    s.step()
                    o.step()
            res.append(sorted(str(x.message)[:50] for x in w if "lr_scheduler" in str(x.message)))
    assert res[:2] == res[2:]


# ====================================================================== 6. hooks, misc API
@pytest.mark.parametrize("name", NAMES)
def test_hooks_called_like_torch(name):
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
    logs = []
    for mod in (torch.optim, fusedopt):
        log = []
        p = torch.randn(3, requires_grad=True)
        o = getattr(mod, name)([p], lr=0.1)
        h1 = o.register_step_pre_hook(lambda opt, a, k: log.append(("pre", len(a), dict(k), opt is o)))
        o.register_step_post_hook(lambda opt, a, k: log.append(("post", len(a), dict(k), opt is o)))
        gh1 = register_optimizer_step_pre_hook(lambda opt, a, k: log.append(("gpre", opt is o)))
        gh2 = register_optimizer_step_post_hook(lambda opt, a, k: log.append(("gpost", opt is o)))
        try:
            p.grad = torch.ones(3)
            o.step()
            o.step(closure=None)
            h1.remove()
            o.step()
        finally:
            gh1.remove()
            gh2.remove()
        o.register_state_dict_pre_hook(lambda opt: log.append("sd-pre"))
        o.register_state_dict_post_hook(lambda opt, sd: (log.append("sd-post"), {**sd, "extra": 1})[1])
        sd = o.state_dict()
        log.append(("extra-in-sd", sd.get("extra")))
        sd.pop("extra", None)
        o.register_load_state_dict_pre_hook(lambda opt, sd: log.append("load-pre"))
        o.register_load_state_dict_post_hook(lambda opt: log.append("load-post"))
        o.load_state_dict(sd)
        logs.append(log)
    assert logs[0] == logs[1]


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_load_state_dict_pre_hook_may_return_a_new_state_dict(name):
    got = []
    for mod in (torch.optim, fusedopt):
        p = torch.randn(3, requires_grad=True)
        o = getattr(mod, name)([p], lr=0.1)
        p.grad = torch.ones(3)
        o.step()
        sd = copy.deepcopy(o.state_dict())

        def pre(opt, sd):
            sd = copy.deepcopy(sd)
            sd["param_groups"][0]["lr"] = 0.777
            return sd
        o.register_load_state_dict_pre_hook(pre)
        o.load_state_dict(sd)
        before = p.detach().clone()
        o.step()
        got.append((o.param_groups[0]["lr"], (p.detach() - before).clone()))
    assert got[0][0] == got[1][0] == 0.777
    torch.testing.assert_close(got[1][1], got[0][1])


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_zero_grad_like_torch(name, set_to_none):
    pt, pf, ot, of = pair(name, STATEFUL[name])
    g = torch.Generator().manual_seed(22)
    run_steps(pt, pf, ot, of, 2, g)
    ot.zero_grad(set_to_none=set_to_none)
    of.zero_grad(set_to_none=set_to_none)
    for a, b in zip(pt, pf):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad)
    # accumulate into the zeroed grads
    for _ in range(2):
        for a, b in zip(pt, pf):
            (a * 1.5).sum().backward()
            (b * 1.5).sum().backward()
    ot.step()
    of.step()
    assert_params_close(pt, pf)


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_after_training(name):
    require_oracle_for_missing_state(name)
    kw = STATEFUL[name]
    pt, pf, ot, of = pair(name, kw)
    g = torch.Generator().manual_seed(23)
    run_steps(pt, pf, ot, of, 3, g)
    nt = make_params(((4, 3), (2,)), seed=9)
    nf = clone_params(nt)
    ot.add_param_group({"params": nt, "lr": 0.02})
    of.add_param_group({"params": nf, "lr": 0.02})
    assert {k: v for k, v in ot.param_groups[1].items() if k != "params"} == \
           {k: v for k, v in of.param_groups[1].items() if k != "params"}
    pt, pf = pt + nt, pf + nf
    run_steps(pt, pf, ot, of, 4, g)
    assert_params_close(pt, pf)
    assert_state_close(ot, of, pt, pf)
    assert _describe_sd(ot.state_dict()) == _describe_sd(of.state_dict())


EDITS = {
    "lr": lambda grp: grp.__setitem__("lr", grp["lr"] * 0.3),
    "weight_decay": lambda grp: grp.__setitem__("weight_decay", 0.07),
    "maximize": lambda grp: grp.__setitem__("maximize", True),
    "betas_or_momentum": lambda grp: grp.__setitem__("betas", (0.5, 0.9)) if "betas" in grp else
    grp.__setitem__("momentum", 0.3) if "momentum" in grp else grp.__setitem__("lr_decay", 0.2),
    "eps": lambda grp: grp.__setitem__("eps", 1e-2),
    "lr_to_tensor": lambda grp: grp.__setitem__("lr", torch.tensor(0.05)),
}


@pytest.mark.parametrize("edit", list(EDITS))
@pytest.mark.parametrize("name", NAMES)
def test_param_group_edits_take_effect_next_step(name, edit):
    kw = STATEFUL[name]
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.004}]  # noqa: E731
    pt, pf, ot, of = pair(name, kw, groups=groups)
    g = torch.Generator().manual_seed(24)
    run_steps(pt, pf, ot, of, 3, g)
    for o in (ot, of):
        EDITS[edit](o.param_groups[1])
    run_steps(pt, pf, ot, of, 3, g)
    assert_params_close(pt, pf)
    assert_state_close(ot, of, pt, pf)


STRUCT_EDITS = {
    "state_object_replaced": lambda o, ps: setattr(o, "state", collections.defaultdict(dict)),
    "state_cleared": lambda o, ps: o.state.clear(),
    "groups_reversed": lambda o, ps: o.param_groups.reverse(),
    "group_popped": lambda o, ps: o.param_groups.pop(),
    "params_list_reordered": lambda o, ps: o.param_groups[0].__setitem__("params", o.param_groups[0]["params"][::-1]),
    "step_counter_filled_in_place": lambda o, ps: [s["step"].fill_(100.0) for s in o.state.values() if "step" in s],
    "step_counter_assigned": lambda o, ps: [s.__setitem__("step", torch.tensor(50.0)) for s in o.state.values() if "step" in s],
    "state_tensors_scaled_in_place": lambda o, ps: [v.mul_(0.5) for s in o.state.values() for k, v in s.items()
                                                    if k != "step" and torch.is_tensor(v)],
    "group_dict_replaced": lambda o, ps: o.param_groups.__setitem__(1, dict(o.param_groups[1], lr=0.02)),
    "param_data_replaced": lambda o, ps: setattr(ps[0], "data", ps[0].data * 2),
    "param_requires_grad_off": lambda o, ps: ps[0].requires_grad_(False),
}


@pytest.mark.parametrize("edit", list(STRUCT_EDITS))
@pytest.mark.parametrize("name", NAMES)
def test_structural_edits_mid_run(name, edit):
    if edit in ("state_object_replaced", "state_cleared"):
        require_oracle_for_missing_state(name)
    kw = STATEFUL[name]
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.003}]  # noqa: E731
    pt, pf, ot, of = pair(name, kw, groups=groups)
    g = torch.Generator().manual_seed(25)
    run_steps(pt, pf, ot, of, 3, g)
    STRUCT_EDITS[edit](ot, pt)
    STRUCT_EDITS[edit](of, pf)
    run_steps(pt, pf, ot, of, 3, g)
    assert_params_close(pt, pf)


@pytest.mark.parametrize("name", NAMES + ["Lion"])
def test_repr_matches_torch_format(name):
    ps = make_params()
    if name == "Lion":
        r = repr(fusedopt.Lion(ps))
        assert r.startswith("Lion (") and "Parameter Group 0" in r and "betas: (0.9, 0.99)" in r
        return
    kw = STATEFUL[name]
    assert repr(F(name)(ps, **kw)) == repr(T(name)(ps, **kw))


@pytest.mark.parametrize("name", NAMES)
def test_named_parameters_state_dict_like_torch(name):
    sds = []
    for mod in (torch.optim, fusedopt):
        torch.manual_seed(0)
        m = torch.nn.Linear(3, 2)
        o = getattr(mod, name)([{"params": [("w", m.weight)]}, {"params": [("b", m.bias)], "lr": 0.5}], lr=0.1)
        m(torch.randn(4, 3)).sum().backward()
        o.step()
        sds.append((o.state_dict(), m.weight.detach().clone()))
    assert _describe_sd(sds[0][0]) == _describe_sd(sds[1][0])
    torch.testing.assert_close(sds[1][1], sds[0][1])


# ============================================================================ 7. GradScaler
def _scaler():
    return torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)


def _scaled_run(mod, name, kw, bad_steps, bad_value, explicit_unscale, steps=10):
    ps = make_params()
    o = getattr(mod, name)(ps, **kw)
    sc = _scaler()
    g = torch.Generator().manual_seed(26)
    trace = []
    for s in range(steps):
        sc.scale(torch.ones(()))
        scale = sc.get_scale()
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g) * scale
        if s in bad_steps:
            ps[1].grad.view(-1)[2] = bad_value
        if explicit_unscale:
            sc.unscale_(o)
        sc.step(o)
        sc.update()
        trace.append((sc.get_scale(), len(o.state),
                      [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in o.state[p].items()} for p in ps],
                      [p.detach().clone() for p in ps], [p.grad.clone() for p in ps], s in bad_steps))
    return trace


@pytest.mark.parametrize("explicit_unscale", [False, True], ids=["implicit", "unscale_"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -float("inf")], ids=["inf", "nan", "-inf"])
@pytest.mark.parametrize("name", NAMES)
def test_grad_scaler_skipped_steps_change_nothing(name, bad, explicit_unscale):
    kw = STATEFUL[name]
    tt = _scaled_run(torch.optim, name, kw, {3, 4, 7}, bad, explicit_unscale)
    tf = _scaled_run(fusedopt, name, kw, {3, 4, 7}, bad, explicit_unscale)
    for s, (a, b) in enumerate(zip(tt, tf)):
        assert a[0] == b[0], (s, "scale")
        assert a[1] == b[1], (s, "len(state)")
        for i, (sa, sb) in enumerate(zip(a[2], b[2])):
            assert set(sa) == set(sb), (s, i)
            for k in sa:
                torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"step {s} {k}: {m}")
        for x, y in zip(a[3], b[3]):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)
        if not a[5]:  # grads are unscaled in place in both (skipped steps: see the next test)
            for x, y in zip(a[4], b[4]):
                torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_grad_scaler_skipped_step_leaves_grads_as_torch_fused_does(name):
    """With an optimizer that unscales inside its step (torch's fused=True, and fusedopt), a step
    GradScaler skips leaves p.grad scaled (the default torch path unscales before deciding)."""
    tt = _scaled_run(torch.optim, name, {**STATEFUL[name], "fused": True}, {2}, float("inf"), False, steps=3)
    tf = _scaled_run(fusedopt, name, STATEFUL[name], {2}, float("inf"), False, steps=3)
    for i, (x, y) in enumerate(zip(tt[2][4], tf[2][4])):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, equal_nan=True,
                                   msg=lambda m: f"p.grad of param {i} after the skipped step: {m}")


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_grad_scaler_skipped_first_step_creates_state_as_torch_fused_does(name):
    """An optimizer that unscales in its step (torch's fused=True, and fusedopt) runs the skipped
    first step's lazy state init: the state exists, untouched (step 0, zero moments)."""
    kw = STATEFUL[name]
    tt = _scaled_run(torch.optim, name, {**kw, "fused": True}, {0}, float("inf"), False, steps=1)
    tf = _scaled_run(fusedopt, name, kw, {0}, float("inf"), False, steps=1)
    assert tt[0][1] == tf[0][1], f"len(optimizer.state) after a skipped first step: torch {tt[0][1]}, fusedopt {tf[0][1]}"
    assert [sorted(s) for s in tt[0][2]] == [sorted(s) for s in tf[0][2]]


@pytest.mark.parametrize("name", ["SGD", "Adam"])
@pytest.mark.parametrize("n", [7, 1 << 15])
def test_grad_scaler_with_one_grad_tensor_shared_by_two_params_is_refused(name, n):
    """Two params whose .grad is the same tensor: with a GradScaler the step unscales every grad
    in place, so a shared one would be unscaled twice (by threads at once). fusedopt refuses it,
    naming both params, and changes nothing; without a scale the step only reads grads."""
    g = torch.Generator().manual_seed(27)
    ps = [torch.randn(n, generator=g).requires_grad_() for _ in range(3)]
    o = getattr(fusedopt, name)([{"params": ps[:1]}, {"params": ps[1:]}], lr=0.1)
    sc = torch.amp.GradScaler("cpu", init_scale=8.0)
    sc.scale(torch.ones(()))
    grad = torch.randn(n, generator=g) * 8
    ps[0].grad, ps[2].grad = grad, grad
    ps[1].grad = torch.randn(n, generator=g)
    before = [p.detach().clone() for p in ps]
    with pytest.raises(RuntimeError, match=r"(?s)params\[0\] and params\[2\] have grads that share memory.*"
                                           r"param_groups\[0\]\['params'\]\[0\].*param_groups\[1\]\['params'\]\[1\]"):
        sc.step(o)
    for p, b in zip(ps, before):
        assert torch.equal(p.detach(), b)
    ps[2].grad = grad.clone()  # a grad of its own: stepped
    sc.step(o)
    assert not torch.equal(ps[2].detach(), before[2])
    o.step()  # no scale: shared grads are only read
    ps[2].grad = ps[0].grad
    o.step()


# ======================================================================= 8. clip_grad_norm_
def _clip_inputs(dtypes=(torch.float32,), shapes=((10,), (3, 4), (50,)), nograd=(), scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for i, s in enumerate(shapes):
        dt = dtypes[i % len(dtypes)]
        p = torch.randn(s, generator=g).to(dt).requires_grad_()
        if i not in nograd:
            p.grad = (torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dt)
        ps.append(p)
    return ps


def _clip_both(make, wrap=lambda ps: ps, **kw):
    out = []
    for fn in (torch.nn.utils.clip_grad_norm_, fusedopt.clip_grad_norm_):
        ps = make()
        r = outcome(lambda: out.append((fn(wrap(ps), **kw), ps)))
        if r is not None:
            out.append(r)
    return out


def _assert_clip_same(res, tol=dict(rtol=1e-5, atol=1e-6)):
    t, f = res
    if isinstance(t[0], type) or isinstance(f[0], type):
        assert isinstance(t[0], type) and isinstance(f[0], type), f"torch: {t[0]}, fusedopt: {f[0]}"
        assert_same_outcome(t, f, "clip_grad_norm_")
        return
    nt, nf = t[0], f[0]
    assert nf.dtype == nt.dtype and nf.shape == nt.shape and nf.device == nt.device
    torch.testing.assert_close(nf, nt, **tol, equal_nan=True)
    ps_t = t[1] if isinstance(t[1], list) else [t[1]]
    ps_f = f[1] if isinstance(f[1], list) else [f[1]]
    for a, b in zip(ps_t, ps_f):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, **tol, equal_nan=True)


@pytest.mark.parametrize("foreach", [None, False, True])
@pytest.mark.parametrize("norm_type", [2, 2.0, float("inf"), "inf", 1, 0.5, 3, 1.5, 0, -1, -float("inf")])
@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_norm_types(norm_type, max_norm, foreach):
    _assert_clip_same(_clip_both(_clip_inputs, max_norm=max_norm, norm_type=norm_type, foreach=foreach))


@pytest.mark.parametrize("case", ["single_tensor", "generator", "tuple", "some_without_grad", "none_with_grad",
                                  "empty", "empty_inf", "zero_size", "zero_size_inf", "max_norm_tensor",
                                  "max_norm_zero", "f32_f64_mixed", "f64", "complex", "noncontiguous"])
def test_clip_inputs(case):
    mk, wrap, kw = _clip_inputs, (lambda ps: ps), dict(max_norm=0.5)
    if case == "single_tensor":
        mk, wrap = (lambda: _clip_inputs(shapes=((7,),))), (lambda ps: ps[0])
    elif case == "generator":
        wrap = lambda ps: (p for p in ps)  # noqa: E731
    elif case == "tuple":
        wrap = tuple
    elif case == "some_without_grad":
        mk = lambda: _clip_inputs(nograd=(1,))  # noqa: E731
    elif case == "none_with_grad":
        mk = lambda: _clip_inputs(nograd=(0, 1, 2))  # noqa: E731
    elif case in ("empty", "empty_inf"):
        mk = lambda: []  # noqa: E731
        kw["norm_type"] = float("inf") if case == "empty_inf" else 2.0
    elif case in ("zero_size", "zero_size_inf"):
        mk = lambda: _clip_inputs(shapes=((0,), (3, 0)))  # noqa: E731
        kw["norm_type"] = float("inf") if case == "zero_size_inf" else 2.0
    elif case == "max_norm_tensor":
        kw["max_norm"] = torch.tensor(0.5)
    elif case == "max_norm_zero":
        kw["max_norm"] = 0.0
    elif case == "f32_f64_mixed":
        mk = lambda: _clip_inputs(dtypes=(torch.float32, torch.float64))  # noqa: E731
    elif case == "f64":
        mk = lambda: _clip_inputs(dtypes=(torch.float64,))  # noqa: E731
    elif case == "complex":
        def mk():
            g = torch.Generator().manual_seed(1)
            p = torch.randn(4, dtype=torch.complex64, generator=g).requires_grad_()
            p.grad = torch.randn(4, dtype=torch.complex64, generator=g)
            return [p] + _clip_inputs()
    elif case == "noncontiguous":
        def mk():
            g = torch.Generator().manual_seed(1)
            p = torch.randn(4, 6, generator=g).requires_grad_()
            p.grad = torch.randn(6, 4, generator=g).t()
            q = torch.randn(4, 6, generator=g).requires_grad_()
            q.grad = torch.randn(4, 12, generator=g)[:, ::2]
            return [p, q]
    _assert_clip_same(_clip_both(mk, wrap, **kw))


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.float32), (torch.bfloat16,), (torch.float16,)],
                         ids=["f16+f32", "bf16", "f16"])
@pytest.mark.parametrize("norm_type", [2, float("inf"), 1])
def test_clip_half_precision(dtypes, norm_type):
    # torch rounds each per-tensor norm to the 16-bit dtype and accumulates in it; fusedopt
    # accumulates in float64 (documented), so allow 2 ulps of the 16-bit result type
    eps = 2.0 ** -7 if torch.bfloat16 in dtypes else 2.0 ** -10
    _assert_clip_same(_clip_both(lambda: _clip_inputs(dtypes=dtypes), max_norm=0.5, norm_type=norm_type),
                      tol=dict(rtol=2 * eps, atol=1e-6))


@pytest.mark.parametrize("error_if_nonfinite", [False, True])
@pytest.mark.parametrize("bad", ["nan", "inf"])
@pytest.mark.parametrize("norm_type", [2.0, float("inf"), 1.0])
def test_clip_nonfinite(bad, error_if_nonfinite, norm_type):
    def mk():
        ps = _clip_inputs()
        ps[1].grad[0, 0] = float(bad)
        return ps
    _assert_clip_same(_clip_both(mk, max_norm=0.5, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite))


@pytest.mark.parametrize("error_if_nonfinite", [False, True])
def test_clip_float32_norm_that_overflows_in_float32_is_computed_exactly(error_if_nonfinite):
    """Finite float32 grads whose 2-norm overflows a float32 accumulation (~1e30 * sqrt(72)): torch
    reports inf (and clips every grad to zero, or raises); fusedopt accumulates in float64
    (README) and returns the true norm, finite, and clips by it."""
    ps = _clip_inputs(scale=1e30)
    grads = [p.grad.clone() for p in ps]
    exact = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads]))
    total = fusedopt.clip_grad_norm_(ps, 1.0, error_if_nonfinite=error_if_nonfinite)
    assert total.dtype == torch.float32 and torch.isfinite(total)
    torch.testing.assert_close(total.double(), exact, rtol=1e-6, atol=0)
    coef = 1.0 / (float(total) + 1e-6)
    for p, g in zip(ps, grads):
        torch.testing.assert_close(p.grad, g * coef, rtol=1e-6, atol=0)


# ===================================================================================== Lion
def _lion_reference(ps, grad_seq, lr, betas, wd, maximize):
    ps = [p.detach().double().clone() for p in ps]
    ms = [torch.zeros_like(p) for p in ps]
    for grads in grad_seq:
        for p, m, g in zip(ps, ms, grads):
            g = -g.double() if maximize else g.double()
            c = betas[0] * m + (1 - betas[0]) * g
            p.mul_(1 - lr * wd).add_(torch.sign(c), alpha=-lr)
            m.mul_(betas[1]).add_(g, alpha=1 - betas[1])
    return ps, ms


@pytest.mark.parametrize("kw", [dict(lr=0.01), dict(lr=0.01, betas=(0.5, 0.7), weight_decay=0.3),
                                dict(lr=0.003, maximize=True, weight_decay=0.1)])
def test_lion_matches_paper_update(kw):
    ps = make_params()
    pf = clone_params(ps)
    o = fusedopt.Lion(pf, **kw)
    g = torch.Generator().manual_seed(28)
    seq = []
    for _ in range(6):
        grads = [torch.randn(p.shape, generator=g) for p in ps]
        seq.append(grads)
        for p, gr in zip(pf, grads):
            p.grad = gr.clone()
        o.step()
    ref, ms = _lion_reference(ps, seq, kw["lr"], kw.get("betas", (0.9, 0.99)), kw.get("weight_decay", 0.0),
                              kw.get("maximize", False))
    for a, b in zip(ref, pf):
        torch.testing.assert_close(b.detach().double(), a, rtol=1e-5, atol=1e-6)
    for m, p in zip(ms, pf):
        torch.testing.assert_close(o.state[p]["exp_avg"].double(), m, rtol=1e-5, atol=1e-6)
    # state_dict round trip into a fresh Lion continues identically
    sd = copy.deepcopy(o.state_dict())
    p2 = clone_params(pf)
    o2 = fusedopt.Lion(p2, **kw)
    o2.load_state_dict(sd)
    for a, b in zip(pf, p2):
        a.grad = torch.ones_like(a)
        b.grad = torch.ones_like(b)
    o.step()
    o2.step()
    for a, b in zip(pf, p2):
        assert torch.equal(a.detach(), b.detach())


@pytest.mark.parametrize("kw", [dict(lr=-1.0), dict(betas=(1.0, 0.9)), dict(betas=(0.9, 1.5)), dict(weight_decay=-1.0),
                                dict(betas=(-0.1, 0.9)), dict(lr=torch.tensor([0.1, 0.2]))])
def test_lion_rejects_bad_arguments(kw):
    with pytest.raises(ValueError):
        fusedopt.Lion(make_params(), **kw)
