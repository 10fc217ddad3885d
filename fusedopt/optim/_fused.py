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

import contextlib
import operator
import re
import sys
from collections import defaultdict
from functools import partial
from itertools import chain, repeat

import torch
from torch import Tensor

from fusedopt import flat
from fusedopt._extension import require
from fusedopt.ops import RULES, _lr_entry, hyper_table, hyper_values, on_device

_is_none = partial(operator.is_, None)
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_INDEX = re.compile(r"\b(?:params|grads|exp_avgs|exp_avg_sqs|state_steps)\[(\d+)\]")
_HALF_TYPES = (torch.float16, torch.bfloat16)
_STATE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MASTER_KEYS = {1: "master_param", 2: "master_remainder"}
_MASTER_DTYPES = {1: torch.float32, 2: torch.int16}
_local_of = operator.attrgetter("_local_tensor")
_spec_of = operator.attrgetter("_spec")
_grad_of = operator.attrgetter("grad")


_through_dispatcher = 0  # > 0: every step calls torch.ops.fusedopt.step_ (see through_dispatcher)


@contextlib.contextmanager
def through_dispatcher():
    """While active, every step goes through the dispatcher (``torch.ops.fusedopt.step_``) instead
    of a StepPlan, which calls fusedopt's own kernel directly: for kernels registered over
    fusedopt's own (the emulated CUDA backend of the tests) and anything else that must see each
    op call."""
    global _through_dispatcher
    _through_dispatcher += 1
    try:
        yield
    finally:
        _through_dispatcher -= 1


def _dtensor_type():
    """DTensor's class if torch.distributed.tensor is loaded, else None: a DTensor cannot exist
    before its module is imported, so fusedopt never imports it (nor pays for it) itself."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor; any other tensor as it is."""
    dt = _dtensor_type()
    return t._local_tensor if dt is not None and isinstance(t, dt) else t


def _counting(base, name):
    """``base.name`` that first counts a change in the version of the optimizer's state."""
    def method(self, *args, **kwargs):
        self._state.version += 1
        return getattr(base, name)(self, *args, **kwargs)
    method.__name__ = name
    return method


class _ParamState(dict):
    """A param's state dict (``optimizer.state[p]``) that counts its edits in the version of the
    optimizer's state, so a plan that validated its tensors once notices an entry assigned,
    deleted or cleared at O(1) cost per step. Saved, copied and pickled as a plain dict."""

    __slots__ = ("_state",)

    def __init__(self, state: "_TrackedState", *args):
        super().__init__(*args)
        self._state = state

    for _name in ("__setitem__", "__delitem__", "__ior__", "clear", "pop", "popitem", "update",
                  "setdefault"):
        locals()[_name] = _counting(dict, _name)
    del _name

    def __reduce__(self):
        return (dict, (dict(self),))


class _TrackedState(defaultdict):
    """``optimizer.state`` that counts the changes a cached plan must notice (a param's state
    dict assigned, deleted, edited, or the whole state cleared), so checking it costs O(1) per
    step instead of one Tensor.__hash__ (a Python call) per param. The state dicts it makes, and
    the plain ones it is built from (torch's load_state_dict makes those), are ``_ParamState``;
    a plain dict assigned later is kept as it is and read anew at every step."""

    def __init__(self, *args):
        super().__init__(dict, *args)
        self.version = 0
        self._state = self
        for key, value in self.items():
            if type(value) is dict:
                defaultdict.__setitem__(self, key, _ParamState(self, value))

    def __missing__(self, key):
        value = self[key] = _ParamState(self)
        return value

    def __setitem__(self, key, value):
        self.version += 1
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self.version += 1
        super().__delitem__(key)

    for _name in ("clear", "pop", "popitem", "update", "setdefault"):
        locals()[_name] = _counting(defaultdict, _name)
    del _name

    def __reduce__(self):  # pickles (torch.save(optimizer), deepcopy) as a plain defaultdict
        return (defaultdict, (dict,), None, None, ((k, _plain(v)) for k, v in self.items()))


def _join_master(param: Tensor, remainder: Tensor) -> Tensor:
    """The float32 master of a bfloat16 param and its int16 remainder (csrc/precision.h's
    join_master): the param's bits, one lower for a negative remainder, above the remainder's."""
    bits = param.view(torch.int16).to(torch.int64) & 0xFFFF
    rem = remainder.to(torch.int64)
    word = (((bits - (rem < 0).to(torch.int64)) & 0xFFFF) << 16) | (rem & 0xFFFF)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32).view(torch.float32)


def _split_master(master: Tensor) -> tuple[Tensor, Tensor]:
    """(bfloat16 bits as int16, int16 remainder) of a float32 master (precision.h's split_master):
    the param rounded to nearest with ties away from zero, and the master's low 16 bits; a NaN
    gives a quiet NaN param and a zero remainder."""
    u = master.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nan = master.isnan()
    bits = torch.where(nan, (u >> 16) | 0x40, ((u + 0x8000) >> 16) & 0xFFFF)
    rem = torch.where(nan, torch.zeros_like(u), u & 0xFFFF)
    to16 = lambda x: torch.where(x >= 2**15, x - 2**16, x).to(torch.int16)  # noqa: E731
    return to16(bits).view_as(master), to16(rem).view_as(master)


def _plain(value):
    return dict(value) if isinstance(value, _ParamState) else value


class _Batch:
    """What one op call on one device needs, ordered group by group."""

    __slots__ = ("device", "params", "states", "group_sizes", "origin", "complex_idx", "extra", "plain",
                 "state_params", "state_dicts", "dtensor", "owners", "owner_states", "specs", "unwrapped",
                 "step_plan", "float64")

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
        # A param is float64 (or complex128): its grad's norm, and so the clip, is float64 (the
        # step refuses a grad of another dtype than its param's)
        self.float64 = False
        self.extra: list = []  # per-optimizer per-entry data (e.g. has an amsgrad buffer)
        self.plain = True  # every param a plain Tensor/Parameter: the eager fast entry applies
        # The params that keep state, and their state dicts as self.state held them at build time.
        self.state_params: list[Tensor] = []
        self.state_dicts: list[dict] = []
        # The C++ StepPlan (fusedopt._C) of a batch whose state dicts are all tracked, made at its
        # first step; None until then, or for good (False) when the batch cannot have one.
        self.step_plan = None

    def tracked(self, state: _TrackedState) -> bool:
        """Whether every state dict the batch reads reports its edits to ``state`` (the optimizer's:
        ``_ParamState``; an empty dict the optimizer made for a param that keeps no state reads
        nothing), so that its tensors can be validated once, in a StepPlan."""
        return all((type(s) is _ParamState and s._state is state) or not s for s in self.states)


class _Plan:
    __slots__ = ("signature", "batches", "without_grad", "params", "flat_generation", "relaid")

    def __init__(self, signature, batches: list[_Batch], without_grad: list[Tensor], params: list[Tensor],
                 flat_generation: int, relaid: int = 0):
        self.signature = signature
        self.batches = batches
        self.without_grad = without_grad
        self.params = params  # every param of every group, in order, as the plan was built
        self.flat_generation = flat_generation  # fusedopt.flat.generation() when it was built
        self.relaid = relaid  # state tensors the build copied into their param's layout

    def same_params(self, param_groups: list[dict]) -> bool:
        """Whether the groups still hold exactly these params (one identity test per param: a
        param replaced in its list, ``group['params'][i] = q``, keeps the list and its length)."""
        return require().same_items([g["params"] for g in param_groups], self.params)


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

    A subclass names its update rule (``_rule``, one of ``fusedopt.ops.RULES``: csrc/update_rules.h)
    and defines ``_hyper_row(group)`` (its columns), ``_structure(group)`` (what changes the plan),
    ``_prepare_state(p, group, state)`` (lazy state, made with ``_new_state``); everything else,
    the precision options included, is shared. SGD adds hooks for its fresh momentum buffers.
    """

    # GradScaler hands us grad_scale / found_inf; unscaling and the skip happen in the kernel.
    _step_supports_amp_scaling = True
    _sparse_hint = "please consider SparseAdam instead"
    _rule: str

    def _fused_init(self, master_weights: bool = False, master_remainders: bool = False,
                    state_dtype: torch.dtype | None = None, stochastic_rounding: bool = False,
                    max_grad_norm: float | None = None, grad_norm_type: float = 2.0) -> None:
        name = type(self).__name__
        if any(g.get("differentiable") for g in self.param_groups):
            raise RuntimeError(f"fusedopt.{name} does not support `differentiable`")
        for opt, value in (("master_weights", master_weights), ("master_remainders", master_remainders),
                           ("stochastic_rounding", stochastic_rounding)):
            if not isinstance(value, bool):
                raise TypeError(f"fusedopt.{name}: {opt} must be a bool, got {value!r}")
        if state_dtype is not None and state_dtype not in _STATE_DTYPES:
            raise ValueError(f"fusedopt.{name}: state_dtype must be None (the param's dtype), torch.float32, "
                             f"torch.float16 or torch.bfloat16, got {state_dtype!r}")
        if master_remainders and not master_weights:
            raise ValueError(f"fusedopt.{name}: master_remainders=True needs master_weights=True (the "
                             "remainder is the low half of a float32 master weight)")
        if stochastic_rounding and master_weights:
            raise ValueError(f"fusedopt.{name}: stochastic_rounding=True rounds bfloat16 params that have no "
                             "master; with master_weights=True the float32 master already keeps small updates")
        self._precision = dict(master_weights=master_weights, master_remainders=master_remainders,
                               state_dtype=state_dtype, stochastic_rounding=stochastic_rounding)
        self.max_grad_norm = max_grad_norm
        self.grad_norm_type = grad_norm_type
        _check_clip_options(name, max_grad_norm, grad_norm_type)
        self.grad_norm: Tensor | None = None
        for group in self.param_groups:
            self._check_precision_params(group)
        self._plan: _Plan | None = None
        self._step_supports_amp_scaling = True
        self._kernel_schedule = None
        # tracked from the start: code that keeps a reference to optimizer.state (a wrapper
        # copying the optimizer's __dict__) sees the state the steps make, as with torch
        self.state = _TrackedState(self.state)

    def _check_precision_params(self, group: dict) -> None:
        if not self._precision["master_remainders"]:
            return
        for k, p in enumerate(group["params"]):
            if p.dtype == torch.float16:
                raise ValueError(
                    f"fusedopt.{type(self).__name__}: master_remainders=True needs bfloat16 params, but a param "
                    f"of this group ({k}) is float16; use master_weights=True alone for float16 params")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_precision"):  # (torch's __init__ adds the first groups before _fused_init)
            try:
                self._check_precision_params(self.param_groups[-1])
            except Exception:
                self.param_groups.pop()  # refused: the optimizer stays as it was, as torch's does
                raise

    @property
    def _columns(self) -> dict[str, int]:
        return RULES[self._rule]["columns"]

    @property
    def _master_mode(self) -> int:
        prec = self._precision
        return 0 if not prec["master_weights"] else (2 if prec["master_remainders"] else 1)

    def _new_state(self, p: Tensor, fill: float = 0.0) -> Tensor:
        """A state tensor for ``p`` (a moment, a momentum buffer): its shape and layout, in
        ``state_dtype`` when that option is set (floating params), else in ``p``'s dtype."""
        dtype = self._precision["state_dtype"] if p.is_floating_point() else None
        return torch.full_like(p, fill, dtype=dtype, memory_format=torch.preserve_format)

    def _prepare_precision(self, p: Tensor, state: dict) -> None:
        """Brings a param's state in line with the precision options: the rule's state tensors in
        ``state_dtype`` (a loaded torch.optim state holds them in the param's dtype), and the float32
        master or its remainder of a 16-bit param, made from the param when missing."""
        dtype = self._precision["state_dtype"]
        if dtype is not None and p.is_floating_point():
            for key in RULES[self._rule]["roles"]:
                value = state.get(key)
                if isinstance(value, Tensor) and value.dtype != dtype:
                    state[key] = value.to(dtype)
        mode = self._master_mode if p.dtype in _HALF_TYPES else 0
        # Master entries this optimizer does not keep (the other mode's, or any when it keeps
        # none) go stale at this step, when the param moves and they do not: a later checkpoint
        # would resume from them and roll the param back. They are dropped (the other mode's
        # converted first, below), as is one of the wrong dtype: torch.optim's load_state_dict
        # casts every state tensor to its param's dtype (a master rounded, a remainder garbled),
        # and a torch run stepped the param without it.
        usable = {}
        for m, key in _MASTER_KEYS.items():
            value = state.get(key) if m == mode else state.pop(key, None)
            if isinstance(value, Tensor) and value.dtype == _MASTER_DTYPES[m]:
                usable[m] = value
            elif m == mode:
                state.pop(key, None)
        if mode:
            key = _MASTER_KEYS[mode]
            if mode not in usable:
                # the other mode's entry (a checkpoint of a run with the other option) holds the
                # master exactly: converted
                other = usable.get(3 - mode)
                if mode == 1 and isinstance(other, Tensor) and p.dtype == torch.bfloat16:
                    state[key] = _join_master(p.detach(), other.to(p.device))
                elif mode == 1:
                    state[key] = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
                elif isinstance(other, Tensor):
                    bits, state[key] = _split_master(other.to(device=p.device, dtype=torch.float32))
                    with torch.no_grad():
                        p.view(torch.int16).copy_(bits)
                else:  # the param is the master exactly: a zero remainder
                    state[key] = torch.zeros_like(p, dtype=torch.int16, memory_format=torch.preserve_format)

    def load_state_dict(self, state_dict: dict) -> None:
        # torch.optim casts every state tensor to its param's dtype: a float32 master would be
        # rounded to the param's 16 bits, an int16 remainder turned into garbage, and moments kept
        # in a wider state_dtype rounded twice. Those entries are kept as saved instead: read from
        # the dict torch loads (after the user's load pre hooks, by a hook appended for this call)
        # and put back before the user's post hooks run (a hook prepended).
        keep = []
        roles = set(RULES[self._rule]["roles"]) if self._precision["state_dtype"] is not None else set()

        def record(optimizer, sd):
            saved_ids = [i for g in sd["param_groups"] for i in g["params"]]
            params = [p for g in self.param_groups for p in g["params"]]
            id_map = dict(zip(saved_ids, params))
            for pid, st in sd["state"].items():
                p = id_map.get(pid)
                if p is None or not isinstance(st, dict):
                    continue
                for key, value in st.items():
                    if isinstance(value, Tensor) and (key in _MASTER_KEYS.values() or key in roles):
                        keep.append((p, key, value))

        def restore(optimizer):
            for p, key, value in keep:
                if key in roles and p.is_floating_point():
                    value = value.to(dtype=self._precision["state_dtype"])
                self.state[p][key] = value.to(device=p.device)

        handles = (self.register_load_state_dict_pre_hook(record),
                   self.register_load_state_dict_post_hook(restore, prepend=True))
        try:
            super().load_state_dict(state_dict)
        finally:
            for h in handles:
                h.remove()

    def state_dict(self) -> dict:
        # the state dicts as plain dicts: what torch.save(..., weights_only) and torch.load expect;
        # made before the user's state_dict post hooks run (which may return a dict of their own)
        def plain(optimizer, sd):
            sd["state"] = {k: self._saved_param_state(v) for k, v in sd["state"].items()}

        handle = self.register_state_dict_post_hook(plain, prepend=True)
        try:
            return super().state_dict()
        finally:
            handle.remove()

    def _saved_param_state(self, state: dict) -> dict:
        """A param's state as saved (state_dict, pickle, deepcopy): a plain dict."""
        return _plain(state)

    def __getstate__(self):
        state = super().__getstate__()
        state["_precision"] = self._precision
        state["max_grad_norm"] = self.max_grad_norm
        state["grad_norm_type"] = self.grad_norm_type
        return state

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
        kernel_args = None if self._kernel_schedule is None else self._kernel_schedule.kernel_args()
        if kernel_args is None:
            sched = {"schedule_state": []}
        else:
            table, state, group_rows = kernel_args
            for row, (begin, count) in zip(rows, group_rows):
                row["sched_begin"], row["sched_count"] = begin, count
            sched = {"schedule_state": state, "schedule": table}
        if torch.compiler.is_compiling():
            return hyper_table(rows, self._columns), lr_tensors, sched
        # the table of the step before when no value changed: making the tensor was a fifth of a
        # one-param step's host time (the ops only read it)
        values = hyper_values(rows, self._columns)
        cached = getattr(self, "_hyper_cache", None)
        if cached is None or cached[0] != values:
            cached = self._hyper_cache = (values, torch.tensor(values, dtype=torch.float64))
        return cached[1], lr_tensors, sched

    def __setstate__(self, state) -> None:
        # pickling and deepcopy keep only defaults, state and param_groups (torch's
        # __getstate__); the plan and the schedule hookup are rebuilt or re-attached.
        # load_state_dict goes through here too: keep an attached schedule on the same object.
        super().__setstate__(state)
        if type(self.state) is not _TrackedState:
            self.state = _TrackedState(self.state)
        self._plan = None
        self._kernel_schedule = getattr(self, "_kernel_schedule", None)
        self._precision = getattr(self, "_precision", None) or dict(
            master_weights=False, master_remainders=False, state_dtype=None, stochastic_rounding=False)
        self.max_grad_norm = getattr(self, "max_grad_norm", None)
        self.grad_norm_type = getattr(self, "grad_norm_type", 2.0)
        self.grad_norm = getattr(self, "grad_norm", None)

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

    def _build_plan(self, signature, relay: bool = False) -> _Plan:
        """``relay``: copy state tensors into their param's layout where it changed (only the
        build after a launch failed asks: a check per state tensor cost more than the rest of a
        10,000-param build)."""
        name = type(self).__name__
        relaid = 0
        dtensor = _dtensor_type()
        batches: dict[tuple[torch.device, bool], _Batch] = {}
        without_grad: list[Tensor] = []
        first: dict[bool, str] = {}  # is a DTensor -> where the first such param is
        n = len(self.param_groups)
        flat_params, flat_generation = flat.any_flat(), flat.generation()
        flat_moves: list = []
        seen: dict[int, tuple[int, int]] = {}  # id(param) -> its place
        spec = RULES[self._rule]
        for gi, group in enumerate(self.param_groups):
            needed = None  # the state keys this group's step reads, as torch.optim would index them
            for k, p in enumerate(group["params"]):
                if seen.setdefault(id(p), (gi, k)) != (gi, k):
                    g0, k0 = seen[id(p)]
                    raise ValueError(
                        f"fusedopt.{name}: param_groups[{gi}]['params'][{k}] is the same tensor as "
                        f"param_groups[{g0}]['params'][{k0}]; a fused step updates each param once, so "
                        "it may appear only once (torch.optim's add_param_group refuses it too)")
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
                self._prepare_precision(p, state)
                if relay and not is_dt:
                    relaid += self._match_layout(p, state)
                if needed is None:
                    mask = _role_mask(spec, self._hyper_row(group))
                    needed = [key for r, key in enumerate(spec["roles"]) if mask >> r & 1]
                    needed += ["step"] if spec["has_step"] else []
                for key in needed:
                    if key not in state:  # deleted by hand from a started state: torch's KeyError
                        raise KeyError(key)
                if flat_params and not is_dt:
                    self._flat_state(p, state, flat_moves)
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
                if p.dtype in (torch.float64, torch.complex128):
                    batch.float64 = True
                if type(p) not in _PLAIN_TYPES:
                    batch.plain = False
                batch.params.append(p)
                batch.states.append(state)
                batch.group_sizes[gi] += 1
                batch.origin.append((gi, k))
                batch.extra.append(self._entry_extra(group))
        for old, new in flat.move_states(flat_moves):
            self._state_moved(old, new)
        params = self._all_params()
        if signature is not None:  # the state as the build left it (lazy state, flat state)
            signature = self._signature()
        return _Plan(signature, list(batches.values()), without_grad, params, flat_generation, relaid)

    def _match_layout(self, p: Tensor, state: dict) -> int:
        """The param's state tensors in its layout: a param whose layout changed once its state
        was made (``model.to(memory_format=torch.channels_last)`` mid-training, a checkpoint saved
        from another layout) gets its state copied into its own layout, which the kernels need and
        torch, stepping elementwise, does not. Returns how many; the step that found the misfit
        then runs again with the plan that made them fit."""
        if p.dim() < 2 or not _dense(p):
            return 0
        stride, relaid = p.stride(), 0
        for key, value in list(state.items()):
            if (isinstance(value, Tensor) and value.stride() != stride and value.shape == p.shape
                    and _dense(value)):
                new = state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)
                self._state_moved(value, new)
                relaid += 1
        return relaid

    def _all_params(self) -> list[Tensor]:
        """Every param of every group, in order."""
        return list(chain.from_iterable(g["params"] for g in self.param_groups))

    def _flat_state(self, p: Tensor, state: dict, moves: list) -> None:
        """A param in flat storage (fusedopt.flatten_) keeps its state in flat buffers too, so the
        fused step merges it with its neighbours: state made or loaded elsewhere moves there (all
        moves at once, after the plan's loop)."""
        slot = flat.slot_of(p)
        if slot is not None:
            moves += slot[0].state_moves(slot[1], p, state)

    def _state_moved(self, old: Tensor, new: Tensor) -> None:
        """A state tensor moved into flat storage (SGD carries its fresh mark over)."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim's zero_grad; a flat bucket (fusedopt.flatten_) whose params are all this
        optimizer's is zeroed in one memset."""
        if not flat.any_flat():
            return super().zero_grad(set_to_none)
        params = self._all_params()
        buckets = flat.owned_buckets(params)
        if not buckets:
            return super().zero_grad(set_to_none)
        if not hasattr(self, "_zero_grad_profile_name"):
            self._patch_step_function()
        with torch.autograd.profiler.record_function(self._zero_grad_profile_name):
            done = set()
            for b in buckets:
                b.zero_grad(set_to_none)
                done.update(map(id, b.params()))
            flat.zero_grads([p for p in params if id(p) not in done], set_to_none)

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
            or not plan.same_params(self.param_groups)
            # params flattened since (fusedopt.flatten_): their state moves into flat state
            or plan.flat_generation != flat.generation()
            or any(p.grad is not None for p in plan.without_grad)
            # a param's state dict emptied in place (opt.state[p].clear()): re-initialise
            # like torch (a tracked dict's edits, assignments and opt.state.clear() change the
            # signature; a plain dict assigned by hand is looked at here)
            or not all(b.step_plan or all(b.state_dicts) for b in plan.batches)
        ):
            plan = self._plan = self._build_plan(signature)
        return plan

    def _clip_grads(self, plan: _Plan, grad_scale) -> dict | None | bool:
        """With ``max_grad_norm``: the total norm of every grad the step reads (unscaled when a
        GradScaler drives the step), one fused reduction per device, and per device the
        [norm, clip coefficient] the kernel scales the grads by as it reads them. Nothing is synced
        to the host; ``self.grad_norm`` is the norm as a 0-dim tensor. False: a grad is missing
        (the plan is stale)."""
        max_norm = self.max_grad_norm
        if max_norm is None:
            return None
        _check_clip_options(type(self).__name__, max_norm, self.grad_norm_type)
        norm_type = float(self.grad_norm_type)
        outs: dict[torch.device, Tensor] = {}
        for batch in plan.batches:
            if batch.dtensor:
                raise RuntimeError(
                    f"fusedopt.{type(self).__name__}: max_grad_norm is not supported with DTensor params "
                    "(FSDP2, tensor parallel) yet: the norm would cover this rank's shards only; call "
                    "torch.nn.utils.clip_grad_norm_ before step() instead")
            grads = [p.grad for p in batch.params]
            if any(map(_is_none, grads)):
                return False
            grads = real_views(grads, batch.complex_idx)
            # torch's total norm and coefficient are float64 as soon as a grad is (its float32
            # grads are then scaled by the coefficient rounded to float, as the kernels do)
            out = torch.empty(2, dtype=torch.float64 if batch.float64 else torch.float32, device=batch.device)
            torch.ops.fusedopt.grad_norm_(grads, norm_type, float(max_norm), out,
                                          on_device(grad_scale, batch.device))
            outs[batch.device] = out
        if not outs:
            return None
        if len(outs) == 1:
            out = next(iter(outs.values()))
            self.grad_norm = out[0]
            return outs
        # several devices: one norm over all of them, combined as torch combines per-device norms
        first = next(iter(outs))
        total = torch.linalg.vector_norm(torch.stack([o[0].to(first) for o in outs.values()]), norm_type)
        coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
        both = torch.stack([total, coef])
        self.grad_norm = total
        return {dev: both.to(dev) for dev in outs}

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

    def _use_step_plan(self, batch: _Batch, hyper: Tensor) -> bool:
        """Whether the batch steps through a StepPlan (made here at its first step): plain params
        on the CPU or CUDA with tracked state dicts, outside torch.compile and any
        TorchDispatchMode (which must see the op call). (A plan missing a state entry is stale:
        the launch then reports it through the other entry.)"""
        if batch.step_plan is None:
            batch.step_plan = False
            if (not batch.dtensor and batch.device.type in ("cpu", "cuda") and self._use_plan_entry(batch)
                    and batch.tracked(self.state)):
                batch.step_plan = require().make_step_plan(
                    self._rule, batch.params, batch.states, batch.group_sizes, hyper,
                    self._master_mode) or False
        return (bool(batch.step_plan) and not _through_dispatcher and not torch._C._len_torch_dispatch_stack()
                and not torch.compiler.is_compiling())

    @staticmethod
    def _use_plan_entry(batch: _Batch) -> bool:
        """The eager fast entry reads grads and state from the plan in C++; torch.compile, tensor
        subclasses and complex params (real views) go through torch.ops with Python lists."""
        return batch.plain and not batch.complex_idx and not torch.compiler.is_compiling()

    # -- launch ------------------------------------------------------------------------------

    def _entry_extra(self, group: dict):
        """Per-entry data a subclass keeps in the plan (SGD: whether the group has momentum)."""
        return None

    def _fresh_params(self, batch: _Batch) -> list[int]:
        """Params of the batch whose state was never written (SGD's new momentum buffers)."""
        return []

    def _after_launch(self, batch: _Batch, fresh: list[int], found_inf, clip) -> None:
        """Bookkeeping after a step that ran (SGD's fresh buffers)."""

    def _rounding_seed(self, device: torch.device) -> int:
        """The seed of this step's stochastic rounding, from torch's default generator (so
        ``torch.manual_seed`` makes a run repeat), or -1 without the option."""
        if not self._precision["stochastic_rounding"]:
            return -1
        if (device.type == "cuda" and not RULES[self._rule]["has_step"]
                and torch.cuda.is_current_stream_capturing()):
            raise RuntimeError(
                f"fusedopt.{type(self).__name__}: stochastic_rounding cannot be captured in a CUDA graph "
                "for this optimizer: its seed is drawn on the host each step, and a replay would round "
                "with the same bits every step (optimizers that count steps, like Adam, mix the step in)")
        return int(torch.randint(0, 2**62, (), dtype=torch.int64))

    def _launch(self, batch: _Batch, grad_scale, found_inf, owners=None, clip=None) -> bool:
        """One op call for a batch. False, having changed nothing: a param lost its grad or a state
        entry since the plan was built. ``clip``: the [grad norm, clip coefficient] of the step on
        the batch's device (``max_grad_norm``), or None."""
        hyper, lr_tensors, sched = self._group_args(batch.device)
        fresh = self._fresh_params(batch)
        seed = self._rounding_seed(batch.device)
        if owners is None and self._use_step_plan(batch, hyper):
            ran = batch.step_plan.step(hyper, lr_tensors, fresh, grad_scale, found_inf,
                                       sched["schedule_state"], sched.get("schedule"), clip, seed)
        elif self._use_plan_entry(batch):
            ran = require().plan_step(
                self._rule, batch.params, batch.states, batch.group_sizes, hyper, lr_tensors, fresh,
                grad_scale, found_inf, sched["schedule_state"], sched.get("schedule"), owners, clip,
                self._master_mode, seed)
        else:
            ran = self._launch_op(batch, hyper, lr_tensors, sched, fresh, grad_scale, found_inf, clip, seed)
        if ran:
            self._after_launch(batch, fresh, found_inf, clip)
        return ran

    def _launch_op(self, batch: _Batch, hyper, lr_tensors, sched, fresh, grad_scale, found_inf, clip,
                   seed) -> bool:
        """The step through ``torch.ops.fusedopt.step_`` with Python lists: torch.compile, tensor
        subclasses, complex params (as real views)."""
        grads = [p.grad for p in batch.params]
        if any(map(_is_none, grads)):
            return False
        spec = RULES[self._rule]
        roles = spec["roles"]
        masks = [_role_mask(spec, self._hyper_row(g)) for g in self.param_groups]
        mode = self._master_mode
        master_key = _MASTER_KEYS.get(mode)
        states, masters, steps = [], [], []
        try:
            for (gi, _), p, st in zip(batch.origin, batch.params, batch.states):
                mask = masks[gi]
                for k, key in enumerate(roles):
                    if mask >> k & 1:
                        t = st[key]
                        states.append(torch.view_as_real(t) if t.is_complex() else t)
                if mode and p.dtype in _HALF_TYPES:
                    masters.append(st[master_key])
                if spec["has_step"]:
                    steps.append(st["step"])
        except KeyError:
            return False
        cidx = batch.complex_idx
        args = (self._rule, real_views(batch.params, cidx), real_views(grads, cidx), states, masters, steps,
                batch.group_sizes, hyper, lr_tensors, fresh)
        if grad_scale is None:  # the grads are only read: the overload whose schema says so
            torch.ops.fusedopt.step_.keep_grads(*args, found_inf, clip=clip, master_mode=mode, seed=seed,
                                                **sched)
        else:
            torch.ops.fusedopt.step_(*args, grad_scale, found_inf, clip=clip, master_mode=mode, seed=seed,
                                     **sched)
        return True

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
        clips = self._clip_grads(plan, grad_scale)
        if clips is False:  # a param lost its grad since the plan was built
            plan = self._plan = self._build_plan(self._signature())
            clips = self._clip_grads(plan, grad_scale)
        done: set[torch.device] = set()
        for _ in range(2):
            if not plan.batches and not done and self._kernel_schedule is not None:
                self._kernel_schedule.advance()  # no param has a grad: no kernel counts this step
                return loss
            stale = False
            for batch in plan.batches:
                if batch.device in done:
                    continue
                gs, fi = on_device(grad_scale, batch.device), on_device(found_inf, batch.device)
                clip = clips.get(batch.device) if clips else None
                try:
                    if batch.dtensor:
                        ran = self._launch_dtensor(batch, gs, fi)
                    else:
                        ran = self._launch(batch, gs, fi, clip=clip)
                except (RuntimeError, TypeError, ValueError) as e:
                    fresh = self._fresh_error(e, batch)
                    if fresh is None:  # the plan built anew re-laid state tensors: step with it
                        stale = True
                        break
                    raise fresh from None
                if not ran:  # a param lost its grad or a state entry since the plan was built
                    stale = True
                    break
                done.add(batch.device)
            if not stale:
                return loss
            plan = self._plan = self._build_plan(self._signature())
        raise RuntimeError("fusedopt: the params' grads changed while the step ran")


    def _fresh_error(self, e: Exception, batch: _Batch) -> Exception:
        """The error a fresh step raises for what made the cached plan's launch fail with ``e``: a
        plan built anew checks the params first (a sparse grad, ...) and names the problem in its
        own words; when it finds nothing, ``e`` located in param_groups. The next step rebuilds."""
        self._plan = None
        try:
            plan = self._build_plan(None, relay=True)
        except (RuntimeError, TypeError, ValueError) as fresh:
            return fresh
        if plan.relaid:  # it made the state fit a param's new layout: nothing to raise
            return None
        return _locate(e, batch)


def _check_clip_options(name: str, max_grad_norm, grad_norm_type) -> None:
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
        raise ValueError(f"fusedopt.{name}: max_grad_norm must be None or a positive number, got {max_grad_norm!r}")
    if not (isinstance(grad_norm_type, (int, float)) and grad_norm_type > 0):
        raise ValueError(f"fusedopt.{name}: grad_norm_type must be a positive number or inf (2.0: the "
                         f"L2 norm), got {grad_norm_type!r}")


def _dense(t: Tensor) -> bool:
    """Non-overlapping and dense (any order of dimensions): sorted by stride, each stride is the
    product of the sizes before it (dimensions of size 1 aside)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda ss: ss[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _role_mask(spec: dict, row: dict) -> int:
    """Bit k set: a group with these hyperparameters keeps the rule's state role k (the conditions
    the C++ side evaluates, from fusedopt._C.RULES)."""
    mask = 0
    for k, use in enumerate(spec["role_uses"]):
        if use is None:
            on = True
        else:
            value = float(row[use[0]])
            on = value != 0 if use[1] == "nonzero" else value > 0
        mask |= int(on) << k
    return mask


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
    """The op's error with its list indices translated to the params' places in param_groups."""
    msg = str(e)
    places = []
    for i in dict.fromkeys(int(m.group(1)) for m in _INDEX.finditer(msg)):
        if i < len(batch.origin):
            g, k = batch.origin[i]
            places.append(f"params[{i}] of this step is param_groups[{g}]['params'][{k}]")
    if places:
        msg = f"{msg} [{'; '.join(places)}]"
    try:
        return type(e)(msg)
    except Exception:  # an exception type that does not take one message
        return RuntimeError(msg)
