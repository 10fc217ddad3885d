"""Build of fusedopt's compiled ops (fusedopt._C).

Environment switches:
  FUSEDOPT_CUDA=1|0   force the CUDA kernels on (fail loudly without a toolkit) or off;
                      unset: on when torch is a CUDA build and a CUDA toolkit is found.
                      Never decided by a visible GPU: CUDA code compiles on GPU-less machines.
  FUSEDOPT_NO_EXTENSION=1   build the pure-Python package only (fusedopt then warns on import).
  FUSEDOPT_CPU_ISA=avx512|avx2|default   instruction set of the CPU kernels: AVX-512 (F, BW,
                      VL, DQ, as torch's AVX512 kernels), AVX2+FMA+F16C, or none (default: the
                      best the build machine's CPU has; the import checks the running CPU).
  CUDA_HOME           the toolkit; else /usr/local/cuda, else the toolkit behind `nvcc`.
  TORCH_CUDA_ARCH_LIST  GPU architectures (default: the visible GPUs, else "9.0+PTX").
  MAX_JOBS            parallel compile jobs (ninja).
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()
CSRC = "csrc"


def _env_flag(name):
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    sys.exit(f"fusedopt setup: {name}={os.environ[name]!r} is not one of 1/0/on/off/auto")


def _is_toolkit(path):
    return path is not None and (Path(path) / "bin" / "nvcc").exists() and (
        Path(path) / "include" / "cuda_runtime.h"
    ).exists()


def find_cuda_toolkit():
    """The CUDA toolkit root, or None.

    torch guesses CUDA_HOME from the `nvcc` on PATH; where that is a wrapper script outside the
    toolkit (as on our build machines), the guess is wrong, so look for the real root first.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
        try:  # a wrapper script that execs the real nvcc names it
            text = Path(nvcc).read_text(errors="ignore")[:4096]
            for word in text.split():
                if word.endswith("/bin/nvcc"):
                    candidates.append(str(Path(word).parent.parent))
        except OSError:
            pass
    for c in candidates:
        if _is_toolkit(c):
            return str(Path(c).resolve())
    return None


_ISA_FLAGS = {
    "avx2": ("avx2", "fma", "f16c"),
    "avx512": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"),
}


def _cpu_isa():
    """FUSEDOPT_CPU_ISA, or the best instruction set /proc/cpuinfo lists."""
    if "FUSEDOPT_CPU_AVX2" in os.environ:
        sys.exit("fusedopt setup: FUSEDOPT_CPU_AVX2 was replaced by FUSEDOPT_CPU_ISA=avx512|avx2|default")
    chosen = os.environ.get("FUSEDOPT_CPU_ISA", "").strip().lower()
    if chosen not in ("", "auto"):
        if chosen not in ("avx512", "avx2", "default"):
            sys.exit(f"fusedopt setup: FUSEDOPT_CPU_ISA={chosen!r} is not one of "
                     "avx512/avx2/default/auto")
        return chosen
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "default"
    for isa in ("avx512", "avx2"):
        if all(f in flags for f in _ISA_FLAGS[isa]):
            return isa
    return "default"


def _write_build_info(torch_version, cuda_version, with_cuda, cpu_isa):
    (ROOT / "fusedopt" / "_build_info.py").write_text(
        "# Written by setup.py: what the compiled extension was built against.\n"
        f"TORCH_VERSION = {torch_version!r}\n"
        f"TORCH_CUDA_VERSION = {cuda_version!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"CPU_ISA = {cpu_isa!r}\n"
        "# /proc/cpuinfo flags the code needs: checked before the library loads\n"
        f"CPU_FLAGS = {_ISA_FLAGS.get(cpu_isa, ())!r}\n"
    )


def extensions_and_cmdclass():
    if _env_flag("FUSEDOPT_NO_EXTENSION"):
        return [], {}
    want_cuda = _env_flag("FUSEDOPT_CUDA")
    toolkit = find_cuda_toolkit()
    if toolkit and not os.environ.get("CUDA_HOME"):
        # Must be set before torch.utils.cpp_extension is imported: it reads it at import.
        os.environ["CUDA_HOME"] = toolkit

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    torch_cuda = torch.version.cuda
    if want_cuda is True and not torch_cuda:
        sys.exit(
            f"fusedopt setup: FUSEDOPT_CUDA=1 but torch {torch.__version__} is not a CUDA build"
        )
    if want_cuda is True and not toolkit:
        sys.exit(
            "fusedopt setup: FUSEDOPT_CUDA=1 but no CUDA toolkit was found (looked at CUDA_HOME, "
            "CUDA_PATH, /usr/local/cuda and the nvcc on PATH); set CUDA_HOME to the toolkit root"
        )
    with_cuda = bool(torch_cuda and toolkit) if want_cuda is None else want_cuda

    isa = _cpu_isa()

    # -ffp-contract=off: no a * b + c fused behind our back. The rules mirror torch's separate
    # multiplies and adds, and the vector loop and its scalar tail must round the same way.
    cxx = ["-O3", "-fopenmp", "-fvisibility=hidden", "-Wno-unknown-pragmas", "-ffp-contract=off"]
    define_macros = []
    # at::vec picks its instruction set from CPU_CAPABILITY; symbols stay hidden in our .so,
    # so these inline copies never interpose on torch's own.
    # FUSEDOPT_CPU_AVX2: x86 with at least AVX2, where the kernels' own intrinsics apply.
    if isa == "avx512":
        cxx += ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
        define_macros += [("FUSEDOPT_CPU_AVX2", None), ("FUSEDOPT_CPU_AVX512", None),
                          ("CPU_CAPABILITY", "AVX512"), ("CPU_CAPABILITY_AVX512", None)]
    elif isa == "avx2":
        cxx += ["-mavx2", "-mfma", "-mf16c"]
        define_macros += [("FUSEDOPT_CPU_AVX2", None), ("CPU_CAPABILITY", "AVX2"),
                          ("CPU_CAPABILITY_AVX2", None)]
    else:
        define_macros.append(("CPU_CAPABILITY", "DEFAULT"))
    sources = [
        f"{CSRC}/module.cpp",
        f"{CSRC}/eager_entry.cpp",
        f"{CSRC}/flat_grads.cpp",
        f"{CSRC}/ops.cpp",
        f"{CSRC}/step_args.cpp",
        f"{CSRC}/work_list.cpp",
        f"{CSRC}/cpu/fused_step_cpu.cpp",
        f"{CSRC}/grad_norm_args.cpp",
        f"{CSRC}/cpu/grad_norm_cpu.cpp",
    ]
    kwargs = dict(
        name="fusedopt._C",
        sources=sources,
        # -lstdc++: the shared C++ runtime even where the compiler links it statically by default
        # (the g++ 13.3 of the H200 machines did). A second copy of the runtime in our library
        # crashed the process, or cut error messages short, whenever an op raised an error.
        extra_link_args=["-fopenmp", "-lstdc++"],
        define_macros=define_macros,
    )
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0+PTX"
        sources += [f"{CSRC}/cuda/fused_step_cuda.cpp", f"{CSRC}/cuda/host_tables.cpp",
                    f"{CSRC}/cuda/table_cache.cpp", f"{CSRC}/cuda/grad_norm_cuda.cpp",
                    f"{CSRC}/cuda/norm_tables.cpp", f"{CSRC}/cuda/grad_norm_kernels.cu",
                    f"{CSRC}/cuda/fused_step_kernels.cu"]
        define_macros.append(("FUSEDOPT_WITH_CUDA", None))
        ext = CUDAExtension(
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            **kwargs,
        )
    else:
        ext = CppExtension(extra_compile_args={"cxx": cxx}, **kwargs)
    _write_build_info(torch.__version__, torch_cuda, with_cuda, isa)
    print(
        f"fusedopt setup: torch {torch.__version__}, CUDA kernels "
        f"{'ON (toolkit ' + str(toolkit) + ')' if with_cuda else 'OFF'}, CPU ISA "
        f"{isa}",
        flush=True,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
