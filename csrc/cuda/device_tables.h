// The tables one fused CUDA launch reads from device memory, shared by the host glue that
// packs them (fused_step_cuda.cpp, compiled by the C++ compiler) and the kernels
// (fused_step_kernels.cu, compiled by nvcc without torch headers). Living in device memory
// rather than in kernel arguments, they let one launch cover any number of tensors.
#pragma once

#include <cstdint>

#include "../update_rules.h"  // kMaxCols, kMaxStates

struct CUstream_st;

namespace fusedopt {
namespace cuda {

// Elements per chunk: one block's unit of work on the GPU. A multiple of every vector width, so
// every chunk of a 16-byte aligned tensor starts 16-byte aligned. (The emulated backend uses
// smaller chunks, so that small test tensors span many of them.)
constexpr int64_t kChunkElems = 1 << 16;

// Threads per block: the kernels are compiled for at most this many (__launch_bounds__), so
// ptxas keeps their register use low enough that such a block always fits on an SM.
constexpr int kMaxBlock = 512;

// LaunchArgs::storage when the launch's tensors do not all share one storage type (or use
// masters, stochastic rounding, float64 or float16): the kernel then switches on each role's type.
constexpr int32_t kMixedStorage = -1;

enum TensorFlags : int32_t {
  kAligned16 = 1,  // every role's pointer is 16-byte aligned
  kFresh = 2,      // the state was never written yet (SGD: the momentum buffer takes the gradient)
};

// One tensor of the step: where each role lives and its storage type (fusedopt::Elem numbers).
struct DeviceTensor {
  void* param;
  void* grad;
  void* master;             // float32 master or int16 remainder (master_kind), or null
  void* state[kMaxStates];  // the rule's state roles; null: unused by the tensor's group
  float* step;              // the step counter (float32, on the device) for rules that count steps
  int64_t numel;
  int32_t group;
  int32_t dtype;            // param and grad
  int32_t state_dtype[kMaxStates];
  int32_t master_kind;      // fusedopt::Master
  int32_t num_chunks;       // at least 1
  int32_t flags;
};

// One param group: its row of the hyper table (update_rules.h columns; the rule reads its own),
// the state roles it uses, and where its lr comes from. A device-tensor lr is read through lr_ptr
// at run time, so a graph replay sees the value a scheduler wrote into it.
// With an in-kernel schedule (sched_count > 0) the lr is schedule_lr() of the group's phase
// rows at the launch's schedule step, and sched_out receives the lr of the next step.
struct DeviceGroup {
  double row[kMaxCols];  // row[col::lr] is the float lr (NaN when it is read through lr_ptr)
  const void* lr_ptr;    // null: use row[col::lr]
  void* sched_out;       // null: no in-kernel schedule
  int32_t lr_is_double;
  uint32_t roles;        // bit k: the group's tensors have state role k
  int32_t sched_begin;
  int32_t sched_count;
  int32_t sched_out_is_double;
  int32_t pad;
};

// A tensor's chunk [begin, min(begin + chunk_elems, numel)). An empty tensor has one empty
// chunk: the block that takes it only bumps the tensor's step counter.
struct DeviceChunk {
  int32_t tensor;
  int32_t pad;
  int64_t begin;
};

struct LaunchArgs {
  const DeviceGroup* groups;
  const DeviceTensor* tensors;
  const DeviceChunk* chunks;
  int64_t num_chunks;
  int64_t chunk_elems;       // elements per chunk (the last chunk of a tensor may be shorter)
  int32_t* done_counters;    // per tensor, then one for the whole launch; zero between launches
  const double* phases;      // schedule rows (phase_col::count doubles each), or null
  int64_t* schedule_step;    // in-kernel schedule counter, or null
  int32_t num_groups;
  int32_t num_tensors;
  const float* grad_scale;   // device scalar, or null
  const float* found_inf;    // device scalar, or null
  const void* clip;          // device [grad norm, clip coefficient], float32 or float64, or null
  int64_t rounding_seed;     // >= 0: bfloat16 params without a master round stochastically
  float host_inv_scale;      // used when grad_scale is null and has_host_scale is set
  int32_t has_host_scale;
  int32_t clip_is_double;
  int32_t rule;              // fusedopt::RuleId
  // The one storage type (fusedopt::Elem: float32 or bfloat16) of every param, grad and state
  // of the launch, none with a master or stochastic rounding; else kMixedStorage. It picks the
  // kernel compiled for that type alone: without the per-role type switches and the master and
  // rounding paths, ptxas fits it in fewer registers, without spills (fused_step_kernels.cu).
  int32_t storage;
  int32_t grid;
  int32_t block;
};

// Launches the kernel of args.rule; returns the cudaError_t of the launch as an int (0: success).
int launch_step(const LaunchArgs& args, CUstream_st* stream);

}  // namespace cuda
}  // namespace fusedopt
