r"""Closed-form learning-rate schedulers.

Every scheduler here is a regular :class:`torch.optim.lr_scheduler.LRScheduler`
and works with any ``torch.optim`` (or ``fusedopt``) optimizer.  Unlike torch's
chainable schedulers, each one computes the learning rate of step ``t``
(``last_epoch``) directly from the param group's base learning rate
(``base_lrs``, taken from ``group["initial_lr"]`` like torch does), so
:meth:`get_lr` and :meth:`_get_closed_form_lr` agree and a schedule can be
evaluated at any step, e.g. inside a fused kernel (see
:func:`fusedopt.lr_scheduler.kernel_phases`).  A consequence is that changes
made to ``group["lr"]`` by someone else are overwritten at the next
:meth:`step`, not compounded.

Notation in the docstrings: :math:`t` is the scheduler's step count
(``last_epoch``, 0 right after construction) and :math:`\eta_0` a param group's
base learning rate.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from typing import Any, SupportsFloat

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    ChainedScheduler,
    CyclicLR,
    LRScheduler,
    OneCycleLR,
    ReduceLROnPlateau,
    SequentialLR,
)

from fusedopt.lr_scheduler._validation import (
    check_int,
    check_last_epoch,
    check_optimizer,
    check_real,
    initial_lrs,
    per_group,
)

__all__ = [
    "PiecewiseDecay",
    "NaturalExpDecay",
    "InverseTimeDecay",
    "PolynomialDecay",
    "NoamDecay",
    "LinearWarmup",
    "WarmupCosine",
    "WarmupStableDecay",
]


def _set_group_lr(group: dict[str, Any], lr: float) -> None:
    # A tensor lr (capturable / fused optimizers) is filled in place so that
    # anything holding a reference to it (e.g. a CUDA graph) sees the update.
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(float(lr))
    else:
        group["lr"] = lr


def _group_lrs(optimizer: Optimizer) -> list[Any]:
    return [g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"] for g in optimizer.param_groups]


def _check_not_above(name: str, values: Sequence[float], limit_name: str, limits: Sequence[float]) -> None:
    for i, (value, limit) in enumerate(zip(values, limits)):
        if value > limit:
            raise ValueError(
                f"Expected {name} <= {limit_name} of every param group, but got {name}={value} > {limit} "
                f"(param group {i})"
            )


class _ClosedFormLR(LRScheduler):
    """Base class: the lr of a group is a pure function of its base lr and ``last_epoch``."""

    def get_lr(self) -> list[float]:
        r"""Compute the learning rate of each param group at :attr:`last_epoch`.

        Same as :meth:`_get_closed_form_lr`: these schedulers are not chainable.
        """
        return self._get_closed_form_lr()

    def _get_closed_form_lr(self) -> list[float]:
        r"""Compute the learning rate of each param group at :attr:`last_epoch` from :attr:`base_lrs`."""
        return [self._lr_at(float(base_lr), self.last_epoch) for base_lr in self.base_lrs]

    def _lr_at(self, base_lr: float, t: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


class PiecewiseDecay(_ClosedFormLR):
    r"""Piecewise-constant learning rate.

    .. math::
        \eta_t = \texttt{values}[i], \quad i = \#\{\, b \in \texttt{boundaries} : b \le t \,\}

    The values are absolute learning rates, the same for every param group (the
    groups' initial lrs are ignored).

    Args:
        optimizer (Optimizer): Wrapped optimizer.
        boundaries (list of int): strictly increasing, non-negative steps at which
            the learning rate changes.
        values (list of float): learning rates, ``len(boundaries) + 1`` of them;
            ``values[0]`` is used before the first boundary.
        last_epoch (int): The index of the last epoch. Default: -1.

    Example:
        >>> # lr = 1.0 if t < 100, 0.5 if 100 <= t < 200, 0.1 otherwise
        >>> scheduler = PiecewiseDecay(optimizer, boundaries=[100, 200], values=[1.0, 0.5, 0.1])
    """

    def __init__(
        self,
        optimizer: Optimizer,
        boundaries: Sequence[int],
        values: Sequence[float],
        last_epoch: int = -1,
    ) -> None:
        check_optimizer(optimizer)
        if isinstance(boundaries, (str, bytes)) or not isinstance(boundaries, Sequence):
            raise TypeError(f"Expected boundaries to be a list of integers, but got {type(boundaries).__name__}")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise TypeError(f"Expected values to be a list of floats, but got {type(values).__name__}")
        bounds = [check_int(f"boundaries[{i}]", b, minimum=0) for i, b in enumerate(boundaries)]
        for i in range(1, len(bounds)):
            if bounds[i] <= bounds[i - 1]:
                raise ValueError(f"Expected strictly increasing boundaries, but got {list(bounds)}")
        if len(values) != len(bounds) + 1:
            raise ValueError(
                f"Expected len(values) == len(boundaries) + 1, but got {len(values)} values "
                f"for {len(bounds)} boundaries"
            )
        self.boundaries = bounds
        self.values = [check_real(f"values[{i}]", v, minimum=0.0) for i, v in enumerate(values)]
        super().__init__(optimizer, check_last_epoch(last_epoch))

    def _lr_at(self, base_lr: float, t: int) -> float:
        return self.values[bisect_right(self.boundaries, t)]


class NaturalExpDecay(_ClosedFormLR):
    r"""Natural exponential decay: :math:`\eta_t = \eta_0 \, e^{-\gamma t}`.

    Args:
        optimizer (Optimizer): Wrapped optimizer.
        gamma (float): non-negative decay rate.
        last_epoch (int): The index of the last epoch. Default: -1.
    """

    def __init__(self, optimizer: Optimizer, gamma: float, last_epoch: int = -1) -> None:
        check_optimizer(optimizer)
        self.gamma = check_real("gamma", gamma, minimum=0.0)
        super().__init__(optimizer, check_last_epoch(last_epoch))

    def _lr_at(self, base_lr: float, t: int) -> float:
        return base_lr * math.exp(-self.gamma * t)


class InverseTimeDecay(_ClosedFormLR):
    r"""Inverse time decay: :math:`\eta_t = \eta_0 / (1 + \gamma t)`.

    Args:
        optimizer (Optimizer): Wrapped optimizer.
        gamma (float): non-negative decay rate.
        last_epoch (int): The index of the last epoch. Default: -1.
    """

    def __init__(self, optimizer: Optimizer, gamma: float, last_epoch: int = -1) -> None:
        check_optimizer(optimizer)
        self.gamma = check_real("gamma", gamma, minimum=0.0)
        super().__init__(optimizer, check_last_epoch(last_epoch))

    def _lr_at(self, base_lr: float, t: int) -> float:
        return base_lr / (1.0 + self.gamma * t)


class PolynomialDecay(_ClosedFormLR):
    r"""Polynomial decay from each group's initial lr to ``end_lr``.

    Without ``cycle``:

    .. math::
        \eta_t = (\eta_0 - \texttt{end\_lr})
            \left(1 - \frac{\min(t, T)}{T}\right)^{\texttt{power}} + \texttt{end\_lr}

    with :math:`T` = ``decay_steps``, so the lr holds ``end_lr`` from step
    :math:`T` on.  With ``cycle=True`` the horizon grows to the next multiple of
    :math:`T`, :math:`H = T \lceil t / T \rceil` (:math:`H = T` at :math:`t = 0`),
    and :math:`t` is not clipped: the lr reaches ``end_lr`` at every multiple of
    :math:`T` and jumps back up (to a lower peak each cycle) right after it.

    Args:
        optimizer (Optimizer): Wrapped optimizer.
        decay_steps (int): positive number of steps of one decay.
        end_lr (float): final learning rate, at most every group's initial lr.
            Default: 1e-4.
        power (float): positive power of the polynomial. Default: 1.0.
        cycle (bool): restart the decay every ``decay_steps``. Default: False.
        last_epoch (int): The index of the last epoch. Default: -1.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        decay_steps: int,
        end_lr: float = 1e-4,
        power: float = 1.0,
        cycle: bool = False,
        last_epoch: int = -1,
    ) -> None:
        check_optimizer(optimizer)
        self.decay_steps = check_int("decay_steps", decay_steps, minimum=1)
        self.end_lr = check_real("end_lr", end_lr, minimum=0.0)
        self.power = check_real("power", power, minimum=0.0, strict=True)
        if not isinstance(cycle, bool):
            raise TypeError(f"Expected bool cycle, but got {cycle!r} of type {type(cycle).__name__}")
        self.cycle = cycle
        _check_not_above("end_lr", [self.end_lr] * len(optimizer.param_groups), "the initial lr", initial_lrs(optimizer))
        super().__init__(optimizer, check_last_epoch(last_epoch))

    def _lr_at(self, base_lr: float, t: int) -> float:
        if self.cycle:
            # Integer ceil; t = 0 would give a zero horizon, the first cycle is used instead.
            horizon = self.decay_steps * max(1, -(-t // self.decay_steps))
            frac = t / horizon
        else:
            frac = min(t, self.decay_steps) / self.decay_steps
        return (base_lr - self.end_lr) * (1.0 - frac) ** self.power + self.end_lr


class NoamDecay(_ClosedFormLR):
    r"""The Transformer ("Attention is all you need") schedule.

    .. math::
        \eta_t = \eta_0 \, d_{model}^{-0.5}
            \min\left(t^{-0.5},\ t \cdot \texttt{warmup\_steps}^{-1.5}\right),
        \qquad \eta_0 = 0 \text{ at } t = 0

    The lr rises linearly for ``warmup_steps`` steps, peaks at
    :math:`\eta_0 / \sqrt{d_{model} \cdot \texttt{warmup\_steps}}`, then decays
    as :math:`1/\sqrt{t}`.  The initial lr acts as a scale factor (1.0 in the
    paper).  Note that the first optimizer step runs with lr 0.

    Args:
        optimizer (Optimizer): Wrapped optimizer.
        d_model (int): positive model width.
        warmup_steps (int): positive number of warmup steps.
        last_epoch (int): The index of the last epoch. Default: -1.
    """

    def __init__(self, optimizer: Optimizer, d_model: int, warmup_steps: int, last_epoch: int = -1) -> None:
        check_optimizer(optimizer)
        self.d_model = check_int("d_model", d_model, minimum=1)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=1)
        super().__init__(optimizer, check_last_epoch(last_epoch))

    def _lr_at(self, base_lr: float, t: int) -> float:
        if t == 0:
            return 0.0  # t ** -0.5 is undefined; the min() is 0 there anyway
        return base_lr * self.d_model**-0.5 * min(t**-0.5, t * self.warmup_steps**-1.5)


class WarmupCosine(_ClosedFormLR):
    r"""Linear warmup from 0, then a cosine decay to ``min_lr``, then ``min_lr``.

    With :math:`W` = ``warmup_steps`` and :math:`T` = ``total_steps``:

    .. math::
        \eta_t = \begin{cases}
            \eta_0 \, t / W & t < W \\
            \eta_{min} + \frac{1}{2}(\eta_0 - \eta_{min})
                \left(1 + \cos\left(\pi \frac{t - W}{T - W}\right)\right) & W \le t < T \\
            \eta_{min} & t \ge T
        \end{cases}

    Args:
        optimizer (Optimizer): Wrapped optimizer.
        warmup_steps (int): non-negative number of warmup steps (0: no warmup).
        total_steps (int): step at which ``min_lr`` is reached; must be greater
            than ``warmup_steps``.
        min_lr (float): final learning rate, at most every group's initial lr.
            Default: 0.0.
        last_epoch (int): The index of the last epoch. Default: -1.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        total_steps: int,
        min_lr: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        check_optimizer(optimizer)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
        self.total_steps = check_int("total_steps", total_steps, minimum=1)
        if self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"Expected total_steps > warmup_steps, but got total_steps={self.total_steps} "
                f"and warmup_steps={self.warmup_steps}"
            )
        self.min_lr = check_real("min_lr", min_lr, minimum=0.0)
        _check_not_above("min_lr", [self.min_lr] * len(optimizer.param_groups), "the initial lr", initial_lrs(optimizer))
        super().__init__(optimizer, check_last_epoch(last_epoch))

    def _lr_at(self, base_lr: float, t: int) -> float:
        if t < self.warmup_steps:
            return base_lr * t / self.warmup_steps
        if t >= self.total_steps:
            return self.min_lr
        progress = (t - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.min_lr + (base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress)) / 2


class WarmupStableDecay(_ClosedFormLR):
    r"""Warmup-Stable-Decay ("trapezoidal") schedule.

    Linear warmup from 0 to :math:`\eta_0` over ``warmup_steps``, hold
    :math:`\eta_0` for ``stable_steps``, decay to ``min_lr`` over
    ``decay_steps``, then hold ``min_lr``.  With :math:`s` the step inside the
    decay (clipped to :math:`D` = ``decay_steps``) and :math:`p = s / D`, the
    decay shapes are

    * ``"linear"``: :math:`\eta_0 + (\eta_{min} - \eta_0) \, p`
    * ``"cosine"``: :math:`\eta_{min} + \frac{1}{2}(\eta_0 - \eta_{min})(1 + \cos \pi p)`
    * ``"sqrt"``: :math:`\eta_{min} + (\eta_0 - \eta_{min})(1 - \sqrt{p})`

    Args:
        optimizer (Optimizer): Wrapped optimizer.
        warmup_steps (int): non-negative number of warmup steps.
        stable_steps (int): non-negative number of steps at the peak lr.
        decay_steps (int): positive number of decay steps.
        min_lr (float): final learning rate, at most every group's initial lr.
            Default: 0.0.
        decay (str): ``"linear"``, ``"cosine"`` or ``"sqrt"``. Default: ``"linear"``.
        last_epoch (int): The index of the last epoch. Default: -1.
    """

    DECAY_SHAPES = ("linear", "cosine", "sqrt")

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        stable_steps: int,
        decay_steps: int,
        min_lr: float = 0.0,
        decay: str = "linear",
        last_epoch: int = -1,
    ) -> None:
        check_optimizer(optimizer)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
        self.stable_steps = check_int("stable_steps", stable_steps, minimum=0)
        self.decay_steps = check_int("decay_steps", decay_steps, minimum=1)
        self.min_lr = check_real("min_lr", min_lr, minimum=0.0)
        if not isinstance(decay, str):
            raise TypeError(f"Expected str decay, but got {decay!r} of type {type(decay).__name__}")
        if decay not in self.DECAY_SHAPES:
            raise ValueError(f"Expected decay to be one of {self.DECAY_SHAPES}, but got {decay!r}")
        self.decay = decay
        _check_not_above("min_lr", [self.min_lr] * len(optimizer.param_groups), "the initial lr", initial_lrs(optimizer))
        super().__init__(optimizer, check_last_epoch(last_epoch))

    def _lr_at(self, base_lr: float, t: int) -> float:
        if t < self.warmup_steps:
            return base_lr * t / self.warmup_steps
        s = t - self.warmup_steps - self.stable_steps
        if s < 0:
            return base_lr
        p = min(s, self.decay_steps) / self.decay_steps
        if self.decay == "linear":
            return base_lr + (self.min_lr - base_lr) * p
        if self.decay == "cosine":
            return self.min_lr + (base_lr - self.min_lr) * (1.0 + math.cos(math.pi * p)) / 2
        return self.min_lr + (base_lr - self.min_lr) * (1.0 - math.sqrt(p))


# --------------------------------------------------------------------------------------
# LinearWarmup and the hand-over to an inner scheduler
# --------------------------------------------------------------------------------------


def _rebase(scheduler: LRScheduler, lrs: Sequence[float]) -> None:
    """Make ``scheduler`` compute its schedule relative to ``lrs`` instead of ``initial_lr``."""
    if isinstance(scheduler, ReduceLROnPlateau):
        return  # it only ever scales the current group lr, which is set at hand-over
    if isinstance(scheduler, (SequentialLR, ChainedScheduler)):
        for sub in scheduler._schedulers:
            _rebase(sub, lrs)
        return
    if isinstance(scheduler, (CyclicLR, OneCycleLR)):
        return  # their lrs come from their own arguments (base_lr / max_lr), not from initial_lr
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = list(lrs)


def _restart(scheduler: LRScheduler, lrs: Sequence[float]) -> None:
    """Put ``scheduler`` in the state it would have if it were built now (group lrs already = ``lrs``)."""
    if isinstance(scheduler, ReduceLROnPlateau):
        scheduler.last_epoch = 0
        scheduler._reset()
        scheduler._last_lr = _group_lrs(scheduler.optimizer)
    elif isinstance(scheduler, SequentialLR):
        # What SequentialLR.__init__ does: every sub-scheduler is "undone" to
        # last_epoch -1 and only the one active at step 0 takes its initial step.
        scheduler.last_epoch = 0
        for sub in scheduler._schedulers:
            if hasattr(sub, "last_epoch"):
                sub.last_epoch = -1
        active = scheduler._schedulers[bisect_right(scheduler._milestones, 0)]
        _restart(active, lrs)
        scheduler._last_lr = active.get_last_lr()
    elif isinstance(scheduler, ChainedScheduler):
        # Each chained scheduler took its initial step, in order, when it was built.
        for sub in scheduler._schedulers:
            _restart(sub, lrs)
        scheduler._last_lr = _group_lrs(scheduler.optimizer)
    else:
        scheduler.last_epoch = -1
        scheduler._initial_step()


def _closed_form_at(scheduler: LRScheduler, t: int) -> list[float]:
    """Closed-form lrs of ``scheduler`` at its step ``t`` without changing its state."""
    if not hasattr(scheduler, "_get_closed_form_lr"):
        raise TypeError(
            f"{type(scheduler).__name__} has no closed form, so LinearWarmup cannot jump to a step past "
            f"the warmup with it; call step() once per step instead"
        )
    saved = scheduler.last_epoch
    scheduler.last_epoch = t
    try:
        return [float(lr) for lr in scheduler._get_closed_form_lr()]
    finally:
        scheduler.last_epoch = saved


class LinearWarmup(LRScheduler):
    r"""Linear warmup from ``start_lr`` to ``end_lr``, then hand over to another scheduler.

    .. math::
        \eta_t = \begin{cases}
            \texttt{start\_lr} + (\texttt{end\_lr} - \texttt{start\_lr}) \, t / W & t < W \\
            \texttt{after}_{t - W} & t \ge W \text{ (or } \texttt{end\_lr} \text{ if } \texttt{after} \text{ is None)}
        \end{cases}

    with :math:`W` = ``warmup_steps`` and :math:`\texttt{after}_s` the lr that
    ``after`` gives at its own step :math:`s`.  ``start_lr`` and ``end_lr`` are
    absolute learning rates: one value for every group, or a sequence with one
    value per param group.

    Hand-over convention (``after`` must be built first, on the same optimizer):

    * Whatever ``after``'s constructor did to the group lrs is overwritten: the
      warmup owns the lr for :math:`t < W`, and ``after`` is not stepped during
      the warmup (metrics passed to :meth:`step` during the warmup are ignored).
    * ``after`` is rebased on ``end_lr``: its ``base_lrs`` become ``end_lr``
      (per group) as soon as ``LinearWarmup`` is built, so its closed form and
      :func:`~fusedopt.lr_scheduler.kernel_phases` describe the final schedule.
      ``group["initial_lr"]`` is left alone.  Schedulers whose lrs come from
      their own arguments (``CyclicLR``, ``OneCycleLR``) keep them.
    * At :math:`t = W` the group lrs are set to ``end_lr`` and ``after`` is
      restarted exactly as if it were constructed at that moment, so its step 0
      is the warmup's step :math:`W` and it then advances one step per
      :meth:`step`.  A ``ReduceLROnPlateau`` starts from ``end_lr`` with fresh
      counters; the first metric it sees is the one passed at step
      :math:`W + 1`.  Metrics are required from then on.
    * :meth:`state_dict` holds ``after``'s state under the key ``"after"``.

    Args:
        optimizer (Optimizer): Wrapped optimizer.
        warmup_steps (int): positive number of warmup steps :math:`W`.
        start_lr (float or sequence of float): learning rate at step 0.
        end_lr (float or sequence of float): learning rate reached at step
            :math:`W`, at least ``start_lr``.
        after (LRScheduler, optional): scheduler that takes over at step
            :math:`W`, built on ``optimizer`` before this one (any scheduler,
            ``ReduceLROnPlateau`` included).  Default: None (hold ``end_lr``).
        last_epoch (int): The index of the last epoch. Default: -1.

    Example:
        >>> after = CosineAnnealingLR(optimizer, T_max=900)
        >>> scheduler = LinearWarmup(optimizer, warmup_steps=100, start_lr=0.0, end_lr=0.1, after=after)
        >>> for step in range(1000):
        >>>     train_step(...)
        >>>     scheduler.step()
        >>> # with ReduceLROnPlateau: scheduler.step(val_loss)
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        start_lr: float | Sequence[float],
        end_lr: float | Sequence[float],
        after: LRScheduler | None = None,
        last_epoch: int = -1,
    ) -> None:
        check_optimizer(optimizer)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=1)
        num_groups = len(optimizer.param_groups)
        self.start_lrs = per_group("start_lr", start_lr, num_groups)
        self.end_lrs = per_group("end_lr", end_lr, num_groups)
        _check_not_above("start_lr", self.start_lrs, "end_lr", self.end_lrs)
        if after is not None:
            if not isinstance(after, LRScheduler):
                raise TypeError(f"Expected after to be an LRScheduler or None, but got {type(after).__name__}")
            if getattr(after, "optimizer", None) is not optimizer:
                raise ValueError(
                    f"LinearWarmup expects `after` ({type(after).__name__}) to be built on the same optimizer"
                )
            _rebase(after, self.end_lrs)
        self.after = after
        self._after_step: int | None = None  # after's own step count, None before the hand-over
        self._pending_metrics: SupportsFloat | None = None
        super().__init__(optimizer, check_last_epoch(last_epoch))

    def step(self, metrics: SupportsFloat | None = None, epoch: int | None = None) -> None:  # type: ignore[override]
        """Perform a step.

        Args:
            metrics: passed on to ``after.step(metrics)`` when ``after`` is a
                ``ReduceLROnPlateau`` and the warmup is over; ignored otherwise.
            epoch (int, optional): deprecated, as in torch: jump to this step
                using the closed form (not possible past the warmup when
                ``after`` has no closed form).
        """
        self._pending_metrics = metrics
        try:
            # torch's bookkeeping (call-order warnings, _step_count), then self._update_lr.
            super().step(epoch)
        finally:
            self._pending_metrics = None

    def _update_lr(self, epoch: int | None = None) -> None:
        # Also the entry point of SequentialLR, which calls _update_lr(0) at its milestones.
        t = self.last_epoch + 1 if epoch is None else epoch
        if self.after is None or t < self.warmup_steps:
            self._after_step = None
            super()._update_lr(epoch)  # get_lr() is the closed form here
            return

        u = t - self.warmup_steps
        sequential = self._after_step is not None and self._after_step == u - 1
        plateau = isinstance(self.after, ReduceLROnPlateau)
        # Check before mutating anything so a failed step leaves the state consistent.
        if sequential and plateau and self._pending_metrics is None:
            raise TypeError(
                "LinearWarmup: `after` is a ReduceLROnPlateau, pass the metric after the warmup: step(metrics)"
            )
        if not sequential and u > 0 and not hasattr(self.after, "_get_closed_form_lr"):
            _closed_form_at(self.after, u)  # raises the explanation

        self.last_epoch = t
        if sequential:
            if plateau:
                self.after.step(self._pending_metrics)
            else:
                self.after.step()
        else:
            self._start_after()
            if u > 0:
                self.after._update_lr(u)
        self._after_step = u
        self._last_lr = _group_lrs(self.optimizer)

    def _start_after(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.end_lrs):
            _set_group_lr(group, lr)
        _rebase(self.after, self.end_lrs)
        _restart(self.after, self.end_lrs)

    def get_lr(self) -> list[float]:
        r"""Compute the learning rate of each param group at :attr:`last_epoch` (closed form)."""
        return self._get_closed_form_lr()

    def _get_closed_form_lr(self) -> list[float]:
        r"""Learning rates at :attr:`last_epoch`; past the warmup, ``after``'s closed form at ``t - W``."""
        t = self.last_epoch
        if t < self.warmup_steps:
            return [s + (e - s) * t / self.warmup_steps for s, e in zip(self.start_lrs, self.end_lrs)]
        if self.after is None:
            return list(self.end_lrs)
        return _closed_form_at(self.after, t - self.warmup_steps)

    def state_dict(self) -> dict[str, Any]:
        """Return the state of the scheduler as a :class:`dict`, ``after``'s state under ``"after"``."""
        state = {
            key: value
            for key, value in self.__dict__.items()
            if key not in ("optimizer", "after", "_pending_metrics")
        }
        state["after"] = None if self.after is None else self.after.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the scheduler's state (and ``after``'s).

        Args:
            state_dict (dict): scheduler state, as returned by :meth:`state_dict`.
        """
        state = dict(state_dict)  # don't mutate the caller's dict
        after_state = state.pop("after", None)
        if (after_state is None) != (self.after is None):
            raise ValueError(
                "LinearWarmup.load_state_dict: the saved state "
                + ("has" if after_state is not None else "has no")
                + " `after` scheduler but this LinearWarmup "
                + ("has none" if self.after is None else "has one")
            )
        self.__dict__.update(state)
        if self.after is not None:
            self.after.load_state_dict(after_state)
