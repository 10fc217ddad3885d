// Validation of fusedopt::grad_norm_'s arguments, shared by the CPU kernel, the CUDA glue and the
// emulated CUDA backend, so all of them reject the same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>

#include "norm_table.h"

namespace fusedopt {

struct NormArgs : NormTable {
  c10::Device device = c10::Device(c10::DeviceType::CPU);
};

// `read_cpu_scale`: a CPU grad_scale is read here (its value goes into host_inv_scale); a device
// grad_scale must be float32 and is recorded by pointer, for the kernel to read.
NormArgs collect_norm_args(const char* op, at::TensorList grads, double norm_type, double max_norm,
                           const at::Tensor& out, const std::optional<at::Tensor>& grad_scale);

}  // namespace fusedopt
