"""Bad arguments give clear ValueError / TypeError messages and leave the optimizer untouched."""

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR

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

# (constructor taking the optimizer, expected exception, match) -- the optimizer has lrs 0.1 / 0.03
CASES = {
    "piecewise_not_increasing": (
        lambda o: PiecewiseDecay(o, [10, 5], [1.0, 0.5, 0.1]),
        ValueError,
        r"Expected strictly increasing boundaries, but got \[10, 5\]",
    ),
    "piecewise_repeated_boundary": (
        lambda o: PiecewiseDecay(o, [10, 10], [1.0, 0.5, 0.1]),
        ValueError,
        r"strictly increasing",
    ),
    "piecewise_length_mismatch": (
        lambda o: PiecewiseDecay(o, [10, 20], [1.0, 0.5]),
        ValueError,
        r"Expected len\(values\) == len\(boundaries\) \+ 1, but got 2 values for 2 boundaries",
    ),
    "piecewise_negative_boundary": (
        lambda o: PiecewiseDecay(o, [-1], [1.0, 0.5]),
        ValueError,
        r"Expected non-negative integer boundaries\[0\], but got -1",
    ),
    "piecewise_float_boundary": (
        lambda o: PiecewiseDecay(o, [1.5], [1.0, 0.5]),
        TypeError,
        r"Expected integer boundaries\[0\], but got 1.5 of type float",
    ),
    "piecewise_boundaries_not_list": (
        lambda o: PiecewiseDecay(o, 10, [1.0, 0.5]),
        TypeError,
        r"Expected boundaries to be a list of integers, but got int",
    ),
    "piecewise_value_type": (
        lambda o: PiecewiseDecay(o, [10], [1.0, "0.5"]),
        TypeError,
        r"Expected a real number for values\[1\], but got '0.5' of type str",
    ),
    "piecewise_negative_value": (
        lambda o: PiecewiseDecay(o, [10], [1.0, -0.5]),
        ValueError,
        r"Expected non-negative values\[1\], but got -0.5",
    ),
    "natural_exp_negative_gamma": (
        lambda o: NaturalExpDecay(o, gamma=-0.1),
        ValueError,
        r"Expected non-negative gamma, but got -0.1",
    ),
    "natural_exp_gamma_type": (
        lambda o: NaturalExpDecay(o, gamma="0.1"),
        TypeError,
        r"Expected a real number for gamma, but got '0.1' of type str",
    ),
    "natural_exp_nan_gamma": (
        lambda o: NaturalExpDecay(o, gamma=float("nan")),
        ValueError,
        r"Expected finite gamma, but got nan",
    ),
    "inverse_time_negative_gamma": (
        lambda o: InverseTimeDecay(o, gamma=-1),
        ValueError,
        r"Expected non-negative gamma, but got -1.0",
    ),
    "poly_zero_steps": (
        lambda o: PolynomialDecay(o, decay_steps=0),
        ValueError,
        r"Expected positive integer decay_steps, but got 0",
    ),
    "poly_end_above_initial": (
        lambda o: PolynomialDecay(o, decay_steps=10, end_lr=0.05),
        ValueError,
        r"Expected end_lr <= the initial lr of every param group, but got end_lr=0.05 > 0.03 \(param group 1\)",
    ),
    "poly_zero_power": (
        lambda o: PolynomialDecay(o, decay_steps=10, power=0),
        ValueError,
        r"Expected positive power, but got 0.0",
    ),
    "poly_cycle_type": (
        lambda o: PolynomialDecay(o, decay_steps=10, cycle="yes"),
        TypeError,
        r"Expected bool cycle, but got 'yes' of type str",
    ),
    "noam_bad_d_model": (
        lambda o: NoamDecay(o, d_model=0, warmup_steps=10),
        ValueError,
        r"Expected positive integer d_model, but got 0",
    ),
    "noam_negative_warmup": (
        lambda o: NoamDecay(o, d_model=512, warmup_steps=-1),
        ValueError,
        r"Expected positive integer warmup_steps, but got -1",
    ),
    "noam_bool_warmup": (
        lambda o: NoamDecay(o, d_model=512, warmup_steps=True),
        TypeError,
        r"Expected integer warmup_steps, but got True of type bool",
    ),
    "warmup_negative_steps": (
        lambda o: LinearWarmup(o, warmup_steps=-1, start_lr=0.0, end_lr=0.1),
        ValueError,
        r"Expected positive integer warmup_steps, but got -1",
    ),
    "warmup_start_above_end": (
        lambda o: LinearWarmup(o, warmup_steps=5, start_lr=0.2, end_lr=0.1),
        ValueError,
        r"Expected start_lr <= end_lr of every param group, but got start_lr=0.2 > 0.1 \(param group 0\)",
    ),
    "warmup_per_group_length": (
        lambda o: LinearWarmup(o, warmup_steps=5, start_lr=0.0, end_lr=[0.1, 0.05, 0.01]),
        ValueError,
        r"Expected end_lr to be a number or a sequence with one value per param group \(2\), but got 3 values",
    ),
    "warmup_negative_start": (
        lambda o: LinearWarmup(o, warmup_steps=5, start_lr=-0.1, end_lr=0.1),
        ValueError,
        r"Expected non-negative start_lr, but got -0.1",
    ),
    "warmup_after_type": (
        lambda o: LinearWarmup(o, 5, 0.0, 0.1, after="cosine"),
        TypeError,
        r"Expected after to be an LRScheduler or None, but got str",
    ),
    "warmup_after_other_optimizer": (
        lambda o: LinearWarmup(
            o, 5, 0.0, 0.1, after=CosineAnnealingLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), 10)
        ),
        ValueError,
        r"LinearWarmup expects `after` \(CosineAnnealingLR\) to be built on the same optimizer",
    ),
    "cosine_total_not_after_warmup": (
        lambda o: WarmupCosine(o, warmup_steps=10, total_steps=10),
        ValueError,
        r"Expected total_steps > warmup_steps, but got total_steps=10 and warmup_steps=10",
    ),
    "cosine_negative_warmup": (
        lambda o: WarmupCosine(o, warmup_steps=-5, total_steps=10),
        ValueError,
        r"Expected non-negative integer warmup_steps, but got -5",
    ),
    "cosine_min_above_initial": (
        lambda o: WarmupCosine(o, warmup_steps=1, total_steps=10, min_lr=0.5),
        ValueError,
        r"Expected min_lr <= the initial lr of every param group, but got min_lr=0.5 > 0.1 \(param group 0\)",
    ),
    "wsd_unknown_decay": (
        lambda o: WarmupStableDecay(o, 1, 1, 10, decay="exp"),
        ValueError,
        r"Expected decay to be one of \('linear', 'cosine', 'sqrt'\), but got 'exp'",
    ),
    "wsd_decay_type": (
        lambda o: WarmupStableDecay(o, 1, 1, 10, decay=1),
        TypeError,
        r"Expected str decay, but got 1 of type int",
    ),
    "wsd_zero_decay_steps": (
        lambda o: WarmupStableDecay(o, 1, 1, 0),
        ValueError,
        r"Expected positive integer decay_steps, but got 0",
    ),
    "wsd_negative_stable": (
        lambda o: WarmupStableDecay(o, 1, -3, 10),
        ValueError,
        r"Expected non-negative integer stable_steps, but got -3",
    ),
    "bad_last_epoch": (
        lambda o: NaturalExpDecay(o, gamma=0.1, last_epoch=-2),
        ValueError,
        r"Expected integer last_epoch >= -1, but got -2",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_arguments(name, make_optimizer):
    build, exc, match = CASES[name]
    opt = make_optimizer()
    with pytest.raises(exc, match=match):
        build(opt)
    # Rejected before LRScheduler.__init__: lrs untouched, no initial_lr recorded.
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.03]
    if name != "warmup_after_other_optimizer":
        assert all("initial_lr" not in g for g in opt.param_groups)


@pytest.mark.parametrize(
    "cls, args",
    [
        (PiecewiseDecay, ([1], [0.1, 0.01])),
        (NaturalExpDecay, (0.1,)),
        (InverseTimeDecay, (0.1,)),
        (PolynomialDecay, (10,)),
        (NoamDecay, (64, 10)),
        (LinearWarmup, (5, 0.0, 0.1)),
        (WarmupCosine, (5, 10)),
        (WarmupStableDecay, (1, 1, 10)),
    ],
)
def test_optimizer_type_is_checked(cls, args):
    with pytest.raises(TypeError, match=r"^list is not an Optimizer$"):
        cls([torch.zeros(1)], *args)


def test_resume_without_initial_lr_is_torch_key_error(make_optimizer):
    opt = make_optimizer()
    with pytest.raises(KeyError, match="initial_lr"):
        WarmupCosine(opt, 5, 10, last_epoch=3)


def test_zero_dim_tensor_hyperparameter_is_accepted(make_optimizer):
    opt = make_optimizer()
    sched = NaturalExpDecay(opt, gamma=torch.tensor(0.5))
    assert sched.gamma == 0.5 and isinstance(sched.gamma, float)
