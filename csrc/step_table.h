// One fused step's arguments after validation, as plain C++ (no torch types): raw pointers,
// sizes and the hyperparameter table. The CPU kernels, the CUDA host tables and the emulated
// CUDA backend all read this, so none of them touches at::Tensor.
#pragma once

#include <cstdint>
#include <vector>

#include "update_rules.h"  // RuleId, kMaxStates

namespace fusedopt {

// Storage types. The math runs in float for the 16-bit types (double for float64 params);
// i16 is the master remainder's storage (precision.h).
enum class Elem : int32_t { f32 = 0, f64 = 1, f16 = 2, bf16 = 3, i16 = 4 };

inline int64_t elem_size(Elem e) {
  return e == Elem::f64 ? 8 : (e == Elem::f32 ? 4 : 2);
}

// What a step keeps of a 16-bit param's float32 master (the `master_mode` op argument).
enum class Master : int32_t {
  none = 0,
  full = 1,       // a float32 copy; the param is written rounded from it
  remainder = 2,  // bfloat16 params: the master's low 16 bits, as an int16 (precision.h)
};

// One tensor's share of a step. Every role has its own storage type; the grad's is the param's.
struct TensorSlot {
  void* param = nullptr;
  void* grad = nullptr;
  void* master = nullptr;              // float32 master or int16 remainder, or null
  void* state[kMaxStates] = {};        // the rule's state roles (null: unused by the group)
  void* step = nullptr;                // the step counter (rules with kHasStep)
  int64_t step_count = 1;  // counters at `step` (a coalesced slot's, contiguous and equal)
  int64_t numel = 0;
  int32_t group = 0;
  Elem dtype = Elem::f32;              // param and grad
  Elem state_dtype[kMaxStates] = {};
  Master master_kind = Master::none;
  bool step_is_double = false;  // step counter dtype: float64 (else float32)
  bool fresh = false;           // the state was never written yet (SGD's first momentum step)
};

// Where the in-kernel schedule stores lr(t + 1) for one group (null: the group has none).
struct ScheduleOut {
  void* lr = nullptr;
  bool is_double = false;
};

// A group's lr given as a tensor. A CPU tensor's value is also copied into the lr column (the
// CPU kernels and the real CUDA path use that); a device tensor is read by the kernel through
// `ptr`, so a CUDA graph replay sees what a scheduler wrote into it.
struct LrTensor {
  const void* ptr = nullptr;  // null: the group's lr is the float in its lr column
  bool is_double = false;
  bool on_cpu = true;
};

struct StepTable {
  RuleId rule = RuleId::adam;
  std::vector<TensorSlot> tensors;
  int64_t num_groups = 0;
  int64_t num_cols = 0;
  std::vector<double> hyper;  // num_groups x num_cols, row-major
  std::vector<LrTensor> lr_tensor;  // one per group
  // In-kernel schedule: phase rows (update_rules.h), the step counter, per-group outputs.
  std::vector<double> phases;
  int64_t* schedule_step = nullptr;
  std::vector<ScheduleOut> schedule_out;
  // Stochastic rounding of bfloat16 params (without a master) with this seed; negative: off.
  int64_t rounding_seed = -1;
  // No two slots share a step counter (a plan checked it once): the CPU step may then bump each
  // single-chunk tensor's counter in its own chunk, on any thread, instead of all serially first.
  bool distinct_step_counters = false;
  // The clip (fusedopt::grad_norm_'s [total grad norm, clip coefficient]), float32 or float64
  // (float64 when a grad is: torch clips float64 grads by a float64 coefficient); null: none.
  // The grads are multiplied by the coefficient as they are read; a non-finite norm skips the
  // step. Set by every step's arguments (finish_common), so a plan's table never keeps a stale one.
  const void* clip_data = nullptr;
  bool clip_is_double = false;
  // Some slot's param starts where the slot before ends (else, as a plan found once for params
  // that keep their storage, no slots can coalesce and the step skips looking).
  bool params_adjacent = true;
  double at(int64_t group, int col) const { return hyper[group * num_cols + col]; }
};

}  // namespace fusedopt
