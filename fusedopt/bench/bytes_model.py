"""How many bytes of memory traffic one optimizer step must move, at the least.

An optimizer step is memory-bound: every element does a handful of flops on data that is
read from and written back to DRAM (or HBM) once per step. The useful figure of merit is
therefore "effective bandwidth": the bytes the update *must* move divided by the step time,
compared with what a plain streaming kernel achieves on the same device.

The model counts, per parameter element, each tensor the update rule reads and each it
writes, once, at that tensor's own element size. By default (torch.optim's behaviour, and
fusedopt's without precision options) the optimizer state has the parameter's dtype:

===========================  ===========================  ============================  ==========
optimizer                    reads                        writes                        bytes/elem
===========================  ===========================  ============================  ==========
SGD, momentum == 0           p, g                         p                             3 * es
SGD, momentum != 0           p, g, momentum_buffer        p, momentum_buffer            5 * es
Adam / AdamW                 p, g, exp_avg, exp_avg_sq    p, exp_avg, exp_avg_sq        7 * es
Adam / AdamW, amsgrad=True   ... + max_exp_avg_sq         ... + max_exp_avg_sq          9 * es
RMSprop (defaults)           p, g, square_avg             p, square_avg                 5 * es
RMSprop, momentum > 0        ... + momentum_buffer        ... + momentum_buffer         + 2 * es
RMSprop, centered=True       ... + grad_avg               ... + grad_avg                + 2 * es
Adagrad                      p, g, sum                    p, sum                        5 * es
Lion                         p, g, exp_avg                p, exp_avg                    5 * es
===========================  ===========================  ============================  ==========

(es = element size in bytes: 4 for float32, 2 for bfloat16/float16, 8 for float64.)

fusedopt's precision options change which tensors are touched and at which size (they only
apply to 16-bit params, 2-byte es; on float32/float64 params they change nothing):

* ``state_dtype``: every state tensor (moment, momentum buffer, square_avg, sum) is read and
  written at ``state_dtype``'s size instead of es. The grad stays in the param's dtype.
* ``master_weights``: the float32 master (``state["master_param"]``) is read and written
  (4 + 4 bytes) and the 16-bit param is only *written* (the rounded master): the kernel never
  reads the param, the master is the value being updated. So the param costs 2 bytes, not 4.
* ``master_weights`` + ``master_remainders`` (bfloat16): the master is the param's 16 bits plus
  an int16 remainder, so the param is read and written (2 + 2) and so is the remainder (2 + 2).
* ``stochastic_rounding``: the same tensors as without it (p, g, states); its cost is compute
  (a hash per element), not bytes.

Worked example, Adam on bfloat16 params, per element (p, g, master/remainder, exp_avg, exp_avg_sq):

===================================  =====================================  ==========
option                               traffic                                bytes/elem
===================================  =====================================  ==========
none (bf16 moments: torch's)         p 2+2, g 2, m 2+2, v 2+2               14
stochastic_rounding                  same as none                           14
master_weights                       p 0+2, g 2, master 4+4, m 2+2, v 2+2   20
master_weights + master_remainders   p 2+2, g 2, rem 2+2, m 2+2, v 2+2      18
state_dtype=float32                  p 2+2, g 2, m 4+4, v 4+4               22
master_weights + state_dtype=fp32    p 0+2, g 2, master 4+4, m 4+4, v 4+4   28
===================================  =====================================  ==========

The last row is the "28 bytes per element" of classic mixed precision: the same traffic as an
fp32 Adam step (7 * 4), since the master replaces the fp32 param's read and write and the 16-bit
param adds one 2-byte write while the grad read shrinks by 2 bytes. Counting a read of the bf16
param as well would give 30; the fused step does not do that read, so it is not credited.

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

__all__ = ["bytes_per_element", "step_bytes", "tensors_touched", "element_traffic", "state_roles",
           "OPTIMIZER_FAMILIES"]

OPTIMIZER_FAMILIES = ("sgd", "adam", "adamw", "rmsprop", "adagrad", "lion")

_HALF = (torch.float16, torch.bfloat16)


def _esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def state_roles(family: str, *, momentum: float = 0.0, amsgrad: bool = False, centered: bool = False) -> list[str]:
    """The state tensors (torch's state-dict keys) one step of ``family`` reads and writes.

    ``momentum`` matters for SGD (nonzero) and RMSprop (positive), ``amsgrad`` for Adam/AdamW,
    ``centered`` for RMSprop; an option the family does not have raises ValueError.
    """
    fam = family.lower()
    if fam not in OPTIMIZER_FAMILIES:
        raise ValueError(f"unknown optimizer family {family!r}; expected one of {OPTIMIZER_FAMILIES}")
    if amsgrad and fam not in ("adam", "adamw"):
        raise ValueError(f"amsgrad is not an {family} option")
    if centered and fam != "rmsprop":
        raise ValueError(f"centered is not an {family} option")
    if momentum and fam not in ("sgd", "rmsprop"):
        raise ValueError(f"momentum is not an {family} option")
    if fam == "sgd":
        return ["momentum_buffer"] if momentum != 0 else []
    if fam in ("adam", "adamw"):
        return ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    if fam == "rmsprop":
        return (["square_avg"] + (["momentum_buffer"] if momentum > 0 else [])
                + (["grad_avg"] if centered else []))
    if fam == "adagrad":
        return ["sum"]
    return ["exp_avg"]  # lion


def tensors_touched(family: str, *, momentum: float = 0.0, amsgrad: bool = False,
                    centered: bool = False) -> tuple[int, int]:
    """(tensors read, tensors written) per parameter for one step of ``family`` (no precision
    options): p and g read, p written, and every state tensor read and written.

    ``family`` is one of :data:`OPTIMIZER_FAMILIES` (case-insensitive). ``momentum`` only
    matters for SGD and RMSprop, ``amsgrad`` only for Adam/AdamW, ``centered`` for RMSprop.
    """
    n = len(state_roles(family, momentum=momentum, amsgrad=amsgrad, centered=centered))
    return 2 + n, 1 + n


def element_traffic(
    family: str,
    param_dtype: torch.dtype,
    *,
    momentum: float = 0.0,
    amsgrad: bool = False,
    centered: bool = False,
    master_weights: bool = False,
    master_remainders: bool = False,
    state_dtype: torch.dtype | None = None,
    stochastic_rounding: bool = False,
) -> list[tuple[str, int, int]]:
    """Per parameter element, ``(tensor, bytes read, bytes written)`` for every tensor one step
    of ``family`` on ``param_dtype`` params touches, with fusedopt's precision options (see the
    module docstring; the options match fusedopt's keyword arguments, so a precision dict can be
    passed as ``**kwargs``). The tensor names are ``"param"``, ``"grad"``, ``"master_param"`` or
    ``"master_remainder"``, then the state-dict keys.

    >>> element_traffic("adam", torch.bfloat16, master_weights=True, state_dtype=torch.float32)
    [('param', 0, 2), ('grad', 2, 0), ('master_param', 4, 4), ('exp_avg', 4, 4), ('exp_avg_sq', 4, 4)]
    """
    roles = state_roles(family, momentum=momentum, amsgrad=amsgrad, centered=centered)
    if master_remainders and not master_weights:
        raise ValueError("master_remainders needs master_weights")
    if stochastic_rounding and master_weights:
        raise ValueError("stochastic_rounding is for bfloat16 params without a master")
    if master_remainders and param_dtype == torch.float16:
        raise ValueError("master_remainders needs bfloat16 params, not float16")
    es = _esize(param_dtype)
    half = param_dtype in _HALF
    floating = param_dtype.is_floating_point
    ses = _esize(state_dtype) if (state_dtype is not None and floating) else es
    out: list[tuple[str, int, int]] = []
    if master_weights and half and master_remainders:
        out += [("param", es, es), ("grad", es, 0), ("master_remainder", 2, 2)]
    elif master_weights and half:
        out += [("param", 0, es), ("grad", es, 0), ("master_param", 4, 4)]
    else:  # stochastic rounding reads and writes the same tensors
        out += [("param", es, es), ("grad", es, 0)]
    out += [(r, ses, ses) for r in roles]
    return out


def _precision_bytes(family, param_dtype, **kw) -> int:
    return sum(r + w for _name, r, w in element_traffic(family, param_dtype, **kw))


def bytes_per_element(
    family: str,
    elem_size: int,
    *,
    momentum: float = 0.0,
    amsgrad: bool = False,
    centered: bool = False,
    master_weights: bool = False,
    master_remainders: bool = False,
    state_dtype: torch.dtype | None = None,
    stochastic_rounding: bool = False,
) -> int:
    """Bytes one step must move per parameter element of ``elem_size`` bytes.

    Without precision options: (reads + writes) * ``elem_size``: SGD 3 * es plain, 5 * es with
    momentum; Adam/AdamW 7 * es, 9 * es with amsgrad; RMSprop, Adagrad, Lion 5 * es. The precision
    options apply to 2-byte (16-bit) params; see :func:`element_traffic` and the module docstring.
    """
    if elem_size <= 0:
        raise ValueError("elem_size must be positive")
    precision = dict(master_weights=master_weights, master_remainders=master_remainders,
                     state_dtype=state_dtype, stochastic_rounding=stochastic_rounding)
    if not master_weights and state_dtype is None:
        reads, writes = tensors_touched(family, momentum=momentum, amsgrad=amsgrad, centered=centered)
        element_traffic(family, torch.float32, momentum=momentum, amsgrad=amsgrad, centered=centered,
                        **precision)  # validates the combination
        return (reads + writes) * int(elem_size)
    # A stand-in dtype of the same size: bfloat16 for 2 bytes (remainders allowed), else float32/64.
    stand_in = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}.get(int(elem_size))
    if stand_in is None:
        raise ValueError(f"precision options need a 2, 4 or 8 byte element size, got {elem_size}")
    return _precision_bytes(family, stand_in, momentum=momentum, amsgrad=amsgrad, centered=centered,
                            **precision)


def step_bytes(
    family: str,
    params: int | Iterable[torch.Tensor] | Iterable[tuple[int, ...]],
    dtype: torch.dtype = torch.float32,
    *,
    momentum: float = 0.0,
    amsgrad: bool = False,
    centered: bool = False,
    master_weights: bool = False,
    master_remainders: bool = False,
    state_dtype: torch.dtype | None = None,
    stochastic_rounding: bool = False,
) -> int:
    """Total bytes one optimizer step over ``params`` must move (the roofline numerator).

    ``params`` is a total element count, an iterable of tensors, or an iterable of shapes.
    Returns ``numel_total * bytes per element`` for ``dtype`` params with the given options.

    >>> step_bytes("adam", [(10, 10), (10,)], torch.float32)   # 110 elements * 7 * 4
    3080
    >>> step_bytes("sgd", 1000, torch.bfloat16, momentum=0.9)   # 1000 * 5 * 2
    10000
    >>> step_bytes("adam", 1000, torch.bfloat16, master_weights=True, state_dtype=torch.float32)
    28000
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
    return numel * _precision_bytes(family, dtype, momentum=momentum, amsgrad=amsgrad, centered=centered,
                                    master_weights=master_weights, master_remainders=master_remainders,
                                    state_dtype=state_dtype, stochastic_rounding=stochastic_rounding)
