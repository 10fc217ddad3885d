"""What is being compared: optimizer configurations x implementations, and how to build each.

Optimizer configurations (same hyper-parameters for every implementation):

=============  ==========================================  ===================
name           constructor kwargs                          bytes/elem (model)
=============  ==========================================  ===================
sgd            SGD(lr=1e-3, momentum=0.9)                  5 * es
sgd-plain      SGD(lr=1e-3)                                3 * es
adam           Adam(lr=1e-3)                               7 * es
adam-amsgrad   Adam(lr=1e-3, amsgrad=True)                 9 * es
adamw          AdamW(lr=1e-3, weight_decay=1e-2)           7 * es
rmsprop        RMSprop(lr=1e-2)  (torch's defaults)        5 * es
adagrad        Adagrad(lr=1e-2)  (torch's defaults)        5 * es
lion           fusedopt.Lion(lr=1e-4, betas=(0.9, 0.99))   5 * es
=============  ==========================================  ===================

torch.optim has no fused RMSprop (its torch-fused rows are n/a) and no Lion at all: lion gets
fusedopt rows only (the runner leaves torch implementations out for it and says so in a note).

Implementations:

==================  ==========================================================================
fusedopt            fusedopt.SGD / Adam / AdamW (one fused call per device)
torch-forloop       torch.optim.X(..., foreach=False)  (per-tensor Python loop)
torch-foreach       torch.optim.X(..., foreach=True)   (multi-tensor _foreach_* ops)
torch-fused         torch.optim.X(..., fused=True)     (torch's fused kernels)
fusedopt-flat       fusedopt on its own copy of the params, flattened (fusedopt.flatten_)
fusedopt-graph      fusedopt, capturable=True, the step captured in a CUDA graph (GPU only)
torch-fused-graph   torch fused (+capturable=True where the class takes it), CUDA graph (GPU)
==================  ==========================================================================

Precision variants (``--precision``, and the ``mixed`` preset): the fusedopt implementation run
with one of fusedopt's precision options, as an extra row named ``fusedopt:<option>``:

==================  =====================================================================
option              fusedopt keyword arguments
==================  =====================================================================
none                (none: state in the param's dtype, torch's behaviour; the plain row)
master              master_weights=True            (float32 master in state["master_param"])
master+rem          master_weights=True, master_remainders=True  (int16 remainder, bf16 only)
fp32-state          state_dtype=torch.float32      (16-bit params, float32 moments/buffers)
master+fp32-state   master_weights=True, state_dtype=torch.float32
sr                  stochastic_rounding=True       (bf16 params, no master)
==================  =====================================================================

They only change 16-bit (bf16/fp16) params; on float32/float64 params their rows are n/a.

The fusedopt classes come from a pluggable factory (:func:`fusedopt_classes`). Normally that
is the real ``fusedopt.SGD/Adam/AdamW``; setting the environment variable
``FUSEDOPT_BENCH_STANDIN`` to ``torch-fused``, ``torch-foreach`` or ``torch-forloop`` makes
the "fusedopt" rows use that torch.optim variant instead. That exists only to develop and
test the harness while the extension is not built; results record which one ran
(``fusedopt_impl`` in results.json) and the CLI prints a loud warning.
"""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from fusedopt.bench.bytes_model import bytes_per_element

__all__ = [
    "OptimizerConfig", "Impl", "OPTIMIZERS", "IMPLS", "DEFAULT_OPTIMIZERS", "DEFAULT_IMPLS",
    "PRECISIONS", "PRECISION_IMPLS", "precision_impl_name", "get_impl", "all_impl_names",
    "Unsupported", "fusedopt_classes", "build_optimizer", "STANDIN_ENV",
]

STANDIN_ENV = "FUSEDOPT_BENCH_STANDIN"


class Unsupported(RuntimeError):
    """This (implementation, optimizer, dtype, device) combination cannot run: recorded as n/a."""


@dataclass(frozen=True)
class OptimizerConfig:
    name: str
    family: str  # "sgd" | "adam" | "adamw" | "rmsprop" | "adagrad" | "lion": which class
    kwargs: dict = field(default_factory=dict)

    @property
    def has_torch(self) -> bool:
        """Whether torch.optim has this optimizer at all (Lion: no)."""
        return self.family in _TORCH_CLASSES

    def model_kwargs(self) -> dict:
        """The constructor arguments that change the bytes model (which state tensors exist)."""
        kw = dict(momentum=self.kwargs.get("momentum", 0.0))
        if self.family in ("adam", "adamw"):
            kw["amsgrad"] = self.kwargs.get("amsgrad", False)
        if self.family == "rmsprop":
            kw["centered"] = self.kwargs.get("centered", False)
        return kw

    def bytes_per_element(self, elem_size: int, **precision) -> int:
        """Bytes per element for ``elem_size``-byte params; ``precision``: fusedopt's precision
        keyword arguments (a :data:`PRECISIONS` entry)."""
        return bytes_per_element(self.family, elem_size, **self.model_kwargs(), **precision)


OPTIMIZERS: dict[str, OptimizerConfig] = {
    "sgd": OptimizerConfig("sgd", "sgd", dict(lr=1e-3, momentum=0.9)),
    "sgd-plain": OptimizerConfig("sgd-plain", "sgd", dict(lr=1e-3)),
    "adam": OptimizerConfig("adam", "adam", dict(lr=1e-3)),
    "adam-amsgrad": OptimizerConfig("adam-amsgrad", "adam", dict(lr=1e-3, amsgrad=True)),
    "adamw": OptimizerConfig("adamw", "adamw", dict(lr=1e-3, weight_decay=1e-2)),
    "rmsprop": OptimizerConfig("rmsprop", "rmsprop", dict(lr=1e-2)),
    "adagrad": OptimizerConfig("adagrad", "adagrad", dict(lr=1e-2)),
    "lion": OptimizerConfig("lion", "lion", dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)),
}
DEFAULT_OPTIMIZERS = ("sgd", "adam", "adamw")

_TORCH_CLASSES = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
                  "rmsprop": torch.optim.RMSprop, "adagrad": torch.optim.Adagrad}
_FUSEDOPT_NAMES = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop",
                   "adagrad": "Adagrad", "lion": "Lion"}


@dataclass(frozen=True)
class Impl:
    name: str
    source: str                      # "fusedopt" | "torch"
    torch_kwargs: dict = field(default_factory=dict)
    graph: bool = False              # CUDA-graph-captured step
    cuda_only: bool = False
    precision: str = "none"          # fusedopt precision option (a PRECISIONS key)
    flat: bool = False               # on a flattened copy of the params (fusedopt.flatten_)

    @property
    def is_fusedopt(self) -> bool:
        return self.source == "fusedopt"

    @property
    def precision_kwargs(self) -> dict:
        return dict(PRECISIONS[self.precision])


IMPLS: dict[str, Impl] = {
    "fusedopt": Impl("fusedopt", "fusedopt"),
    "torch-forloop": Impl("torch-forloop", "torch", dict(foreach=False)),
    "torch-foreach": Impl("torch-foreach", "torch", dict(foreach=True)),
    "torch-fused": Impl("torch-fused", "torch", dict(fused=True)),
    "fusedopt-flat": Impl("fusedopt-flat", "fusedopt", flat=True),
    "fusedopt-graph": Impl("fusedopt-graph", "fusedopt", graph=True, cuda_only=True),
    "torch-fused-graph": Impl("torch-fused-graph", "torch", dict(fused=True), graph=True, cuda_only=True),
}
# the graph variants are dropped on CPU automatically; fusedopt-flat (a second copy of the
# params) runs when named
DEFAULT_IMPLS = tuple(k for k in IMPLS if not IMPLS[k].flat)

# fusedopt's precision options, one benchmark row each (see the module docstring).
PRECISIONS: dict[str, dict] = {
    "none": {},
    "master": dict(master_weights=True),
    "master+rem": dict(master_weights=True, master_remainders=True),
    "fp32-state": dict(state_dtype=torch.float32),
    "master+fp32-state": dict(master_weights=True, state_dtype=torch.float32),
    "sr": dict(stochastic_rounding=True),
}


def precision_impl_name(precision: str) -> str:
    """The row name of fusedopt with ``precision``: "fusedopt" for none, else "fusedopt:<option>"."""
    return "fusedopt" if precision == "none" else f"fusedopt:{precision}"


PRECISION_IMPLS: dict[str, Impl] = {
    precision_impl_name(k): Impl(precision_impl_name(k), "fusedopt", precision=k) for k in PRECISIONS if k != "none"
}


def get_impl(name: str) -> Impl:
    """An implementation by name: one of :data:`IMPLS` or a precision variant ``fusedopt:<option>``."""
    try:
        return IMPLS[name] if name in IMPLS else PRECISION_IMPLS[name]
    except KeyError:
        raise KeyError(f"unknown implementation {name!r}") from None


def all_impl_names() -> list[str]:
    return list(IMPLS) + list(PRECISION_IMPLS)


# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def fusedopt_classes() -> tuple[dict[str, Callable] | None, str, str]:
    """The pluggable fusedopt factory: ``(classes or None, description, reason if None)``.

    ``classes`` maps an optimizer family ("sgd", "adam", "adamw", "rmsprop", "adagrad", "lion")
    to a constructor with torch.optim's signature (a family it lacks has n/a fusedopt rows).
    """
    standin = os.environ.get(STANDIN_ENV, "").strip()
    if standin:
        if standin not in ("torch-fused", "torch-foreach", "torch-forloop"):
            raise ValueError(f"{STANDIN_ENV}={standin!r}: expected torch-fused, torch-foreach or torch-forloop")
        kw = IMPLS[standin].torch_kwargs
        classes = {fam: functools.partial(cls, **kw) for fam, cls in _TORCH_CLASSES.items()
                   if not (fam == "rmsprop" and "fused" in kw)}
        return classes, f"STAND-IN: torch.optim {standin} (${STANDIN_ENV})", ""
    try:
        import fusedopt
        classes = {"sgd": fusedopt.SGD, "adam": fusedopt.Adam, "adamw": fusedopt.AdamW}
        # the newer optimizers, where this fusedopt has them (their rows are n/a otherwise)
        classes.update({fam: getattr(fusedopt, cls) for fam, cls in _FUSEDOPT_NAMES.items()
                        if fam not in classes and hasattr(fusedopt, cls)})
    except Exception as e:  # extension not built, or fusedopt.optim not there yet
        return None, "unavailable", f"cannot import fusedopt optimizers: {type(e).__name__}: {e}"
    avail = getattr(fusedopt, "extension_available", None)
    if callable(avail) and not avail():
        err = getattr(fusedopt, "extension_error", None)
        msg = err() if callable(err) else err
        return None, "unavailable", f"fusedopt extension not built: {msg}"
    return classes, f"fusedopt {getattr(fusedopt, '__version__', '?')}", ""


def _accepts(ctor: Callable, name: str) -> bool:
    target = ctor.func if isinstance(ctor, functools.partial) else ctor
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def build_optimizer(impl: Impl, opt: OptimizerConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """Construct ``opt`` as implemented by ``impl`` over ``params``; raise :class:`Unsupported`."""
    device = params[0].device
    if impl.cuda_only and device.type != "cuda":
        raise Unsupported(f"{impl.name} needs a CUDA device")
    kwargs = dict(opt.kwargs)
    if impl.is_fusedopt:
        classes, desc, reason = fusedopt_classes()
        if classes is None:
            raise Unsupported(reason)
        if opt.family not in classes:
            raise Unsupported(f"{desc} has no {_FUSEDOPT_NAMES[opt.family]}")
        ctor = classes[opt.family]
        if impl.precision != "none":
            if desc.startswith("STAND-IN"):
                raise Unsupported(f"{impl.name}: the torch.optim stand-in has no precision options")
            if params[0].dtype not in (torch.bfloat16, torch.float16):
                raise Unsupported(f"{impl.name}: precision options only change 16-bit (bf16/fp16) params, "
                                  f"not {str(params[0].dtype).removeprefix('torch.')}")
            kwargs.update(impl.precision_kwargs)
    else:
        if opt.family not in _TORCH_CLASSES:
            raise Unsupported(f"torch.optim has no {_FUSEDOPT_NAMES.get(opt.family, opt.family)}: fusedopt only")
        ctor = _TORCH_CLASSES[opt.family]
        if impl.torch_kwargs.get("fused") and not _accepts(ctor, "fused"):
            raise Unsupported(f"torch.optim.{ctor.__name__} has no fused implementation")
        kwargs.update(impl.torch_kwargs)
    if impl.flat:
        if desc.startswith("STAND-IN"):
            raise Unsupported(f"{impl.name}: the torch.optim stand-in has no flat storage")
        params = _flat_copy(params)
    if impl.graph:
        if _accepts(ctor, "capturable"):
            kwargs["capturable"] = True
        elif opt.family != "sgd":  # SGD has no step counter: capturable is not a thing for it
            raise Unsupported(f"{impl.name}: {opt.family} constructor takes no capturable=")
    try:
        return ctor(params, **kwargs)
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
        raise Unsupported(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


def _flat_copy(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of ``params`` (with their grads) flattened by fusedopt.flatten_: the other rows keep
    stepping the shared params as they were made."""
    import fusedopt

    copies = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        q.grad = None if p.grad is None else p.grad.detach().clone()
        copies.append(q)
    try:
        fusedopt.flatten_(copies)
    except (TypeError, ValueError) as e:  # e.g. DTensor params
        raise Unsupported(f"fusedopt-flat: {e}") from e
    return copies
