"""(4) Constructors: same signature, defaults, validation (exception type AND message) as
torch.optim; foreach/fused accepted; the ``defaults`` dict equals torch's.

Decision on 'fused' / 'foreach': no allowance - ``defaults`` and ``param_groups`` must hold them
exactly as torch does (the value the user passed, None by default).  They end up in every
checkpoint: a fusedopt state_dict saying fused=True would silently switch torch.optim to its own
fused kernels when loaded there (and change zero_grad's code path), so recording "I am fused"
there is not harmless.  fusedopt is fused whatever these flags say.
"""

import inspect

import pytest
import torch

from optim_parity_utils import OPT_NAMES, fused_cls, leaf, torch_cls

def params(n=2):
    return [leaf(torch.randn(3), torch.float32, "cpu") for _ in range(n)]


def outcome(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - we compare whatever torch raises
        return type(e), str(e)
    return None


# --------------------------------------------------------------------------------- signature
@pytest.mark.parametrize("name", OPT_NAMES)
def test_constructor_signature_matches_torch(name):
    st = inspect.signature(torch_cls(name).__init__)
    sf = inspect.signature(fused_cls(name).__init__)
    rows_t = [(p.name, p.kind, p.default) for p in st.parameters.values()]
    rows_f = [(p.name, p.kind, p.default) for p in sf.parameters.values()]
    # torch's signature exactly, then fusedopt's keyword-only precision options, whose defaults
    # are torch's behaviour
    kw = inspect.Parameter.KEYWORD_ONLY
    assert rows_f == rows_t + [("master_weights", kw, False), ("master_remainders", kw, False),
                               ("state_dtype", kw, None), ("stochastic_rounding", kw, False),
                               ("max_grad_norm", kw, None), ("grad_norm_type", kw, 2.0)]


@pytest.mark.parametrize("name", OPT_NAMES)
def test_is_a_torch_optimizer(name):
    opt = fused_cls(name)(params())
    assert isinstance(opt, torch.optim.Optimizer)  # required by lr_scheduler and GradScaler
    assert "closure" in inspect.signature(opt.step).parameters


@pytest.mark.parametrize("name", OPT_NAMES)
def test_amp_scaling_flag(name):
    assert getattr(fused_cls(name)(params()), "_step_supports_amp_scaling", False) is True


# -------------------------------------------------------------------------------- validation
def T(*v):
    return torch.tensor(v if len(v) > 1 else v[0])


COMMON_BAD = [
    dict(lr=-0.1),
    dict(lr=-1e-12),
    dict(lr=torch.tensor([0.1, 0.2])),
    dict(lr=torch.tensor(-0.1)),
    dict(weight_decay=-1e-4),
    dict(fused=True, foreach=True),
    dict(fused=True, differentiable=True),
]
SGD_BAD = COMMON_BAD + [
    dict(momentum=-0.5),
    dict(nesterov=True),  # momentum 0
    dict(nesterov=True, momentum=0.9, dampening=0.1),
    dict(nesterov=True, momentum=-0.1),
]
ADAM_BAD = COMMON_BAD + [
    dict(lr=float("nan")),  # `not 0.0 <= lr` (SGD's `lr < 0.0` accepts nan, so only here)
    dict(eps=-1e-8),
    dict(betas=(1.0, 0.999)),
    dict(betas=(-0.1, 0.999)),
    dict(betas=(0.9, 1.0)),
    dict(betas=(0.9, -0.5)),
    dict(betas=(0.9, T(0.999))),
    dict(betas=(T(0.9), 0.999)),
    dict(betas=(T(0.9), T(0.999)), foreach=True),
    dict(betas=(T(0.9, 0.8), T(0.999))),
    dict(betas=(T(0.9), T(0.999, 0.9))),
    dict(lr=torch.tensor(0.01), foreach=True),
    dict(lr=torch.tensor([0.01, 0.02]), foreach=True),
]
BAD = [(n, kw) for n, cases in (("SGD", SGD_BAD), ("Adam", ADAM_BAD), ("AdamW", ADAM_BAD)) for kw in cases]


def _id(kw):
    return ",".join(f"{k}={v!r}".replace(" ", "") for k, v in kw.items())


@pytest.mark.parametrize("name,kwargs", BAD, ids=[f"{n}-{_id(k)}" for n, k in BAD])
def test_invalid_arguments_raise_like_torch(name, kwargs):
    expected = outcome(lambda: torch_cls(name)(params(), **kwargs))
    assert expected is not None, f"test case is not invalid for torch: {kwargs}"
    got = outcome(lambda: fused_cls(name)(params(), **kwargs))
    assert got is not None, f"fusedopt.{name} accepted {kwargs}; torch raises {expected[0].__name__}: {expected[1]}"
    assert got[0] is expected[0] and got[1] == expected[1], f"fusedopt: {got}, torch: {expected}"


BAD_PARAMS = {
    "tensor_not_iterable": lambda: torch.randn(3, requires_grad=True),
    "empty_list": lambda: [],
    "non_leaf": lambda: [torch.randn(3, requires_grad=True) * 2],
    "not_a_tensor": lambda: [1.0, 2.0],
    "set_in_group": lambda: [{"params": set(params())}],
    "duplicate_across_groups": lambda: (lambda p: [{"params": [p]}, {"params": [p]}])(params(1)[0]),
    "group_not_dict_mixed_names": lambda: [("a", params(1)[0]), params(1)[0]],
}


@pytest.mark.parametrize("what", list(BAD_PARAMS))
@pytest.mark.parametrize("name", OPT_NAMES)
def test_invalid_params_raise_like_torch(name, what):
    # the same object for both (the factory may build it lazily; build once)
    obj = BAD_PARAMS[what]()
    expected = outcome(lambda: torch_cls(name)(obj))
    got = outcome(lambda: fused_cls(name)(obj))
    assert expected is not None
    assert got is not None and got[0] is expected[0] and got[1] == expected[1], f"fusedopt: {got}, torch: {expected}"


# ---------------------------------------------------------------------- accepted, and defaults
IMPL_COMBOS = [(fe, fu) for fe in (None, False, True) for fu in (None, False, True) if not (fe and fu)]


@pytest.mark.parametrize("foreach,fused", IMPL_COMBOS, ids=[f"foreach={a}-fused={b}" for a, b in IMPL_COMBOS])
@pytest.mark.parametrize("name", OPT_NAMES)
def test_foreach_and_fused_are_accepted(name, foreach, fused, device):
    """foreach / fused only choose torch's implementation; fusedopt must accept every combination
    torch accepts (foreach=fused=True is rejected like torch, see above) and still step right."""
    ps = [leaf(torch.randn(5, dtype=torch.float64), torch.float64, device) for _ in range(2)]
    ref_ps = [leaf(p.detach(), torch.float64, device) for p in ps]
    kw = dict(lr=0.01, weight_decay=0.01)
    if name == "SGD":
        kw["momentum"] = 0.9
    opt = fused_cls(name)(ps, foreach=foreach, fused=fused, **kw)
    ref = torch_cls(name)(ref_ps, foreach=False, **kw)
    for _ in range(3):
        for a, b in zip(ps, ref_ps):
            g = torch.randn(5, dtype=torch.float64, device=device)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for a, b in zip(ps, ref_ps):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


GOOD = {
    "SGD": [
        {},
        dict(lr=0.1),
        dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-4),
        dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True),
        dict(lr=torch.tensor(0.1)),
        dict(lr=0.1, foreach=True),
        dict(lr=0.1, fused=True),
        dict(lr=0.1, foreach=False, fused=False),
    ],
    "Adam": [
        {},
        dict(lr=0.1, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1, amsgrad=True),
        dict(maximize=True, decoupled_weight_decay=True),
        dict(lr=torch.tensor(0.01)),
        dict(betas=(T(0.9), T(0.99))),
        dict(foreach=True),
        dict(fused=True),
        dict(foreach=False, fused=False),
        dict(capturable=False, differentiable=False),
    ],
    "AdamW": [
        {},
        dict(lr=0.1, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.0, amsgrad=True),
        dict(maximize=True),
        dict(lr=torch.tensor(0.01)),
        dict(foreach=True),
        dict(fused=True),
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
def test_defaults_and_param_groups_equal_torch(name, kwargs):
    ref = torch_cls(name)(params(), **kwargs)
    fo = fused_cls(name)(params(), **kwargs)
    assert set(fo.defaults) == set(ref.defaults), sorted(set(fo.defaults) ^ set(ref.defaults))
    for k, v in ref.defaults.items():
        assert _same(fo.defaults[k], v), f"defaults[{k!r}]: fusedopt {fo.defaults[k]!r} != torch {v!r}"
    for gf, gt in zip(fo.param_groups, ref.param_groups):
        assert set(gf) == set(gt)
        for k in gt:
            if k != "params":
                assert _same(gf[k], gt[k]), f"param_group[{k!r}]: fusedopt {gf[k]!r} != torch {gt[k]!r}"


@pytest.mark.parametrize("name", OPT_NAMES)
def test_default_hyperparameters(name):
    """Explicit check of the documented defaults (catches a signature and defaults that agree with
    each other but not with torch)."""
    fo = fused_cls(name)(params())
    d = fo.defaults
    if name == "SGD":
        assert (d["lr"], d["momentum"], d["dampening"], d["weight_decay"], d["nesterov"], d["maximize"]) == (
            1e-3, 0, 0, 0, False, False)
    else:
        assert d["lr"] == 1e-3 and d["betas"] == (0.9, 0.999) and d["eps"] == 1e-8
        assert d["weight_decay"] == (1e-2 if name == "AdamW" else 0)
        assert d["amsgrad"] is False and d["maximize"] is False
        assert d["decoupled_weight_decay"] is (name == "AdamW")


def test_adamw_keeps_decoupled_weight_decay_true_after_load():
    """torch.optim.AdamW.__setstate__ forces decoupled_weight_decay=True; so must fusedopt.AdamW."""
    fo = fused_cls("AdamW")(params())
    sd = fo.state_dict()
    for g in sd["param_groups"]:
        g["decoupled_weight_decay"] = False
    fo.load_state_dict(sd)
    assert all(g["decoupled_weight_decay"] is True for g in fo.param_groups)


@pytest.mark.parametrize("name", OPT_NAMES)
def test_repr_lists_groups_like_torch(name):
    ps = params()
    r = repr(fused_cls(name)(ps, lr=0.5))
    assert r.startswith(f"{name} (") and "Parameter Group 0" in r and "lr: 0.5" in r
