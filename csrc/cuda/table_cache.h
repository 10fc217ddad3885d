// The table cache of the CUDA glue, moved out of fused_step_cuda.cpp so that the glue of every
// op shares it.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstring>
#include <list>
#include <mutex>
#include <optional>
#include <vector>

#include "host_tables.h"

namespace fusedopt {
namespace cuda {

// The device's multiprocessor count (cached): launches size their grids by it.
int sm_count(int device);

// Device copies of host-packed tables (host_tables.h), kept while they may be reused: a step
// whose tables are byte-identical to an earlier one reuses that upload (no copy at all), and an
// upload recorded into a CUDA graph stays alive, with its pinned source, for as long as the
// process runs. A tensor table also owns the completion counters its launches use, so two
// optimizers never share counters and a captured graph's counters live as long as its table.
struct Upload {
  const void* table = nullptr;
  int32_t* counters = nullptr;
};

class TableCache {
 public:
  // The device copy of a tensor table packed from exactly these slots, if one is cached: the
  // table is a function of the slots alone, so a step whose tensors are those of an earlier step
  // (the common case) skips packing and comparing the bytes.
  std::optional<Upload> find_tensors(const std::vector<TensorSlot>& slots, c10::Device device,
                                     bool capturing, int64_t num_counters, cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->device == device && it->num_counters >= num_counters && it->has_slots &&
          same_slots(it->slots, slots)) {
        return use(it, capturing, stream);
      }
    }
    return std::nullopt;
  }

  // Returns the device copy of `bytes` (packed from `slots`, when given) for a launch on `stream`.
  Upload upload(const std::vector<uint8_t>& bytes, c10::Device device, bool capturing,
                int64_t num_counters, cudaStream_t stream, const char* what,
                const std::vector<TensorSlot>* slots = nullptr) {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->device == device && it->bytes == bytes && it->num_counters >= num_counters) {
        return use(it, capturing, stream);
      }
    }
    // Pinned staging memory cannot be allocated while a stream is being captured, and a table
    // made inside a capture would live in the graph's private pool.
    TORCH_CHECK(!capturing, "fusedopt: the optimizer step being captured into a CUDA graph differs "
                "from every eager step before it: ", what, " changed. Take one eager optimizer "
                "step exactly as it will be captured first.");
    Entry e;
    e.device = device;
    e.bytes = bytes;
    if (slots != nullptr) {
      e.slots = *slots;
      e.has_slots = true;
    }
    e.stream = stream;
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
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&e.used, cudaEventDisableTiming));
    entries_.push_front(std::move(e));
    evict();
    return entries_.front().view();
  }

  // Records that the entry of `table` was used by work just enqueued on `stream`.
  void mark_used(const void* table, cudaStream_t stream, bool capturing) {
    if (capturing) return;  // replays are ordered by whoever launches the graph
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& e : entries_) {
      if (e.dev.defined() && e.dev.data_ptr() == table) {
        C10_CUDA_CHECK(cudaEventRecord(e.used, stream));
        return;
      }
    }
  }

 private:
  struct Entry;
  // Moves an entry to the front (most recently used) for a launch on `stream`. An entry last
  // used on another stream is first made to wait for that use (its upload, its counters' last
  // launch), and is kept from the caching allocator while `stream` may read it.
  Upload use(std::list<Entry>::iterator it, bool capturing, cudaStream_t stream) {
    it->keep |= capturing;
    entries_.splice(entries_.begin(), entries_, it);
    Entry& e = entries_.front();
    if (e.stream != stream && !capturing) {
      C10_CUDA_CHECK(cudaStreamWaitEvent(stream, e.used, 0));
      const auto s = c10::cuda::getStreamFromExternal(stream, e.device.index());
      e.dev.record_stream(s);
      if (e.counters.defined()) e.counters.record_stream(s);
      e.stream = stream;
    }
    return e.view();
  }

  struct Entry {
    c10::Device device = c10::Device(c10::DeviceType::CUDA, 0);
    std::vector<uint8_t> bytes;
    std::vector<TensorSlot> slots;  // what a tensor table was packed from
    bool has_slots = false;
    at::Tensor host, dev, counters;
    int64_t num_counters = 0;
    bool keep = false;
    cudaStream_t stream = nullptr;  // where it was last used
    cudaEvent_t used = nullptr;     // recorded after its last use
    Entry() = default;
    Entry(Entry&& o) noexcept
        : device(o.device), bytes(std::move(o.bytes)), slots(std::move(o.slots)),
          has_slots(o.has_slots), host(std::move(o.host)), dev(std::move(o.dev)),
          counters(std::move(o.counters)), num_counters(o.num_counters),
          keep(o.keep), stream(o.stream), used(o.used) {
      o.used = nullptr;
    }
    ~Entry() {
      if (used != nullptr) cudaEventDestroy(used);
    }
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

// The process-wide cache (table_cache.cpp).
TableCache& table_cache();

}  // namespace cuda
}  // namespace fusedopt
