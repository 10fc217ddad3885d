"""fusedopt.Adam and fusedopt.AdamW: torch.optim.Adam / AdamW with a fused step.

They subclass torch's classes, so the constructor signature, defaults, validation and error
messages, ``__setstate__`` for old checkpoints and the state_dict format are torch's own; only
``step`` differs: every param of every group on a device is updated by one op call.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype

from fusedopt.optim._fused import FusedStepMixin


def _new_step(p: Tensor) -> Tensor:
    # On an accelerator the kernel increments the counter in device memory (no host sync, and
    # capturable in a CUDA graph), as torch's fused and capturable paths keep it; on the CPU it
    # stays where torch's default path keeps it.
    if p.device.type == "cpu":
        return torch.tensor(0.0, dtype=_get_scalar_dtype())
    return torch.zeros((), dtype=torch.float32, device=p.device)


def _place_step(p: Tensor, state: dict) -> None:
    """A loaded (or torch-made) step counter where the fused step keeps it: torch.optim's default
    path keeps `step` on the CPU; ours lives with the param on an accelerator, as float32."""
    step = state["step"]
    if not torch.is_tensor(step) or step.dtype not in (torch.float32, torch.float64):
        # a number, or a counter of another dtype (an int64 one torch.optim would go on with):
        # the kernels count in float32 or float64, the dtypes torch itself makes
        step = state["step"] = torch.tensor(float(step), dtype=_get_scalar_dtype())
    if p.device.type != "cpu" and (step.device != p.device or step.dtype != torch.float32):
        state["step"] = step.to(device=p.device, dtype=torch.float32)
    elif p.device.type == "cpu" and step.device.type != "cpu":
        state["step"] = step.cpu()


class _FusedAdamStep(FusedStepMixin):
    _rule = "adam"

    def _structure(self, group):
        return bool(group["amsgrad"])

    def _prepare_state(self, p: Tensor, group: dict, state: dict) -> None:
        if len(state) == 0:
            state["step"] = _new_step(p)
            state["exp_avg"] = self._new_state(p)
            state["exp_avg_sq"] = self._new_state(p)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = self._new_state(p)
            return
        _place_step(p, state)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = self._new_state(p)

    def _hyper_row(self, group: dict) -> dict:
        beta1, beta2 = group["betas"]
        return dict(beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                    amsgrad=group["amsgrad"], maximize=group["maximize"],
                    decoupled=group["decoupled_weight_decay"])


_PRECISION_DOC = """
Precision options (keyword-only; the defaults are torch's behaviour):

- ``master_weights``: float16 / bfloat16 params get a float32 master copy
  (``state["master_param"]``); the step updates the master and writes the rounded param in the
  same pass (bfloat16: to nearest, ties away from zero; float16: to nearest even).
- ``master_remainders``: with ``master_weights``, bfloat16 params keep only the master's low
  16 bits (``state["master_remainder"]``, int16): bit-identical results, 2 bytes less per param.
- ``state_dtype``: storage dtype of every moment / momentum buffer (float32, float16 or bfloat16),
  whatever the param dtype; math is float32 (float64 for float64 params).
- ``stochastic_rounding``: bfloat16 params without a master are rounded stochastically
  (unbiased), from a seed drawn from torch's default generator each step.
"""
class Adam(_FusedAdamStep, torch.optim.Adam):
    __doc__ = (
        "Fused drop-in for :class:`torch.optim.Adam` (same arguments, state and behaviour).\n\n"
        "The whole step is one fused kernel call per device. ``foreach``, ``fused`` and\n"
        "``capturable`` are accepted for compatibility; the fused step never syncs with the\n"
        "host and keeps accelerator step counters on the device.\n" + _PRECISION_DOC + "\n"
        + (torch.optim.Adam.__doc__ or "")
    )

    def __init__(self, params, lr: float | Tensor = 1e-3,
                 betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, decoupled_weight_decay: bool = False,
                 master_weights: bool = False, master_remainders: bool = False,
                 state_dtype: torch.dtype | None = None, stochastic_rounding: bool = False,
                 max_grad_norm: float | None = None, grad_norm_type: float = 2.0) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable, differentiable=differentiable,
                         fused=fused, decoupled_weight_decay=decoupled_weight_decay)
        self._fused_init(master_weights, master_remainders, state_dtype, stochastic_rounding,
                         max_grad_norm, grad_norm_type)


class AdamW(_FusedAdamStep, torch.optim.AdamW):
    __doc__ = (
        "Fused drop-in for :class:`torch.optim.AdamW` (same arguments, state and behaviour).\n\n"
        "The whole step is one fused kernel call per device.\n" + _PRECISION_DOC + "\n"
        + (torch.optim.AdamW.__doc__ or "")
    )

    def __init__(self, params, lr: float | Tensor = 1e-3,
                 betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None,
                 master_weights: bool = False, master_remainders: bool = False,
                 state_dtype: torch.dtype | None = None, stochastic_rounding: bool = False,
                 max_grad_norm: float | None = None, grad_norm_type: float = 2.0) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         foreach=foreach, capturable=capturable, differentiable=differentiable,
                         fused=fused)
        self._fused_init(master_weights, master_remainders, state_dtype, stochastic_rounding,
                         max_grad_norm, grad_norm_type)
