r"""Learning-rate schedulers for fusedopt (and any ``torch.optim`` optimizer).

Closed-form schedulers, all :class:`torch.optim.lr_scheduler.LRScheduler`
subclasses:

* :class:`PiecewiseDecay`, :class:`NaturalExpDecay`, :class:`InverseTimeDecay`,
  :class:`PolynomialDecay`, :class:`NoamDecay`
* :class:`LinearWarmup` (hands over to any scheduler, ``ReduceLROnPlateau`` included)
* :class:`WarmupCosine`, :class:`WarmupStableDecay`

:func:`kernel_phases` describes a closed-form schedule (these, and torch's
``StepLR``, ``MultiStepLR``, ``ExponentialLR``, ``CosineAnnealingLR``,
``LinearLR``, ``ConstantLR``, ``PolynomialLR``, ``SequentialLR``) as phases
that the fused kernel can evaluate on the device; :func:`evaluate_phases` is
the reference evaluator. :func:`in_kernel` hands such a schedule to a fusedopt
optimizer, whose fused kernel then computes the lr from its own step count.  :func:`plot` and ``python -m fusedopt.lr_scheduler
plot`` draw schedules into a PNG.

This package only depends on torch (and matplotlib, imported lazily by
:func:`plot`), never on the compiled extension.
"""

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
from fusedopt.lr_scheduler.phases import PHASE_KINDS, evaluate_phases, kernel_phases, supports_kernel_phases
from fusedopt.lr_scheduler._plot import lr_trajectory, plot
from fusedopt.lr_scheduler._cli import parse_schedule
from fusedopt.lr_scheduler.in_kernel import InKernelSchedule, in_kernel

__all__ = [
    "PiecewiseDecay",
    "NaturalExpDecay",
    "InverseTimeDecay",
    "PolynomialDecay",
    "NoamDecay",
    "LinearWarmup",
    "WarmupCosine",
    "WarmupStableDecay",
    "PHASE_KINDS",
    "kernel_phases",
    "evaluate_phases",
    "supports_kernel_phases",
    "plot",
    "lr_trajectory",
    "parse_schedule",
    "in_kernel",
    "InKernelSchedule",
]
