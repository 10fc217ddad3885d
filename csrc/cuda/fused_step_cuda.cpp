// CUDA implementation of the fused ops (host side): validates through the shared step_args,
// packs the group / tensor / chunk tables, uploads them asynchronously (reusing an identical
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
#include <unordered_map>
#include <vector>

#include "../step_args.h"
#include "../update_rules.h"
#include "../work_list.h"
#include "device_tables.h"

namespace fusedopt {
namespace cuda {
namespace {

constexpr int kBlock = 512;
constexpr int kBlocksPerSm = 4;

int sm_count(int device) {
  static std::mutex mu;
  static std::unordered_map<int, int> counts;
  std::lock_guard<std::mutex> lock(mu);
  auto it = counts.find(device);
  if (it != counts.end()) return it->second;
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  counts[device] = n;
  return n;
}

// Device copies of host-packed tables, kept while they may be reused: a step whose tables are
// byte-identical to an earlier one reuses that upload (no copy at all), and an upload recorded
// into a CUDA graph stays alive, with its pinned source, for as long as the process runs.
// A tensor table also owns the completion counters its launches use, so two optimizers never
// share counters and a captured graph's counters live as long as its table.
struct Upload {
  const void* table = nullptr;
  int32_t* counters = nullptr;
};

class TableCache {
 public:
  Upload upload(const std::vector<uint8_t>& bytes, c10::Device device, bool capturing,
                int64_t num_counters, cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->device == device && it->bytes == bytes && it->num_counters >= num_counters) {
        it->keep |= capturing;
        entries_.splice(entries_.begin(), entries_, it);  // most recently used first
        return entries_.front().view();
      }
    }
    Entry e;
    e.device = device;
    e.bytes = bytes;
    e.keep = capturing;
    e.host = at::empty({static_cast<int64_t>(bytes.size())},
                       at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(e.host.data_ptr(), bytes.data(), bytes.size());
    e.dev = at::empty({static_cast<int64_t>(bytes.size())},
                      at::TensorOptions().dtype(at::kByte).device(device));
    // Asynchronous: the caching host allocator keeps the pinned block until the copy is done.
    e.dev.copy_(e.host, /*non_blocking=*/true);
    if (num_counters > 0) {
      e.num_counters = num_counters;
      e.counters = at::empty({num_counters}, at::TensorOptions().dtype(at::kInt).device(device));
      // A memset, not a kernel: the counters return to zero after every launch.
      C10_CUDA_CHECK(cudaMemsetAsync(e.counters.data_ptr(), 0, num_counters * sizeof(int32_t), stream));
    }
    entries_.push_front(std::move(e));
    evict();
    return entries_.front().view();
  }

 private:
  struct Entry {
    c10::Device device = c10::Device(c10::DeviceType::CUDA, 0);
    std::vector<uint8_t> bytes;
    at::Tensor host, dev, counters;
    int64_t num_counters = 0;
    bool keep = false;
    Upload view() const {
      return {dev.data_ptr(), counters.defined() ? counters.data_ptr<int32_t>() : nullptr};
    }
  };
  void evict() {
    size_t n = 0;
    for (auto it = entries_.begin(); it != entries_.end();) {
      if (!it->keep && ++n > kMaxEntries) {
        it = entries_.erase(it);
      } else {
        ++it;
      }
    }
  }
  static constexpr size_t kMaxEntries = 16;
  std::mutex mu_;
  std::list<Entry> entries_;
};

TableCache& table_cache() {
  static TableCache cache;
  return cache;
}

template <typename T>
void append(std::vector<uint8_t>& bytes, const T& value) {
  const auto* p = reinterpret_cast<const uint8_t*>(&value);
  bytes.insert(bytes.end(), p, p + sizeof(T));
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

struct Packed {
  std::vector<uint8_t> groups, tensors;  // groups: group table then schedule rows;
                                         // tensors: tensor table then chunk table
  int64_t num_tensors = 0, num_chunks = 0, phases_offset = 0;
};

Packed pack(const StepArgs& args, at::TensorList lr_tensors, bool adam) {
  Packed out;
  for (int64_t g = 0; g < args.num_groups; ++g) {
    DeviceGroup dg{};
    int32_t flags = 0;
    int lr_index_col, begin_col, count_col;
    if (adam) {
      dg.lr = args.at(g, adam_col::lr);
      dg.h[0] = args.at(g, adam_col::beta1);
      dg.h[1] = args.at(g, adam_col::beta2);
      dg.h[2] = args.at(g, adam_col::eps);
      dg.h[3] = args.at(g, adam_col::weight_decay);
      if (args.at(g, adam_col::amsgrad) != 0.0) flags |= kAmsgrad;
      if (args.at(g, adam_col::maximize) != 0.0) flags |= kMaximize;
      if (args.at(g, adam_col::decoupled) != 0.0) flags |= kDecoupled;
      lr_index_col = adam_col::lr_index;
      begin_col = adam_col::sched_begin;
      count_col = adam_col::sched_count;
    } else {
      dg.lr = args.at(g, sgd_col::lr);
      dg.h[0] = args.at(g, sgd_col::momentum);
      dg.h[1] = args.at(g, sgd_col::dampening);
      dg.h[2] = args.at(g, sgd_col::weight_decay);
      if (args.at(g, sgd_col::nesterov) != 0.0) flags |= kNesterov;
      if (args.at(g, sgd_col::maximize) != 0.0) flags |= kMaximize;
      lr_index_col = sgd_col::lr_index;
      begin_col = sgd_col::sched_begin;
      count_col = sgd_col::sched_count;
    }
    if (args.schedule_step != nullptr && args.at(g, count_col) > 0) {
      dg.sched_begin = static_cast<int32_t>(args.at(g, begin_col));
      dg.sched_count = static_cast<int32_t>(args.at(g, count_col));
      const ScheduleOut& so = args.schedule_out[static_cast<size_t>(g)];
      dg.sched_out = so.lr;
      dg.sched_out_is_double = so.is_double;
    }
    const double idx = args.at(g, lr_index_col);
    if (idx >= 0) {  // a device lr tensor (step_args resolved CPU ones to floats)
      const at::Tensor& lr = lr_tensors[static_cast<size_t>(idx)];
      TORCH_CHECK_TYPE(lr.scalar_type() == at::kFloat || lr.scalar_type() == at::kDouble,
                       "fusedopt: a CUDA lr tensor must be float32 or float64, got ",
                       lr.scalar_type());
      dg.lr_ptr = lr.data_ptr();
      dg.lr_is_double = lr.scalar_type() == at::kDouble;
    }
    dg.flags = flags;
    append(out.groups, dg);
  }
  out.phases_offset = static_cast<int64_t>(out.groups.size());
  for (const double v : args.phases) append(out.groups, v);
  std::vector<int64_t> numels;
  numels.reserve(args.tensors.size());
  for (const auto& s : args.tensors) numels.push_back(s.numel);
  const std::vector<WorkChunk> chunks = build_work_list(numels, kChunkElems);
  TORCH_CHECK(args.tensors.size() < (1u << 31), "fusedopt: too many tensors for one launch");
  out.num_tensors = static_cast<int64_t>(args.tensors.size());
  out.num_chunks = static_cast<int64_t>(chunks.size());
  out.tensors.reserve(args.tensors.size() * sizeof(DeviceTensor) + chunks.size() * sizeof(DeviceChunk));
  for (const auto& s : args.tensors) {
    DeviceTensor dt{};
    dt.param = s.param;
    dt.grad = s.grad;
    dt.state0 = s.state0;
    dt.state1 = s.state1;
    dt.state2 = s.state2;
    dt.step = static_cast<float*>(s.step);
    dt.numel = s.numel;
    dt.group = s.group;
    dt.dtype = static_cast<int32_t>(s.dtype);
    dt.num_chunks = static_cast<int32_t>((s.numel + kChunkElems - 1) / kChunkElems);
    const bool aligned = aligned16(s.param) && aligned16(s.grad) && aligned16(s.state0) &&
                         aligned16(s.state1) && aligned16(s.state2);
    dt.flags = (aligned ? kAligned16 : 0) | (s.fresh ? kFresh : 0);
    append(out.tensors, dt);
  }
  for (const auto& c : chunks) append(out.tensors, DeviceChunk{static_cast<int32_t>(c.tensor), 0, c.begin});
  return out;
}

const float* device_float_scalar(const char* op, const char* what,
                                 const std::optional<at::Tensor>& t) {
  if (!t.has_value() || t->device().is_cpu()) return nullptr;
  TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, op, ": a CUDA ", what,
                   " must be float32 (as GradScaler makes it), got ", t->scalar_type());
  return t->data_ptr<float>();
}

// Launches one fused step. Returns without launching when a CPU found_inf says to skip.
void launch(const char* op, const StepArgs& args, at::TensorList lr_tensors,
            const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
            bool adam) {
  if (args.tensors.empty()) return;
  if (found_inf.has_value() && found_inf->device().is_cpu() && found_inf->item<double>() != 0.0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(args.device);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(args.device.index());
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &status));
  const bool capturing = status != cudaStreamCaptureStatusNone;

  const Packed packed = pack(args, lr_tensors, adam);
  LaunchArgs la{};
  const auto* group_table = static_cast<const uint8_t*>(
      table_cache().upload(packed.groups, args.device, capturing, 0, stream.stream()).table);
  la.groups = reinterpret_cast<const DeviceGroup*>(group_table);
  la.num_groups = static_cast<int32_t>(args.num_groups);
  la.num_tensors = static_cast<int32_t>(packed.num_tensors);
  if (args.schedule_step != nullptr) {
    la.phases = reinterpret_cast<const double*>(group_table + packed.phases_offset);
    la.schedule_step = args.schedule_step;
  }
  // Counters: one per tensor for the step bump, then one for the whole launch (schedule).
  const Upload tensors = table_cache().upload(packed.tensors, args.device, capturing,
                                              packed.num_tensors + 1, stream.stream());
  const auto* table = static_cast<const uint8_t*>(tensors.table);
  la.tensors = reinterpret_cast<const DeviceTensor*>(table);
  la.chunks = reinterpret_cast<const DeviceChunk*>(table + packed.num_tensors * sizeof(DeviceTensor));
  la.num_chunks = packed.num_chunks;
  la.done_counters = tensors.counters;
  la.grad_scale = device_float_scalar(op, "grad_scale", grad_scale);
  la.found_inf = device_float_scalar(op, "found_inf", found_inf);
  if (grad_scale.has_value() && grad_scale->device().is_cpu()) {
    la.has_host_scale = 1;
    la.host_inv_scale = static_cast<float>(1.0 / grad_scale->item<double>());
  }
  const int64_t max_grid = static_cast<int64_t>(sm_count(args.device.index())) * kBlocksPerSm;
  la.grid = static_cast<int32_t>(std::max<int64_t>(1, std::min(packed.num_chunks, max_grid)));
  la.block = kBlock;
  if (packed.num_chunks == 0) return;
  const int err = adam ? launch_adam(la, stream.stream()) : launch_sgd(la, stream.stream());
  C10_CUDA_CHECK(static_cast<cudaError_t>(err));
}

void check_cuda_steps(const char* op, at::TensorList state_steps) {
  for (size_t i = 0; i < state_steps.size(); ++i) {
    TORCH_CHECK_TYPE(state_steps[i].scalar_type() == at::kFloat, op, ": state_steps[", i,
                     "] must be float32 on CUDA (the kernel increments it in place), got ",
                     state_steps[i].scalar_type());
  }
}

void adam_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
               at::TensorList state_steps, c10::IntArrayRef group_sizes, const at::Tensor& hyper,
               at::TensorList lr_tensors, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf, at::TensorList schedule_state,
               const std::optional<at::Tensor>& schedule) {
  const char* op = "fusedopt::adam_";
  const StepArgs args = collect_adam_args(op, params, grads, exp_avgs, exp_avg_sqs,
                                          max_exp_avg_sqs, state_steps, group_sizes, hyper,
                                          lr_tensors, grad_scale, found_inf, schedule_state,
                                          schedule);
  check_cuda_steps(op, state_steps);
  launch(op, args, lr_tensors, grad_scale, found_inf, /*adam=*/true);
}

void sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
              c10::IntArrayRef group_sizes, const at::Tensor& hyper, at::TensorList lr_tensors,
              c10::IntArrayRef fresh_buffers, const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf, at::TensorList schedule_state,
              const std::optional<at::Tensor>& schedule) {
  const char* op = "fusedopt::sgd_";
  const StepArgs args = collect_sgd_args(op, params, grads, momentum_buffers, group_sizes, hyper,
                                         lr_tensors, fresh_buffers, grad_scale, found_inf,
                                         schedule_state, schedule);
  launch(op, args, lr_tensors, grad_scale, found_inf, /*adam=*/false);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedopt, CUDA, m) {
  m.impl("adam_", &adam_cuda);
  m.impl("sgd_", &sgd_cuda);
}

// Sparse gradients reach the shared validation, which names the offending tensor.
TORCH_LIBRARY_IMPL(fusedopt, SparseCUDA, m) {
  m.impl("adam_", &adam_cuda);
  m.impl("sgd_", &sgd_cuda);
}

}  // namespace cuda
}  // namespace fusedopt
