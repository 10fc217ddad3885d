"""The emulated CUDA backend: fusedopt's CUDA kernels (csrc/cuda/fused_step_kernels.cu, unchanged)
compiled as host C++ against csrc/cuda/emulation/cuda_shim.h and run on CPU threads, so that
machines without a GPU (CI) execute them.

``emulated(...)`` is a context manager that routes ``torch.ops.fusedopt.step_`` / ``adam_`` / ``sgd_`` /
``grad_norm_`` (csrc/cuda/grad_norm_kernels.cu) on CPU
tensors through the emulated kernels: the optimizer classes, the eager plan entry and the shared
validation all run as they do for CUDA tensors, and only the GPU is replaced. The backend is built
on first use with torch's JIT extension loader (about two minutes), into ``build/emulated_cuda``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
EMULATION = CSRC / "cuda" / "emulation"
DEFAULT_BUILD_DIR = ROOT / "build" / "emulated_cuda"
MODULE_NAME = "fusedopt_emulated_cuda"


def cuda_include_dirs() -> list[str] | None:
    """The toolkit's include dirs (cuda_runtime.h and libcu++'s cuda/atomic), or None."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(str(Path(nvcc).resolve().parent.parent))
    for root in filter(None, roots):
        inc = Path(root) / "include"
        if (inc / "cuda_runtime.h").exists() and (inc / "cccl" / "cuda" / "atomic").exists():
            return [str(inc), str(inc / "cccl")]
    return None


def build(kernel_source: str | os.PathLike | None = None, build_dir: str | os.PathLike | None = None,
          verbose: bool = False):
    """Compiles (or loads the cached build of) the emulated backend and returns its module.

    ``kernel_source``: a kernel file to compile instead of csrc/cuda/fused_step_kernels.cu (the
    mutation script's broken copies; it must sit in a copy of csrc/cuda so its includes resolve).
    """
    # the mutation script (scripts/mutate_cuda_kernels.py) points test runs at its broken copies
    kernel_source = kernel_source or os.environ.get("FUSEDOPT_EMULATED_KERNEL_SOURCE") or None
    build_dir = build_dir or os.environ.get("FUSEDOPT_EMULATED_BUILD_DIR") or None
    includes = cuda_include_dirs()
    if includes is None:
        raise RuntimeError("emulated CUDA: no CUDA toolkit headers found (cuda_runtime.h and "
                           "cccl/cuda/atomic under CUDA_HOME, /usr/local/cuda or the nvcc on PATH)")
    os.environ.setdefault("CUDA_HOME", str(Path(includes[0]).parent))  # torch guesses it wrong
    from torch.utils.cpp_extension import load

    build_dir = Path(build_dir or DEFAULT_BUILD_DIR)
    build_dir.mkdir(parents=True, exist_ok=True)
    kernels = EMULATION / "emulated_kernels.cpp"
    if kernel_source is not None:
        kernels = build_dir / "mutant_kernels.cpp"
        text = (f'#define FUSEDOPT_KERNEL_SOURCE "{Path(kernel_source).resolve()}"\n'
                f'#include "{EMULATION / "emulated_kernels.cpp"}"\n')
        if not kernels.exists() or kernels.read_text() != text:
            kernels.write_text(text)
    # likewise for the gradient-norm kernel (csrc/cuda/grad_norm_kernels.cu)
    norm_kernels = EMULATION / "emulated_norm_kernels.cpp"
    norm_source = os.environ.get("FUSEDOPT_EMULATED_NORM_KERNEL_SOURCE") or None
    if norm_source is not None:
        norm_kernels = build_dir / "mutant_norm_kernels.cpp"
        text = (f'#define FUSEDOPT_NORM_KERNEL_SOURCE "{Path(norm_source).resolve()}"\n'
                f'#include "{EMULATION / "emulated_norm_kernels.cpp"}"\n')
        if not norm_kernels.exists() or norm_kernels.read_text() != text:
            norm_kernels.write_text(text)
    return load(
        name=MODULE_NAME,
        sources=[str(EMULATION / "emulated_backend.cpp"), str(kernels),
                 str(norm_kernels),
                 str(CSRC / "cuda" / "host_tables.cpp"), str(CSRC / "cuda" / "norm_tables.cpp"),
                 str(CSRC / "step_args.cpp"), str(CSRC / "grad_norm_args.cpp")],
        # the half-type switches torch's CUDA builds give nvcc, so the kernels see the same API;
        # FUSEDOPT_EMULATED_CFLAGS adds flags ("-mfma -ffp-contract=fast": nvcc's fused multiply-adds)
        extra_cflags=["-std=c++20", "-O2", "-Wno-unknown-pragmas", "-D__CUDA_NO_HALF_OPERATORS__",
                      "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
                      "-D__CUDA_NO_HALF2_OPERATORS__"] + os.environ.get("FUSEDOPT_EMULATED_CFLAGS", "").split(),
        extra_include_paths=includes + [str(EMULATION)],
        build_directory=str(build_dir),
        verbose=verbose,
    )


@contextlib.contextmanager
def emulated(module, *, grid: int = 3, block: int = 16, chunk_elems: int = 64,
             concurrent: bool = True, seed: int = 0):
    """Routes the fused ops on CPU tensors through the emulated CUDA kernels while active.

    ``grid`` is the most blocks a launch uses (one per chunk below that), ``block`` the threads
    per block, ``chunk_elems`` the elements per chunk (small, so small tensors span several
    chunks and blocks), ``concurrent`` runs all blocks at once, else one at a time in an order
    shuffled by ``seed``.
    """
    module.configure(grid, block, chunk_elems, concurrent, seed)
    lib = torch.library.Library("fusedopt", "IMPL")
    try:
        def adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, group_sizes,
                  hyper, lr_tensors, grad_scale=None, found_inf=None, *, schedule_state,
                  schedule=None):
            module.adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                         group_sizes, hyper, lr_tensors, grad_scale, found_inf, schedule_state,
                         schedule)

        def sgd_(params, grads, momentum_buffers, group_sizes, hyper, lr_tensors, fresh_buffers,
                 grad_scale=None, found_inf=None, *, schedule_state, schedule=None):
            module.sgd_(params, grads, momentum_buffers, group_sizes, hyper, lr_tensors,
                        fresh_buffers, grad_scale, found_inf, schedule_state, schedule)

        def step_(rule, params, grads, states, masters, state_steps, group_sizes, hyper, lr_tensors,
                  fresh, grad_scale=None, found_inf=None, *, schedule_state, schedule=None, clip=None,
                  master_mode=0, seed=-1):
            module.step_(rule, params, grads, states, masters, state_steps, group_sizes, hyper,
                         lr_tensors, fresh, grad_scale, found_inf, schedule_state, schedule, clip,
                         master_mode, seed)

        def grad_norm_(grads, norm_type, max_norm, out, grad_scale=None):
            module.grad_norm_(grads, norm_type, max_norm, out, grad_scale)

        lib.impl("adam_", adam_, "CPU")
        lib.impl("sgd_", sgd_, "CPU")
        lib.impl("step_", step_, "CPU")
        lib.impl("grad_norm_", grad_norm_, "CPU")
        # the optimizers' StepPlans call the real CPU kernel directly: route them through the op
        from fusedopt.optim._fused import through_dispatcher

        with through_dispatcher():
            yield module
    finally:
        lib._destroy()


# A device entry for parametrized tests: CPU tensors, with the fused ops run by the emulated CUDA
# kernels (tests/conftest.py activates them for tests marked emulated_cuda). Its id makes
# `pytest -k emul` select every emulated test.
EMULATED = pytest.param("cpu", id="emul", marks=pytest.mark.emulated_cuda)
DEVICES = ["cpu", EMULATED] + (["cuda"] if torch.cuda.is_available() else [])
