"""Loading of the compiled ops, which never crashes the import of fusedopt.

The extension is checked against the torch it was built with *before* its shared library is
loaded, so a torch upgrade gives a clear message instead of an undefined-symbol trace.
"""

from __future__ import annotations

import os
import warnings

import torch

_BUILD_HINT = (
    "Build it with `pip install --no-build-isolation -e .` (or `pip install .`) from the fusedopt "
    "source tree, against the torch you run."
)

_C = None
_error: str | None = None


def _missing_cpu_flags(required, cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """The flags of ``required`` that ``cpuinfo`` does not list ([] where it cannot be read: the
    library then checks the CPU itself once loaded)."""
    try:
        with open(cpuinfo) as f:
            flags = set(f.read().split())
    except OSError:
        return []
    return [f for f in required if f not in flags]


def _load() -> None:
    global _C, _error
    if os.environ.get("FUSEDOPT_NO_EXTENSION", "").strip() in ("1", "on", "true", "yes"):
        _error = "the compiled extension is disabled by FUSEDOPT_NO_EXTENSION."
        return
    try:
        from fusedopt import _build_info
    except ImportError:
        _error = "the compiled extension fusedopt._C is not built. " + _BUILD_HINT
        return
    # torch.__version__ may carry a local tag (+cpu, +cu130): the C++ ABI is the release's.
    built, running = _build_info.TORCH_VERSION, torch.__version__
    if built.split("+")[0] != running.split("+")[0]:
        _error = (
            f"fusedopt._C was built against torch {built} but torch {running} is running; "
            "its C++ ABI does not match. Rebuild fusedopt. " + _BUILD_HINT
        )
        return
    # Any function of an AVX-512 build may use AVX-512 instructions, its static initialisers too:
    # on a CPU without them, loading the library would die of SIGILL before it could say why.
    missing = _missing_cpu_flags(getattr(_build_info, "CPU_FLAGS", ()))
    if missing:
        _error = (
            f"fusedopt._C was compiled for the {_build_info.CPU_ISA} instruction set, and this CPU "
            f"lacks {', '.join(missing)}. Rebuild on this machine, or with FUSEDOPT_CPU_ISA=avx2 or "
            "default."
        )
        return
    try:
        from fusedopt import _C as module
    except ImportError as e:
        _error = f"the compiled extension fusedopt._C failed to load ({e}). " + _BUILD_HINT
        return
    if not module.cpu_supports_build_isa():
        _error = (
            f"fusedopt._C was compiled for the {module.CPU_ISA} instruction set, which this CPU "
            "lacks. Rebuild on this machine, or with FUSEDOPT_CPU_ISA=avx2 or default."
        )
        return
    _C = module


_load()
if _error is not None:
    warnings.warn(f"fusedopt: {_error} The optimizers will raise until it is fixed.", stacklevel=2)


def extension_available() -> bool:
    """Whether the compiled fused ops are loaded and usable."""
    return _C is not None


def extension_error() -> str | None:
    """Why the compiled ops are unavailable, or None when they are loaded."""
    return _error


def require():
    """The extension module; raises a RuntimeError that says what is missing otherwise."""
    if _C is None:
        raise RuntimeError(f"fusedopt: {_error}")
    return _C
