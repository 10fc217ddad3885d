// Validation of the fused ops' arguments and their flattening into a neutral per-tensor
// table, shared by the CPU and CUDA implementations so both reject the same inputs with
// the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <vector>

#include "step_table.h"

namespace fusedopt {

// A validated step: the plain table (step_table.h) and the device the op runs on.
struct StepArgs : StepTable {
  c10::Device device = c10::Device(c10::DeviceType::CPU);
};

StepArgs collect_adam_args(const char* op, at::TensorList params, at::TensorList grads,
                           at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                           at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                           c10::IntArrayRef group_sizes, const at::Tensor& hyper,
                           at::TensorList lr_tensors, const std::optional<at::Tensor>& grad_scale,
                           const std::optional<at::Tensor>& found_inf,
                           at::TensorList schedule_state, const std::optional<at::Tensor>& schedule);

StepArgs collect_sgd_args(const char* op, at::TensorList params, at::TensorList grads,
                          at::TensorList momentum_buffers, c10::IntArrayRef group_sizes,
                          const at::Tensor& hyper, at::TensorList lr_tensors,
                          c10::IntArrayRef fresh_buffers,
                          const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf,
                          at::TensorList schedule_state, const std::optional<at::Tensor>& schedule);

// The lr a group uses at schedule step t: its in-kernel schedule's value, else its lr column.
double scheduled_lr(const StepTable& args, int64_t group, int lr_col, int begin_col, int count_col,
                    double t);

// Checks that Adam's step counters can be bumped in place by a CUDA kernel: float32 (the kernels,
// real and emulated, write them as float).
void check_kernel_steps(const char* op, at::TensorList state_steps);

// Checks a 1-element float tensor argument (grad_scale, found_inf, an lr tensor) and that it
// lives on the CPU or on `device`.
void check_scalar_tensor(const char* op, const char* what, const at::Tensor& t,
                         c10::Device device);

}  // namespace fusedopt
