// The CUDA kernels of fusedopt, compiled unchanged as host C++ for the emulated backend.
// FUSEDOPT_KERNEL_SOURCE lets the mutation script (scripts/mutate_cuda_kernels.py) build a
// deliberately broken copy instead.
#define FUSEDOPT_EMULATED_CUDA 1
#include "cuda_shim.h"

#ifdef FUSEDOPT_KERNEL_SOURCE
#include FUSEDOPT_KERNEL_SOURCE
#else
#include "../fused_step_kernels.cu"
#endif
