"""The fused ops (``torch.ops.fusedopt.adam_`` / ``sgd_`` / ``grad_norm_``), their fake implementations, and the
functional forms ``fusedopt.ops.adam`` / ``fusedopt.ops.sgd`` in the style of
``torch.optim.adam.adam``: one param group, lists of tensors, one op call per device.

The ops are declared in C++ (``csrc/ops.cpp``) and implemented per backend; the dispatcher picks
the CPU or CUDA kernel from the tensors' device, so nothing here branches on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fusedopt._extension import _C, extension_available, require

if extension_available():
    # Each update rule's hyper columns, state roles (torch's state-dict keys, in the order the op
    # takes them) and whether it counts steps: csrc/update_rules.h, read from the extension.
    RULES: dict[str, dict] = {name: dict(spec) for name, spec in _C.RULES.items()}
    ADAM_COLUMNS: dict[str, int] = dict(_C.ADAM_COLUMNS)
    SGD_COLUMNS: dict[str, int] = dict(_C.SGD_COLUMNS)

    # The ops only mutate their inputs in place and return nothing, so their fake (meta)
    # implementations have nothing to compute: they let torch.compile and FakeTensor trace
    # optimizer.step(). Registered for the Meta key too, they are also what a call reaches when
    # any argument is a meta tensor: all on meta is a no-op (a model traced on the meta device),
    # but meta mixed with real tensors is refused, as the kernels' own device checks would.
    def _one_device(op: str, **args) -> None:
        real = meta = None
        for name, value in args.items():
            for i, t in enumerate(value if isinstance(value, (list, tuple)) else [value]):
                if not isinstance(t, Tensor):
                    continue
                where = f"{name}[{i}]" if isinstance(value, (list, tuple)) else name
                if t.device.type == "meta":
                    meta = meta or where
                else:
                    real = real or (where, t.device)
        if meta and real:
            raise RuntimeError(f"fusedopt::{op}: {meta} is on meta but {real[0]} is on {real[1]}: "
                               "every tensor of the call must be on the params' device")

    @torch.library.register_fake("fusedopt::adam_")
    def _adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                   group_sizes, hyper, lr_tensors, grad_scale=None, found_inf=None, *,
                   schedule_state, schedule=None) -> None:
        _one_device("adam_", params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                    max_exp_avg_sqs=max_exp_avg_sqs, state_steps=state_steps, lr_tensors=lr_tensors,
                    grad_scale=grad_scale, found_inf=found_inf, schedule_state=schedule_state,
                    schedule=schedule)

    @torch.library.register_fake("fusedopt::sgd_")
    def _sgd_fake(params, grads, momentum_buffers, group_sizes, hyper, lr_tensors,
                  fresh_buffers, grad_scale=None, found_inf=None, *, schedule_state,
                  schedule=None) -> None:
        _one_device("sgd_", params=params, grads=grads, momentum_buffers=momentum_buffers,
                    lr_tensors=lr_tensors, grad_scale=grad_scale, found_inf=found_inf,
                    schedule_state=schedule_state, schedule=schedule)

    @torch.library.register_fake("fusedopt::step_")
    def _step_fake(rule, params, grads, states, masters, state_steps, group_sizes, hyper,
                   lr_tensors, fresh, grad_scale=None, found_inf=None, *, schedule_state,
                   schedule=None, clip=None, master_mode=0, seed=-1) -> None:
        _one_device("step_", params=params, grads=grads, states=states, masters=masters,
                    state_steps=state_steps, lr_tensors=lr_tensors, grad_scale=grad_scale,
                    found_inf=found_inf, schedule_state=schedule_state, schedule=schedule, clip=clip)

    @torch.library.register_fake("fusedopt::step_.keep_grads")
    def _step_keep_grads_fake(rule, params, grads, states, masters, state_steps, group_sizes, hyper,
                              lr_tensors, fresh, found_inf=None, *, schedule_state, schedule=None,
                              clip=None, master_mode=0, seed=-1) -> None:
        _one_device("step_", params=params, grads=grads, states=states, masters=masters,
                    state_steps=state_steps, lr_tensors=lr_tensors, found_inf=found_inf,
                    schedule_state=schedule_state, schedule=schedule, clip=clip)

    # grad_norm_ only writes its `out` argument in place.
    @torch.library.register_fake("fusedopt::grad_norm_")
    def _grad_norm_fake(grads, norm_type, max_norm, out, grad_scale=None) -> None:
        _one_device("grad_norm_", grads=grads, out=out, grad_scale=grad_scale)
else:
    RULES = {}
    ADAM_COLUMNS = {}
    SGD_COLUMNS = {}


def hyper_values(rows: Sequence[dict[str, float]], columns: dict[str, int]) -> list[list[float]]:
    """The values of hyper_table, as Python floats."""
    table = [[0.0] * len(columns) for _ in rows]
    for r, row in enumerate(rows):
        for name, value in row.items():
            table[r][columns[name]] = float(value)
    return table


def hyper_table(rows: Sequence[dict[str, float]], columns: dict[str, int]) -> Tensor:
    """The ops' float64 CPU table of per-group hyperparameters: one row per group."""
    return torch.tensor(hyper_values(rows, columns), dtype=torch.float64)


def _check_lengths(fn: str, params: Sequence[Tensor], **lists: Sequence) -> None:
    """Every per-param list has one entry per param (the op would only see the slices taken)."""
    for name, values in lists.items():
        if len(values) != len(params):
            raise ValueError(f"fusedopt.ops.{fn}: {name} has length {len(values)} but params has length "
                             f"{len(params)}; every list takes one entry per param")


def _by_device(params: Sequence[Tensor]) -> dict[torch.device, list[int]]:
    out: dict[torch.device, list[int]] = {}
    for i, p in enumerate(params):
        out.setdefault(p.device, []).append(i)
    return out


def on_device(t: Tensor | None, device: torch.device) -> Tensor | None:
    """A GradScaler tensor (grad_scale / found_inf) for the op call of one device: CPU scalars
    are read by any kernel, device scalars are moved without a sync."""
    if t is None or t.device == device or t.device.type == "cpu":
        return t
    return t.to(device, non_blocking=True)


def _lr_entry(lr: float | Tensor, device: torch.device, lr_tensors: list[Tensor]) -> tuple[float, int]:
    """(lr value, lr_index): a floating-point tensor lr on the params' device or the CPU goes to the
    op, which reads it (a device one in the kernel), so a changing tensor lr is no Python float:
    torch.compile neither breaks the graph on ``.item()`` nor recompiles for it. Anything else is
    read here."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr.is_floating_point() and (lr.device == device or lr.device.type == "cpu"):
            lr_tensors.append(lr)
            return 0.0, len(lr_tensors) - 1
        return float(lr), -1
    return float(lr), -1


def adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    decoupled_weight_decay: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """Functional Adam/AdamW over one param group, fused: one op call per device.

    Same arguments as ``torch.optim.adam.adam`` (without foreach/fused/capturable, which do not
    apply), for real params only: complex ones are refused (the optimizer classes step them, as
    real views). ``state_steps`` are incremented in place; with ``found_inf`` nonzero nothing
    changes.
    """
    require()
    _check_lengths("adam", params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                   state_steps=state_steps, **(dict(max_exp_avg_sqs=max_exp_avg_sqs) if amsgrad else {}))
    for dev, idx in _by_device(params).items():
        lr_tensors: list[Tensor] = []
        lr_value, lr_index = _lr_entry(lr, dev, lr_tensors)
        row = dict(lr=lr_value, beta1=float(beta1), beta2=float(beta2), eps=float(eps),
                   weight_decay=float(weight_decay), amsgrad=amsgrad, maximize=maximize,
                   decoupled=decoupled_weight_decay, lr_index=lr_index)
        torch.ops.fusedopt.adam_(
            [params[i] for i in idx], [grads[i] for i in idx], [exp_avgs[i] for i in idx],
            [exp_avg_sqs[i] for i in idx], [max_exp_avg_sqs[i] for i in idx] if amsgrad else [],
            [state_steps[i] for i in idx], [len(idx)], hyper_table([row], ADAM_COLUMNS),
            lr_tensors, on_device(grad_scale, dev), on_device(found_inf, dev), schedule_state=[])


def sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    *,
    weight_decay: float,
    momentum: float,
    lr: float | Tensor,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """Functional SGD over one param group, fused: one op call per device.

    Like ``torch.optim.sgd.sgd``: a ``None`` entry of ``momentum_buffer_list`` gets a new buffer
    (initialised with the gradient, as torch does) written back into the list, once the step has
    run: a call that raises, or that ``found_inf`` skips, leaves the entry ``None`` (learning that
    a step creating buffers was skipped reads ``found_inf``: on CUDA, a sync).
    """
    require()
    _check_lengths("sgd", params, grads=grads, **(dict(momentum_buffer_list=momentum_buffer_list)
                                                  if momentum != 0 else {}))
    for dev, idx in _by_device(params).items():
        lr_tensors: list[Tensor] = []
        lr_value, lr_index = _lr_entry(lr, dev, lr_tensors)
        row = dict(lr=lr_value, momentum=float(momentum), dampening=float(dampening),
                   weight_decay=float(weight_decay), nesterov=nesterov, maximize=maximize,
                   lr_index=lr_index)
        bufs: list[Tensor] = []
        fresh: list[int] = []
        if momentum != 0:
            for k, i in enumerate(idx):
                buf = momentum_buffer_list[i]
                if buf is None:
                    buf = torch.zeros_like(params[i], memory_format=torch.preserve_format)
                    fresh.append(k)
                bufs.append(buf)
        found_inf_here = on_device(found_inf, dev)
        torch.ops.fusedopt.sgd_(
            [params[i] for i in idx], [grads[i] for i in idx], bufs, [len(idx)],
            hyper_table([row], SGD_COLUMNS), lr_tensors, fresh, on_device(grad_scale, dev),
            found_inf_here, schedule_state=[])
        # the new buffers join the list only when the step wrote them (a skipped step made none)
        if fresh and not (found_inf_here is not None and found_inf_here.item() != 0):
            for k in fresh:
                momentum_buffer_list[idx[k]] = bufs[k]
