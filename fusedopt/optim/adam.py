"""fusedopt.Adam and fusedopt.AdamW: torch.optim.Adam / AdamW with a fused step.

They subclass torch's classes, so the constructor signature, defaults, validation and error
messages, ``__setstate__`` for old checkpoints and the state_dict format are torch's own; only
``step`` differs: every param of every group on a device is updated by one op call.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype

from fusedopt.ops import ADAM_COLUMNS
from fusedopt._extension import require
from fusedopt.optim._fused import FusedStepMixin, _Batch, _is_none, real_views


def _new_step(p: Tensor) -> Tensor:
    # On an accelerator the kernel increments the counter in device memory (no host sync, and
    # capturable in a CUDA graph), as torch's fused and capturable paths keep it; on the CPU it
    # stays where torch's default path keeps it.
    if p.device.type == "cpu":
        return torch.tensor(0.0, dtype=_get_scalar_dtype())
    return torch.zeros((), dtype=torch.float32, device=p.device)


class _FusedAdamStep(FusedStepMixin):
    def _structure(self, group):
        return bool(group["amsgrad"])

    def _entry_extra(self, group):
        return bool(group["amsgrad"])

    def _prepare_state(self, p: Tensor, group: dict, state: dict) -> None:
        if len(state) == 0:
            state["step"] = _new_step(p)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            return
        # A loaded state: torch.optim's default path keeps `step` on the CPU; ours lives with
        # the param on an accelerator.
        step = state["step"]
        if not torch.is_tensor(step):
            step = state["step"] = torch.tensor(float(step), dtype=_get_scalar_dtype())
        if p.device.type != "cpu" and (step.device != p.device or step.dtype != torch.float32):
            state["step"] = step.to(device=p.device, dtype=torch.float32)
        elif p.device.type == "cpu" and step.device.type != "cpu":
            state["step"] = step.cpu()
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    _columns = ADAM_COLUMNS

    def _hyper_row(self, group: dict) -> dict:
        beta1, beta2 = group["betas"]
        return dict(beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                    amsgrad=group["amsgrad"], maximize=group["maximize"],
                    decoupled=group["decoupled_weight_decay"])

    def _launch(self, batch: _Batch, grad_scale, found_inf, owners=None) -> bool:
        hyper, lr_tensors, sched = self._group_args(batch.device)
        if self._use_plan_entry(batch):
            return require().adam_plan_step(
                batch.params, batch.states, batch.extra, batch.group_sizes, hyper, lr_tensors,
                grad_scale, found_inf, sched["schedule_state"], sched.get("schedule"), owners)
        grads = [p.grad for p in batch.params]
        if any(map(_is_none, grads)):
            return False
        states = batch.states
        cidx = batch.complex_idx
        max_sqs = [s["max_exp_avg_sq"] for s, ams in zip(states, batch.extra) if ams]
        if cidx:
            max_sqs = [torch.view_as_real(t) if t.is_complex() else t for t in max_sqs]
        torch.ops.fusedopt.adam_(
            real_views(batch.params, cidx),
            real_views(grads, cidx),
            real_views([s["exp_avg"] for s in states], cidx),
            real_views([s["exp_avg_sq"] for s in states], cidx),
            max_sqs,
            [s["step"] for s in states],
            batch.group_sizes,
            hyper,
            lr_tensors,
            grad_scale,
            found_inf,
            **sched,
        )
        return True


class Adam(_FusedAdamStep, torch.optim.Adam):
    __doc__ = (
        "Fused drop-in for :class:`torch.optim.Adam` (same arguments, state and behaviour).\n\n"
        "The whole step is one fused kernel call per device. ``foreach``, ``fused`` and\n"
        "``capturable`` are accepted for compatibility; the fused step never syncs with the\n"
        "host and keeps accelerator step counters on the device.\n\n" + (torch.optim.Adam.__doc__ or "")
    )

    def __init__(self, params, lr: float | Tensor = 1e-3,
                 betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, amsgrad: bool = False, *, foreach: bool | None = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, decoupled_weight_decay: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable, differentiable=differentiable,
                         fused=fused, decoupled_weight_decay=decoupled_weight_decay)
        self._fused_init()


class AdamW(_FusedAdamStep, torch.optim.AdamW):
    __doc__ = (
        "Fused drop-in for :class:`torch.optim.AdamW` (same arguments, state and behaviour).\n\n"
        "The whole step is one fused kernel call per device.\n\n" + (torch.optim.AdamW.__doc__ or "")
    )

    def __init__(self, params, lr: float | Tensor = 1e-3,
                 betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         foreach=foreach, capturable=capturable, differentiable=differentiable,
                         fused=fused)
        self._fused_init()
