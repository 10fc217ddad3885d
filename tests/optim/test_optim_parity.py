"""(1) Numerical parity of fusedopt.SGD / Adam / AdamW with torch.optim (foreach=False) over a
hyperparameter grid.

Every test uses ONE optimizer with three param groups of odd-sized params:
  group 0: {(1,), (4097,)}   - inherits every constructor default (the grid point)
  group 1: {(7,), (3, 5, 7)} - the grid point with every boolean option flipped, other lr/betas/eps
  group 2: {(64, 65)}        - only lr (and betas / momentum) overridden
so each test also checks that per-group hyperparameters are honoured inside one fused call.
50+ steps, fresh seeded gradients every step (the same values for both optimizers).
Tolerances: see optim_parity_utils.float_tolerance (float32 / float64) and
assert_half_step_close (float16 / bfloat16).
"""

import pytest
import torch

from optim_parity_utils import (
    MagnitudeTracker,
    Side,
    assert_close_dtype,
    assert_pair_close,
    build_pair,
    feed_same_grads,
    make_gen,
    run_half_parity,
    run_parity,
)

STEPS = 50
SHAPES = ([(1,), (4097,)], [(7,), (3, 5, 7)], [(64, 65)])
FULL_DTYPES = [torch.float32, torch.float64]
HALF_DTYPES = [torch.float16, torch.bfloat16]


def lr_value(value, lr_kind, dtype, one_dim=False):
    """float lr, or a 1-element tensor lr.  For float64 params the tensor is float64: torch's
    for-loop computes ``lr / bias_correction1`` in the tensor's dtype, so a float32 lr tensor would
    make *torch itself* round the Adam step size to float32 (a 6e-8 relative effect that is
    legitimately absent from an implementation computing it in double)."""
    if lr_kind == "float":
        return value
    tdtype = torch.float64 if dtype == torch.float64 else torch.float32
    t = torch.tensor(value, dtype=tdtype)
    return t.reshape(1) if one_dim else t


# ---------------------------------------------------------------------------------- Adam / AdamW
def adam_case_ids(case):
    return "-".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in case.items())


ADAM_CASES = [
    dict(amsgrad=a, maximize=m, weight_decay=wd, decoupled_weight_decay=d)
    for a in (False, True)
    for m in (False, True)
    for wd in (0.0, 0.1)
    for d in (False, True)
]
ADAMW_CASES = [dict(amsgrad=a, maximize=m, weight_decay=wd) for a in (False, True) for m in (False, True) for wd in (0.0, 0.1)]


def adam_groups(name, case, lr_kind, dtype):
    ctor = dict(case)
    ctor["lr"] = lr_value(1e-3, lr_kind, dtype)
    flipped = dict(
        amsgrad=not case["amsgrad"],
        maximize=not case["maximize"],
        weight_decay=0.1 if case["weight_decay"] == 0 else 0.0,
        lr=lr_value(0.05, lr_kind, dtype, one_dim=True),
        betas=(0.8, 0.99),
        eps=1e-6,
    )
    if name == "Adam":
        flipped["decoupled_weight_decay"] = not case["decoupled_weight_decay"]
    g2 = dict(lr=3e-3, betas=(0.95, 0.9999))  # float lr in a group of a tensor-lr optimizer: mixed
    return ctor, [(SHAPES[0], {}), (SHAPES[1], flipped), (SHAPES[2], g2)]


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("dtype", FULL_DTYPES, ids=str)
@pytest.mark.parametrize("case", ADAM_CASES, ids=adam_case_ids)
def test_adam_parity_grid(case, dtype, lr_kind, device):
    ctor, groups = adam_groups("Adam", case, lr_kind, dtype)
    run_parity("Adam", groups, dtype=dtype, device=device, steps=STEPS, ctor=ctor)


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("dtype", FULL_DTYPES, ids=str)
@pytest.mark.parametrize("case", ADAMW_CASES, ids=adam_case_ids)
def test_adamw_parity_grid(case, dtype, lr_kind, device):
    ctor, groups = adam_groups("AdamW", case, lr_kind, dtype)
    run_parity("AdamW", groups, dtype=dtype, device=device, steps=STEPS, ctor=ctor)


# ------------------------------------------------------------------------------------------- SGD
SGD_MOMENTA = [  # (momentum, dampening, nesterov); dampening is not combined with nesterov (invalid)
    (0.0, 0.0, False),
    (0.0, 0.1, False),
    (0.9, 0.0, False),
    (0.9, 0.1, False),
    (0.9, 0.0, True),
]
SGD_CASES = [
    dict(momentum=mo, dampening=da, nesterov=ne, weight_decay=wd, maximize=mx)
    for (mo, da, ne) in SGD_MOMENTA
    for wd in (0.0, 0.01)
    for mx in (False, True)
]


def sgd_groups(case, lr_kind, dtype):
    ctor = dict(case)
    ctor["lr"] = lr_value(0.01, lr_kind, dtype)
    if case["momentum"] == 0:
        g1_mom = dict(momentum=0.9, dampening=0.0, nesterov=True)
    elif case["nesterov"]:
        g1_mom = dict(momentum=0.8, dampening=0.2, nesterov=False)
    else:
        g1_mom = dict(momentum=0.0, dampening=0.0, nesterov=False)
    flipped = dict(
        g1_mom,
        maximize=not case["maximize"],
        weight_decay=0.01 if case["weight_decay"] == 0 else 0.0,
        lr=lr_value(0.05, lr_kind, dtype, one_dim=True),
    )
    g2 = dict(lr=0.002)
    if case["momentum"]:
        g2["momentum"] = 0.5
    return ctor, [(SHAPES[0], {}), (SHAPES[1], flipped), (SHAPES[2], g2)]


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("dtype", FULL_DTYPES, ids=str)
@pytest.mark.parametrize("case", SGD_CASES, ids=adam_case_ids)
def test_sgd_parity_grid(case, dtype, lr_kind, device):
    ctor, groups = sgd_groups(case, lr_kind, dtype)
    run_parity("SGD", groups, dtype=dtype, device=device, steps=STEPS, ctor=ctor)


# -------------------------------------------------------------------------- float16 / bfloat16
HALF_SHAPES = ([(1,), (7,)], [(3, 5, 7)], [(257,)])
HALF_CASES = [
    ("Adam", dict(amsgrad=False, maximize=False, weight_decay=0.0, decoupled_weight_decay=False)),
    ("Adam", dict(amsgrad=True, maximize=True, weight_decay=0.1, decoupled_weight_decay=False)),
    ("Adam", dict(amsgrad=False, maximize=False, weight_decay=0.1, decoupled_weight_decay=True)),
    ("AdamW", dict(amsgrad=False, maximize=False, weight_decay=0.1)),
    ("AdamW", dict(amsgrad=True, maximize=True, weight_decay=0.0)),
    ("SGD", dict(momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.01, maximize=False)),
    ("SGD", dict(momentum=0.9, dampening=0.1, nesterov=False, weight_decay=0.01, maximize=False)),
    ("SGD", dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.0, maximize=True)),
]


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("name,case", HALF_CASES, ids=[f"{n}-{adam_case_ids(c)}" for n, c in HALF_CASES])
def test_half_precision_parity(name, case, dtype, lr_kind, device):
    if name == "SGD":
        ctor, groups = sgd_groups(case, lr_kind, dtype)
    else:
        ctor, groups = adam_groups(name, case, lr_kind, dtype)
    groups = [(shapes, hp) for shapes, (_, hp) in zip(HALF_SHAPES, groups)]
    run_half_parity(name, groups, dtype=dtype, device=device, steps=STEPS, ctor=ctor)


# ------------------------------------------------------------------------ mixed dtypes / devices
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_mixed_dtypes_in_one_group(name, device):
    """One group holding float32 and float64 params: each compared with its own tolerance."""
    ctor = dict(lr=0.01, weight_decay=0.01)
    if name == "SGD":
        ctor.update(momentum=0.9)
    else:
        ctor.update(amsgrad=True)
    ref32, fo32 = build_pair(name, [([(5,), (33,)], {})], dtype=torch.float32, device=device, ctor=ctor, seed=3)
    ref64, fo64 = build_pair(name, [([(6,), (17,)], {})], dtype=torch.float64, device=device, ctor=ctor, seed=4)
    ref = Side(type(ref32.opt)(ref32.params + ref64.params, foreach=False, **ctor), ref32.params + ref64.params)
    fo = Side(type(fo32.opt)(fo32.params + fo64.params, **ctor), fo32.params + fo64.params)
    gen = make_gen(9)
    tr = MagnitudeTracker()
    for _ in range(STEPS):
        feed_same_grads(ref32, fo32, gen, dtype=torch.float32)
        feed_same_grads(ref64, fo64, gen, dtype=torch.float64)
        ref.step()
        fo.step()
        tr.update(ref)
    for i, (pr, pf) in enumerate(zip(ref.params, fo.params)):
        assert_close_dtype(pf, pr, pr.dtype, f"{name} mixed-dtype group, param {i} ({pr.dtype})", tr.get(i, "param"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_params_on_cpu_and_cuda_in_one_optimizer(name):
    """One optimizer with params on two devices (one fused op per device)."""
    ctor = dict(lr=0.01, weight_decay=0.01)
    if name == "SGD":
        ctor.update(momentum=0.9)
    ref_c, fo_c = build_pair(name, [([(5,), (300,)], {})], dtype=torch.float32, device="cpu", ctor=ctor, seed=3)
    ref_g, fo_g = build_pair(name, [([(6,), (301,)], {"lr": 0.02})], dtype=torch.float32, device="cuda", ctor=ctor, seed=4)
    ref = Side(
        type(ref_c.opt)([{"params": ref_c.params}, {"params": ref_g.params, "lr": 0.02}], foreach=False, **ctor),
        ref_c.params + ref_g.params,
    )
    fo = Side(type(fo_c.opt)([{"params": fo_c.params}, {"params": fo_g.params, "lr": 0.02}], **ctor), fo_c.params + fo_g.params)
    gen, tr = make_gen(9), MagnitudeTracker()
    for t in range(STEPS):
        feed_same_grads(ref, fo, gen, dtype=torch.float32)
        ref.step()
        fo.step()
        tr.update(ref)
    assert_pair_close(ref, fo, torch.float32, f"{name} cpu+cuda", tracker=tr)


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_adam_tensor_betas(name, device):
    """betas given as 1-element tensors (torch.optim accepts them with foreach=False).  float64
    tensors, for the same reason as the float64 tensor lr above."""
    b = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    ctor = dict(lr=0.01, betas=(b(0.9), b(0.99)), weight_decay=0.1, amsgrad=True)
    run_parity(name, [([(5,), (3, 4)], {}), ([(6,)], {"betas": (b(0.8), b(0.95))})], dtype=torch.float64,
               device=device, steps=20, ctor=ctor)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_many_params(name, device):
    """130 params of assorted sizes (multi-tensor kernels chunk their work lists: CUDA
    multi_tensor_apply-style launches hold ~100 tensors / 65536-element chunks), and one param
    just over 2**16 elements."""
    gen = torch.Generator().manual_seed(5)
    sizes = torch.randint(1, 300, (129,), generator=gen).tolist()
    shapes = [(s,) for s in sizes] + [(65536 + 7,)]
    ctor = dict(lr=0.01, weight_decay=0.01)
    if name == "SGD":
        ctor["momentum"] = 0.9
    run_parity(name, [(shapes[:70], {}), (shapes[70:], {"lr": 0.02})], dtype=torch.float32, device=device,
               steps=10, ctor=ctor, check_every=5)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_thousands_of_tiny_params_on_two_threads(name, device, two_threads):
    """2,500 params of 1-4 elements: few elements but many tensors, which the CPU kernel spreads
    over its threads (a tensor's fixed cost counts as work), so the threads' shares meet inside
    a group and between the groups."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(s,) for s in torch.randint(1, 5, (2500,), generator=gen).tolist()]
    ctor = dict(lr=0.01, weight_decay=0.01)
    if name == "SGD":
        ctor["momentum"] = 0.9
    run_parity(name, [(shapes[:1300], {}), (shapes[1300:], {"lr": 0.02})], dtype=torch.float32,
               device=device, steps=6, ctor=ctor, check_every=3)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_zero_element_and_0dim_params(name, device):
    """A 0-dim param (e.g. a learnable temperature) and zero-element params (e.g. an empty
    embedding table / a layer with 0 features) next to ordinary ones: torch steps them all."""
    ctor = dict(lr=0.01, weight_decay=0.01)
    if name == "SGD":
        ctor["momentum"] = 0.9
    run_parity(name, [([(3,), (), (0,)], {}), ([(3, 0), (5,)], {"lr": 0.02})], dtype=torch.float64, device=device,
               steps=6, ctor=ctor, check_every=1)


def test_sgd_tensor_weight_decay(device):
    """torch.optim.SGD accepts weight_decay as a Tensor (float | Tensor in its signature)."""
    ctor = dict(lr=0.01, momentum=0.9, weight_decay=torch.tensor(0.01, dtype=torch.float64))
    run_parity("SGD", [([(5,), (3, 4)], {})], dtype=torch.float64, device=device, steps=10, ctor=ctor)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_device_resident_tensor_lr(name):
    """A tensor lr living on the params' CUDA device (the capturable-style setup), updated in place
    between steps like a scheduler does."""
    ctor = dict(lr=torch.tensor(0.01, device="cuda"), weight_decay=0.01)
    if name == "SGD":
        ctor["momentum"] = 0.9
    ref, fo = build_pair(name, [([(5,), (300,)], {})], dtype=torch.float32, device="cuda", ctor=ctor)
    # the oracle's semantics do not depend on where its lr tensor lives; keep it on the CPU
    ref.opt.param_groups[0]["lr"] = torch.tensor(0.01)
    gen, tr = make_gen(3), MagnitudeTracker()
    for t in range(20):
        for side in (ref, fo):
            side.opt.param_groups[0]["lr"].fill_(0.01 * 0.9**t)
        feed_same_grads(ref, fo, gen, dtype=torch.float32)
        ref.step()
        fo.step()
        tr.update(ref)
    assert_pair_close(ref, fo, torch.float32, f"{name} cuda tensor lr", tracker=tr)
