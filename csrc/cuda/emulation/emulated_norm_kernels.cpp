// The fused gradient-norm kernel of fusedopt, compiled unchanged as host C++ for the emulated
// backend (see emulated_kernels.cpp for the step kernels).
#define FUSEDOPT_EMULATED_CUDA 1
#include "cuda_shim.h"

#include "../grad_norm_kernels.cu"
