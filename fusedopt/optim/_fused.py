"""The fused step shared by fusedopt's optimizers.

A step gathers, per device, every param that has a gradient across all param groups into one
op call (``torch.ops.fusedopt.*``). Walking thousands of params in Python every step would cost
more than the update itself, so the walk happens once into a cached *plan* (params, their state
dicts, group sizes) that is rebuilt only when its structure changes: groups added or resized,
the state replaced (``load_state_dict``), a structural hyperparameter flipped (``amsgrad``,
``momentum`` on/off), or the set of params with a gradient changing. Each step still re-reads
the gradients, the state tensors and every hyperparameter, so edits to ``param_groups`` or to
state entries take effect at the next step.

DTensor params (FSDP2's ``fully_shard``, tensor parallelism) are stepped on their local shards:
the op sees only plain tensors, so no sharding propagation runs per step. The plan holds each
DTensor param's local shard and its state dict mapped to local tensors; the state itself stays
DTensor, laid out like the param, so ``torch.distributed.checkpoint`` sees what it sees with
torch.optim. Each step checks by identity that neither FSDP2 (``load_state_dict``,
``module.to``) nor the user replaced a local param or a state tensor (the plan is rebuilt if so);
the eager entry reads each local grad from its DTensor grad in C++ (elsewhere, the local grads are
bound to the local params' ``.grad`` for the op call and unbound after it).
"""

from __future__ import annotations

import operator
import re
import sys
from collections import defaultdict
from functools import partial
from itertools import repeat

import torch
from torch import Tensor

from fusedopt._extension import require
from fusedopt.ops import _lr_entry, hyper_table, on_device

_is_none = partial(operator.is_, None)
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_INDEX = re.compile(r"\b(?:params|grads|exp_avgs|exp_avg_sqs|state_steps)\[(\d+)\]")
_local_of = operator.attrgetter("_local_tensor")
_spec_of = operator.attrgetter("_spec")
_grad_of = operator.attrgetter("grad")


def _dtensor_type():
    """DTensor's class if torch.distributed.tensor is loaded, else None: a DTensor cannot exist
    before its module is imported, so fusedopt never imports it (nor pays for it) itself."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor; any other tensor as it is."""
    dt = _dtensor_type()
    return t._local_tensor if dt is not None and isinstance(t, dt) else t


class _TrackedState(defaultdict):
    """``optimizer.state`` that counts the changes a cached plan must notice (a param's state
    dict assigned, deleted, or the whole state cleared), so checking it costs O(1) per step
    instead of one Tensor.__hash__ (a Python call) per param."""

    def __init__(self, *args):
        super().__init__(dict, *args)
        self.version = 0

    def __setitem__(self, key, value):
        self.version += 1
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self.version += 1
        super().__delitem__(key)

    def _changed(name):  # noqa: N805 - a decorator factory used in the class body
        def method(self, *args, **kwargs):
            self.version += 1
            return getattr(defaultdict, name)(self, *args, **kwargs)
        method.__name__ = name
        return method

    clear = _changed("clear")
    pop = _changed("pop")
    popitem = _changed("popitem")
    update = _changed("update")
    setdefault = _changed("setdefault")
    del _changed

    def __reduce__(self):  # pickles (torch.save(optimizer), deepcopy) as a plain defaultdict
        return (defaultdict, (dict,), None, None, iter(self.items()))


class _Batch:
    """What one op call on one device needs, ordered group by group."""

    __slots__ = ("device", "params", "states", "group_sizes", "origin", "complex_idx", "extra", "plain",
                 "state_params", "state_dicts", "dtensor", "owners", "owner_states", "specs", "unwrapped")

    def __init__(self, device: torch.device, num_groups: int, dtensor: bool = False):
        self.device = device
        # What the op reads: the params and their state dicts; for a DTensor batch, the local
        # shards and dicts of the local state tensors.
        self.params: list[Tensor] = []
        self.states: list[dict] = []
        # The params as param_groups holds them (the keys of self.state) and their state dicts
        # in self.state: the same lists as params / states unless the batch is of DTensors.
        self.dtensor = dtensor
        self.owners: list[Tensor] = [] if dtensor else self.params
        self.owner_states: list[dict] = [] if dtensor else self.states
        self.specs: list = []  # DTensor batch: each param's DTensorSpec, which its grad must match
        # DTensor batch: (state dict, key, tensor) of every state tensor the plan unwrapped, as
        # three lists, so that checking them all for replacement is three C-level maps.
        self.unwrapped: tuple[list, list, list] = ([], [], [])
        self.group_sizes = [0] * num_groups
        self.origin: list[tuple[int, int]] = []  # (group index, index in group['params'])
        self.complex_idx: list[int] = []
        self.extra: list = []  # per-optimizer per-entry data (e.g. has an amsgrad buffer)
        self.plain = True  # every param a plain Tensor/Parameter: the eager fast entry applies
        # The params that keep state, and their state dicts as self.state held them at build time.
        self.state_params: list[Tensor] = []
        self.state_dicts: list[dict] = []


class _Plan:
    __slots__ = ("signature", "batches", "without_grad")

    def __init__(self, signature, batches: list[_Batch], without_grad: list[Tensor]):
        self.signature = signature
        self.batches = batches
        self.without_grad = without_grad


def real_views(tensors: list[Tensor], complex_idx: list[int]) -> list[Tensor]:
    """The list with complex entries replaced by their real views (torch's own complex rule:
    every update is elementwise on the real and imaginary parts)."""
    if not complex_idx:
        return tensors
    out = list(tensors)
    for i in complex_idx:
        out[i] = torch.view_as_real(out[i])
    return out


class FusedStepMixin:
    """Mixed in before a torch.optim class: replaces its step with one fused op call per device.

    Subclasses define ``_columns``, ``_hyper_row(group)``, ``_structure(group)``,
    ``_prepare_state(p, group, state)``, ``_entry_extra(group)`` and ``_launch(batch, grad_scale, found_inf) -> bool`` (False: a
    param lost its grad or a state entry since the plan was built; nothing was changed).
    """

    # GradScaler hands us grad_scale / found_inf; unscaling and the skip happen in the kernel.
    _step_supports_amp_scaling = True
    _sparse_hint = "please consider SparseAdam instead"

    def _fused_init(self) -> None:
        if any(g.get("differentiable") for g in self.param_groups):
            raise RuntimeError(f"fusedopt.{type(self).__name__} does not support `differentiable`")
        self._plan: _Plan | None = None
        self._step_supports_amp_scaling = True
        self._kernel_schedule = None

    def _attach_kernel_schedule(self, schedule) -> None:
        self._kernel_schedule = schedule

    @property
    def lr_schedule_mode(self) -> str:
        """``"in-kernel"`` when a schedule was handed to the fused kernel
        (``fusedopt.lr_scheduler.in_kernel``), else ``"host"`` (group lrs are read as set)."""
        return "host" if self._kernel_schedule is None else "in-kernel"

    def _group_args(self, device: torch.device) -> tuple[Tensor, list[Tensor], dict]:
        """The per-group arguments of one op call: the hyper table (a row per group from the
        subclass's ``_hyper_row``), the device-tensor lrs it names, and the schedule kwargs."""
        lr_tensors: list[Tensor] = []
        rows = []
        for group in self.param_groups:
            lr, lr_index = _lr_entry(group["lr"], device, lr_tensors)
            rows.append(dict(self._hyper_row(group), lr=lr, lr_index=lr_index))
        if self._kernel_schedule is None:
            sched = {"schedule_state": []}
        else:
            table, state, group_rows = self._kernel_schedule.kernel_args()
            for row, (begin, count) in zip(rows, group_rows):
                row["sched_begin"], row["sched_count"] = begin, count
            sched = {"schedule_state": state, "schedule": table}
        return hyper_table(rows, self._columns), lr_tensors, sched

    def __setstate__(self, state) -> None:
        # pickling and deepcopy keep only defaults, state and param_groups (torch's
        # __getstate__); the plan and the schedule hookup are rebuilt or re-attached.
        # load_state_dict goes through here too: keep an attached schedule on the same object.
        super().__setstate__(state)
        self._plan = None
        self._kernel_schedule = getattr(self, "_kernel_schedule", None)

    def _state_of(self, p: Tensor, group: dict) -> dict:
        """The state dict a param's step uses (accessing self.state[p] creates the entry)."""
        return self.state[p]

    # -- plan --------------------------------------------------------------------------------

    def _signature(self):
        if type(self.state) is not _TrackedState:  # new after __init__ / load_state_dict
            self.state = _TrackedState(self.state)
        return (
            id(self.state),
            self.state.version,
            tuple((id(g["params"]), len(g["params"]), self._structure(g)) for g in self.param_groups),
        )

    def _build_plan(self, signature) -> _Plan:
        name = type(self).__name__
        dtensor = _dtensor_type()
        batches: dict[tuple[torch.device, bool], _Batch] = {}
        without_grad: list[Tensor] = []
        first: dict[bool, str] = {}  # is a DTensor -> where the first such param is
        n = len(self.param_groups)
        for gi, group in enumerate(self.param_groups):
            for k, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    without_grad.append(p)
                    continue
                where = f"param_groups[{gi}]['params'][{k}]"
                if grad.is_sparse:
                    raise RuntimeError(
                        f"fusedopt.{name} does not support sparse gradients ({where} has one); "
                        + self._sparse_hint
                    )
                is_dt = dtensor is not None and isinstance(p, dtensor)
                first.setdefault(is_dt, where)
                if len(first) > 1:
                    raise RuntimeError(
                        f"fusedopt.{name}: {first[False]} is a plain tensor but {first[True]} is a "
                        "DTensor; one optimizer steps either DTensor params (fully_shard, tensor "
                        "parallel) or plain ones, as torch.optim's foreach and fused steps require: "
                        "shard the module that holds the plain one, or give it its own optimizer"
                    )
                state = self._state_of(p, group)
                self._prepare_state(p, group, state)
                batch = batches.get((p.device, is_dt))
                if batch is None:
                    batch = batches[(p.device, is_dt)] = _Batch(p.device, n, dtensor=is_dt)
                if state:
                    batch.state_params.append(p)
                    batch.state_dicts.append(state)
                if is_dt:
                    if any(pl.is_partial() for pl in p.placements):
                        # its value is a sum over ranks: an update of each rank's term alone is wrong
                        raise RuntimeError(
                            f"fusedopt.{name}: {where} is a DTensor with placements {tuple(p.placements)}; "
                            "fusedopt steps Shard and Replicate placements, not Partial ones"
                        )
                    _check_layout(name, where, p, grad, "its grad")
                    batch.owners.append(p)
                    batch.owner_states.append(state)
                    batch.specs.append(p._spec)
                    dicts, keys, values = batch.unwrapped
                    for key, value in state.items():
                        if isinstance(value, Tensor):
                            dicts.append(state)
                            keys.append(key)
                            values.append(value)
                    state = _local_state(name, where, p, state)
                    p = p._local_tensor
                if torch.is_complex(p):
                    batch.complex_idx.append(len(batch.params))
                if type(p) not in _PLAIN_TYPES:
                    batch.plain = False
                batch.params.append(p)
                batch.states.append(state)
                batch.group_sizes[gi] += 1
                batch.origin.append((gi, k))
                batch.extra.append(self._entry_extra(group))
        return _Plan(signature, list(batches.values()), without_grad)

    def _current_plan(self) -> _Plan:
        """The cached plan, rebuilt when its structure may have changed. Grads are checked where
        they are read (the launch), which reports a param that lost its grad as stale."""
        if torch.compiler.is_compiling():
            return self._build_plan(None)  # traced once; no identity-based caching
        signature = self._signature()
        plan = self._plan
        if (
            plan is None
            or plan.signature != signature
            or any(p.grad is not None for p in plan.without_grad)
            # a param's state dict emptied in place (opt.state[p].clear()): re-initialise
            # like torch (assignments and opt.state.clear() change the signature)
            or not all(all(b.state_dicts) for b in plan.batches)
        ):
            plan = self._plan = self._build_plan(signature)
        return plan

    def _launch_dtensor(self, batch: _Batch, grad_scale, found_inf) -> bool:
        """The step of a DTensor batch. The fast entry reads each local grad from its DTensor in
        C++; when it cannot (a grad laid out by another spec object, a replaced shard: it changes
        nothing then), the local grads are bound in Python, which checks layouts and names what is
        wrong."""
        if not _states_intact(batch):
            return False
        if self._use_plan_entry(batch) and self._launch(batch, grad_scale, found_inf, owners=batch.owners):
            return True
        if not self._bind_local_grads(batch):
            return False
        try:
            return self._launch(batch, grad_scale, found_inf)
        finally:
            _unbind_local_grads(batch)

    def _bind_local_grads(self, batch: _Batch) -> bool:
        """Point each local param's ``.grad`` at its DTensor grad's local tensor, so that the op
        and the fast entry read a DTensor batch like any other. False, having bound nothing: a
        param lost its grad, FSDP2 replaced a local tensor, or a state tensor was replaced; the
        plan is stale."""
        owners = batch.owners
        if not all(map(operator.is_, map(_local_of, owners), batch.params)):
            return False
        with torch._C.DisableTorchFunctionSubclass():  # DTensor's .grad getter, without the detour
            grads = list(map(_grad_of, owners))
        if any(map(_is_none, grads)):
            return False
        # FSDP2 makes each grad with its param's own spec object: one identity test per param
        try:
            same = all(map(operator.is_, map(_spec_of, grads), batch.specs))
        except AttributeError:  # a grad that is not a DTensor
            same = False
        if not same:
            for i, p, g in zip(range(len(grads)), owners, grads):
                if _layout_mismatch(p, g):
                    _check_layout(type(self).__name__, _where(batch, i), p, g, "its grad")
        local = list(map(_local_of, grads))
        try:
            list(map(setattr, batch.params, repeat("grad"), local))
        except (RuntimeError, TypeError):  # e.g. a grad of another dtype than its param
            _unbind_local_grads(batch)
            for i, (lp, g) in enumerate(zip(batch.params, local)):
                if g.dtype != lp.dtype or g.shape != lp.shape or g.device != lp.device:
                    raise RuntimeError(
                        f"fusedopt.{type(self).__name__}: {_where(batch, i)} is a DTensor whose "
                        f"local shard is {tuple(lp.shape)} {lp.dtype} on {lp.device} but its grad's "
                        f"is {tuple(g.shape)} {g.dtype} on {g.device}"
                    ) from None
            raise
        return True

    @staticmethod
    def _use_plan_entry(batch: _Batch) -> bool:
        """The eager fast entry reads grads and state from the plan in C++; torch.compile, tensor
        subclasses and complex params (real views) go through torch.ops with Python lists."""
        return batch.plain and not batch.complex_idx and not torch.compiler.is_compiling()

    # -- step --------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step: one fused kernel call per device.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        require()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        plan = self._current_plan()
        done: set[torch.device] = set()
        for _ in range(2):
            stale = False
            for batch in plan.batches:
                if batch.device in done:
                    continue
                gs, fi = on_device(grad_scale, batch.device), on_device(found_inf, batch.device)
                try:
                    ran = self._launch_dtensor(batch, gs, fi) if batch.dtensor else self._launch(batch, gs, fi)
                except (RuntimeError, TypeError, ValueError) as e:
                    raise _locate(e, batch) from None
                if not ran:  # a param lost its grad or a state entry since the plan was built
                    stale = True
                    break
                done.add(batch.device)
            if not stale:
                return loss
            plan = self._plan = self._build_plan(self._signature())
        raise RuntimeError("fusedopt: the params' grads changed while the step ran")


def _states_intact(batch: _Batch) -> bool:
    """Whether every state tensor of a DTensor batch is still the one the plan unwrapped: a state
    tensor replaced by hand is honoured at the next step (the plan is rebuilt), as for plain
    params."""
    dicts, keys, values = batch.unwrapped
    try:
        return all(map(operator.is_, map(operator.getitem, dicts, keys), values))
    except KeyError:
        return False


def _unbind_local_grads(batch: _Batch) -> None:
    # the local grads must not outlive the step: FSDP2 frees its grads at zero_grad
    list(map(setattr, batch.params, repeat("grad"), repeat(None, len(batch.params))))


def _where(batch: _Batch, i: int) -> str:
    g, k = batch.origin[i]
    return f"param_groups[{g}]['params'][{k}]"


def _check_layout(name: str, where: str, p: Tensor, t, what: str) -> None:
    """Raise unless ``t`` (a DTensor param's grad or state tensor) is a DTensor laid out like
    ``p``: same mesh, placements and global shape, so their local shards line up."""
    problem = _layout_mismatch(p, t)
    if problem:
        layout = f" {problem[0]}" if problem[0] else ""
        raise RuntimeError(f"fusedopt.{name}: {where} is a DTensor{layout} but {what} {problem[1]}")


def _layout_mismatch(p: Tensor, t) -> tuple[str, str] | None:
    ps = p._spec
    ts = getattr(t, "_spec", None)
    if ts is ps:
        return None
    if ts is None:
        return "", (f"is a {type(t).__name__}, not a DTensor; its local shard would not line up "
                    "with the param's")
    if not (ts.mesh is ps.mesh or ts.mesh == ps.mesh):
        return f"on {ps.mesh}", f"is on {ts.mesh}"
    if ts.placements != ps.placements:
        return f"with placements {tuple(ps.placements)}", f"has {tuple(ts.placements)}"
    if ts.tensor_meta.shape != ps.tensor_meta.shape:
        return f"of global shape {tuple(ps.shape)}", f"has {tuple(ts.shape)}"
    return None


def _local_state(name: str, where: str, p: Tensor, state: dict) -> dict:
    """A DTensor param's state dict with its tensors replaced by their local shards. Every state
    tensor but the step counter must be laid out like the param; a DTensor step counter (a
    replicated scalar) is stepped through its local tensor too."""
    dtensor = _dtensor_type()
    local = {}
    for key, value in state.items():
        if key == "step":
            local[key] = value._local_tensor if isinstance(value, dtensor) else value
        elif isinstance(value, Tensor):
            if not isinstance(value, dtensor):
                raise RuntimeError(
                    f"fusedopt.{name}: {where} is a DTensor but its state {key!r} is a plain "
                    f"{type(value).__name__} (an optimizer state_dict saved unsharded?); load "
                    "sharded state with torch.distributed.checkpoint.state_dict.set_optimizer_state_dict"
                )
            _check_layout(name, where, p, value, f"its state {key!r}")
            local[key] = value._local_tensor
        else:
            local[key] = value
    return local


def _locate(e: Exception, batch: _Batch) -> Exception:
    """The op's error with its list index translated to the param's place in param_groups."""
    msg = str(e)
    m = _INDEX.search(msg)
    if m and int(m.group(1)) < len(batch.origin):
        g, k = batch.origin[int(m.group(1))]
        msg = f"{msg} [params[{m.group(1)}] of this step is param_groups[{g}]['params'][{k}]]"
    try:
        return type(e)(msg)
    except Exception:  # an exception type that does not take one message
        return RuntimeError(msg)
