"""state_dict / load_state_dict mid-run: a fresh optimizer + scheduler that load both
states continue on exactly the same trajectory as the original."""

import io

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, ExponentialLR, ReduceLROnPlateau, SequentialLR, StepLR

from fusedopt.lr_scheduler import (
    InverseTimeDecay,
    LinearWarmup,
    NaturalExpDecay,
    NoamDecay,
    PiecewiseDecay,
    PolynomialDecay,
    WarmupCosine,
    WarmupStableDecay,
)


def plateau_metric(t):
    return 1.0 / (1 + t // 7)  # improves every 7 steps, flat in between


FACTORIES = {
    "piecewise": lambda o: PiecewiseDecay(o, [5, 15], [0.3, 0.2, 0.1]),
    "natural_exp": lambda o: NaturalExpDecay(o, gamma=0.05),
    "inverse_time": lambda o: InverseTimeDecay(o, gamma=0.2),
    "poly_cycle": lambda o: PolynomialDecay(o, decay_steps=9, end_lr=0.001, power=1.5, cycle=True),
    "noam": lambda o: NoamDecay(o, d_model=32, warmup_steps=8),
    "warmup_cosine": lambda o: WarmupCosine(o, warmup_steps=6, total_steps=30, min_lr=0.002),
    "wsd_sqrt": lambda o: WarmupStableDecay(o, 5, 10, 12, min_lr=0.001, decay="sqrt"),
    "warmup_only": lambda o: LinearWarmup(o, 10, [0.0, 0.001], [0.05, 0.02]),
    "warmup_cosine_after": lambda o: LinearWarmup(o, 10, 0.0, 0.05, after=CosineAnnealingLR(o, T_max=15)),
    "warmup_step_after": lambda o: LinearWarmup(o, 10, 0.0, [0.05, 0.02], after=StepLR(o, 4, gamma=0.7)),
    "warmup_plateau_after": lambda o: LinearWarmup(
        o, 10, 0.0, 0.05, after=ReduceLROnPlateau(o, factor=0.5, patience=2)
    ),
    "sequential_with_warmup": lambda o: SequentialLR(
        o, [LinearWarmup(o, 6, 0.0, 0.05), ExponentialLR(o, gamma=0.9)], milestones=[12]
    ),
}


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf)  # weights_only: the states are plain Python data


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("split", [3, 13])  # inside and after the warmups
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_resume_mid_run(name, split, kind, make_optimizer, run):
    factory = FACTORIES[name]
    metrics = plateau_metric if "plateau" in name else None
    total = 40

    opt = make_optimizer(kind=kind)
    sched = factory(opt)
    reference = run(opt, sched, total, metrics=metrics)

    opt = make_optimizer(kind=kind)
    sched = factory(opt)
    head = run(opt, sched, split + 1, metrics=metrics)  # steps 0 .. split
    saved_opt = _roundtrip(opt.state_dict())
    saved_sched = _roundtrip(sched.state_dict())

    new_opt = make_optimizer(kind=kind)
    new_sched = factory(new_opt)  # built first, then the optimizer state, like torch recommends
    new_opt.load_state_dict(saved_opt)
    new_sched.load_state_dict(saved_sched)
    assert new_sched.last_epoch == split
    tail = run(new_opt, new_sched, total - split, metrics=metrics, t0=split)

    assert head[:-1] + tail == reference
    # and the optimizer itself continued identically (momentum / Adam moments restored)
    assert new_opt.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


def test_load_does_not_alias_saved_state(make_optimizer, run):
    opt = make_optimizer()
    sched = LinearWarmup(opt, 4, 0.0, 0.05, after=CosineAnnealingLR(opt, T_max=10))
    run(opt, sched, 7)
    state = sched.state_dict()
    keys = set(state)
    sched.load_state_dict(state)
    assert set(state) == keys  # "after" not popped from the caller's dict
    run(opt, sched, 5, t0=6)
    assert state["last_epoch"] == 6 and state["after"]["last_epoch"] == 2
