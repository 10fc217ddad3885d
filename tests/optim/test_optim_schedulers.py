"""(6) Every torch.optim.lr_scheduler drives fusedopt exactly like torch.optim: identical lr
trajectories (``get_last_lr()`` and ``group['lr']``, bit for bit, float or tensor lr), identical
momentum / beta1 trajectories for CyclicLR / OneCycleLR, matching params (float64, 1e-12), exact
resumption from a mid-run checkpoint of optimizer + scheduler, and hand-edited hyperparameters
taking effect at the next step."""

import warnings

import pytest
import torch
from torch.optim import lr_scheduler as L

from optim_parity_utils import (
    MagnitudeTracker,
    assert_pair_close,
    build_pair,
    feed_same_grads,
    make_gen,
    roundtrip,
    state_of,
)

DT = torch.float64
STEPS = 120
CKPT = 55


def _seq(o):
    return L.SequentialLR(o, [L.LinearLR(o, 0.1, 1.0, 10), L.ExponentialLR(o, 0.97)], [10])


def _chain(o):
    return L.ChainedScheduler([L.ConstantLR(o, 0.5, 15), L.ExponentialLR(o, 0.98)])


def _warm_lambda(e):
    return min(1.0, (e + 1) / 10) * 0.99**e


def _mult(e):
    return 0.97


SCHEDULERS = {
    "LambdaLR": lambda o: L.LambdaLR(o, [_warm_lambda, lambda e: 0.95**e]),
    "MultiplicativeLR": lambda o: L.MultiplicativeLR(o, _mult),
    "StepLR": lambda o: L.StepLR(o, step_size=10, gamma=0.5),
    "MultiStepLR": lambda o: L.MultiStepLR(o, milestones=[10, 30, 70], gamma=0.3),
    "ConstantLR": lambda o: L.ConstantLR(o, factor=0.25, total_iters=20),
    "LinearLR": lambda o: L.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=30),
    "ExponentialLR": lambda o: L.ExponentialLR(o, gamma=0.98),
    "SequentialLR": _seq,
    "CosineAnnealingLR": lambda o: L.CosineAnnealingLR(o, T_max=40, eta_min=1e-4),
    "ChainedScheduler": _chain,
    "ReduceLROnPlateau": lambda o: L.ReduceLROnPlateau(o, mode="min", factor=0.5, patience=3, cooldown=2),
    "CyclicLR": lambda o: L.CyclicLR(o, base_lr=[1e-3, 2e-3], max_lr=[1e-2, 3e-2], step_size_up=15, cycle_momentum=True),
    "CyclicLR-triangular2": lambda o: L.CyclicLR(o, 1e-3, 1e-2, step_size_up=7, step_size_down=11, mode="triangular2", cycle_momentum=True),
    "CosineAnnealingWarmRestarts": lambda o: L.CosineAnnealingWarmRestarts(o, T_0=10, T_mult=2, eta_min=1e-5),
    "OneCycleLR": lambda o: L.OneCycleLR(o, max_lr=[1e-2, 2e-2], total_steps=STEPS + 10),
    "OneCycleLR-linear-3phase": lambda o: L.OneCycleLR(o, max_lr=1e-2, total_steps=STEPS + 10, anneal_strategy="linear", three_phase=True),
    "PolynomialLR": lambda o: L.PolynomialLR(o, total_iters=80, power=2.0),
}
MOMENTUM_CYCLING = ("CyclicLR", "CyclicLR-triangular2", "OneCycleLR", "OneCycleLR-linear-3phase")


def plateau_metric(t):
    """Piecewise-constant 'validation loss' (independent of the params, so both runs see the same
    value): improves every 12 steps, so ReduceLROnPlateau both waits and reduces."""
    return 1.0 / (1 + t // 12) + (0.01 if t % 12 > 6 else 0.0)


def opt_setup(name, lr_kind):
    lr = 0.01 if lr_kind == "float" else torch.tensor(0.01, dtype=DT)
    lr2 = 0.02 if lr_kind == "float" else torch.tensor(0.02, dtype=DT)
    if name == "SGD":
        ctor = dict(lr=lr, momentum=0.9, weight_decay=1e-3)
        g2 = {"lr": lr2, "momentum": 0.8, "dampening": 0.1}
    else:
        ctor = dict(lr=lr, weight_decay=1e-2, amsgrad=True)
        g2 = {"lr": lr2, "betas": (0.85, 0.99)}
    return ctor, [([(7,), (3, 5)], {}), ([(4, 4)], g2)]


def sched_step(s, t):
    if isinstance(s, L.ReduceLROnPlateau):
        s.step(plateau_metric(t))
    else:
        s.step()


def assert_same_lr(a, b, what):
    """Bit-for-bit equality of an lr / momentum value, including its python type."""
    if torch.is_tensor(b):
        assert torch.is_tensor(a), f"{what}: fusedopt has {type(a).__name__}, torch has a tensor"
        assert a.dtype == b.dtype and torch.equal(a, b), f"{what}: {a} != {b}"
    elif isinstance(b, tuple):
        assert isinstance(a, tuple) and len(a) == len(b), f"{what}: {a!r} != {b!r}"
        for x, y in zip(a, b):
            assert_same_lr(x, y, what)
    else:
        assert type(a) is type(b) and a == b, f"{what}: fusedopt {a!r} != torch {b!r}"


def assert_same_schedule(ref, fo, s_ref, s_fo, what):
    lr_r, lr_f = s_ref.get_last_lr(), s_fo.get_last_lr()
    assert len(lr_r) == len(lr_f)
    for i, (a, b) in enumerate(zip(lr_f, lr_r)):
        assert_same_lr(a, b, f"{what}: get_last_lr()[{i}]")
    for i, (gf, gr) in enumerate(zip(fo.opt.param_groups, ref.opt.param_groups)):
        assert_same_lr(gf["lr"], gr["lr"], f"{what}: param_groups[{i}]['lr']")
        for k in ("momentum", "betas"):
            if k in gr:
                assert_same_lr(gf[k], gr[k], f"{what}: param_groups[{i}][{k!r}]")


def run_side_by_side(name, sched_name, lr_kind, device, steps):
    ctor, groups = opt_setup(name, lr_kind)
    ref, fo = build_pair(name, groups, dtype=DT, device=device, ctor=ctor, seed=31)
    with warnings.catch_warnings(record=True) as w_ref:
        warnings.simplefilter("always")
        s_ref = SCHEDULERS[sched_name](ref.opt)
    with warnings.catch_warnings(record=True) as w_fo:
        warnings.simplefilter("always")
        s_fo = SCHEDULERS[sched_name](fo.opt)
    gen = make_gen(32)
    tr = MagnitudeTracker()
    assert_same_schedule(ref, fo, s_ref, s_fo, "after scheduler construction")
    lrs = []
    with warnings.catch_warnings(record=True) as w_steps:
        warnings.simplefilter("always")
        for t in range(steps):
            feed_same_grads(ref, fo, gen, dtype=DT)
            ref.step()
            fo.step()
            sched_step(s_ref, t)
            sched_step(s_fo, t)
            tr.update(ref)
            assert_same_schedule(ref, fo, s_ref, s_fo, f"{sched_name} step {t}")
            lrs.append([float(g["lr"]) for g in fo.opt.param_groups])
    sched_warnings = [str(x.message) for x in w_fo + w_steps if "lr_scheduler" in str(x.message) or "optimizer.step()" in str(x.message)]
    ref_warnings = [str(x.message) for x in w_ref if "optimizer.step()" in str(x.message)]
    assert sched_warnings == ref_warnings, f"scheduler warnings with fusedopt: {sched_warnings}"
    return ref, fo, s_ref, s_fo, tr, lrs


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_scheduler_drives_fusedopt_like_torch(name, sched_name, lr_kind, device):
    ref, fo, s_ref, s_fo, tr, lrs = run_side_by_side(name, sched_name, lr_kind, device, STEPS)
    assert len({tuple(x) for x in lrs}) > 1, "the schedule should actually change the lr (test sanity)"
    assert_pair_close(ref, fo, DT, f"{name}+{sched_name} after {STEPS} steps", tracker=tr)
    if lr_kind == "tensor":
        assert all(torch.is_tensor(g["lr"]) for g in fo.opt.param_groups)


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
@pytest.mark.parametrize("name", ["SGD", "AdamW"])
def test_checkpoint_mid_run_resumes_exactly(name, sched_name, lr_kind, device):
    """Save optimizer + scheduler state_dicts at step CKPT, rebuild both from scratch (scheduler
    first, then optimizer.load_state_dict, as torch documents), continue: bitwise equal to the
    uninterrupted fusedopt run, and still matching torch."""
    ref, fo, s_ref, s_fo, tr, _ = run_side_by_side(name, sched_name, lr_kind, device, CKPT)
    ckpt = roundtrip({"opt": fo.opt.state_dict(), "sched": s_fo.state_dict(), "params": [p.detach() for p in fo.params]})

    ctor, groups = opt_setup(name, lr_kind)
    _, fo2 = build_pair(name, groups, dtype=DT, device=device, ctor=ctor, seed=999)  # different init on purpose
    with torch.no_grad():
        for p, v in zip(fo2.params, ckpt["params"]):
            p.copy_(v)
    s_fo2 = SCHEDULERS[sched_name](fo2.opt)
    s_fo2.load_state_dict(ckpt["sched"])
    fo2.opt.load_state_dict(ckpt["opt"])

    gen = make_gen(77)
    for t in range(CKPT, STEPS):
        g = [torch.randn(p.shape, generator=gen, dtype=DT).to(device) for p in fo.params]
        for side in (ref, fo, fo2):
            side.set_grads(g)
            side.step()
        for s in (s_ref, s_fo, s_fo2):
            sched_step(s, t)
        tr.update(ref)
        assert_same_schedule(fo, fo2, s_fo, s_fo2, f"resumed {sched_name} step {t}")
    for i, (a, b) in enumerate(zip(fo.params, fo2.params)):
        assert torch.equal(a, b), f"param {i}: resumed run differs from the uninterrupted one"
        for k, v in state_of(fo.opt, a).items():
            assert torch.equal(torch.as_tensor(v).cpu(), torch.as_tensor(state_of(fo2.opt, b)[k]).cpu()), k
    assert_pair_close(ref, fo, DT, "uninterrupted fusedopt vs torch", tracker=tr)


# ------------------------------------------------------------------------ hand-edited hparams
EDITS = {
    "SGD": [
        (5, lambda g, i: g.__setitem__("lr", 0.05 if i == 0 else 0.001)),
        (9, lambda g, i: g.__setitem__("momentum", 0.5)),
        (12, lambda g, i: g.__setitem__("weight_decay", 0.1)),
        (15, lambda g, i: g.__setitem__("dampening", 0.3)),
        (18, lambda g, i: g.__setitem__("maximize", True)),
        (21, lambda g, i: g.__setitem__("momentum", 0.0)),
        (24, lambda g, i: g.__setitem__("momentum", 0.9)),
    ],
    "Adam": [
        (5, lambda g, i: g.__setitem__("lr", 0.05 if i == 0 else 0.001)),
        (9, lambda g, i: g.__setitem__("betas", (0.5, 0.9))),
        (12, lambda g, i: g.__setitem__("weight_decay", 0.2)),
        (15, lambda g, i: g.__setitem__("eps", 1e-3)),
        (18, lambda g, i: g.__setitem__("maximize", True)),
        (21, lambda g, i: g.__setitem__("decoupled_weight_decay", True)),
    ],
    "AdamW": [
        (5, lambda g, i: g.__setitem__("lr", 0.05 if i == 0 else 0.001)),
        (9, lambda g, i: g.__setitem__("betas", (0.5, 0.9))),
        (12, lambda g, i: g.__setitem__("weight_decay", 0.0)),
        (15, lambda g, i: g.__setitem__("eps", 1e-3)),
        (18, lambda g, i: g.__setitem__("maximize", True)),
    ],
}


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_hand_edited_hyperparameters_take_effect_next_step(name, lr_kind, device):
    ctor, groups = opt_setup(name, lr_kind)
    ref, fo = build_pair(name, groups, dtype=DT, device=device, ctor=ctor, seed=41)
    edits = dict(EDITS[name])
    gen = make_gen(42)
    tr = MagnitudeTracker()
    for t in range(30):
        if t in edits:
            for side in (ref, fo):
                for i, g in enumerate(side.opt.param_groups):
                    if t == 5 and torch.is_tensor(g["lr"]):
                        g["lr"].fill_(0.05 if i == 0 else 0.001)  # in-place, like the schedulers do
                    else:
                        edits[t](g, i)
        if t == 27:  # and a tensor lr replaced by a float (or the reverse)
            for side in (ref, fo):
                g = side.opt.param_groups[1]
                g["lr"] = float(g["lr"]) if torch.is_tensor(g["lr"]) else torch.tensor(g["lr"], dtype=DT)
        feed_same_grads(ref, fo, gen, dtype=DT)
        before = [p.detach().clone() for p in fo.params]
        ref.step()
        fo.step()
        tr.update(ref)
        assert_pair_close(ref, fo, DT, f"{name} step {t} (edits at {sorted(edits)})", tracker=tr)
        assert any(not torch.equal(b, p) for b, p in zip(before, fo.params))
