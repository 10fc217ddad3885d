"""How many bytes of memory traffic one optimizer step must move, at the least.

An optimizer step is memory-bound: every element does a handful of flops on data that is
read from and written back to DRAM (or HBM) once per step. The useful figure of merit is
therefore "effective bandwidth": the bytes the update *must* move divided by the step time,
compared with what a plain streaming kernel achieves on the same device.

The model counts, per parameter element, each tensor the update rule reads and each it
writes, once, at the parameter dtype's element size (the optimizer state has the parameter's
dtype, as in torch.optim):

===========================  ===========================  ============================  ==========
optimizer                    reads                        writes                        bytes/elem
===========================  ===========================  ============================  ==========
SGD, momentum == 0           p, g                         p                             3 * es
SGD, momentum != 0           p, g, momentum_buffer        p, momentum_buffer            5 * es
Adam / AdamW                 p, g, exp_avg, exp_avg_sq    p, exp_avg, exp_avg_sq        7 * es
Adam / AdamW, amsgrad=True   ... + max_exp_avg_sq         ... + max_exp_avg_sq          9 * es
===========================  ===========================  ============================  ==========

(es = element size in bytes: 4 for float32, 2 for bfloat16/float16, 8 for float64.)

Not counted, because they are either negligible or not required by the math: the per-tensor
step counters and scalar hyper-parameters, weight decay / nesterov / maximize (they reuse data
that is already read), and any temporaries an implementation chooses to materialise (torch's
foreach path, for instance, allocates and re-reads intermediate tensors; that extra traffic is
exactly what a fused kernel avoids, so it must not be credited). The first SGD-momentum step,
which only writes the buffer, is excluded by the benchmark's warm-up.
"""

from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["bytes_per_element", "step_bytes", "tensors_touched", "OPTIMIZER_FAMILIES"]

OPTIMIZER_FAMILIES = ("sgd", "adam", "adamw")


def tensors_touched(family: str, *, momentum: float = 0.0, amsgrad: bool = False) -> tuple[int, int]:
    """(tensors read, tensors written) per parameter for one step of ``family``.

    ``family`` is ``"sgd"``, ``"adam"`` or ``"adamw"`` (case-insensitive). ``momentum`` only
    matters for SGD, ``amsgrad`` only for Adam/AdamW.
    """
    fam = family.lower()
    if fam == "sgd":
        if amsgrad:
            raise ValueError("amsgrad is not an SGD option")
        return (3, 2) if momentum != 0 else (2, 1)
    if fam in ("adam", "adamw"):
        return (5, 4) if amsgrad else (4, 3)
    raise ValueError(f"unknown optimizer family {family!r}; expected one of {OPTIMIZER_FAMILIES}")


def bytes_per_element(family: str, elem_size: int, *, momentum: float = 0.0, amsgrad: bool = False) -> int:
    """Bytes one step must move per parameter element: (reads + writes) * ``elem_size``.

    SGD: 3 * es plain, 5 * es with momentum; Adam/AdamW: 7 * es, 9 * es with amsgrad.
    See the module docstring for what is and is not counted.
    """
    if elem_size <= 0:
        raise ValueError("elem_size must be positive")
    reads, writes = tensors_touched(family, momentum=momentum, amsgrad=amsgrad)
    return (reads + writes) * int(elem_size)


def step_bytes(
    family: str,
    params: int | Iterable[torch.Tensor] | Iterable[tuple[int, ...]],
    dtype: torch.dtype = torch.float32,
    *,
    momentum: float = 0.0,
    amsgrad: bool = False,
) -> int:
    """Total bytes one optimizer step over ``params`` must move (the roofline numerator).

    ``params`` is a total element count, an iterable of tensors, or an iterable of shapes.
    Returns ``numel_total * bytes_per_element(family, dtype's element size, ...)``.

    >>> step_bytes("adam", [(10, 10), (10,)], torch.float32)   # 110 elements * 7 * 4
    3080
    >>> step_bytes("sgd", 1000, torch.bfloat16, momentum=0.9)   # 1000 * 5 * 2
    10000
    """
    if isinstance(params, int):
        numel = params
    else:
        numel = 0
        for p in params:
            if isinstance(p, torch.Tensor):
                numel += p.numel()
            else:
                n = 1
                for d in p:
                    n *= int(d)
                numel += n
    es = torch.empty((), dtype=dtype).element_size()
    return numel * bytes_per_element(family, es, momentum=momentum, amsgrad=amsgrad)
