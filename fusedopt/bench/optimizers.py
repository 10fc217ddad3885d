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
=============  ==========================================  ===================

Implementations:

==================  ==========================================================================
fusedopt            fusedopt.SGD / Adam / AdamW (one fused call per device)
torch-forloop       torch.optim.X(..., foreach=False)  (per-tensor Python loop)
torch-foreach       torch.optim.X(..., foreach=True)   (multi-tensor _foreach_* ops)
torch-fused         torch.optim.X(..., fused=True)     (torch's fused kernels)
fusedopt-graph      fusedopt, capturable=True, the step captured in a CUDA graph (GPU only)
torch-fused-graph   torch fused (+capturable=True where the class takes it), CUDA graph (GPU)
==================  ==========================================================================

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
    "Unsupported", "fusedopt_classes", "build_optimizer", "STANDIN_ENV",
]

STANDIN_ENV = "FUSEDOPT_BENCH_STANDIN"


class Unsupported(RuntimeError):
    """This (implementation, optimizer, dtype, device) combination cannot run: recorded as n/a."""


@dataclass(frozen=True)
class OptimizerConfig:
    name: str
    family: str  # "sgd" | "adam" | "adamw": which class
    kwargs: dict = field(default_factory=dict)

    def bytes_per_element(self, elem_size: int) -> int:
        return bytes_per_element(self.family, elem_size,
                                 momentum=self.kwargs.get("momentum", 0.0),
                                 amsgrad=self.kwargs.get("amsgrad", False))


OPTIMIZERS: dict[str, OptimizerConfig] = {
    "sgd": OptimizerConfig("sgd", "sgd", dict(lr=1e-3, momentum=0.9)),
    "sgd-plain": OptimizerConfig("sgd-plain", "sgd", dict(lr=1e-3)),
    "adam": OptimizerConfig("adam", "adam", dict(lr=1e-3)),
    "adam-amsgrad": OptimizerConfig("adam-amsgrad", "adam", dict(lr=1e-3, amsgrad=True)),
    "adamw": OptimizerConfig("adamw", "adamw", dict(lr=1e-3, weight_decay=1e-2)),
}
DEFAULT_OPTIMIZERS = ("sgd", "adam", "adamw")

_TORCH_CLASSES = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


@dataclass(frozen=True)
class Impl:
    name: str
    source: str                      # "fusedopt" | "torch"
    torch_kwargs: dict = field(default_factory=dict)
    graph: bool = False              # CUDA-graph-captured step
    cuda_only: bool = False

    @property
    def is_fusedopt(self) -> bool:
        return self.source == "fusedopt"


IMPLS: dict[str, Impl] = {
    "fusedopt": Impl("fusedopt", "fusedopt"),
    "torch-forloop": Impl("torch-forloop", "torch", dict(foreach=False)),
    "torch-foreach": Impl("torch-foreach", "torch", dict(foreach=True)),
    "torch-fused": Impl("torch-fused", "torch", dict(fused=True)),
    "fusedopt-graph": Impl("fusedopt-graph", "fusedopt", graph=True, cuda_only=True),
    "torch-fused-graph": Impl("torch-fused-graph", "torch", dict(fused=True), graph=True, cuda_only=True),
}
DEFAULT_IMPLS = tuple(IMPLS)  # the graph variants are dropped on CPU automatically


# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def fusedopt_classes() -> tuple[dict[str, Callable] | None, str, str]:
    """The pluggable fusedopt factory: ``(classes or None, description, reason if None)``.

    ``classes`` maps "sgd"/"adam"/"adamw" to a constructor with torch.optim's signature.
    """
    standin = os.environ.get(STANDIN_ENV, "").strip()
    if standin:
        if standin not in ("torch-fused", "torch-foreach", "torch-forloop"):
            raise ValueError(f"{STANDIN_ENV}={standin!r}: expected torch-fused, torch-foreach or torch-forloop")
        kw = IMPLS[standin].torch_kwargs
        classes = {fam: functools.partial(cls, **kw) for fam, cls in _TORCH_CLASSES.items()}
        return classes, f"STAND-IN: torch.optim {standin} (${STANDIN_ENV})", ""
    try:
        import fusedopt
        classes = {"sgd": fusedopt.SGD, "adam": fusedopt.Adam, "adamw": fusedopt.AdamW}
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
        classes, _desc, reason = fusedopt_classes()
        if classes is None:
            raise Unsupported(reason)
        ctor = classes[opt.family]
    else:
        ctor = _TORCH_CLASSES[opt.family]
        kwargs.update(impl.torch_kwargs)
    if impl.graph:
        if _accepts(ctor, "capturable"):
            kwargs["capturable"] = True
        elif opt.family != "sgd":  # SGD has no step counter: capturable is not a thing for it
            raise Unsupported(f"{impl.name}: {opt.family} constructor takes no capturable=")
    try:
        return ctor(params, **kwargs)
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
        raise Unsupported(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
