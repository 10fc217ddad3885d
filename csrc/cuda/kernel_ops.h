// The op entry points of the CUDA implementation, generic over what launches the kernels: the
// real glue (fused_step_cuda.cpp) and the emulated backend (emulation/) validate and check the
// same way and differ only in `Launch`.
#pragma once

#include <optional>
#include <string>

#include "../step_args.h"
#include "host_tables.h"

namespace fusedopt {
namespace cuda {

using LaunchFn = void (*)(const char* op, const StepArgs& args);

template <LaunchFn Launch>
struct KernelOps {
  // Launches a validated step, adjacent flat slots merged. Device step counters are not read on
  // the host (that would sync), so slots with counters stay apart.
  static void run(const char* op, StepArgs& args) {
    const CoalescedSlots flat(args, /*merge_steps=*/false);
    Launch(op, args);
  }

  static void adam(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                   at::TensorList state_steps, c10::IntArrayRef group_sizes,
                   const at::Tensor& hyper, at::TensorList lr_tensors,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf, at::TensorList schedule_state,
                   const std::optional<at::Tensor>& schedule) {
    const char* op = "fusedopt::adam_";
    StepArgs args = collect_adam_args(op, params, grads, exp_avgs, exp_avg_sqs,
                                            max_exp_avg_sqs, state_steps, group_sizes, hyper,
                                            lr_tensors, grad_scale, found_inf, schedule_state,
                                            schedule);
    check_kernel_steps(op, args);
    run(op, args);
  }

  static void sgd(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  c10::IntArrayRef group_sizes, const at::Tensor& hyper,
                  at::TensorList lr_tensors, c10::IntArrayRef fresh_buffers,
                  const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf, at::TensorList schedule_state,
                  const std::optional<at::Tensor>& schedule) {
    const char* op = "fusedopt::sgd_";
    StepArgs args = collect_sgd_args(op, params, grads, momentum_buffers, group_sizes,
                                           hyper, lr_tensors, fresh_buffers, grad_scale,
                                           found_inf, schedule_state, schedule);
    run(op, args);
  }

  static void step(c10::string_view rule, at::TensorList params, at::TensorList grads,
                   at::TensorList states, at::TensorList masters, at::TensorList state_steps,
                   c10::IntArrayRef group_sizes, const at::Tensor& hyper,
                   at::TensorList lr_tensors, c10::IntArrayRef fresh,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf, at::TensorList schedule_state,
                   const std::optional<at::Tensor>& schedule, const std::optional<at::Tensor>& clip,
                   int64_t master_mode, int64_t seed) {
    const char* op = "fusedopt::step_";
    StepArgs args = collect_step_args(op, std::string(rule), params, grads, states, masters,
                                            state_steps, group_sizes, hyper, lr_tensors, fresh,
                                            grad_scale, found_inf, schedule_state, schedule, clip,
                                            master_mode, seed);
    check_kernel_steps(op, args);
    run(op, args);
  }
};

}  // namespace cuda
}  // namespace fusedopt
