"""fusedopt.Lion: Lion as published (Chen et al. 2023, "Symbolic Discovery of Optimization
Algorithms"), with a fused step. torch.optim has no Lion, so the class follows torch's style
(validation, defaults, state) on torch.optim.Optimizer; the rule is LionRule in
csrc/update_rules.h:

    c = beta1 * m + (1 - beta1) * g
    p = p * (1 - lr * weight_decay) - lr * sign(c)        (decoupled weight decay)
    m = beta2 * m + (1 - beta2) * g

Lion keeps one state tensor per param (``exp_avg``), half of Adam's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedopt.optim._fused import FusedStepMixin
from fusedopt.optim.adam import _PRECISION_DOC


class Lion(FusedStepMixin, torch.optim.Optimizer):
    __doc__ = (
        "Lion (EvoLved Sign Momentum), fused: one kernel call per device for every param.\n\n"
        "Args:\n"
        "    params: iterable of parameters or named parameters to optimize, or of dicts\n"
        "        defining parameter groups.\n"
        "    lr (float, Tensor, optional): learning rate (default: 1e-4). Lion's updates have\n"
        "        unit size per element: use a 3-10x smaller lr than AdamW's.\n"
        "    betas (Tuple[float, float], optional): interpolation factor of the update direction\n"
        "        and decay of the momentum (default: (0.9, 0.99)).\n"
        "    weight_decay (float, optional): decoupled weight decay (default: 0); use 3-10x\n"
        "        AdamW's, so that lr * weight_decay stays the same.\n"
        "    maximize (bool, optional): maximize the objective (default: False).\n"
        "    foreach, differentiable: accepted in torch's style; differentiable=True is refused.\n"
        + _PRECISION_DOC
    )
    _rule = "lion"

    def __init__(self, params, lr: float | Tensor = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, maximize: bool = False, foreach: bool | None = None,
                 differentiable: bool = False, master_weights: bool = False,
                 master_remainders: bool = False, state_dtype: torch.dtype | None = None,
                 stochastic_rounding: bool = False,
                 max_grad_norm: float | None = None, grad_norm_type: float = 2.0) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize,
                        foreach=foreach, differentiable=differentiable)
        super().__init__(params, defaults)
        self._fused_init(master_weights, master_remainders, state_dtype, stochastic_rounding,
                         max_grad_norm, grad_norm_type)

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)

    def _structure(self, group):
        return None

    def _prepare_state(self, p: Tensor, group: dict, state: dict) -> None:
        if "exp_avg" not in state:
            state["exp_avg"] = self._new_state(p)

    def _hyper_row(self, group: dict) -> dict:
        beta1, beta2 = group["betas"]
        return dict(beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                    maximize=group["maximize"])
