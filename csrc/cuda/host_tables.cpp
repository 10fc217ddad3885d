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

struct Cols {
  int lr, lr_index, sched_begin, sched_count;
};

Cols group_row(const StepTable& args, Rule rule, int64_t g, DeviceGroup& dg) {
  int32_t flags = 0;
  if (rule == Rule::adam) {
    dg.lr = args.at(g, adam_col::lr);
    dg.h[0] = args.at(g, adam_col::beta1);
    dg.h[1] = args.at(g, adam_col::beta2);
    dg.h[2] = args.at(g, adam_col::eps);
    dg.h[3] = args.at(g, adam_col::weight_decay);
    if (args.at(g, adam_col::amsgrad) != 0.0) flags |= kAmsgrad;
    if (args.at(g, adam_col::maximize) != 0.0) flags |= kMaximize;
    if (args.at(g, adam_col::decoupled) != 0.0) flags |= kDecoupled;
    dg.flags = flags;
    return {adam_col::lr, adam_col::lr_index, adam_col::sched_begin, adam_col::sched_count};
  }
  dg.lr = args.at(g, sgd_col::lr);
  dg.h[0] = args.at(g, sgd_col::momentum);
  dg.h[1] = args.at(g, sgd_col::dampening);
  dg.h[2] = args.at(g, sgd_col::weight_decay);
  if (args.at(g, sgd_col::nesterov) != 0.0) flags |= kNesterov;
  if (args.at(g, sgd_col::maximize) != 0.0) flags |= kMaximize;
  dg.flags = flags;
  return {sgd_col::lr, sgd_col::lr_index, sgd_col::sched_begin, sgd_col::sched_count};
}

}  // namespace

bool same_slots(const std::vector<TensorSlot>& a, const std::vector<TensorSlot>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    const TensorSlot& x = a[i];
    const TensorSlot& y = b[i];
    if (x.param != y.param || x.grad != y.grad || x.state0 != y.state0 || x.state1 != y.state1 ||
        x.state2 != y.state2 || x.step != y.step || x.numel != y.numel || x.group != y.group ||
        x.dtype != y.dtype || x.fresh != y.fresh || x.step_is_double != y.step_is_double) {
      return false;
    }
  }
  return true;
}

HostTables pack_tables(const StepTable& args, Rule rule, int64_t chunk_elems,
                       bool cpu_lr_by_pointer, bool tensor_bytes) {
  if (chunk_elems <= 0 || chunk_elems % 8 != 0) {
    throw std::invalid_argument("fusedopt: the CUDA chunk size must be a positive multiple of 8, got " +
                                std::to_string(chunk_elems));
  }
  if (args.tensors.size() >= (size_t{1} << 31)) {
    throw std::invalid_argument("fusedopt: too many tensors for one launch");
  }
  HostTables out;
  out.chunk_elems = chunk_elems;
  out.num_groups = args.num_groups;
  out.has_schedule = args.schedule_step != nullptr;
  DeviceGroup* groups = grow<DeviceGroup>(out.groups, args.num_groups);
  for (int64_t g = 0; g < args.num_groups; ++g) {
    DeviceGroup& dg = groups[g];
    dg = DeviceGroup{};
    const Cols cols = group_row(args, rule, g, dg);
    if (out.has_schedule && args.at(g, cols.sched_count) > 0) {
      dg.sched_begin = static_cast<int32_t>(args.at(g, cols.sched_begin));
      dg.sched_count = static_cast<int32_t>(args.at(g, cols.sched_count));
      const ScheduleOut& so = args.schedule_out[static_cast<size_t>(g)];
      dg.sched_out = so.lr;
      dg.sched_out_is_double = so.is_double;
    }
    const LrTensor& lr = args.lr_tensor.empty() ? LrTensor{} : args.lr_tensor[static_cast<size_t>(g)];
    if (lr.ptr != nullptr && (!lr.on_cpu || cpu_lr_by_pointer)) {
      dg.lr_ptr = lr.ptr;
      dg.lr_is_double = lr.is_double;
      dg.lr = std::numeric_limits<double>::quiet_NaN();  // a kernel that ignored lr_ptr shows
    }
  }
  out.phases_offset = static_cast<int64_t>(out.groups.size());
  if (!args.phases.empty()) {
    double* rows = grow<double>(out.groups, static_cast<int64_t>(args.phases.size()));
    std::memcpy(rows, args.phases.data(), args.phases.size() * sizeof(double));
  }

  out.num_tensors = static_cast<int64_t>(args.tensors.size());
  int64_t total_chunks = 0;
  for (const auto& s : args.tensors) {
    total_chunks += s.numel == 0 ? 1 : (s.numel + chunk_elems - 1) / chunk_elems;
  }
  out.num_chunks = total_chunks;
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
    dt.state0 = s.state0;
    dt.state1 = s.state1;
    dt.state2 = s.state2;
    dt.step = static_cast<float*>(s.step);
    dt.numel = s.numel;
    dt.group = s.group;
    dt.dtype = static_cast<int32_t>(s.dtype);
    const int64_t n = s.numel == 0 ? 1 : (s.numel + chunk_elems - 1) / chunk_elems;
    dt.num_chunks = static_cast<int32_t>(n);
    const bool aligned = aligned16(s.param) && aligned16(s.grad) && aligned16(s.state0) &&
                         aligned16(s.state1) && aligned16(s.state2);
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
