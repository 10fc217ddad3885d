r"""Phase descriptions of closed-form schedules, for evaluating the lr inside a fused kernel.

A schedule is described per param group as a list of *phases*, each a tuple of
8 floats ``(start_step, kind, a, b, n, gamma, power, flag)``.  At step ``t``
the active phase is the last one with ``start_step <= t``; with
``u = t - start_step`` the learning rate is, by ``kind``:

======  ==============  ======================================================
 kind   name            learning rate
======  ==============  ======================================================
 0      CONSTANT        ``a``
 1      LINEAR          ``a + (b - a) * min(u, n) / n``
 2      COSINE          ``b + (a - b) * (1 + cos(pi * v / n)) / 2``,
                        ``v = min(u, n)`` if ``flag == 1`` else ``u``
 3      STEP_EXP        ``a * gamma ** floor(u / n)``
 4      POLY            ``(a - b) * (1 - min(u, n) / n) ** power + b``; with
                        ``flag == 1`` (cycle) ``H = n * ceil(u / n)``
                        (``H = n`` at ``u = 0``) and
                        ``(a - b) * (1 - u / H) ** power + b``
 5      NATURAL_EXP     ``a * exp(-gamma * u)``
 6      INVERSE_TIME    ``a / (1 + gamma * u)``
 7      NOAM            ``a * min(u ** -0.5, u * n ** -1.5)``, 0 at ``u = 0``
 8      SQRT_DECAY      ``b + (a - b) * (1 - sqrt(min(u, n) / n))``
======  ==============  ======================================================

:func:`kernel_phases` guarantees that every group's list is non-empty, starts
at step 0 and has strictly increasing ``start_step``\ s, and that the phases
give the lr the scheduler produces at *every* step ``t >= 0`` when it is
stepped once per step from construction (they depend only on the scheduler's
hyper-parameters and ``base_lrs``, not on its current ``last_epoch``).
:func:`evaluate_phases` is the reference evaluator.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Sequence

from torch.optim import lr_scheduler as tls

from fusedopt.lr_scheduler.schedulers import (
    InverseTimeDecay,
    LinearWarmup,
    NaturalExpDecay,
    NoamDecay,
    PiecewiseDecay,
    PolynomialDecay,
    WarmupCosine,
    WarmupStableDecay,
)

__all__ = ["PHASE_KINDS", "Phase", "kernel_phases", "evaluate_phases", "supports_kernel_phases"]

#: Phase kind name -> the integer stored in a phase's ``kind`` field.
PHASE_KINDS: dict[str, int] = {
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

#: ``(start_step, kind, a, b, n, gamma, power, flag)``, all floats.
Phase = tuple[float, float, float, float, float, float, float, float]

CONSTANT = PHASE_KINDS["CONSTANT"]
LINEAR = PHASE_KINDS["LINEAR"]
COSINE = PHASE_KINDS["COSINE"]
STEP_EXP = PHASE_KINDS["STEP_EXP"]
POLY = PHASE_KINDS["POLY"]
NATURAL_EXP = PHASE_KINDS["NATURAL_EXP"]
INVERSE_TIME = PHASE_KINDS["INVERSE_TIME"]
NOAM = PHASE_KINDS["NOAM"]
SQRT_DECAY = PHASE_KINDS["SQRT_DECAY"]


def _phase(
    start: float,
    kind: int,
    a: float = 0.0,
    b: float = 0.0,
    n: float = 0.0,
    gamma: float = 0.0,
    power: float = 0.0,
    flag: float = 0.0,
) -> Phase:
    return tuple(float(x) for x in (start, kind, a, b, n, gamma, power, flag))  # type: ignore[return-value]


def _normalize(phases: list[Phase]) -> list[Phase]:
    """Sort by start (stable) and drop phases superseded by a later one with the same start."""
    out: list[Phase] = []
    for p in sorted(phases, key=lambda p: p[0]):
        if out and out[-1][0] == p[0]:
            out[-1] = p
        else:
            out.append(p)
    return out


def _shift(phases: Sequence[Phase], offset: float) -> list[Phase]:
    return [(p[0] + offset, *p[1:]) for p in phases]  # type: ignore[misc]


def _per_group(scheduler: tls.LRScheduler, fn: Callable[[float], list[Phase]]) -> list[list[Phase]]:
    return [fn(float(base_lr)) for base_lr in scheduler.base_lrs]


# ---- fusedopt schedulers -------------------------------------------------------------


def _piecewise(s: PiecewiseDecay) -> list[list[Phase]]:
    starts = [0, *s.boundaries]
    phases = [_phase(start, CONSTANT, a=value) for start, value in zip(starts, s.values)]
    return [_normalize(list(phases)) for _ in s.base_lrs]


def _natural_exp(s: NaturalExpDecay) -> list[list[Phase]]:
    return _per_group(s, lambda lr0: [_phase(0, NATURAL_EXP, a=lr0, gamma=s.gamma)])


def _inverse_time(s: InverseTimeDecay) -> list[list[Phase]]:
    return _per_group(s, lambda lr0: [_phase(0, INVERSE_TIME, a=lr0, gamma=s.gamma)])


def _polynomial(s: PolynomialDecay) -> list[list[Phase]]:
    return _per_group(
        s,
        lambda lr0: [_phase(0, POLY, a=lr0, b=s.end_lr, n=s.decay_steps, power=s.power, flag=float(s.cycle))],
    )


def _noam(s: NoamDecay) -> list[list[Phase]]:
    return _per_group(s, lambda lr0: [_phase(0, NOAM, a=lr0 * s.d_model**-0.5, n=s.warmup_steps)])


def _warmup_cosine(s: WarmupCosine) -> list[list[Phase]]:
    def fn(lr0: float) -> list[Phase]:
        phases = []
        if s.warmup_steps > 0:
            phases.append(_phase(0, LINEAR, a=0.0, b=lr0, n=s.warmup_steps))
        # flag 1: clamped, so the cosine phase also holds min_lr after total_steps.
        phases.append(
            _phase(s.warmup_steps, COSINE, a=lr0, b=s.min_lr, n=s.total_steps - s.warmup_steps, flag=1.0)
        )
        return phases

    return _per_group(s, fn)


def _warmup_stable_decay(s: WarmupStableDecay) -> list[list[Phase]]:
    def fn(lr0: float) -> list[Phase]:
        phases = []
        if s.warmup_steps > 0:
            phases.append(_phase(0, LINEAR, a=0.0, b=lr0, n=s.warmup_steps))
        if s.stable_steps > 0:
            phases.append(_phase(s.warmup_steps, CONSTANT, a=lr0))
        start = s.warmup_steps + s.stable_steps
        if s.decay == "linear":
            phases.append(_phase(start, LINEAR, a=lr0, b=s.min_lr, n=s.decay_steps))
        elif s.decay == "cosine":
            phases.append(_phase(start, COSINE, a=lr0, b=s.min_lr, n=s.decay_steps, flag=1.0))
        else:
            phases.append(_phase(start, SQRT_DECAY, a=lr0, b=s.min_lr, n=s.decay_steps))
        return phases

    return _per_group(s, fn)


def _linear_warmup(s: LinearWarmup) -> list[list[Phase]]:
    if s.after is None:
        # The LINEAR kind clamps at u = n, so one phase also covers "hold end_lr".
        return [[_phase(0, LINEAR, a=lo, b=hi, n=s.warmup_steps)] for lo, hi in zip(s.start_lrs, s.end_lrs)]
    try:
        inner = kernel_phases(s.after)  # after's base_lrs were rebased on end_lr
    except TypeError as e:
        raise TypeError(f"LinearWarmup(after={type(s.after).__name__}) has no phase description: {e}") from None
    return [
        [_phase(0, LINEAR, a=lo, b=hi, n=s.warmup_steps), *_shift(group, s.warmup_steps)]
        for lo, hi, group in zip(s.start_lrs, s.end_lrs, inner)
    ]


# ---- torch schedulers ----------------------------------------------------------------


def _step_lr(s: tls.StepLR) -> list[list[Phase]]:
    return _per_group(s, lambda lr0: [_phase(0, STEP_EXP, a=lr0, n=s.step_size, gamma=float(s.gamma))])


def _exponential_lr(s: tls.ExponentialLR) -> list[list[Phase]]:
    return _per_group(s, lambda lr0: [_phase(0, STEP_EXP, a=lr0, n=1, gamma=float(s.gamma))])


def _multistep_lr(s: tls.MultiStepLR) -> list[list[Phase]]:
    milestones = sorted(s.milestones.elements())
    if milestones and milestones[0] < 0:
        # The closed form would count them from step 0, the chainable form never applies them.
        raise ValueError(f"MultiStepLR with negative milestones {milestones} has no consistent phase description")
    gamma = float(s.gamma)

    def fn(lr0: float) -> list[Phase]:
        # Repeated milestones multiply by gamma once per repetition, like torch.
        starts = [0, *sorted(set(milestones))]
        return _normalize([_phase(m, CONSTANT, a=lr0 * gamma ** bisect_right(milestones, m)) for m in starts])

    return _per_group(s, fn)


def _cosine_annealing_lr(s: tls.CosineAnnealingLR) -> list[list[Phase]]:
    # flag 0: unclamped, torch's cosine goes back up after T_max.
    return _per_group(s, lambda lr0: [_phase(0, COSINE, a=lr0, b=float(s.eta_min), n=s.T_max, flag=0.0)])


def _linear_lr(s: tls.LinearLR) -> list[list[Phase]]:
    if s.total_iters <= 0:
        # Chainable form: scaled by start_factor at step 0, then held forever.
        return _per_group(s, lambda lr0: [_phase(0, CONSTANT, a=lr0 * s.start_factor)])
    return _per_group(
        s,
        lambda lr0: [_phase(0, LINEAR, a=lr0 * s.start_factor, b=lr0 * s.end_factor, n=s.total_iters)],
    )


def _constant_lr(s: tls.ConstantLR) -> list[list[Phase]]:
    if s.total_iters <= 0:
        # torch's chainable (factor forever) and closed (no factor) forms disagree here.
        raise ValueError(f"ConstantLR with total_iters={s.total_iters} has no consistent phase description")
    return _per_group(
        s, lambda lr0: [_phase(0, CONSTANT, a=lr0 * s.factor), _phase(s.total_iters, CONSTANT, a=lr0)]
    )


def _polynomial_lr(s: tls.PolynomialLR) -> list[list[Phase]]:
    if s.total_iters <= 0:
        raise ValueError(f"PolynomialLR with total_iters={s.total_iters} has no phase description")
    return _per_group(
        s, lambda lr0: [_phase(0, POLY, a=lr0, b=0.0, n=s.total_iters, power=float(s.power), flag=0.0)]
    )


def _sequential_lr(s: tls.SequentialLR) -> list[list[Phase]]:
    milestones = list(s._milestones)
    if any(b < a for a, b in zip(milestones, milestones[1:])) or (milestones and milestones[0] < 0):
        raise ValueError(f"SequentialLR with milestones {milestones} (not non-decreasing and >= 0)")
    subs = []
    for i, sub in enumerate(s._schedulers):
        if isinstance(sub, tls.SequentialLR):
            # SequentialLR.__init__ undoes the inner one's sub-schedulers but then steps the
            # inner SequentialLR itself, which runs one step ahead from then on.
            raise TypeError(
                f"SequentialLR nested in SequentialLR (index {i}) has no closed form: torch runs the inner "
                f"one a step ahead, so its learning rate stays on the host"
            )
        try:
            subs.append(kernel_phases(sub))
        except TypeError as e:
            raise TypeError(f"SequentialLR: scheduler at index {i}: {e}") from None
    # Sub-scheduler i runs on [milestones[i-1], milestones[i]); SequentialLR restarts
    # it at its own step 0 at its milestone (the first one starts at step 0).
    starts = [0, *milestones]
    ends = [*milestones, math.inf]
    out = []
    for g in range(len(s.optimizer.param_groups)):
        phases: list[Phase] = []
        for sub_phases, start, end in zip(subs, starts, ends):
            phases.extend(p for p in _shift(sub_phases[g], start) if p[0] < end)
        out.append(_normalize(phases))
    return out


# Exact types only: a subclass may override get_lr / step with anything.
_HANDLERS: dict[type, Callable[[tls.LRScheduler], list[list[Phase]]]] = {
    PiecewiseDecay: _piecewise,
    NaturalExpDecay: _natural_exp,
    InverseTimeDecay: _inverse_time,
    PolynomialDecay: _polynomial,
    NoamDecay: _noam,
    LinearWarmup: _linear_warmup,
    WarmupCosine: _warmup_cosine,
    WarmupStableDecay: _warmup_stable_decay,
    tls.StepLR: _step_lr,
    tls.MultiStepLR: _multistep_lr,
    tls.ExponentialLR: _exponential_lr,
    tls.CosineAnnealingLR: _cosine_annealing_lr,
    tls.LinearLR: _linear_lr,
    tls.ConstantLR: _constant_lr,
    tls.PolynomialLR: _polynomial_lr,
    tls.SequentialLR: _sequential_lr,
}


def supports_kernel_phases(scheduler: object) -> bool:
    """Whether :func:`kernel_phases` can describe ``scheduler`` (False where it raises)."""
    try:
        kernel_phases(scheduler)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


def kernel_phases(scheduler: tls.LRScheduler) -> list[list[Phase]]:
    r"""Describe a closed-form schedule as phases, one list per param group.

    Supported: every ``fusedopt.lr_scheduler`` scheduler (``LinearWarmup`` when
    its ``after`` is None or supported itself) and torch's ``StepLR``,
    ``MultiStepLR``, ``ExponentialLR``, ``CosineAnnealingLR``, ``LinearLR``,
    ``ConstantLR``, ``PolynomialLR`` and ``SequentialLR`` of supported
    schedulers.  See the module docstring for the phase format.

    Args:
        scheduler (LRScheduler): the scheduler to describe.

    Returns:
        list[list[tuple]]: for each param group, phases
        ``(start_step, kind, a, b, n, gamma, power, flag)`` of floats, starting
        at step 0 with strictly increasing starts.

    Raises:
        TypeError: the scheduler has no closed form (``LambdaLR``,
            ``MultiplicativeLR``, ``ReduceLROnPlateau``, ``CyclicLR``,
            ``OneCycleLR``, ``ChainedScheduler``,
            ``CosineAnnealingWarmRestarts``, subclasses, ...): its learning rate
            stays on the host.
        ValueError: degenerate arguments for which torch's own schedule is
            ill-defined (e.g. ``ConstantLR(total_iters=0)``).
    """
    if not isinstance(scheduler, tls.LRScheduler):
        raise TypeError(f"Expected an LRScheduler, but got {type(scheduler).__name__}")
    handler = _HANDLERS.get(type(scheduler))
    if handler is None:
        raise TypeError(
            f"{type(scheduler).__name__} has no closed form: its learning rate stays on the host "
            f"(step it there and pass the lr to the optimizer) and cannot be evaluated in the kernel"
        )
    return handler(scheduler)


def evaluate_phases(phases: Sequence[Sequence[float]], t: float) -> float:
    r"""Learning rate at step ``t`` of one param group's phases (the reference evaluator).

    Args:
        phases: one group's phases, as returned by :func:`kernel_phases` (``[g]``).
        t (int or float): non-negative step.

    Returns:
        float: the learning rate.
    """
    t = float(t)
    if not t >= 0:  # also catches NaN
        raise ValueError(f"Expected non-negative step t, but got {t}")
    active = None
    for p in phases:
        if len(p) != 8:
            raise ValueError(f"Expected phases of 8 floats, but got {tuple(p)!r}")
        if float(p[0]) <= t:
            active = p
    if active is None:
        raise ValueError(f"No phase starts at or before step {t} (phases: {list(phases)!r})")
    start, kind, a, b, n, gamma, power, flag = (float(x) for x in active)
    u = t - start
    k = int(kind)
    if k == CONSTANT:
        return a
    if k == LINEAR:
        return b if n <= 0 else a + (b - a) * min(u, n) / n
    if k == COSINE:
        v = min(u, n) if flag == 1.0 else u
        return b + (a - b) * (1.0 + math.cos(math.pi * v / n)) / 2.0
    if k == STEP_EXP:
        return a * gamma ** math.floor(u / n)
    if k == POLY:
        if flag == 1.0:
            horizon = n * math.ceil(u / n) if u > 0 else n
            return (a - b) * (1.0 - u / horizon) ** power + b
        return (a - b) * (1.0 - min(u, n) / n) ** power + b
    if k == NATURAL_EXP:
        return a * math.exp(-gamma * u)
    if k == INVERSE_TIME:
        return a / (1.0 + gamma * u)
    if k == NOAM:
        return 0.0 if u == 0 else a * min(u**-0.5, u * n**-1.5)
    if k == SQRT_DECAY:
        return b + (a - b) * (1.0 - math.sqrt(min(u, n) / n))
    raise ValueError(f"Unknown phase kind {kind!r}; known kinds: {PHASE_KINDS}")
