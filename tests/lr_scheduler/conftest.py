"""Shared fixtures for the fusedopt.lr_scheduler tests (CPU only, torch optimizers only)."""

import pytest
import torch

#: Two param groups with different initial learning rates.
LRS = (0.1, 0.03)


def _make_optimizer(lrs=LRS, kind="sgd"):
    groups = [{"params": [torch.nn.Parameter(torch.zeros(3))], "lr": lr} for lr in lrs]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lrs[0], momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lrs[0])
    raise ValueError(kind)


def _run(optimizer, scheduler, steps, metrics=None, t0=0):
    """Group lrs at steps ``t0 .. t0 + steps - 1`` as ``lrs[i][g]``, in training-loop order.

    Records the current lrs (the scheduler being at step ``t0``), then repeats
    ``optimizer.step(); scheduler.step()`` (``scheduler.step(metrics(t))`` when
    ``metrics`` is given, ``t`` being the step the scheduler moves to).
    """
    out = [[float(g["lr"]) for g in optimizer.param_groups]]
    for t in range(t0 + 1, t0 + steps):
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.ones_like(p)
        optimizer.step()
        if metrics is None:
            scheduler.step()
        else:
            scheduler.step(metrics(t))
        out.append([float(g["lr"]) for g in optimizer.param_groups])
    return out


@pytest.fixture
def make_optimizer():
    """``make_optimizer(lrs=(0.1, 0.03), kind="sgd"|"adam")``: one param group per lr."""
    return _make_optimizer


@pytest.fixture
def run():
    """``run(optimizer, scheduler, steps, metrics=None, t0=0) -> lrs[i][g]`` (step ``t0 + i``)."""
    return _run


@pytest.fixture
def lrs():
    return LRS


# -- closed-form schedules every in-kernel path must reproduce (name -> factory(optimizer)) --

from torch.optim import lr_scheduler as tls  # noqa: E402

from fusedopt.lr_scheduler import (  # noqa: E402
    InverseTimeDecay,
    LinearWarmup,
    NaturalExpDecay,
    NoamDecay,
    PiecewiseDecay,
    PolynomialDecay,
    WarmupCosine,
    WarmupStableDecay,
)

SUPPORTED = {
    # fusedopt
    "PiecewiseDecay": lambda o: PiecewiseDecay(o, [40, 90, 200], [0.3, 0.1, 0.05, 0.01]),
    "PiecewiseDecay_boundary0": lambda o: PiecewiseDecay(o, [0, 100], [0.3, 0.1, 0.05]),
    "NaturalExpDecay": lambda o: NaturalExpDecay(o, gamma=0.01),
    "InverseTimeDecay": lambda o: InverseTimeDecay(o, gamma=0.05),
    "PolynomialDecay": lambda o: PolynomialDecay(o, decay_steps=150, end_lr=0.001, power=2.0),
    "PolynomialDecay_cycle": lambda o: PolynomialDecay(o, decay_steps=70, end_lr=0.002, power=0.5, cycle=True),
    "NoamDecay": lambda o: NoamDecay(o, d_model=128, warmup_steps=40),
    "WarmupCosine": lambda o: WarmupCosine(o, warmup_steps=30, total_steps=250, min_lr=0.001),
    "WarmupCosine_no_warmup": lambda o: WarmupCosine(o, warmup_steps=0, total_steps=200),
    "WSD_linear": lambda o: WarmupStableDecay(o, 20, 100, 120, min_lr=0.001, decay="linear"),
    "WSD_cosine": lambda o: WarmupStableDecay(o, 20, 100, 120, decay="cosine"),
    "WSD_sqrt_no_warmup_no_stable": lambda o: WarmupStableDecay(o, 0, 0, 250, min_lr=0.002, decay="sqrt"),
    "LinearWarmup": lambda o: LinearWarmup(o, 25, [0.0, 0.001], [0.05, 0.02]),
    "LinearWarmup_cosine": lambda o: LinearWarmup(
        o, 25, 0.0, [0.05, 0.02], after=tls.CosineAnnealingLR(o, T_max=100, eta_min=0.001)
    ),
    "LinearWarmup_steplr": lambda o: LinearWarmup(o, 10, 0.001, 0.08, after=tls.StepLR(o, 30, gamma=0.6)),
    "LinearWarmup_linearlr": lambda o: LinearWarmup(o, 10, 0.0, 0.08, after=tls.LinearLR(o, 0.5, 1.0, 20)),
    "LinearWarmup_wsd": lambda o: LinearWarmup(o, 10, 0.0, 0.08, after=WarmupStableDecay(o, 0, 50, 100)),
    "LinearWarmup_sequential": lambda o: LinearWarmup(
        o,
        10,
        0.0,
        0.08,
        after=tls.SequentialLR(o, [tls.ConstantLR(o, 0.5, 20), tls.ExponentialLR(o, 0.99)], milestones=[50]),
    ),
    # torch
    "StepLR": lambda o: tls.StepLR(o, step_size=45, gamma=0.5),
    "MultiStepLR": lambda o: tls.MultiStepLR(o, milestones=[30, 80, 80, 250], gamma=0.3),
    "MultiStepLR_milestone0": lambda o: tls.MultiStepLR(o, milestones=[0, 100], gamma=0.5),
    "ExponentialLR": lambda o: tls.ExponentialLR(o, gamma=0.99),
    "CosineAnnealingLR": lambda o: tls.CosineAnnealingLR(o, T_max=100, eta_min=0.001),  # 3 half-periods
    "CosineAnnealingLR_eta0": lambda o: tls.CosineAnnealingLR(o, T_max=150),
    "LinearLR_up": lambda o: tls.LinearLR(o, start_factor=0.1, end_factor=1.0, total_iters=60),
    "LinearLR_down": lambda o: tls.LinearLR(o, start_factor=1.0, end_factor=0.05, total_iters=200),
    "ConstantLR": lambda o: tls.ConstantLR(o, factor=0.25, total_iters=35),
    "PolynomialLR": lambda o: tls.PolynomialLR(o, total_iters=180, power=2.0),
    "SequentialLR": lambda o: tls.SequentialLR(
        o, [tls.LinearLR(o, 0.1, 1.0, 20), tls.CosineAnnealingLR(o, T_max=200, eta_min=0.001)], milestones=[20]
    ),
    "SequentialLR_three": lambda o: tls.SequentialLR(
        o,
        [tls.ConstantLR(o, 0.5, 100), tls.StepLR(o, 25, 0.7), tls.ExponentialLR(o, 0.98)],
        milestones=[30, 150],  # ConstantLR cut before its own total_iters
    ),
    "SequentialLR_fusedopt": lambda o: tls.SequentialLR(
        o, [LinearWarmup(o, 15, 0.0, 0.05), WarmupCosine(o, 0, 200, min_lr=0.001)], milestones=[40]
    ),
    "SequentialLR_milestone0": lambda o: tls.SequentialLR(
        o, [tls.StepLR(o, 10, 0.5), tls.ExponentialLR(o, 0.99)], milestones=[0]
    ),
    "SequentialLR_warmup_with_after": lambda o: tls.SequentialLR(
        o,
        [
            LinearWarmup(o, 10, 0.0, [0.05, 0.02], after=tls.CosineAnnealingLR(o, T_max=60)),
            tls.ExponentialLR(o, 0.98),
        ],
        milestones=[100],
    ),
    "SequentialLR_warmup_second": lambda o: tls.SequentialLR(  # LinearWarmup restarted by _update_lr(0)
        o,
        [tls.ConstantLR(o, 0.5, 10), LinearWarmup(o, 10, 0.0, 0.05, after=tls.ExponentialLR(o, 0.98))],
        milestones=[30],
    ),
}


def pytest_generate_tests(metafunc):
    if "schedule_case" in metafunc.fixturenames:
        names = sorted(SUPPORTED)
        metafunc.parametrize("schedule_case", [(n, SUPPORTED[n]) for n in names], ids=names)
