// CUDA implementation of fusedopt::grad_norm_ (host side): validates through the shared
// grad_norm_args, packs the chunk table (norm_tables.cpp, shared with the emulated backend),
// uploads it through the shared table cache (an identical table from an earlier call is reused,
// which a CUDA graph replay needs) and launches ONE kernel. No host synchronisation: the norm and
// the clip coefficient are written to `out` by the kernel.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <unordered_map>

#include "../grad_norm_args.h"
#include "device_tables.h"
#include "norm_tables.h"
#include "table_cache.h"

namespace fusedopt {
namespace cuda {
namespace {

constexpr int kNormBlock = kMaxBlock;
constexpr int kNormBlocksPerSm = 4;

void grad_norm_cuda(at::TensorList grads, double norm_type, double max_norm, const at::Tensor& out,
                    const std::optional<at::Tensor>& grad_scale) {
  const char* op = "fusedopt::grad_norm_";
  const NormArgs a = collect_norm_args(op, grads, norm_type, max_norm, out, grad_scale);
  const c10::cuda::CUDAGuard guard(a.device);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(a.device.index());
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &status));
  const bool capturing = status != cudaStreamCaptureStatusNone;
  NormHostTable table;
  try {
    table = pack_norm_table(a, kChunkElems);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, op, ": ", e.what());
  }
  // The table owns the launch's completion counter (one int32, zero between launches).
  const Upload up = table_cache().upload(table.bytes, a.device, capturing, /*num_counters=*/1,
                                         stream.stream(), "the gradients (their number, sizes, "
                                         "dtypes or memory)");
  // Scratch for the per-chunk partials, from the caching allocator (the graph's pool under capture).
  const at::Tensor partials = at::empty({std::max<int64_t>(table.num_chunks, 1)},
                                        at::TensorOptions().dtype(at::kDouble).device(a.device));
  NormLaunchArgs la = make_norm_launch_args(table, a, up.table, up.counters, partials.data_ptr<double>());
  la.grid = norm_launch_grid(table, static_cast<int64_t>(sm_count(a.device.index())) * kNormBlocksPerSm);
  la.block = kNormBlock;
  C10_CUDA_CHECK(static_cast<cudaError_t>(launch_grad_norm(la, stream.stream())));
  table_cache().mark_used(up.table, stream.stream(), capturing);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedopt, CUDA, m) { m.impl("grad_norm_", &grad_norm_cuda); }

// Sparse gradients reach the shared validation, which names the offending tensor.
TORCH_LIBRARY_IMPL(fusedopt, SparseCUDA, m) { m.impl("grad_norm_", &grad_norm_cuda); }

}  // namespace cuda
}  // namespace fusedopt
