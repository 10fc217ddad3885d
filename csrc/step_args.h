// Validation of the fused ops' arguments and their flattening into a neutral per-tensor
// table, shared by the CPU and CUDA implementations so both reject the same inputs with
// the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "step_table.h"

namespace fusedopt {

// A validated step: the plain table (step_table.h), the device the op runs on, and the scalars
// the kernels read from memory (GradScaler's grad_scale and found_inf, the clip of the grads).
struct StepArgs : StepTable {
  c10::Device device = c10::Device(c10::DeviceType::CPU);
  std::optional<at::Tensor> grad_scale, found_inf;
  // (the clip, fusedopt::grad_norm_'s output, is the table's clip_data: the caller holds it)
};

// The C++ signature of fusedopt::step_ (csrc/ops.cpp), for typed calls through the dispatcher.
using StepSig = void(c10::string_view, at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                     at::TensorList, c10::IntArrayRef, const at::Tensor&, at::TensorList,
                     c10::IntArrayRef, const std::optional<at::Tensor>&,
                     const std::optional<at::Tensor>&, at::TensorList,
                     const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t,
                     int64_t);

// fusedopt::step_: any rule (update_rules.h), states given tensor by tensor in role order.
StepArgs collect_step_args(const char* op, const std::string& rule, at::TensorList params,
                           at::TensorList grads, at::TensorList states, at::TensorList masters,
                           at::TensorList state_steps, c10::IntArrayRef group_sizes,
                           const at::Tensor& hyper, at::TensorList lr_tensors,
                           c10::IntArrayRef fresh, const std::optional<at::Tensor>& grad_scale,
                           const std::optional<at::Tensor>& found_inf, at::TensorList schedule_state,
                           const std::optional<at::Tensor>& schedule,
                           const std::optional<at::Tensor>& clip, int64_t master_mode,
                           int64_t seed);

// The tail of a step's arguments, shared by collect_step_args and a plan's later steps (whose
// tensors are already validated in `out`): the SGD buffers to start (`fresh`), lr tensors, the
// in-kernel schedule, the GradScaler scalars, the clip and the rounding seed.
void finish_step_args(const char* op, StepArgs& out, c10::IntArrayRef fresh,
                      at::TensorList lr_tensors, at::TensorList schedule_state,
                      const std::optional<at::Tensor>& schedule,
                      const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf,
                      const std::optional<at::Tensor>& clip, int64_t seed);

// Validates the [groups x cols] float64 hyperparameter table and copies it into `out`.
void read_hyper(const char* op, const at::Tensor& hyper, int64_t groups, int64_t cols,
                StepArgs& out);

// Whether `grad` still passes every check collect_step_args made of its param's slot `s`
// (dtype, shape, layout, device), and the param still has the storage, size and density `s`
// was validated with. Raises nothing: a plan re-validates in full when this says no.
bool grad_fits(const at::Tensor& grad, const at::Tensor& param, const TensorSlot& s,
               c10::Device device);

// Adjacent slots of one group whose every role (param, grad, master, states) continues the
// previous slot's memory, as in a flat storage (fusedopt.flatten_), merged into one: the kernels
// then walk one tensor where they would have walked thousands of tiny ones, with the same
// elementwise math. Step counters merge only when `merge_steps` (host memory the caller lets us
// read) and they are contiguous and equal; stochastic rounding (its bits depend on the slot)
// merges nothing. Returns false, with `out` untouched, when nothing merges.
bool coalesce_slots(const StepTable& t, bool merge_steps, std::vector<TensorSlot>& out);

// Whether no two slots' step counters overlap in memory (StepTable::distinct_step_counters).
bool step_counters_distinct(const StepTable& t);

// Whether some slot's param starts where the slot before ends (StepTable::params_adjacent).
bool any_params_adjacent(const StepTable& t);

// For its lifetime, `t` has its coalesced slots (if any merge); the per-tensor slots come back
// when it ends, so a plan keeps its table indexed by param.
class CoalescedSlots {
 public:
  CoalescedSlots(StepTable& t, bool merge_steps) : t_(t) {
    swapped_ = coalesce_slots(t, merge_steps, merged_);
    if (swapped_) t_.tensors.swap(merged_);
  }
  ~CoalescedSlots() {
    if (swapped_) t_.tensors.swap(merged_);
  }
  CoalescedSlots(const CoalescedSlots&) = delete;
  CoalescedSlots& operator=(const CoalescedSlots&) = delete;

 private:
  StepTable& t_;
  std::vector<TensorSlot> merged_;
  bool swapped_ = false;
};

// Custom ops get no version-counter bump from the dispatcher (ADInplaceOrView falls through),
// so the update bumps what it writes, as torch's in-place ops do: autograd then refuses a
// backward through values the step has changed instead of computing wrong gradients.
void bump_version(const at::Tensor& t);

// What runs a validated step on one device type (the CPU kernels, the CUDA launch), registered
// by each backend's translation unit, so a plan (eager_entry.cpp) reaches the kernel of its
// device without the dispatcher's boxing and re-validation.
using StepRunner = void (*)(StepArgs& args);
bool register_step_runner(c10::DeviceType type, StepRunner run);
StepRunner step_runner(c10::DeviceType type);  // null: no backend for that device type

// The rule an op names ("adam", "sgd", ...): TORCH_CHECK fails for an unknown name.
RuleId rule_by_name(const char* op, const std::string& name);

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
double scheduled_lr(const StepTable& args, int64_t group, double t);

// Checks that step counters can be bumped in place by a CUDA kernel: float32 (the kernels,
// real and emulated, write them as float).
void check_kernel_steps(const char* op, const StepTable& args);

// Checks a 1-element float tensor argument (grad_scale, found_inf, an lr tensor) and that it
// lives on the CPU or on `device`.
void check_scalar_tensor(const char* op, const char* what, const at::Tensor& t,
                         c10::Device device);

}  // namespace fusedopt
