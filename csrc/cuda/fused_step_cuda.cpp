// CUDA implementation of the fused ops (host side): validates through the shared step_args,
// packs the group / tensor / chunk tables (host_tables.cpp, shared with the emulated backend),
// uploads them asynchronously (reusing an identical
// upload from an earlier step, which is what a CUDA graph replay needs), and launches ONE kernel
// for all tensors on the device. No host synchronisation anywhere on this path.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstring>
#include <list>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <unordered_map>
#include <vector>

#include "../step_args.h"
#include "device_tables.h"
#include "host_tables.h"
#include "kernel_ops.h"
#include "table_cache.h"

namespace fusedopt {
namespace cuda {
namespace {

// Small blocks, many per SM. The step kernel needs over 100 registers a thread, so an SM holds
// 16 warps whatever the block size; in blocks of 4 warps, one block's chunk prologue (the
// dependent loads of chunk, tensor, group and step) and its end-of-chunk barrier overlap the
// other blocks' streaming. On an H200 (one run, against 512 x 4 per SM): fp32 Adam on 0.67B
// Llama-shaped params 6.03-6.13 -> 5.52 ms, bf16 6.06-6.18 -> 5.42 ms; 256 x 8 per SM gave
// 5.56 / 5.50 ms (benchmarks/results/gpu/NOTES.md).
constexpr int kBlock = 128;
constexpr int kBlocksPerSm = 16;

const float* device_float_scalar(const char* op, const char* what,
                                 const std::optional<at::Tensor>& t) {
  if (!t.has_value() || t->device().is_cpu()) return nullptr;
  TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, op, ": a CUDA ", what,
                   " must be float32 (as GradScaler makes it), got ", t->scalar_type());
  return t->data_ptr<float>();
}

// Launches one fused step. Returns without launching when a CPU found_inf says to skip, or
// when there is nothing to do (no tensor and no in-kernel schedule).
void launch(const char* op, const StepArgs& args) {
  const std::optional<at::Tensor>& grad_scale = args.grad_scale;
  const std::optional<at::Tensor>& found_inf = args.found_inf;
  if (args.tensors.empty() && args.schedule_step == nullptr) return;
  if (found_inf.has_value() && found_inf->device().is_cpu() && found_inf->item<double>() != 0.0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(args.device);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(args.device.index());
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &status));
  const bool capturing = status != cudaStreamCaptureStatusNone;

  // The tensor table is reused by its slots when cached; only the small group table is packed
  // and compared every step (it holds the hyperparameters).
  const int64_t num_counters = static_cast<int64_t>(args.tensors.size()) + 1;
  const std::optional<Upload> cached = table_cache().find_tensors(
      args.tensors, args.device, capturing, num_counters, stream.stream());
  Upload tensors = cached.value_or(Upload{});
  HostTables tables;
  try {
    tables = pack_tables(args, kChunkElems, /*cpu_lr_by_pointer=*/false,
                         /*tensor_bytes=*/!cached.has_value());
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, op, ": ", e.what());
  }
  const Upload groups = table_cache().upload(tables.groups, args.device, capturing, 0,
                                             stream.stream(), "the hyperparameters (a float lr or "
                                             "another group setting; under capture, give the lr "
                                             "as a tensor on the device)");
  if (!cached.has_value()) {
    // Counters: one per tensor for the step bump, then one for the whole launch (schedule). An
    // empty tensor table still gets its upload: it owns the launch counter.
    if (tables.tensors.empty()) tables.tensors.resize(sizeof(DeviceChunk));
    tensors = table_cache().upload(tables.tensors, args.device, capturing, num_counters,
                                   stream.stream(), "the params, grads or state tensors",
                                   &args.tensors);
  }
  LaunchArgs la = make_launch_args(tables, args, groups.table, tensors.table, tensors.counters);
  la.grad_scale = device_float_scalar(op, "grad_scale", grad_scale);
  la.found_inf = device_float_scalar(op, "found_inf", found_inf);
  if (grad_scale.has_value() && grad_scale->device().is_cpu()) {
    la.has_host_scale = 1;
    la.host_inv_scale = static_cast<float>(1.0 / grad_scale->item<double>());
  }
  la.grid = launch_grid(tables, static_cast<int64_t>(sm_count(args.device.index())) * kBlocksPerSm);
  la.block = kBlock;
  if (la.grid == 0) return;
  const int err = launch_step(la, stream.stream());
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
  table_cache().mark_used(groups.table, stream.stream(), capturing);
  table_cache().mark_used(tensors.table, stream.stream(), capturing);
}

}  // namespace

using CudaOps = KernelOps<launch>;

namespace {
// A plan's steps (eager_entry.cpp): the same checks and launch as the op, on a table the plan
// keeps validated.
void run_plan_step(StepArgs& args) {
  const char* op = "fusedopt::step_";
  check_kernel_steps(op, args);
  CudaOps::run(op, args);
}
const bool cuda_runner_registered = register_step_runner(c10::DeviceType::CUDA, &run_plan_step);
}  // namespace

TORCH_LIBRARY_IMPL(fusedopt, CUDA, m) {
  m.impl("adam_", &CudaOps::adam);
  m.impl("sgd_", &CudaOps::sgd);
  m.impl("step_", &CudaOps::step);
}

// Sparse gradients reach the shared validation, which names the offending tensor.
TORCH_LIBRARY_IMPL(fusedopt, SparseCUDA, m) {
  m.impl("adam_", &CudaOps::adam);
  m.impl("sgd_", &CudaOps::sgd);
  m.impl("step_", &CudaOps::step);
}

}  // namespace cuda
}  // namespace fusedopt
