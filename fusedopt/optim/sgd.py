"""fusedopt.SGD: torch.optim.SGD with a fused step (see fusedopt.optim.adam for the pattern)."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from fusedopt.optim._fused import FusedStepMixin, _Batch, local_tensor
from fusedopt.optim.adam import _PRECISION_DOC


class SGD(FusedStepMixin, torch.optim.SGD):
    __doc__ = (
        "Fused drop-in for :class:`torch.optim.SGD` (same arguments, state and behaviour).\n\n"
        "The whole step is one fused kernel call per device. A momentum buffer is allocated\n"
        "before its first step and marked fresh, so the kernel initialises it with the gradient\n"
        "as torch does; if GradScaler skips that step the buffer is dropped again, as torch\n"
        "would never have made it. On CUDA, learning whether such a step was skipped reads\n"
        "``found_inf`` (a host sync), only on a step that creates buffers, and such a step\n"
        "cannot be captured in a CUDA graph (take one eager step first).\n" + _PRECISION_DOC + "\n"
        + (torch.optim.SGD.__doc__ or "")
    )

    def __init__(self, params, lr: float | Tensor = 1e-3, momentum: float = 0,
                 dampening: float = 0, weight_decay: float | Tensor = 0, nesterov: bool = False,
                 *, maximize: bool = False, foreach: bool | None = None,
                 differentiable: bool = False, fused: bool | None = None,
                 master_weights: bool = False, master_remainders: bool = False,
                 state_dtype: torch.dtype | None = None, stochastic_rounding: bool = False,
                 max_grad_norm: float | None = None, grad_norm_type: float = 2.0) -> None:
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov,
                         maximize=maximize, foreach=foreach, differentiable=differentiable,
                         fused=fused)
        self._fused_init(master_weights, master_remainders, state_dtype, stochastic_rounding,
                         max_grad_norm, grad_norm_type)
        # id(buffer) -> buffer for momentum buffers never written yet (kept alive so ids stay unique).
        self._fresh: dict[int, Tensor] = {}

    _rule = "sgd"
    _sparse_hint = "torch.optim.SGD (foreach=False) steps sparse gradients"

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._fresh = getattr(self, "_fresh", {})

    def _saved_param_state(self, state: dict) -> dict:
        # a buffer made for a step that then raised was never written: torch would have none
        out = super()._saved_param_state(state)
        buf = out.get("momentum_buffer")
        if buf is not None and self._fresh.get(id(buf)) is buf:
            del out["momentum_buffer"]
        return out

    def __getstate__(self):
        state = super().__getstate__()
        if self._fresh:  # pickle / deepcopy: without never-written buffers (the mark is not saved)
            saved = defaultdict(dict)
            for p, st in state["state"].items():
                saved[p] = self._saved_param_state(st)
            state["state"] = saved
        return state

    def _state_of(self, p: Tensor, group: dict) -> dict:
        # like torch, SGD without momentum keeps no state entry at all (unless a master weight
        # has to live somewhere, or one was loaded: a master it does not keep is dropped there)
        if (group["momentum"] != 0 or (self._master_mode and p.dtype in (torch.float16, torch.bfloat16))
                or p in self.state):
            return self.state[p]
        return {}

    def _structure(self, group):
        return group["momentum"] != 0

    def _entry_extra(self, group):
        return group["momentum"] != 0

    def _prepare_state(self, p: Tensor, group: dict, state: dict) -> None:
        if group["momentum"] != 0 and state.get("momentum_buffer") is None:
            buf = state["momentum_buffer"] = self._new_state(p)
            buf = local_tensor(buf)  # what the op sees of a DTensor buffer
            self._fresh[id(buf)] = buf

    def _hyper_row(self, group: dict) -> dict:
        return dict(momentum=group["momentum"], dampening=group["dampening"],
                    weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                    maximize=group["maximize"])

    def _state_moved(self, old: Tensor, new: Tensor) -> None:
        if self._fresh.pop(id(old), None) is old:
            self._fresh[id(new)] = new

    def _fresh_params(self, batch: _Batch) -> list[int]:
        fresh: list[int] = []
        if self._fresh:
            for i, (s, has) in enumerate(zip(batch.states, batch.extra)):
                buf = s.get("momentum_buffer") if has else None
                if buf is not None and self._fresh.get(id(buf)) is buf:
                    fresh.append(i)
        if fresh:
            _refuse_capture_of_fresh_buffers(batch.device)
        return fresh

    def _after_launch(self, batch: _Batch, fresh: list[int], found_inf, clip) -> None:
        if not fresh:
            return
        skipped = _skipped(found_inf, clip)
        for i in fresh:
            del self._fresh[id(batch.states[i]["momentum_buffer"])]
            if skipped:
                # torch creates no buffer on a skipped step: drop the ones made for this
                # one, so the state is torch's exactly and the next step makes them again
                state = batch.owner_states[i]
                del state["momentum_buffer"]
                if not state:
                    self.state.pop(batch.owners[i], None)
        if skipped:
            self._plan = None


def _refuse_capture_of_fresh_buffers(device: torch.device) -> None:
    """A step that creates momentum buffers tells the kernel so (the buffer takes the gradient
    itself); captured in a CUDA graph, every replay would do that again, silently turning momentum
    off. Such a step must be eager."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "fusedopt.SGD: this step creates momentum buffers, which cannot be captured in a CUDA "
            "graph (every replay would start the buffers afresh, turning momentum off); take one "
            "eager optimizer step before capturing"
        )


def _skipped(found_inf: Tensor | None, clip: Tensor | None) -> bool:
    """Whether the step skipped: GradScaler found an inf, or the clip's grad norm is not finite.
    (Never reached while capturing: _refuse_capture_of_fresh_buffers raised before the step.)"""
    if found_inf is not None and found_inf.item() != 0:
        return True
    return clip is not None and not bool(torch.isfinite(clip[0]))
