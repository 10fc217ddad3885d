#include "host_tables.h"

#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "../update_rules.h"

namespace fusedopt {
namespace cuda {
namespace {

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
T* grow(std::vector<uint8_t>& bytes, int64_t count) {
  const size_t at = bytes.size();
  bytes.resize(at + static_cast<size_t>(count) * sizeof(T));
  return reinterpret_cast<T*>(bytes.data() + at);
}

// Folds slots into the one storage type they all share (LaunchArgs::storage).
class StorageScan {
 public:
  explicit StorageScan(const StepTable& args) : stochastic_(args.rounding_seed >= 0) {}
  void add(const TensorSlot& s) {
    if (storage_ == kMixedStorage) return;
    const auto dtype = static_cast<int32_t>(s.dtype);
    bool uniform = s.master_kind == Master::none &&
                   (s.dtype == Elem::f32 || (s.dtype == Elem::bf16 && !stochastic_)) &&
                   (storage_ == kUnset || storage_ == dtype);
    for (int k = 0; k < kMaxStates; ++k) {
      uniform = uniform && (s.state[k] == nullptr || s.state_dtype[k] == s.dtype);
    }
    storage_ = uniform ? dtype : kMixedStorage;
  }
  int32_t storage() const { return storage_ == kUnset ? kMixedStorage : storage_; }

 private:
  static constexpr int32_t kUnset = -2;
  bool stochastic_;
  int32_t storage_ = kUnset;
};

}  // namespace

bool same_slots(const std::vector<TensorSlot>& a, const std::vector<TensorSlot>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    const TensorSlot& x = a[i];
    const TensorSlot& y = b[i];
    if (x.param != y.param || x.grad != y.grad || x.master != y.master || x.step != y.step ||
        x.numel != y.numel || x.group != y.group || x.dtype != y.dtype ||
        x.master_kind != y.master_kind || x.fresh != y.fresh || x.step_is_double != y.step_is_double) {
      return false;
    }
    for (int k = 0; k < kMaxStates; ++k) {
      if (x.state[k] != y.state[k] || x.state_dtype[k] != y.state_dtype[k]) return false;
    }
  }
  return true;
}

HostTables pack_tables(const StepTable& args, int64_t chunk_elems, bool cpu_lr_by_pointer,
                       bool tensor_bytes) {
  if (chunk_elems <= 0 || chunk_elems % 8 != 0) {
    throw std::invalid_argument("fusedopt: the CUDA chunk size must be a positive multiple of 8, got " +
                                std::to_string(chunk_elems));
  }
  if (args.tensors.size() >= (size_t{1} << 31)) {
    throw std::invalid_argument("fusedopt: too many tensors for one launch");
  }
  if (args.num_cols > kMaxCols) {
    throw std::invalid_argument("fusedopt: a hyper row of " + std::to_string(args.num_cols) +
                                " columns does not fit the CUDA group table");
  }
  HostTables out;
  out.chunk_elems = chunk_elems;
  out.num_groups = args.num_groups;
  out.has_schedule = args.schedule_step != nullptr;
  DeviceGroup* groups = grow<DeviceGroup>(out.groups, args.num_groups);
  for (int64_t g = 0; g < args.num_groups; ++g) {
    DeviceGroup& dg = groups[g];
    dg = DeviceGroup{};
    const double* row = &args.hyper[static_cast<size_t>(g * args.num_cols)];
    std::memcpy(dg.row, row, static_cast<size_t>(args.num_cols) * sizeof(double));
    dg.roles = visit_rule(args.rule, [&](auto r) { return role_mask<decltype(r)>(row); });
    if (out.has_schedule && args.at(g, col::sched_count) > 0) {
      dg.sched_begin = static_cast<int32_t>(args.at(g, col::sched_begin));
      dg.sched_count = static_cast<int32_t>(args.at(g, col::sched_count));
      const ScheduleOut& so = args.schedule_out[static_cast<size_t>(g)];
      dg.sched_out = so.lr;
      dg.sched_out_is_double = so.is_double;
    }
    const LrTensor& lr = args.lr_tensor.empty() ? LrTensor{} : args.lr_tensor[static_cast<size_t>(g)];
    if (lr.ptr != nullptr && (!lr.on_cpu || cpu_lr_by_pointer)) {
      dg.lr_ptr = lr.ptr;
      dg.lr_is_double = lr.is_double;
      dg.row[col::lr] = std::numeric_limits<double>::quiet_NaN();  // a kernel that ignored lr_ptr shows
    }
  }
  out.phases_offset = static_cast<int64_t>(out.groups.size());
  if (!args.phases.empty()) {
    double* rows = grow<double>(out.groups, static_cast<int64_t>(args.phases.size()));
    std::memcpy(rows, args.phases.data(), args.phases.size() * sizeof(double));
  }

  out.num_tensors = static_cast<int64_t>(args.tensors.size());
  int64_t total_chunks = 0;
  StorageScan storage(args);
  for (const auto& s : args.tensors) {
    total_chunks += s.numel == 0 ? 1 : (s.numel + chunk_elems - 1) / chunk_elems;
    storage.add(s);
  }
  out.num_chunks = total_chunks;
  out.storage = storage.storage();
  out.chunks_offset = out.num_tensors * static_cast<int64_t>(sizeof(DeviceTensor));
  if (!tensor_bytes) return out;
  out.tensors.reserve(static_cast<size_t>(out.num_tensors) * sizeof(DeviceTensor) +
                      static_cast<size_t>(total_chunks) * sizeof(DeviceChunk));
  DeviceTensor* tensors = grow<DeviceTensor>(out.tensors, out.num_tensors);
  DeviceChunk* chunks = grow<DeviceChunk>(out.tensors, total_chunks);
  int64_t c = 0;
  for (int64_t i = 0; i < out.num_tensors; ++i) {
    const TensorSlot& s = args.tensors[static_cast<size_t>(i)];
    DeviceTensor& dt = tensors[i];
    dt = DeviceTensor{};
    dt.param = s.param;
    dt.grad = s.grad;
    dt.master = s.master;
    bool aligned = aligned16(s.param) && aligned16(s.grad) && aligned16(s.master);
    for (int k = 0; k < kMaxStates; ++k) {
      dt.state[k] = s.state[k];
      dt.state_dtype[k] = static_cast<int32_t>(s.state_dtype[k]);
      aligned = aligned && aligned16(s.state[k]);
    }
    dt.master_kind = static_cast<int32_t>(s.master_kind);
    // the kernel bumps one counter per slot: CUDA slots are coalesced without merge_steps
    if (s.step_count != 1) throw std::invalid_argument("fusedopt: a coalesced slot with several step counters (an internal error)");
    dt.step = static_cast<float*>(s.step);
    dt.numel = s.numel;
    dt.group = s.group;
    dt.dtype = static_cast<int32_t>(s.dtype);
    const int64_t n = s.numel == 0 ? 1 : (s.numel + chunk_elems - 1) / chunk_elems;
    dt.num_chunks = static_cast<int32_t>(n);
    dt.flags = (aligned ? kAligned16 : 0) | (s.fresh ? kFresh : 0);
    for (int64_t k = 0; k < n; ++k) chunks[c++] = DeviceChunk{static_cast<int32_t>(i), 0, k * chunk_elems};
  }
  return out;
}

LaunchArgs make_launch_args(const HostTables& t, const StepTable& args, const void* groups,
                            const void* tensors, int32_t* counters) {
  LaunchArgs la{};
  const auto* g = static_cast<const uint8_t*>(groups);
  const auto* tt = static_cast<const uint8_t*>(tensors);
  la.groups = reinterpret_cast<const DeviceGroup*>(g);
  la.num_groups = static_cast<int32_t>(t.num_groups);
  la.tensors = reinterpret_cast<const DeviceTensor*>(tt);
  la.chunks = reinterpret_cast<const DeviceChunk*>(tt + t.chunks_offset);
  la.num_tensors = static_cast<int32_t>(t.num_tensors);
  la.num_chunks = t.num_chunks;
  la.chunk_elems = t.chunk_elems;
  la.done_counters = counters;
  la.rule = static_cast<int32_t>(args.rule);
  la.rounding_seed = args.rounding_seed;
  la.storage = t.storage;
  la.clip = args.clip_data;
  la.clip_is_double = args.clip_is_double ? 1 : 0;
  if (t.has_schedule) {
    la.phases = reinterpret_cast<const double*>(g + t.phases_offset);
    la.schedule_step = args.schedule_step;
  }
  return la;
}

int32_t launch_grid(const HostTables& t, int64_t max_blocks) {
  if (t.num_chunks == 0) return t.has_schedule ? 1 : 0;
  return static_cast<int32_t>(t.num_chunks < max_blocks ? t.num_chunks : max_blocks);
}

}  // namespace cuda
}  // namespace fusedopt
