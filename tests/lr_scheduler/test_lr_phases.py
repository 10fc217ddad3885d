"""kernel_phases / evaluate_phases: the phase descriptions reproduce the host trajectory."""

import math

import pytest
import torch
from torch.optim import lr_scheduler as tls

from fusedopt.lr_scheduler import (
    PHASE_KINDS,
    InverseTimeDecay,
    LinearWarmup,
    NaturalExpDecay,
    NoamDecay,
    PiecewiseDecay,
    PolynomialDecay,
    WarmupCosine,
    WarmupStableDecay,
    evaluate_phases,
    kernel_phases,
    supports_kernel_phases,
)

STEPS = 320


def test_phase_kinds_mapping():
    assert PHASE_KINDS == {
        "CONSTANT": 0,
        "LINEAR": 1,
        "COSINE": 2,
        "STEP_EXP": 3,
        "POLY": 4,
        "NATURAL_EXP": 5,
        "INVERSE_TIME": 6,
        "NOAM": 7,
        "SQRT_DECAY": 8,
    }


def ph(start, kind, a=0.0, b=0.0, n=0.0, gamma=0.0, power=0.0, flag=0.0):
    return (float(start), float(PHASE_KINDS[kind]), a, b, n, gamma, power, flag)


# (phase, u, expected) with hand-computed expectations; every phase starts at 0 so t = u.
EVALUATE_CASES = [
    (ph(0, "CONSTANT", a=0.25), 7, 0.25),
    (ph(0, "LINEAR", a=0.0, b=1.0, n=4), 1, 0.25),
    (ph(0, "LINEAR", a=0.0, b=1.0, n=4), 4, 1.0),
    (ph(0, "LINEAR", a=0.0, b=1.0, n=4), 9, 1.0),  # clamped
    (ph(0, "LINEAR", a=1.0, b=0.2, n=8), 2, 0.8),
    (ph(0, "COSINE", a=1.0, b=0.0, n=10, flag=1), 5, 0.5),
    (ph(0, "COSINE", a=1.0, b=0.0, n=10, flag=1), 10, 0.0),
    (ph(0, "COSINE", a=1.0, b=0.0, n=10, flag=1), 15, 0.0),  # clamped: holds b
    (ph(0, "COSINE", a=1.0, b=0.0, n=10, flag=0), 15, 0.5),  # unclamped: back up
    (ph(0, "COSINE", a=1.0, b=0.0, n=10, flag=0), 20, 1.0),
    (ph(0, "STEP_EXP", a=1.0, n=3, gamma=0.5), 2, 1.0),
    (ph(0, "STEP_EXP", a=1.0, n=3, gamma=0.5), 3, 0.5),
    (ph(0, "STEP_EXP", a=1.0, n=3, gamma=0.5), 6, 0.25),
    (ph(0, "POLY", a=1.0, b=0.0, n=10, power=2.0), 5, 0.25),
    (ph(0, "POLY", a=1.0, b=0.1, n=10, power=1.0), 15, 0.1),  # clamped
    (ph(0, "POLY", a=1.0, b=0.0, n=10, power=1.0, flag=1), 0, 1.0),  # H = n at u = 0
    (ph(0, "POLY", a=1.0, b=0.0, n=10, power=1.0, flag=1), 10, 0.0),  # cycle edge
    (ph(0, "POLY", a=1.0, b=0.0, n=10, power=1.0, flag=1), 11, 0.45),  # H = 20
    (ph(0, "POLY", a=1.0, b=0.0, n=10, power=1.0, flag=1), 25, 1.0 / 6.0),  # H = 30
    (ph(0, "NATURAL_EXP", a=2.0, gamma=0.5), 2, 2.0 / math.e),
    (ph(0, "INVERSE_TIME", a=1.0, gamma=0.5), 6, 0.25),
    (ph(0, "NOAM", a=2.0, n=4), 0, 0.0),
    (ph(0, "NOAM", a=2.0, n=4), 2, 0.5),  # 2 * min(2^-0.5, 2/8)
    (ph(0, "NOAM", a=2.0, n=4), 4, 1.0),  # peak: both terms 0.5
    (ph(0, "NOAM", a=2.0, n=4), 16, 0.5),  # 2 * 16^-0.5
    (ph(0, "SQRT_DECAY", a=1.0, b=0.2, n=16), 4, 0.6),  # 0.2 + 0.8 * (1 - 0.5)
    (ph(0, "SQRT_DECAY", a=1.0, b=0.2, n=16), 40, 0.2),
]


@pytest.mark.parametrize("phase, t, expected", EVALUATE_CASES)
def test_evaluate_each_kind(phase, t, expected):
    assert evaluate_phases([phase], t) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_evaluate_picks_last_phase_started():
    phases = [ph(0, "CONSTANT", a=1.0), ph(10, "LINEAR", a=1.0, b=0.0, n=10), ph(30, "CONSTANT", a=0.3)]
    assert evaluate_phases(phases, 9) == 1.0
    assert evaluate_phases(phases, 10) == 1.0  # u = 0 of the linear phase
    assert evaluate_phases(phases, 15) == pytest.approx(0.5)
    assert evaluate_phases(phases, 29) == pytest.approx(0.0)
    assert evaluate_phases(phases, 30) == 0.3
    assert evaluate_phases(phases, 10**6) == 0.3


def test_evaluate_errors():
    with pytest.raises(ValueError, match=r"Expected non-negative step t, but got -1"):
        evaluate_phases([ph(0, "CONSTANT", a=1.0)], -1)
    with pytest.raises(ValueError, match=r"No phase starts at or before step 3"):
        evaluate_phases([ph(5, "CONSTANT", a=1.0)], 3)
    with pytest.raises(ValueError, match=r"Unknown phase kind 42"):
        evaluate_phases([(0.0, 42.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)], 0)
    with pytest.raises(ValueError, match=r"Expected phases of 8 floats"):
        evaluate_phases([(0.0, 0.0, 1.0)], 0)


# ---- host trajectory == phases, for every supported scheduler ------------------------



def close(a, b):
    return abs(a - b) <= 1e-6 * max(abs(a), abs(b)) + 1e-15


def check_phases_structure(phases, num_groups):
    assert len(phases) == num_groups
    for group in phases:
        assert group, "empty phase list"
        assert group[0][0] == 0.0
        for p in group:
            assert isinstance(p, tuple) and len(p) == 8 and all(type(x) is float for x in p)
            assert int(p[1]) in PHASE_KINDS.values()
        starts = [p[0] for p in group]
        assert starts == sorted(set(starts)), f"starts not strictly increasing: {starts}"


def test_phases_reproduce_host_trajectory(schedule_case, make_optimizer, run, recwarn):
    name, factory = schedule_case
    opt = make_optimizer(kind="adam" if len(name) % 2 else "sgd")
    sched = factory(opt)
    phases = kernel_phases(sched)
    check_phases_structure(phases, 2)
    assert supports_kernel_phases(sched)
    traj = run(opt, sched, STEPS)
    mismatches = [
        (t, g, traj[t][g], evaluate_phases(phases[g], t))
        for t in range(STEPS)
        for g in range(2)
        if not close(traj[t][g], evaluate_phases(phases[g], t))
    ]
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:3]}"
    # Phases describe every t >= 0 from the hyper-parameters: same answer mid-run.
    assert kernel_phases(sched) == phases


def test_phases_for_two_groups_differ(make_optimizer):
    opt = make_optimizer()
    phases = kernel_phases(WarmupCosine(opt, warmup_steps=10, total_steps=100, min_lr=0.001))
    assert phases == [
        [ph(0, "LINEAR", a=0.0, b=0.1, n=10.0), ph(10, "COSINE", a=0.1, b=0.001, n=90.0, flag=1.0)],
        [ph(0, "LINEAR", a=0.0, b=0.03, n=10.0), ph(10, "COSINE", a=0.03, b=0.001, n=90.0, flag=1.0)],
    ]


def test_sequential_phases_are_offset_by_milestones(make_optimizer):
    opt = make_optimizer(lrs=(1.0,))
    sched = tls.SequentialLR(opt, [tls.ConstantLR(opt, 0.5, 100), tls.StepLR(opt, 25, 0.7)], milestones=[30])
    assert kernel_phases(sched) == [
        [ph(0, "CONSTANT", a=0.5), ph(30, "STEP_EXP", a=1.0, n=25.0, gamma=0.7)],
    ]


class MyStepLR(tls.StepLR):
    pass


UNSUPPORTED = {
    "LambdaLR": lambda o: tls.LambdaLR(o, lambda t: 0.9**t),
    "MultiplicativeLR": lambda o: tls.MultiplicativeLR(o, lambda t: 0.9),
    "ReduceLROnPlateau": lambda o: tls.ReduceLROnPlateau(o),
    "CyclicLR": lambda o: tls.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=10),
    "OneCycleLR": lambda o: tls.OneCycleLR(o, max_lr=0.1, total_steps=100),
    "ChainedScheduler": lambda o: tls.ChainedScheduler([tls.StepLR(o, 10), tls.ExponentialLR(o, 0.9)]),
    "CosineAnnealingWarmRestarts": lambda o: tls.CosineAnnealingWarmRestarts(o, T_0=10),
    "MyStepLR": lambda o: MyStepLR(o, step_size=10),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_schedulers_raise_type_error(name, make_optimizer):
    opt = make_optimizer()
    sched = UNSUPPORTED[name](opt)
    with pytest.raises(TypeError, match=rf"^{name} has no closed form: its learning rate stays on the host"):
        kernel_phases(sched)
    assert not supports_kernel_phases(sched)


def test_unsupported_inside_supported_raise_type_error(make_optimizer):
    opt = make_optimizer()
    warm = LinearWarmup(opt, 5, 0.0, 0.05, after=tls.ReduceLROnPlateau(opt))
    with pytest.raises(TypeError, match=r"LinearWarmup\(after=ReduceLROnPlateau\).*ReduceLROnPlateau has no closed form"):
        kernel_phases(warm)
    opt = make_optimizer()
    seq = tls.SequentialLR(opt, [tls.StepLR(opt, 10), tls.LambdaLR(opt, lambda t: 1.0)], milestones=[5])
    with pytest.raises(TypeError, match=r"SequentialLR: scheduler at index 1: LambdaLR has no closed form"):
        kernel_phases(seq)


def test_nested_sequential_raises_type_error(make_optimizer):
    opt = make_optimizer()
    inner = tls.SequentialLR(opt, [tls.LinearLR(opt, 0.2, 1.0, 10), tls.ConstantLR(opt, 0.5, 30)], milestones=[10])
    opt.step()  # the outer constructor steps the inner one
    outer = tls.SequentialLR(opt, [inner, tls.PolynomialLR(opt, total_iters=100)], milestones=[60])
    with pytest.raises(TypeError, match=r"SequentialLR nested in SequentialLR \(index 0\) has no closed form"):
        kernel_phases(outer)


def test_non_scheduler_raises_type_error():
    with pytest.raises(TypeError, match=r"Expected an LRScheduler, but got str"):
        kernel_phases("StepLR")


def test_degenerate_torch_arguments_raise_value_error(make_optimizer):
    opt = make_optimizer()
    with pytest.raises(ValueError, match=r"ConstantLR with total_iters=0"):
        kernel_phases(tls.ConstantLR(opt, factor=0.5, total_iters=0))


def test_evaluate_phases_is_plain_python(make_optimizer):
    """The reference evaluator returns Python floats (no tensors), also for tensor lrs."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=torch.tensor(0.1), foreach=False)
    phases = kernel_phases(tls.StepLR(opt, 10, 0.5))
    assert phases == [[ph(0, "STEP_EXP", a=pytest.approx(0.1), n=10.0, gamma=0.5)]]
    assert type(evaluate_phases(phases[0], 25)) is float
