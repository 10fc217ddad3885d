// One fused step's arguments after validation, as plain C++ (no torch types): raw pointers,
// sizes and the hyperparameter table. The CPU kernels, the CUDA host tables and the emulated
// CUDA backend all read this, so none of them touches at::Tensor.
#pragma once

#include <cstdint>
#include <vector>

namespace fusedopt {

// Element types a param may have. The math runs in float for the 16-bit types.
enum class Elem : int32_t { f32 = 0, f64 = 1, f16 = 2, bf16 = 3 };

// One tensor's share of a step.
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

// A group's lr given as a tensor. A CPU tensor's value is also copied into the lr column (the
// CPU kernels and the real CUDA path use that); a device tensor is read by the kernel through
// `ptr`, so a CUDA graph replay sees what a scheduler wrote into it.
struct LrTensor {
  const void* ptr = nullptr;  // null: the group's lr is the float in its lr column
  bool is_double = false;
  bool on_cpu = true;
};

struct StepTable {
  std::vector<TensorSlot> tensors;
  int64_t num_groups = 0;
  int64_t num_cols = 0;
  std::vector<double> hyper;  // num_groups x num_cols, row-major
  std::vector<LrTensor> lr_tensor;  // one per group
  // In-kernel schedule: phase rows (update_rules.h), the step counter, per-group outputs.
  std::vector<double> phases;
  int64_t* schedule_step = nullptr;
  std::vector<ScheduleOut> schedule_out;
  double at(int64_t group, int col) const { return hyper[group * num_cols + col]; }
};

}  // namespace fusedopt
