// Validation of the fused ops' arguments and their flattening into a neutral per-tensor
// table, shared by the CPU and CUDA implementations so both reject the same inputs with
// the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <vector>

namespace fusedopt {

// Element types a param may have. The math runs in float for the 16-bit types.
enum class Elem : int32_t { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };

// One tensor's share of a step: raw pointers and sizes only, so the CPU kernel and the
// CUDA table builder read it without touching at::Tensor.
struct TensorSlot {
  void* param = nullptr;
  void* grad = nullptr;
  void* state0 = nullptr;  // Adam: exp_avg; SGD: momentum_buffer (null without momentum)
  void* state1 = nullptr;  // Adam: exp_avg_sq
  void* state2 = nullptr;  // Adam: max_exp_avg_sq (null without amsgrad)
  void* step = nullptr;    // Adam: the 1-element step counter
  int64_t numel = 0;
  int32_t group = 0;
  Elem dtype = Elem::f32;
  bool step_is_double = false;  // step counter dtype: float64 (else float32)
  bool fresh = false;           // SGD: momentum buffer never written yet
};

// Where the in-kernel schedule stores lr(t + 1) for one group (null: the group has none).
struct ScheduleOut {
  void* lr = nullptr;
  bool is_double = false;
};

struct StepArgs {
  std::vector<TensorSlot> tensors;
  int64_t num_groups = 0;
  int64_t num_cols = 0;
  std::vector<double> hyper;  // num_groups x num_cols, row-major
  c10::Device device = c10::Device(c10::DeviceType::CPU);
  // In-kernel schedule: phase rows (update_rules.h), the step counter, per-group outputs.
  std::vector<double> phases;
  int64_t* schedule_step = nullptr;
  std::vector<ScheduleOut> schedule_out;
  double at(int64_t group, int col) const { return hyper[group * num_cols + col]; }
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
double scheduled_lr(const StepArgs& args, int64_t group, int lr_col, int begin_col, int count_col,
                    double t);

// Checks a 1-element float tensor argument (grad_scale, found_inf, an lr tensor) and that it
// lives on the CPU or on `device`.
void check_scalar_tensor(const char* op, const char* what, const at::Tensor& t,
                         c10::Device device);

}  // namespace fusedopt
