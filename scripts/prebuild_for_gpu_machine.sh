#!/usr/bin/env bash
# Builds fusedopt._C here for a GPU machine's Python and torch, into .devbuild/ (git-ignored
# through .git/info/exclude), so that scripts/gpu_check.sh spends none of a short GPU lease on
# the build:
#
#   bash scripts/prebuild_for_gpu_machine.sh          # then, on the GPU machine (carry .devbuild):
#   bash scripts/gpu_check.sh OUT_DIR .devbuild
#
# With a NAME, the build goes to .devbuild/NAME/ instead: a variant of the kernels (the working
# tree as it is now, uncommitted edits included) that gpu_check.sh times against the others.
# REV=<commit> builds that commit's tree instead of the working tree, for a variant of an earlier
# state (REV=8f58de7: the CUDA step before the kernels compiled for one storage type).
#
# PYTHON (default python3.12) and TORCH (default 2.11.0) must match the GPU machine's (the H200
# machines lent here had Python 3.12 and torch 2.11.0+cu130). The first run installs that torch
# into a virtual environment in /tmp (a few GB of wheels, a few minutes); the build takes about
# 8 minutes on 2 cores, an incremental one seconds.
# The CPU kernels are built for AVX2, which any x86-64 GPU host has. (A build made on the H200
# machine itself with its g++ 13.3 linked libstdc++ statically and crashed the process whenever an
# op raised an error; setup.py now links the shared one, which this build, g++ 12.2, did anyway.)
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3.12}"
torch_version="${TORCH:-2.11.0}"
venv="/tmp/fusedopt-gpu-venv-$torch_version"
tree="/tmp/fusedopt-gpu-build"
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$torch_version')" 2>/dev/null; then
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q "torch==$torch_version" pybind11 ninja "setuptools<82" wheel numpy
fi
mkdir -p "$tree"
if [ -n "${REV:-}" ]; then
  git archive "$REV" | tar -x -C "$tree"              # that commit's tree
else
  git ls-files -z | xargs -0 cp --parents -t "$tree"   # the tracked tree, with uncommitted edits
fi
(cd "$tree" && FUSEDOPT_CUDA=1 FUSEDOPT_CPU_ISA=avx2 CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" \
  MAX_JOBS="${MAX_JOBS:-2}" "$venv/bin/python" setup.py build_ext --inplace >"$tree/build.log" 2>&1) \
  || { tail -30 "$tree/build.log"; exit 1; }
grep -qx "/.devbuild/" .git/info/exclude 2>/dev/null || echo "/.devbuild/" >>.git/info/exclude
dest=".devbuild${1:+/$1}"
mkdir -p "$dest"
cp "$tree"/fusedopt/_C*.so "$tree"/fusedopt/_build_info.py "$dest/"
strip --strip-debug "$dest"/_C*.so
ls -l "$dest"
