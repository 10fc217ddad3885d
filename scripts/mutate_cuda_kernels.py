"""Mutation testing of the emulated-CUDA tests: injects known bugs, one at a time, into a copy of
csrc/cuda/fused_step_kernels.cu (or of csrc/cuda/grad_norm_kernels.cu: the "norm:" mutants), builds the emulated backend from the copy, and runs the emulated
tests against it. Each mutant must be caught (a failing test, a crash or a hang); a surviving mutant
means the tests cannot see that kind of bug, and the script exits non-zero.

    python scripts/mutate_cuda_kernels.py            # every mutant
    python scripts/mutate_cuda_kernels.py -k reset   # those whose name contains "reset"
    python scripts/mutate_cuda_kernels.py -k norm:   # the gradient-norm kernel's

Needs the built fusedopt extension and the CUDA headers; no GPU. About 20-60 s per mutant.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELS = "csrc/cuda/fused_step_kernels.cu"

# (name, text to find, replacement, occurrences it must have: the mutant changes all of them)
MUTANTS = [
    ("vector loop drops its last unit", "const int64_t units = (end - begin) / kN;",
     "const int64_t units = (end - begin) / kN - 1;", 1),
    ("scalar tail stops one early", "for (int64_t j = i + threadIdx.x; j < end; j += blockDim.x)",
     "for (int64_t j = i + threadIdx.x; j < end - 1; j += blockDim.x)", 1),
    ("chunk loop skips the last chunk", "for (int64_t c = blockIdx.x; c < a.num_chunks; c += gridDim.x)",
     "for (int64_t c = blockIdx.x; c < a.num_chunks - 1; c += gridDim.x)", 1),
    ("grid stride skips chunks", "c < a.num_chunks; c += gridDim.x)", "c < a.num_chunks; c += gridDim.x + 1)", 1),
    ("chunk end off by one", "const int64_t end = ch.begin + a.chunk_elems < t.numel ? ch.begin + a.chunk_elems : t.numel;",
     "const int64_t end = ch.begin + a.chunk_elems < t.numel ? ch.begin + a.chunk_elems - 1 : t.numel;", 1),
    ("found_inf ignored", "  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return true;\n", "", 1),
    ("unscaled grads not written back", "    store_role<S, N, Vec>(t.grad, St::of(t.dtype), j, g);\n", "", 1),
    ("step counter never reset", "          reset_count(&a.done_counters[ch.tensor]);\n", "", 1),
    ("launch counter never reset", "  reset_count(launch_counter);\n", "", 1),
    ("schedule step not advanced", "  *a.schedule_step += 1;\n", "", 1),
    ("step bumped by the first block", "if (count_done(&a.done_counters[ch.tensor]) == t.num_chunks - 1) {",
     "if (count_done(&a.done_counters[ch.tensor]) == 0) {", 1),
    ("step written twice", "          *t.step = static_cast<float>(step);", "          *t.step = static_cast<float>(step + 1.0);", 1),
    ("no __syncthreads before counting a chunk done",
     "      __syncthreads();\n      if (threadIdx.x == 0) {\n        if (count_done",
     "      if (threadIdx.x == 0) {\n        if (count_done", 1),
    ("device lr ignored", "  if (g.lr_ptr == nullptr) return g.row[col::lr];", "  return g.row[col::lr];", 1),
    ("fresh momentum buffer ignored", "const bool fresh = (t.flags & kFresh) != 0;", "const bool fresh = false;", 1),
    ("third state role not stored", "if (roles & (1u << r)) store_role<S, N, Vec>(t.state[r]",
     "if ((roles & (1u << r)) && r < 2) store_role<S, N, Vec>(t.state[r]", 1),
    ("schedule evaluated at the old step", "const double next = static_cast<double>(*a.schedule_step + 1);",
     "const double next = static_cast<double>(*a.schedule_step);", 1),
    ("state stored in the param's dtype", "store_role<S, N, Vec>(t.state[r], St::of(t.state_dtype[r]), j, st[r]);",
     "store_role<S, N, Vec>(t.state[r], St::of(t.dtype), j, st[r]);", 1),
    ("float32 master not written", "    store_as<float, S, N, Vec>(t.master, j, p);\n", "", 1),
    ("stochastic rounding reuses bits across elements", "static_cast<uint64_t>(j + k)));",
     "static_cast<uint64_t>(j)));", 1),
    ("clip coefficient ignored", "    S gk = gs.clip ? g[k] * static_cast<S>(gs.clip_coef) : g[k];",
     "    S gk = g[k];", 1),
    ("non-finite grad norm does not skip", "    if (!(norm - norm == 0.0)) return true;  // inf or NaN\n", "", 1),
    ("a bfloat16 launch runs the float32 kernel", "case kBF16: return launch_kernel<Rule, kBF16>(args, stream);",
     "case kBF16: return launch_kernel<Rule, kF32>(args, stream);", 1),
    ("a float32 launch runs the bfloat16 kernel", "case kF32: return launch_kernel<Rule, kF32>(args, stream);",
     "case kF32: return launch_kernel<Rule, kBF16>(args, stream);", 1),
]

TESTS = ["tests/cuda/test_emulated_kernels.py", "tests/optim/test_optim_parity.py",
         "tests/optim/test_optim_amp.py", "tests/lr_scheduler/test_in_kernel.py", "tests/ops/test_ops.py",
         "tests/optim/test_precision_options.py", "tests/optim/test_new_optimizers.py",
         "tests/optim/test_clip_in_step.py"]

# The gradient-norm kernel's mutants, caught by its emulated tests.
NORM_KERNELS = "csrc/cuda/grad_norm_kernels.cu"
NORM_MUTANTS = [
    ("norm: vector loop drops its last pack", "const int64_t nvec = (end - begin) / kN;",
     "const int64_t nvec = (end - begin) / kN - 1;", 1),
    ("norm: scalar tail stops one early", "for (int64_t j = i + threadIdx.x; j < end; j += blockDim.x)",
     "for (int64_t j = i + threadIdx.x; j < end - 1; j += blockDim.x)", 1),
    ("norm: grid stride skips chunks", "c < a.num_chunks; c += gridDim.x)", "c < a.num_chunks; c += gridDim.x + 1)", 1),
    ("norm: counter never reset", "    reset_count(a.done_counter);\n", "", 1),
    ("norm: the first block to finish reduces", "== static_cast<int>(gridDim.x) - 1 ? 1 : 0;", "== 0 ? 1 : 0;", 1),
    ("norm: block tree drops the odd element", "const unsigned half = (width + 1) / 2;", "const unsigned half = width / 2;", 1),
    ("norm: no barrier before reading the last-block flag", "  __syncthreads();\n  if (!sh.last) return;",
     "  if (!sh.last) return;", 1),
    ("norm: final reduction skips a partial", "for (int64_t c = threadIdx.x; c < a.num_chunks; c += blockDim.x)",
     "for (int64_t c = threadIdx.x + 1; c < a.num_chunks; c += blockDim.x)", 1),
    ("norm: device grad_scale ignored",
     "    u = {true, static_cast<float>(1.0 / static_cast<double>(*a.grad_scale))};\n", "", 1),
    ("norm: host grad_scale ignored", "Unscale u{a.has_host_scale != 0, a.host_inv_scale};",
     "Unscale u{false, a.host_inv_scale};", 1),
]
NORM_TESTS = ["tests/test_clip.py"]

# (kernel file, the environment variable that points the emulated build at a copy, mutants, tests)
TARGETS = [(KERNELS, "FUSEDOPT_EMULATED_KERNEL_SOURCE", MUTANTS, TESTS),
           (NORM_KERNELS, "FUSEDOPT_EMULATED_NORM_KERNEL_SOURCE", NORM_MUTANTS, NORM_TESTS)]


def run(cmd, env, timeout):
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        return r.returncode, (r.stdout + r.stderr)
    except subprocess.TimeoutExpired:
        return "timeout", ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", default="", help="only mutants whose name contains this")
    ap.add_argument("--timeout", type=float, default=600, help="seconds before a test run counts as hung")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    import emulated_cuda

    print("building the unmutated emulated backend ...", flush=True)
    emulated_cuda.build()
    survivors = []
    with tempfile.TemporaryDirectory(prefix="fusedopt-mutants-") as tmp:
        n = 0
        for kernel_file, env_var, mutants, tests in TARGETS:
            source = (ROOT / kernel_file).read_text()
            for name, old, new, count in mutants:
                n += 1
                if args.k not in name:
                    continue
                found = source.count(old)
                if found != count:
                    print(f"[{name}] the kernel source changed: expected {count} occurrence(s), found "
                          f"{found}; update scripts/mutate_cuda_kernels.py")
                    return 2
                work = Path(tmp) / f"m{n}"
                shutil.copytree(ROOT / "csrc", work / "csrc")
                shutil.copytree(emulated_cuda.DEFAULT_BUILD_DIR, work / "build")  # reuse the objects
                (work / kernel_file).write_text(source.replace(old, new))
                env = dict(os.environ, FUSEDOPT_EMULATED_BUILD_DIR=str(work / "build"),
                           FUSEDOPT_REQUIRE_EMULATION="1")
                env[env_var] = str(work / kernel_file)
                start = time.time()
                code, out = run([sys.executable, "-c", "import sys; sys.path.insert(0, 'tests'); "
                                 "import emulated_cuda; emulated_cuda.build()"], env, args.timeout)
                if code != 0:
                    print(f"[{name}] the mutant does not build:\n{out[-3000:]}")
                    return 2
                code, out = run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-k",
                                 "emul", *tests], env, args.timeout)
                took = time.time() - start
                if code == 0:
                    survivors.append(name)
                    verdict = "SURVIVED"
                elif code == "timeout":
                    verdict = "caught (hang)"
                elif code == 1:
                    failed = [ln for ln in out.splitlines() if ln.startswith("FAILED")]
                    verdict = "caught by " + (failed[0].split(" ")[1] if failed else "a failing test")
                else:
                    verdict = f"caught (pytest exit {code}: a crash)"
                print(f"[{name}] {verdict} ({took:.0f} s)", flush=True)
    if survivors:
        print(f"{len(survivors)} mutant(s) survived: {survivors}")
        return 1
    print("every mutant was caught")
    return 0


if __name__ == "__main__":
    sys.exit(main())
