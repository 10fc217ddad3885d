// The emulated CUDA backend, for tests: the CUDA implementation of the fused ops (and of grad_norm_,
// through ../grad_norm_kernels.cu and the shared ../norm_tables.cpp) with the GPU
// replaced by CPU threads. It validates through the shared step_args, packs the tables with the
// shared host_tables (what the real glue uploads), and runs the unchanged kernels of
// ../fused_step_kernels.cu (compiled by emulated_kernels.cpp). Every "device" pointer is host
// memory, so the kernels read CPU tensors, lr tensors, grad_scale and found_inf in place, as they
// read device memory on a GPU.
//
// Built on demand by tests/emulated_cuda.py, never shipped in fusedopt._C.
#include <torch/extension.h>

#include <algorithm>
#include <chrono>
#include <limits>
#include <list>
#include <stdexcept>
#include <vector>

#include "../../grad_norm_args.h"
#include "../../step_args.h"
#include "../../update_rules.h"
#include "../device_tables.h"
#include "../host_tables.h"
#include "../kernel_ops.h"
#include "../norm_tables.h"
#include "cuda_shim.h"

namespace fusedopt {
namespace cuda {
namespace {

struct Config {
  int64_t grid = 4;  // most blocks per launch (like SMs x blocks per SM on a GPU)
  int64_t block = 32;
  int64_t chunk_elems = 64;
  int64_t launches = 0;
  int64_t last_tensors = 0;  // slots in the last step launch's table (after coalescing)
  int32_t last_storage = kMixedStorage;  // LaunchArgs::storage of the last step launch
};

Config& config() {
  static Config c;
  return c;
}

// Packed tensor tables and their completion counters, cached by the slots they were packed from,
// as the real glue caches its uploads: a step with the same tensors reuses the table and the
// counters. A kernel that leaves a counter nonzero breaks the next step, and a cache that reused
// a table for other tensors would update the wrong memory: the tests see both.
struct CachedTable {
  std::vector<TensorSlot> slots;
  std::vector<uint8_t> bytes;
  std::vector<int32_t> counters;
};

class TableCache {
 public:
  CachedTable& get(const StepTable& args, const HostTables& sizes, int64_t chunk_elems) {
    const auto n = static_cast<size_t>(sizes.num_tensors + 1);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->counters.size() >= n && same_slots(it->slots, args.tensors)) {
        entries_.splice(entries_.begin(), entries_, it);
        return entries_.front();
      }
    }
    HostTables full = pack_tables(args, chunk_elems, /*cpu_lr_by_pointer=*/true);
    if (full.tensors.empty()) full.tensors.resize(sizeof(DeviceChunk));
    entries_.push_front({args.tensors, std::move(full.tensors), std::vector<int32_t>(n, 0)});
    if (entries_.size() > 16) entries_.pop_back();
    return entries_.front();
  }
  void clear() { entries_.clear(); }

 private:
  std::list<CachedTable> entries_;
};

TableCache& table_cache() {
  static TableCache c;
  return c;
}

const float* scalar_ptr(const char* op, const char* what, const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, op, ": a CUDA ", what,
                   " must be float32 (as GradScaler makes it), got ", t->scalar_type());
  return t->data_ptr<float>();
}

void launch(const char* op, const StepArgs& args) {
  const Config& cfg = config();
  if (args.tensors.empty() && args.schedule_step == nullptr) return;
  HostTables tables;
  CachedTable* cached = nullptr;
  try {
    tables = pack_tables(args, cfg.chunk_elems, /*cpu_lr_by_pointer=*/true,
                         /*tensor_bytes=*/false);
    cached = &table_cache().get(args, tables, cfg.chunk_elems);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, op, ": ", e.what());
  }
  // The "uploads": host memory is the device memory here (vector storage is 16-byte aligned).
  LaunchArgs la = make_launch_args(tables, args, tables.groups.data(), cached->bytes.data(),
                                   cached->counters.data());
  la.grad_scale = scalar_ptr(op, "grad_scale", args.grad_scale);
  la.found_inf = scalar_ptr(op, "found_inf", args.found_inf);
  la.grid = launch_grid(tables, cfg.grid);
  la.block = static_cast<int32_t>(cfg.block);
  if (la.grid == 0) return;
  const int err = launch_step(la, nullptr);
  TORCH_CHECK(err == 0, op, ": emulated launch failed with CUDA error ", err);
  ++config().launches;
  config().last_tensors = static_cast<int64_t>(args.tensors.size());
  config().last_storage = la.storage;
}

using EmulatedOps = KernelOps<launch>;

// fusedopt::grad_norm_ through the emulated kernel (../grad_norm_kernels.cu). Each distinct table
// keeps its completion counter across calls, as the real glue's cached upload does, so a kernel
// that leaves the counter nonzero is caught (here, and by the next call's result).
struct NormCounter {
  std::vector<uint8_t> bytes;
  int32_t counter = 0;
};

std::list<NormCounter>& norm_counters() {
  static std::list<NormCounter> c;
  return c;
}

void grad_norm(const std::vector<at::Tensor>& grads, double norm_type, double max_norm,
               const at::Tensor& out, const std::optional<at::Tensor>& grad_scale) {
  const char* op = "fusedopt::grad_norm_";
  NormArgs a = collect_norm_args(op, grads, norm_type, max_norm, out, grad_scale);
  // Host memory is the device memory here: a float32 grad_scale is read by the kernel itself.
  if (grad_scale.has_value() && grad_scale->scalar_type() == at::kFloat) {
    a.scale_ptr = grad_scale->data_ptr<float>();
  }
  NormHostTable table;
  try {
    table = pack_norm_table(a, config().chunk_elems);
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, op, ": ", e.what());
  }
  auto& counters = norm_counters();
  auto it = std::find_if(counters.begin(), counters.end(),
                         [&](const NormCounter& c) { return c.bytes == table.bytes; });
  if (it == counters.end()) {
    counters.push_front({table.bytes, 0});
    if (counters.size() > 16) counters.pop_back();
    it = counters.begin();
  }
  // A partial the kernel failed to write shows as a NaN norm.
  std::vector<double> partials(static_cast<size_t>(std::max<int64_t>(table.num_chunks, 1)),
                               std::numeric_limits<double>::quiet_NaN());
  NormLaunchArgs la = make_norm_launch_args(table, a, it->bytes.data(), &it->counter, partials.data());
  la.grid = norm_launch_grid(table, config().grid);
  la.block = static_cast<int32_t>(config().block);
  const int err = launch_grad_norm(la, nullptr);
  TORCH_CHECK(err == 0, op, ": emulated launch failed with CUDA error ", err);
  TORCH_CHECK(it->counter == 0, op, ": the emulated kernel left its completion counter at ",
              it->counter);
  ++config().launches;
}

}  // namespace
}  // namespace cuda
}  // namespace fusedopt

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace fusedopt::cuda;
  m.doc() = "fusedopt's CUDA kernels run on CPU threads (tests only)";
  using Tensors = std::vector<at::Tensor>;
  using Ints = std::vector<int64_t>;
  using Opt = std::optional<at::Tensor>;
  // Same arguments as the op schemas (csrc/ops.cpp), in order.
  m.def("adam_", [](const Tensors& params, const Tensors& grads, const Tensors& exp_avgs,
                    const Tensors& exp_avg_sqs, const Tensors& max_exp_avg_sqs,
                    const Tensors& state_steps, const Ints& group_sizes, const at::Tensor& hyper,
                    const Tensors& lr_tensors, const Opt& grad_scale, const Opt& found_inf,
                    const Tensors& schedule_state, const Opt& schedule) {
    EmulatedOps::adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, group_sizes,
                  hyper, lr_tensors, grad_scale, found_inf, schedule_state, schedule);
  }, "fusedopt::adam_ on CPU tensors through the emulated CUDA kernels");
  m.def("sgd_", [](const Tensors& params, const Tensors& grads, const Tensors& momentum_buffers,
                   const Ints& group_sizes, const at::Tensor& hyper, const Tensors& lr_tensors,
                   const Ints& fresh_buffers, const Opt& grad_scale, const Opt& found_inf,
                   const Tensors& schedule_state, const Opt& schedule) {
    EmulatedOps::sgd(params, grads, momentum_buffers, group_sizes, hyper, lr_tensors, fresh_buffers,
                 grad_scale, found_inf, schedule_state, schedule);
  }, "fusedopt::sgd_ on CPU tensors through the emulated CUDA kernels");
  m.def("step_", [](const std::string& rule, const Tensors& params, const Tensors& grads,
                    const Tensors& states, const Tensors& masters, const Tensors& state_steps,
                    const Ints& group_sizes, const at::Tensor& hyper, const Tensors& lr_tensors,
                    const Ints& fresh, const Opt& grad_scale, const Opt& found_inf,
                    const Tensors& schedule_state, const Opt& schedule, const Opt& clip,
                    int64_t master_mode, int64_t seed) {
    EmulatedOps::step(rule, params, grads, states, masters, state_steps, group_sizes, hyper,
                      lr_tensors, fresh, grad_scale, found_inf, schedule_state, schedule, clip,
                      master_mode, seed);
  }, "fusedopt::step_ on CPU tensors through the emulated CUDA kernels");
  m.def("grad_norm_", &grad_norm, "fusedopt::grad_norm_ on CPU tensors through the emulated CUDA kernel");
  m.def("configure", [](int64_t grid, int64_t block, int64_t chunk_elems, bool concurrent,
                        uint64_t seed) {
    if (grid < 1 || block < 1 || block > kMaxBlock || chunk_elems < 8 || chunk_elems % 8 != 0) {
      throw std::invalid_argument("emulated CUDA: need grid >= 1, 1 <= block <= 512 and a chunk "
                                  "size that is a positive multiple of 8");
    }
    config().grid = grid;
    config().block = block;
    config().chunk_elems = chunk_elems;
    fusedopt_emulation::schedule() = {concurrent, seed};
    table_cache().clear();
    norm_counters().clear();
  }, py::arg("grid"), py::arg("block"), py::arg("chunk_elems"), py::arg("concurrent"),
     py::arg("seed"));
  m.def("launches", [] { return config().launches; }, "Kernel launches so far.");
  m.def("last_launch_tensors", [] { return config().last_tensors; },
        "Tensor slots of the last step launch, after coalescing (step_args.cpp).");
  m.def("last_launch_storage", [] {
    const int32_t s = config().last_storage;
    if (s == static_cast<int32_t>(fusedopt::Elem::f32)) return std::string("float32");
    if (s == static_cast<int32_t>(fusedopt::Elem::bf16)) return std::string("bfloat16");
    return std::string(s == kMixedStorage ? "mixed" : "unknown");
  }, "The storage the last step launch's kernel was compiled for (LaunchArgs::storage): float32, "
     "bfloat16, or mixed (the kernel that switches on each role's type).");
  m.def("table_lookup_us", [](const std::vector<int64_t>& numels, int64_t repeats) {
    // Host cost per step of finding the tensor table of an unchanged step, as the real glue does:
    // (packing it and comparing the bytes with the cached copy, the old way; comparing the slots
    // with the cached ones, the way now), in microseconds.
    fusedopt::StepTable t;
    t.num_groups = 1;
    t.num_cols = fusedopt::AdamRule::count;
    t.hyper.assign(static_cast<size_t>(t.num_cols), 0.0);
    std::vector<float> dummy(16);
    for (const int64_t n : numels) {
      fusedopt::TensorSlot s;
      s.param = s.grad = s.state[0] = s.state[1] = dummy.data();
      s.step = dummy.data();
      s.numel = n;
      t.tensors.push_back(s);
    }
    const HostTables cached = pack_tables(t);
    const std::vector<fusedopt::TensorSlot> cached_slots = t.tensors;
    auto time_us = [&](auto&& step) {
      const auto start = std::chrono::steady_clock::now();
      size_t hits = 0;
      for (int64_t r = 0; r < repeats; ++r) hits += step() ? 1 : 0;
      const auto us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
      if (hits != static_cast<size_t>(repeats)) throw std::runtime_error("table lookup missed");
      return us / static_cast<double>(repeats);
    };
    const double by_bytes = time_us([&] { return pack_tables(t).tensors == cached.tensors; });
    const double by_slots = time_us([&] { return same_slots(cached_slots, t.tensors); });
    return std::make_pair(by_bytes, by_slots);
  });
}
