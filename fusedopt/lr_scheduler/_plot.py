"""Draw learning-rate schedules into a PNG (matplotlib, Agg, no pyplot global state)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Union

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from fusedopt.lr_scheduler._validation import check_int, check_real

__all__ = ["plot", "lr_trajectory"]

SchedulerFactory = Callable[[Optimizer], LRScheduler]
NamedFactory = tuple[str, SchedulerFactory]


def _needs_metrics(scheduler: LRScheduler) -> bool:
    if isinstance(scheduler, ReduceLROnPlateau):
        return True
    inner = getattr(scheduler, "after", None)  # LinearWarmup
    return isinstance(inner, LRScheduler) and _needs_metrics(inner)


def lr_trajectory(factory: SchedulerFactory, steps: int, lr: float = 0.1) -> list[float]:
    """Learning rate of param group 0 at steps ``0 .. steps - 1``.

    The scheduler is built by ``factory(optimizer)`` on a throwaway one-parameter
    ``torch.optim.SGD`` with learning rate ``lr`` and stepped the usual way
    (``optimizer.step(); scheduler.step()``; the parameter has no gradient so the
    optimizer step is a no-op).
    """
    steps = check_int("steps", steps, minimum=1)
    lr = check_real("lr", lr, minimum=0.0)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = factory(optimizer)
    if not isinstance(scheduler, LRScheduler):
        raise TypeError(f"Expected the factory to return an LRScheduler, but got {type(scheduler).__name__}")
    if getattr(scheduler, "optimizer", optimizer) is not optimizer:
        raise ValueError("The factory must build the scheduler on the optimizer it is given")
    if _needs_metrics(scheduler):
        raise ValueError(f"{type(scheduler).__name__} needs a metric at every step and cannot be plotted")
    lrs = [float(optimizer.param_groups[0]["lr"])]
    for _ in range(steps - 1):
        optimizer.step()
        scheduler.step()
        lrs.append(float(optimizer.param_groups[0]["lr"]))
    return lrs


def plot(
    schedulers: Union[NamedFactory, Sequence[NamedFactory]],
    steps: int,
    path: Union[str, os.PathLike],
    *,
    lr: float = 0.1,
    title: str | None = None,
) -> dict[str, list[float]]:
    r"""Plot learning rate against step for one or several schedulers into a PNG.

    Schedulers are given as ``(name, factory)`` pairs, not instances: each
    ``factory(optimizer)`` builds its scheduler on a fresh throwaway optimizer
    (one parameter, ``torch.optim.SGD`` with learning rate ``lr``), so plotting
    never steps or mutates a scheduler you are training with.  A factory that
    needs inner schedulers (``LinearWarmup``'s ``after``, ``SequentialLR``)
    builds them on the optimizer it is given.  One line is drawn per scheduler
    (param group 0), labelled with its name.

    Args:
        schedulers: a ``(name, factory)`` pair or a sequence of them.
        steps (int): number of steps to draw (``t = 0 .. steps - 1``).
        path (str or PathLike): output file; always written as PNG.
        lr (float): initial learning rate of the throwaway optimizer. Default: 0.1.
        title (str, optional): figure title.

    Returns:
        dict[str, list[float]]: the plotted learning rates, by name.

    Example:
        >>> plot([("warmup+cosine", lambda opt: WarmupCosine(opt, 100, 1000)),
        ...       ("step", lambda opt: StepLR(opt, step_size=200, gamma=0.5))],
        ...      steps=1000, path="lr.png")
    """
    if isinstance(schedulers, tuple) and len(schedulers) == 2 and isinstance(schedulers[0], str):
        schedulers = [schedulers]
    if isinstance(schedulers, LRScheduler):
        schedulers = [schedulers]
    curves: dict[str, list[float]] = {}
    for item in schedulers:
        if isinstance(item, LRScheduler) or (isinstance(item, tuple) and any(isinstance(x, LRScheduler) for x in item)):
            # An instance would have to be stepped (and so mutated) to be plotted.
            raise TypeError(
                "plot() takes (name, factory) pairs, not scheduler instances, e.g. "
                "('cosine', lambda opt: CosineAnnealingLR(opt, T_max=100))"
            )
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and callable(item[1])):
            raise TypeError(f"Expected (name, factory) pairs, but got {item!r}")
        name, factory = item
        if name in curves:
            raise ValueError(f"Duplicate scheduler name {name!r}")
        curves[name] = lr_trajectory(factory, steps, lr)
    if not curves:
        raise ValueError("Expected at least one (name, factory) pair to plot")

    # Figure + Agg canvas directly: no pyplot, so no global backend switch for the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(steps))
    for name, lrs in curves.items():
        ax.plot(x, lrs, label=name, linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate (param group 0)")
    ax.set_title(title or f"Learning-rate schedules (initial lr {lr:g})")
    ax.set_xlim(0, max(steps - 1, 1))
    ax.grid(True, alpha=0.3)
    # Below the axes: spec-style names are long and would hide the curves.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize="small", frameon=False)
    fig.savefig(path, format="png", bbox_inches="tight")
    return curves
