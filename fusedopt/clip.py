"""``fusedopt.clip_grad_norm_``: a drop-in for ``torch.nn.utils.clip_grad_norm_`` whose total norm
is one fused multi-tensor reduction per device (``torch.ops.fusedopt.grad_norm_``), followed by one
``torch._foreach_mul_`` per device that scales the grads.

What it computes, and where it differs from torch:

- The norm of every grad on a device is reduced by one op call, in float64 (the CPU kernel and the
  CUDA kernel both accumulate in float64 and round once), where torch computes a float32 norm per
  tensor and then the norm of those. For float32 grads the two agree within a few float32 ulps;
  fusedopt's is the more accurate one. The CPU result is bit-identical whatever the thread count.
- The returned norm has torch's dtype (the promoted dtype of the grads: bfloat16 for bfloat16
  grads, float64 as soon as one grad is float64) and device (that of the first grad), and the clip
  coefficient is computed from it exactly as torch computes it, so the grads are scaled by the
  same factor whenever the norms agree.
- No host synchronisation unless ``error_if_nonfinite=True`` (which needs one, as in torch). On
  CUDA the norm is one kernel launch, capturable in a CUDA graph. On the CPU, where reading the
  coefficient costs nothing, a coefficient of exactly 1 (norm below max_norm) skips the multiply,
  which would leave the grads bit for bit unchanged anyway (not under torch.compile).
- Orders: ``norm_type`` 2, ``inf``, 1 and any other finite ``p > 0`` are fused. Orders torch also
  accepts but the op does not (``0``, negative ones, ``-inf``), grads that are not plain dense
  float32/float64/float16/bfloat16 tensors (sparse, complex, tensor subclasses such as DTensor),
  devices other than CPU and CUDA, and a missing compiled extension all run
  ``torch.nn.utils.clip_grad_norm_`` itself.
"""

from __future__ import annotations

import functools
import math
import types
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor

try:  # a dense tensor in any stride order (transposed, channels_last) is read in place
    from torch._prims_common import is_non_overlapping_and_dense_or_false as _is_dense
except ImportError:  # pragma: no cover - private helper gone: copy every non-contiguous grad
    def _is_dense(t: Tensor) -> bool:
        return False

from fusedopt._extension import extension_available

__all__ = ["clip_grad_norm_"]

_FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_FUSED_DEVICES = ("cpu", "cuda")

_NONFINITE_MESSAGE = (
    "The total norm of order {} for gradients from `parameters` is non-finite, so it cannot be "
    "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
    "`error_if_nonfinite=False`"
)


def _fusable(grads: list[Tensor], norm_type: float) -> bool:
    if not extension_available():
        return False
    if not (norm_type > 0.0):  # also NaN; inf is fine
        return False
    for g in grads:
        if norm_type == math.inf and g.numel() == 0:
            return False  # torch raises (the inf norm of nothing has no identity): let it say so
        if (type(g) is not torch.Tensor or g.layout != torch.strided or g.dtype not in _FUSED_DTYPES
                or g.device.type not in _FUSED_DEVICES):
            return False
    return True


def _dense(g: Tensor) -> Tensor:
    """The grad itself when the op can read it in place (any dense layout), else a dense copy."""
    if g.is_contiguous() or _is_dense(g):
        return g
    return g.contiguous()


@torch.no_grad()
def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    r"""Clips the gradient norm of an iterable of parameters, like
    :func:`torch.nn.utils.clip_grad_norm_` (same arguments, return value and errors).

    The norm is computed over the gradients of all parameters together, as if they were
    concatenated into a single vector, and the gradients are scaled in place by
    ``min(max_norm / (total_norm + 1e-6), 1)``.

    Args:
        parameters: an iterable of Tensors, or a single Tensor, whose gradients are clipped.
        max_norm: max norm of the gradients.
        norm_type: order of the norm: a positive number or ``inf`` run fused; other orders
            accepted by torch fall back to torch.
        error_if_nonfinite: raise ``RuntimeError`` (torch's message) if the total norm is NaN or
            infinite. This reads the norm on the host (a synchronisation on CUDA).
        foreach: as in torch, for the scaling: ``False`` scales tensor by tensor, ``None`` or
            ``True`` with ``torch._foreach_mul_``.

    Returns:
        The total norm of the gradients (a 0-dim tensor on the first gradient's device, in their
        promoted dtype; ``torch.tensor(0.0)`` when no parameter has a gradient).
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if is_generator and len(parameters) == 0:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.",
                          stacklevel=3)
    grads = [p.grad for p in parameters if p.grad is not None]
    max_norm = float(max_norm)
    norm_type = float(norm_type)
    if not _fusable(grads, norm_type):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite,
                                              foreach)
    if len(grads) == 0:
        return torch.tensor(0.0)

    by_device: dict[torch.device, list[Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    first_device = grads[0].device
    # torch's total norm has the promoted dtype of the grads' norms (torch.stack promotes).
    result_dtype = functools.reduce(torch.promote_types, (g.dtype for g in grads))
    out_dtype = torch.float64 if result_dtype == torch.float64 else torch.float32

    outs = []
    for device, device_grads in by_device.items():
        out = torch.empty(2, dtype=out_dtype, device=device)
        torch.ops.fusedopt.grad_norm_([_dense(g) for g in device_grads], norm_type, max_norm, out)
        outs.append(out)

    if len(outs) == 1 and result_dtype == out_dtype:
        # The kernel computed the coefficient from this very norm, as torch would.
        total_norm, clip_coef = outs[0][0], outs[0][1]
    else:
        if len(outs) == 1:
            total_norm = outs[0][0].to(result_dtype)
        else:  # one norm over all devices, combined as torch combines per-tensor norms
            total_norm = torch.linalg.vector_norm(
                torch.stack([o[0].to(first_device) for o in outs]), norm_type).to(result_dtype)
        clip_coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)

    if error_if_nonfinite and torch.logical_or(total_norm.isnan(), total_norm.isinf()):
        raise RuntimeError(_NONFINITE_MESSAGE.format(norm_type))

    for device, device_grads in by_device.items():
        if (device.type == "cpu" and clip_coef.device.type == "cpu"
                and not torch.compiler.is_compiling() and float(clip_coef) == 1.0):
            # On the CPU reading the coefficient costs no synchronisation, and multiplying by
            # exactly 1 would leave every grad bit for bit as it is (a NaN or infinite norm gives
            # NaN or 0): the common unclipped step skips a pass over all grads.
            continue
        coef = clip_coef.to(device)
        if foreach is False:
            for g in device_grads:
                g.mul_(coef)
        else:
            torch._foreach_mul_(device_grads, coef)
    return total_norm
