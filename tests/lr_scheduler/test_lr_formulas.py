"""Each closed-form scheduler against independently written formulas and literal numbers.

Expected values are computed here with the tests' own small formulas (or written
as literals), never by calling the code under test.  Every case uses two param
groups with different initial lrs (0.1 and 0.03).
"""

import math

import pytest
import torch

from fusedopt.lr_scheduler import (
    InverseTimeDecay,
    NaturalExpDecay,
    NoamDecay,
    PiecewiseDecay,
    PolynomialDecay,
    WarmupCosine,
    WarmupStableDecay,
)

STEPS = 70


def assert_trajectory(traj, expected, lrs):
    for t, row in enumerate(traj):
        for g, lr in enumerate(row):
            want = expected(lrs[g], t)
            assert lr == pytest.approx(want, rel=1e-12, abs=1e-15), f"t={t} group={g}: {lr} != {want}"


# ---- expected formulas, written independently of the implementation ------------------


def piecewise(lr0, t):
    return 0.5 if t < 10 else (0.2 if t < 25 else 0.05)


def natural_exp(lr0, t):
    return lr0 * math.exp(-0.1 * t)


def inverse_time(lr0, t):
    return lr0 / (1 + 0.5 * t)


def poly_nocycle(lr0, t):
    end, steps, power = 0.001, 20, 2.0
    t = min(t, steps)
    return (lr0 - end) * (1 - t / steps) ** power + end


def poly_cycle(lr0, t):
    end, steps = 0.001, 20
    horizon = steps if t == 0 else steps * math.ceil(t / steps)
    return (lr0 - end) * (1 - t / horizon) + end


def noam(lr0, t):
    if t == 0:
        return 0.0
    return lr0 / math.sqrt(64) * min(1 / math.sqrt(t), t / 10**1.5)


def warmup_cosine(lr0, t, warmup=10, total=50, floor=0.001):
    if t < warmup:
        return lr0 * t / warmup
    if t >= total:
        return floor
    return floor + 0.5 * (lr0 - floor) * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


def wsd(shape):
    warmup, stable, decay, floor = 10, 15, 20, 0.002

    def f(lr0, t):
        if t < warmup:
            return lr0 * t / warmup
        if t < warmup + stable:
            return lr0
        p = min(t - warmup - stable, decay) / decay
        if shape == "linear":
            return lr0 - (lr0 - floor) * p
        if shape == "cosine":
            return floor + (lr0 - floor) * 0.5 * (1 + math.cos(math.pi * p))
        return floor + (lr0 - floor) * (1 - math.sqrt(p))

    return f


CASES = {
    "piecewise": (lambda o: PiecewiseDecay(o, boundaries=[10, 25], values=[0.5, 0.2, 0.05]), piecewise),
    "natural_exp": (lambda o: NaturalExpDecay(o, gamma=0.1), natural_exp),
    "inverse_time": (lambda o: InverseTimeDecay(o, gamma=0.5), inverse_time),
    "poly": (lambda o: PolynomialDecay(o, decay_steps=20, end_lr=0.001, power=2.0), poly_nocycle),
    "poly_cycle": (lambda o: PolynomialDecay(o, decay_steps=20, end_lr=0.001, cycle=True), poly_cycle),
    "noam": (lambda o: NoamDecay(o, d_model=64, warmup_steps=10), noam),
    "warmup_cosine": (lambda o: WarmupCosine(o, warmup_steps=10, total_steps=50, min_lr=0.001), warmup_cosine),
    "cosine_no_warmup": (
        lambda o: WarmupCosine(o, warmup_steps=0, total_steps=40),
        lambda lr0, t: warmup_cosine(lr0, t, warmup=0, total=40, floor=0.0),
    ),
    "wsd_linear": (lambda o: WarmupStableDecay(o, 10, 15, 20, min_lr=0.002, decay="linear"), wsd("linear")),
    "wsd_cosine": (lambda o: WarmupStableDecay(o, 10, 15, 20, min_lr=0.002, decay="cosine"), wsd("cosine")),
    "wsd_sqrt": (lambda o: WarmupStableDecay(o, 10, 15, 20, min_lr=0.002, decay="sqrt"), wsd("sqrt")),
}


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_trajectory_matches_formula(name, kind, make_optimizer, run, lrs):
    factory, expected = CASES[name]
    opt = make_optimizer(kind=kind)
    sched = factory(opt)
    assert sched.base_lrs == list(lrs)
    traj = run(opt, sched, STEPS)
    assert_trajectory(traj, expected, lrs)
    assert sched.last_epoch == STEPS - 1
    assert sched.get_last_lr() == traj[-1]


# ---- literal values at the boundaries (t = 0, warmup, decay end, cycle edges) -------

LITERALS = {
    # name: {t: (lr of group 0, lr of group 1)}
    "piecewise": {0: (0.5, 0.5), 9: (0.5, 0.5), 10: (0.2, 0.2), 24: (0.2, 0.2), 25: (0.05, 0.05), 69: (0.05, 0.05)},
    "natural_exp": {0: (0.1, 0.03), 10: (0.036787944117144235, 0.011036383235143271)},
    "inverse_time": {0: (0.1, 0.03), 2: (0.05, 0.015), 8: (0.02, 0.006)},
    # (lr0 - 0.001) * (1 - t/20)^2 + 0.001
    "poly": {0: (0.1, 0.03), 10: (0.02575, 0.00825), 20: (0.001, 0.001), 69: (0.001, 0.001)},
    # cycle: end_lr at every multiple of 20, then back up with a horizon of the next multiple
    "poly_cycle": {
        0: (0.1, 0.03),
        20: (0.001, 0.001),
        21: (0.048025, 0.014775),  # (lr0 - 0.001) * (1 - 21/40) + 0.001
        40: (0.001, 0.001),
        41: (0.03235, 0.0101833333333333),  # (lr0 - 0.001) * (1 - 41/60) + 0.001
    },
    # lr0 / 8 * min(t^-0.5, t * 10^-1.5); peak at t = warmup_steps = 10
    "noam": {0: (0.0, 0.0), 5: (0.00197642353760524, 0.000592927061281571), 10: (0.00395284707521047, 0.00118585412256314)},
    "warmup_cosine": {0: (0.0, 0.0), 5: (0.05, 0.015), 10: (0.1, 0.03), 30: (0.0505, 0.0155), 50: (0.001, 0.001), 69: (0.001, 0.001)},
    "wsd_linear": {0: (0.0, 0.0), 10: (0.1, 0.03), 24: (0.1, 0.03), 25: (0.1, 0.03), 35: (0.051, 0.016), 45: (0.002, 0.002), 69: (0.002, 0.002)},
    "wsd_cosine": {25: (0.1, 0.03), 35: (0.051, 0.016), 45: (0.002, 0.002)},
    # 0.002 + (lr0 - 0.002) * (1 - sqrt(0.5))
    "wsd_sqrt": {25: (0.1, 0.03), 35: (0.0307035354437183, 0.0102010101267767), 45: (0.002, 0.002)},
}


@pytest.mark.parametrize("name", sorted(LITERALS))
def test_literal_values(name, make_optimizer, run):
    factory, _ = CASES[name]
    opt = make_optimizer()
    traj = run(opt, factory(opt), STEPS)
    for t, want in LITERALS[name].items():
        assert traj[t] == pytest.approx(list(want), rel=1e-12, abs=1e-15), f"t={t}"


def test_closed_form_jump_matches_stepping(make_optimizer, run):
    """The deprecated ``step(epoch)`` uses _get_closed_form_lr; it must land on the same lrs."""
    opt = make_optimizer()
    sched = WarmupCosine(opt, warmup_steps=10, total_steps=50, min_lr=0.001)
    opt.step()
    with pytest.warns(UserWarning, match="epoch parameter"):
        sched.step(37)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([warmup_cosine(0.1, 37), warmup_cosine(0.03, 37)])
    assert sched.last_epoch == 37


def test_base_lrs_come_from_initial_lr(make_optimizer):
    """Like torch: a scheduler built after another one keeps the groups' initial_lr as base lrs."""
    opt = make_optimizer()
    torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=4)  # group lrs now halved
    sched = NaturalExpDecay(opt, gamma=0.1)
    assert sched.base_lrs == [0.1, 0.03]
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.03]


def test_tensor_lr_is_filled_in_place():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([p], lr=torch.tensor(0.1), foreach=False)
    lr_tensor = opt.param_groups[0]["lr"]
    sched = WarmupCosine(opt, warmup_steps=4, total_steps=20)
    for _ in range(2):
        p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] is lr_tensor  # same tensor, updated in place
    assert float(lr_tensor) == pytest.approx(0.05)
