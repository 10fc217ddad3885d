"""Flat storage: params, grads and optimizer state as views of one buffer per device and dtype.

``fusedopt.flatten_(model)`` re-homes the params (``p.data``) and their grads as views of one
contiguous buffer per (device, dtype), like DDP's ``gradient_as_bucket_view``. fusedopt's
optimizers then keep each state tensor (moments, step counters, masters) as a view of a flat
buffer too, and the fused step merges adjacent params whose every tensor continues the previous
one's memory (csrc/step_args.cpp, ``coalesce_slots``): a 10,000-tensor step becomes one
tensor's step. ``optimizer.zero_grad()`` is one memset per bucket.

Nothing here is needed for correctness: the step checks memory at every call, so a param whose
data was replaced, a grad set by hand or one made by a backward after ``p.grad = None`` is
stepped as an ordinary tensor (only the merge is lost), never through a stale view. After
``zero_grad(set_to_none=True)`` every grad is None, as in torch; a hook on each param gives it
back its zeroed slot before the next backward accumulates into it, so params that get no
gradient keep grad None and are skipped like torch skips them.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from fusedopt._extension import require

__all__ = ["flatten_", "FlatParams", "FlatBucket"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# param -> (its bucket, its index there), for as long as the param lives
_slots: WeakIdKeyDictionary = WeakIdKeyDictionary()
_buckets: weakref.WeakSet = weakref.WeakSet()
# how many times flatten_ has run: an optimizer's cached plan built before the latest flatten_
# is rebuilt, which moves its state into the new flat state
_generation = 0


def _dead_ref():  # what a bucket keeps of a param that left it
    return None


class FlatBucket:
    """The params of one device and dtype, as views of one buffer, with their grads (views of a
    second one) and the optimizer state made for them (one buffer per state key)."""

    def __init__(self, params: list[Tensor]):
        first = params[0]
        self.device, self.dtype = first.device, first.dtype
        self.numels = [p.numel() for p in params]
        self.offsets = []
        total = 0
        for n in self.numels:
            self.offsets.append(total)
            total += n
        self.numel = total
        with torch.no_grad():
            flat = torch.empty(total, dtype=self.dtype, device=self.device)
            for p, off, n in zip(params, self.offsets, self.numels):
                view = flat[off:off + n].view(p.shape)
                view.copy_(p)
                p.data = view
        self._base = flat.untyped_storage().data_ptr()
        self._params = [weakref.ref(p) for p in params]
        self._state: dict[tuple, Tensor] = {}
        grads = torch.zeros(total, dtype=self.dtype, device=self.device)
        self._grads = require().FlatGrads(params, grads, self.offsets)  # adopts existing grads

    def __len__(self) -> int:
        return len(self._params)

    def __repr__(self) -> str:
        return f"FlatBucket({len(self)} params, {self.numel} elements, {self.dtype}, {self.device})"

    def params(self) -> list[Tensor]:
        """The bucket's params that are alive."""
        return [p for p in (r() for r in self._params) if p is not None]

    def _release(self, i: int, p: Tensor) -> None:
        self._grads.release(p, i)
        self._params[i] = _dead_ref

    def holds(self, i: int, p: Tensor) -> bool:
        """Whether ``p`` still lives at its place in the bucket (its data not replaced since)."""
        return (p.device == self.device and p.dtype == self.dtype and p.numel() == self.numels[i]
                and p.data_ptr() == self._base + self.offsets[i] * p.element_size())

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Every param's grad zeroed in one memset; with ``set_to_none``, then set to None."""
        zero_grads(self._grads.zero_grad(set_to_none), set_to_none)

    def _state_view(self, key: str, i: int, p: Tensor, value: Tensor) -> Tensor | None:
        """Where state ``value`` of param i lives in the flat state (a buffer per key, dtype and
        device), or None for a value that has no place there."""
        if key == "step":  # one counter per param
            if value.dim() != 0:
                return None
            size, index = len(self._params), (i,)
        elif value.shape == p.shape:
            size, index = self.numel, (slice(self.offsets[i], self.offsets[i] + self.numels[i]),)
        else:
            return None
        buf_key = (key, value.dtype, value.device)
        buf = self._state.get(buf_key)
        if buf is None:
            buf = self._state[buf_key] = torch.zeros(size, dtype=value.dtype, device=value.device)
        view = buf[index]
        return view if key == "step" else view.view(p.shape)

    def state_moves(self, i: int, p: Tensor, state: dict) -> list[tuple[dict, str, Tensor, Tensor]]:
        """The tensors of param i's state dict that belong elsewhere in the flat state, as
        (state, key, tensor, its place); ``move_states`` moves them."""
        moves = []
        for key, value in state.items():
            if type(value) is not Tensor or value.layout != torch.strided or value.is_complex():
                continue
            view = self._state_view(key, i, p, value)
            if view is not None and view.data_ptr() != value.data_ptr():
                moves.append((state, key, value, view))
        return moves


def move_states(moves: list[tuple[dict, str, Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    """Copies each tensor of ``state_moves`` to its place and puts the place in its state dict;
    returns (old, new) for each. All at once: state dicts swapped or moved between params hold
    tensors at other params' places, which a copy in turn would overwrite before they are read."""
    targets = {view.untyped_storage().data_ptr() for _, _, _, view in moves}
    with torch.no_grad():
        sources = [value.clone() if value.untyped_storage().data_ptr() in targets else value
                   for _, _, value, _ in moves]
        for (_, _, _, view), source in zip(moves, sources):
            view.copy_(source)
    for state, key, _, view in moves:
        state[key] = view
    return [(value, view) for _, _, value, view in moves]


class FlatParams:
    """What ``flatten_`` returns: the buckets it made (one per device and dtype)."""

    def __init__(self, buckets: list[FlatBucket]):
        self.buckets = buckets

    def __iter__(self):
        return iter(self.buckets)

    def __len__(self) -> int:
        return len(self.buckets)

    def __repr__(self) -> str:
        return f"FlatParams({self.buckets})"

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``zero_grad`` of every bucket: one memset each."""
        for b in self.buckets:
            b.zero_grad(set_to_none)


def zero_grads(params, set_to_none: bool) -> None:
    """torch.optim.Optimizer.zero_grad for these params' grads, one by one."""
    for p in params:
        if p.grad is None:
            continue
        if set_to_none:
            p.grad = None
        else:
            if p.grad.grad_fn is not None:
                p.grad.detach_()
            else:
                p.grad.requires_grad_(False)
            p.grad.zero_()


def _gather(params) -> list[Tensor]:
    if isinstance(params, torch.nn.Module):
        return [p for p in params.parameters() if p.requires_grad]
    if isinstance(params, Tensor):
        raise TypeError("fusedopt.flatten_: params must be a module or an iterable of tensors or of "
                        "param groups (dicts with 'params'), got a single tensor")
    if not isinstance(params, Iterable):
        raise TypeError(f"fusedopt.flatten_: params must be a module or an iterable of tensors or of "
                        f"param groups, got {type(params).__name__}")
    out: list[Tensor] = []
    for item in params:
        if isinstance(item, dict):
            group = item.get("params")
            out.extend([group] if isinstance(group, Tensor) else list(group or ()))
        else:
            out.append(item)
    return out


def _check(params: list[Tensor]) -> None:
    seen: dict[int, int] = {}
    memory: dict[tuple, int] = {}
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    for i, p in enumerate(params):
        what = f"fusedopt.flatten_: params[{i}]"
        if not isinstance(p, Tensor):
            raise TypeError(f"{what} is a {type(p).__name__}, not a tensor")
        if dtensor is not None and isinstance(p, dtensor):
            raise TypeError(f"{what} is a DTensor: flat storage takes plain params (FSDP2 keeps its "
                            "own shards flat)")
        if type(p) not in (Tensor, torch.nn.Parameter):
            raise TypeError(f"{what} is a {type(p).__name__}: flat storage takes plain tensors and "
                            "Parameters")
        if not p.is_leaf:
            raise ValueError(f"{what} is not a leaf tensor (it has a grad_fn); flatten params, not "
                             "results computed from them")
        if p.layout != torch.strided or p.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{what} is {p.layout} {p.dtype}: flat storage takes dense float32, "
                            "float64, float16 and bfloat16 params")
        if not p.is_contiguous():
            raise ValueError(f"{what} is not contiguous (shape {tuple(p.shape)}, strides {p.stride()}): "
                             "flat storage keeps params contiguous; leave it out, or make it "
                             "contiguous first")
        if id(p) in seen:
            raise ValueError(f"{what} is the same tensor as params[{seen[id(p)]}]")
        seen[id(p)] = i
        if p.numel():
            where = (p.device, p.untyped_storage().data_ptr())
            if where in memory and not _flat_now(p):
                raise ValueError(f"{what} shares memory with params[{memory[where]}]: flat storage "
                                 "would give each its own copy")
            memory.setdefault(where, i)


def _flat_now(p: Tensor) -> bool:
    slot = _slots.get(p)
    return slot is not None and slot[0].holds(slot[1], p)


def flatten_(params) -> FlatParams:
    """Re-homes params and their grads as views of one contiguous buffer per device and dtype.

    ``params``: a module (its params that require grad), or an iterable of tensors or of param
    groups (dicts with ``'params'``, as an optimizer takes them; their order is kept, so each
    group's params are adjacent). Call it before or after making the optimizer: state made before
    (by earlier steps or ``load_state_dict``) is moved into flat state at the optimizer's next step.

    Existing grads move into the flat grads. Params keep their identity (``p.data`` is replaced),
    shapes and values; a module's ``state_dict`` and ``load_state_dict`` are unchanged. Params
    flattened before are flattened anew (their previous buckets let go of them).

    Returns a :class:`FlatParams`, the buckets made.
    """
    params = _gather(params)
    _check(params)
    by_place: dict[tuple, list[Tensor]] = {}
    for p in params:
        by_place.setdefault((p.device, p.dtype), []).append(p)
    buckets = []
    for group in by_place.values():
        for p in group:  # flattened before: its old bucket lets go of it
            old = _slots.pop(p, None)
            if old is not None:
                old[0]._release(old[1], p)
        bucket = FlatBucket(group)
        for i, p in enumerate(group):
            _slots[p] = (bucket, i)
        _buckets.add(bucket)
        buckets.append(bucket)
    global _generation
    _generation += 1
    return FlatParams(buckets)


def generation() -> int:
    """How many times ``flatten_`` has run (a plan built before the latest run is stale)."""
    return _generation


def any_flat() -> bool:
    """Whether any live param was flattened (one check, so unflattened runs pay nothing). False
    while torch.compile traces: dynamo refuses the weak dictionaries flat storage is looked up in,
    so a compiled step or zero_grad treats flat params as ordinary ones (the same results; the
    state moves into flat storage at an eager step)."""
    if torch.compiler.is_compiling():
        return False
    return len(_slots) > 0


def slot_of(p: Tensor) -> tuple[FlatBucket, int] | None:
    """The bucket and index of a param that lives in flat storage now, else None."""
    slot = _slots.get(p)
    if slot is None or not slot[0].holds(slot[1], p):
        return None
    return slot


def owned_buckets(params: list[Tensor]) -> list[FlatBucket]:
    """The buckets all of whose live params are among ``params`` (an optimizer may zero those
    whole)."""
    ids = set(map(id, params))
    out = []
    for b in list(_buckets):
        live = b.params()
        if live and all(id(p) in ids for p in live):
            out.append(b)
    return out
