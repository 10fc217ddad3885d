// The arguments of one fused gradient-norm reduction (fusedopt::grad_norm_) after validation, as
// plain C++ (no torch types), read by the CPU kernel, the CUDA table packing and the emulated CUDA
// backend alike.
#pragma once

#include <cstdint>
#include <vector>

#include "norm_math.h"
#include "step_table.h"

namespace fusedopt {

struct NormSlot {
  const void* data = nullptr;  // numel elements from here: a dense tensor, in storage order
  int64_t numel = 0;
  Elem dtype = Elem::f32;
};

struct NormTable {
  std::vector<NormSlot> grads;
  double norm_type = 2.0;
  NormKind kind = NormKind::two;
  double max_norm = 1.0;
  void* out = nullptr;      // 2 elements: the total norm, then the clip coefficient
  bool out_is_double = false;
  // grad_scale given: the norm is that of grad * inv_scale, each product rounded to the grad's
  // dtype as GradScaler.unscale_ stores it. A CPU grad_scale is read at validation (host_inv_scale);
  // a device one is read by the CUDA kernel through scale_ptr.
  bool scaled = false;
  float host_inv_scale = 1.0f;
  const float* scale_ptr = nullptr;
};

}  // namespace fusedopt
