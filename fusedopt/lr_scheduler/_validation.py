"""Argument checks shared by the schedulers, with torch-style messages.

Every check runs *before* ``LRScheduler.__init__`` so that a rejected scheduler
leaves the optimizer's ``param_groups`` untouched.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = [
    "check_optimizer",
    "check_int",
    "check_real",
    "check_last_epoch",
    "per_group",
    "initial_lrs",
]


def _type_name(value: Any) -> str:
    return type(value).__name__


def check_optimizer(optimizer: Any) -> Optimizer:
    """Same check and message as ``torch.optim.lr_scheduler.LRScheduler``."""
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"{_type_name(optimizer)} is not an Optimizer")
    return optimizer


def check_int(name: str, value: Any, *, minimum: int = 0) -> int:
    """Return ``value`` as an ``int`` after checking its type and lower bound.

    ``bool`` is rejected even though it is an ``int`` subclass: ``True`` as a step
    count is always a mistake.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"Expected integer {name}, but got {value!r} of type {_type_name(value)}")
    if value < minimum:
        if minimum == 1:
            raise ValueError(f"Expected positive integer {name}, but got {value}")
        if minimum == 0:
            raise ValueError(f"Expected non-negative integer {name}, but got {value}")
        raise ValueError(f"Expected integer {name} >= {minimum}, but got {value}")
    return int(value)


def check_real(name: str, value: Any, *, minimum: float | None = None, strict: bool = False) -> float:
    """Return ``value`` as a finite ``float``, optionally bounded below.

    Args:
        name: argument name used in the message.
        value: the value to check (any real number, including 0-dim tensors).
        minimum: lower bound, or ``None`` for none.
        strict: if ``True`` the bound is exclusive (``value > minimum``).
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Expected a real number for {name}, but got {value!r} of type {_type_name(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"Expected finite {name}, but got {value}")
    if minimum is not None:
        if strict and value <= minimum:
            word = "positive" if minimum == 0 else f"> {minimum}"
            raise ValueError(f"Expected {word} {name}, but got {value}")
        if not strict and value < minimum:
            word = "non-negative" if minimum == 0 else f">= {minimum}"
            raise ValueError(f"Expected {word} {name}, but got {value}")
    return value


def check_last_epoch(last_epoch: Any) -> int:
    return check_int("last_epoch", last_epoch, minimum=-1)


def per_group(name: str, value: Any, num_groups: int, *, minimum: float | None = 0.0) -> list[float]:
    """Broadcast a scalar to every param group, or check a per-group sequence.

    Mirrors how torch's schedulers accept ``max_lr`` / ``min_lr`` either as one
    value or as one value per param group.
    """
    if isinstance(value, (Sequence, torch.Tensor)) and not isinstance(value, str):
        values = list(value)
        if len(values) != num_groups:
            raise ValueError(
                f"Expected {name} to be a number or a sequence with one value per param group "
                f"({num_groups}), but got {len(values)} values"
            )
        return [check_real(f"{name}[{i}]", v, minimum=minimum) for i, v in enumerate(values)]
    return [check_real(name, value, minimum=minimum)] * num_groups


def initial_lrs(optimizer: Optimizer) -> list[float]:
    """The ``base_lrs`` that ``LRScheduler.__init__`` is about to pick, read without side effects.

    Torch keeps an existing ``initial_lr`` (set by an earlier scheduler on the
    same optimizer, or restored from a checkpoint) and otherwise uses ``lr``.
    When resuming without ``initial_lr``, torch itself raises the ``KeyError``.
    """
    lrs = []
    for group in optimizer.param_groups:
        lr = group.get("initial_lr", group["lr"])
        lrs.append(float(lr))
    return lrs
