// The fused gradient-norm kernel of fusedopt, compiled unchanged as host C++ for the emulated
// backend (see emulated_kernels.cpp for the step kernels). FUSEDOPT_NORM_KERNEL_SOURCE lets the
// mutation script (scripts/mutate_cuda_kernels.py) build a deliberately broken copy instead.
#define FUSEDOPT_EMULATED_CUDA 1
#include "cuda_shim.h"

#ifdef FUSEDOPT_NORM_KERNEL_SOURCE
#include FUSEDOPT_NORM_KERNEL_SOURCE
#else
#include "../grad_norm_kernels.cu"
#endif
