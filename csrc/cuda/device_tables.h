// The tables one fused CUDA launch reads from device memory, shared by the host glue that
// packs them (fused_step_cuda.cpp, compiled by the C++ compiler) and the kernels
// (fused_step_kernels.cu, compiled by nvcc without torch headers). Living in device memory
// rather than in kernel arguments, they let one launch cover any number of tensors.
#pragma once

#include <cstdint>

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

enum TensorFlags : int32_t {
  kAligned16 = 1,  // param, grad and state pointers are all 16-byte aligned
  kFresh = 2,      // SGD: momentum buffer never written; take the gradient
};

struct DeviceTensor {
  void* param;
  void* grad;
  void* state0;  // Adam: exp_avg; SGD: momentum buffer (null without momentum)
  void* state1;  // Adam: exp_avg_sq
  void* state2;  // Adam: max_exp_avg_sq (null without amsgrad)
  float* step;   // Adam: the step counter (float32, on the device)
  int64_t numel;
  int32_t group;
  int32_t dtype;  // fusedopt::Elem
  int32_t num_chunks;  // at least 1
  int32_t flags;
};

enum GroupFlags : int32_t {
  kAmsgrad = 1,
  kMaximize = 2,
  kDecoupled = 4,
  kNesterov = 8,
};

// One param group. Adam: h = {beta1, beta2, eps, weight_decay}; SGD: h = {momentum,
// dampening, weight_decay, unused}. A device-tensor lr is read through lr_ptr at run time,
// so a graph replay sees the value a scheduler wrote into it.
// With an in-kernel schedule (sched_count > 0) the lr is schedule_lr() of the group's phase
// rows at the launch's schedule step, and sched_out receives the lr of the next step.
struct DeviceGroup {
  double lr;
  double h[4];
  const void* lr_ptr;  // null: use lr
  void* sched_out;     // null: no in-kernel schedule
  int32_t lr_is_double;
  int32_t flags;
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
  float host_inv_scale;      // used when grad_scale is null and has_host_scale is set
  int32_t has_host_scale;
  int32_t grid;
  int32_t block;
};

// Both return the cudaError_t of the launch as an int (0 on success).
int launch_adam(const LaunchArgs& args, CUstream_st* stream);
int launch_sgd(const LaunchArgs& args, CUstream_st* stream);

}  // namespace cuda
}  // namespace fusedopt
