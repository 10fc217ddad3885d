"""fusedopt.RMSprop and fusedopt.Adagrad: torch.optim.RMSprop / Adagrad with a fused step (see
fusedopt.optim.adam for the pattern). Their per-element rules are RmspropRule and AdagradRule in
csrc/update_rules.h, in torch's operation order."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedopt.optim._fused import FusedStepMixin
from fusedopt.optim.adam import _PRECISION_DOC, _place_step, _new_step


class RMSprop(FusedStepMixin, torch.optim.RMSprop):
    __doc__ = (
        "Fused drop-in for :class:`torch.optim.RMSprop` (same arguments, state and behaviour).\n\n"
        "The whole step is one fused kernel call per device. ``capturable`` and ``foreach`` are\n"
        "accepted for compatibility; accelerator step counters stay on the device.\n"
        + _PRECISION_DOC + "\n" + (torch.optim.RMSprop.__doc__ or "")
    )
    _rule = "rmsprop"
    _sparse_hint = "neither does torch.optim.RMSprop"

    def __init__(self, params, lr: float | Tensor = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0, momentum: float = 0, centered: bool = False,
                 capturable: bool = False, foreach: bool | None = None, maximize: bool = False,
                 differentiable: bool = False, *, master_weights: bool = False,
                 master_remainders: bool = False, state_dtype: torch.dtype | None = None,
                 stochastic_rounding: bool = False,
                 max_grad_norm: float | None = None, grad_norm_type: float = 2.0) -> None:
        super().__init__(params, lr, alpha, eps, weight_decay, momentum, centered, capturable,
                         foreach, maximize, differentiable)
        self._fused_init(master_weights, master_remainders, state_dtype, stochastic_rounding,
                         max_grad_norm, grad_norm_type)

    def _structure(self, group):
        return (group["momentum"] > 0, bool(group["centered"]))

    def _prepare_state(self, p: Tensor, group: dict, state: dict) -> None:
        if len(state) == 0:
            state["step"] = _new_step(p)
            state["square_avg"] = self._new_state(p)
        else:
            _place_step(p, state)
        if group["momentum"] > 0 and "momentum_buffer" not in state:
            state["momentum_buffer"] = self._new_state(p)
        if group["centered"] and "grad_avg" not in state:
            state["grad_avg"] = self._new_state(p)

    def _hyper_row(self, group: dict) -> dict:
        return dict(alpha=group["alpha"], eps=group["eps"], weight_decay=group["weight_decay"],
                    momentum=group["momentum"], centered=group["centered"], maximize=group["maximize"])


class Adagrad(FusedStepMixin, torch.optim.Adagrad):
    __doc__ = (
        "Fused drop-in for :class:`torch.optim.Adagrad` (same arguments, state and behaviour).\n\n"
        "The whole step is one fused kernel call per device; ``foreach`` and ``fused`` are accepted\n"
        "for compatibility. Like torch's, the state (``step``, ``sum``) exists from construction.\n"
        + _PRECISION_DOC + "\n" + (torch.optim.Adagrad.__doc__ or "")
    )
    _rule = "adagrad"
    _sparse_hint = "torch.optim.Adagrad steps sparse gradients"

    def __init__(self, params, lr: float | Tensor = 1e-2, lr_decay: float = 0, weight_decay: float = 0,
                 initial_accumulator_value: float = 0, eps: float = 1e-10,
                 foreach: bool | None = None, *, maximize: bool = False, differentiable: bool = False,
                 fused: bool | None = None, master_weights: bool = False,
                 master_remainders: bool = False, state_dtype: torch.dtype | None = None,
                 stochastic_rounding: bool = False,
                 max_grad_norm: float | None = None, grad_norm_type: float = 2.0) -> None:
        super().__init__(params, lr, lr_decay, weight_decay, initial_accumulator_value, eps, foreach,
                         maximize=maximize, differentiable=differentiable, fused=fused)
        self._fused_init(master_weights, master_remainders, state_dtype, stochastic_rounding,
                         max_grad_norm, grad_norm_type)

    def _structure(self, group):
        return None

    def _prepare_state(self, p: Tensor, group: dict, state: dict) -> None:
        if "step" not in state:  # a param added after construction, or a cleared state
            state["step"] = _new_step(p)
        else:
            _place_step(p, state)
        if "sum" not in state:
            # torch fills with the constructor's initial_accumulator_value, whatever the group says
            init = self.defaults["initial_accumulator_value"]
            state["sum"] = self._new_state(p, complex(init, init) if torch.is_complex(p) else init)

    def _hyper_row(self, group: dict) -> dict:
        return dict(lr_decay=group["lr_decay"], weight_decay=group["weight_decay"], eps=group["eps"],
                    maximize=group["maximize"])
