// The group / tensor / chunk tables of one fused CUDA launch, packed on the host in plain C++
// (no CUDA runtime, no torch headers). The real CUDA glue (fused_step_cuda.cpp) uploads them to
// the GPU; the emulated backend (emulation/) hands them to the same kernels run on the CPU. So
// what the emulated tests check is byte for byte what the GPU receives.
#pragma once

#include <cstdint>
#include <vector>

#include "../step_table.h"
#include "device_tables.h"

namespace fusedopt {
namespace cuda {

struct HostTables {
  std::vector<uint8_t> groups;   // DeviceGroup x num_groups, then the schedule rows (doubles)
  std::vector<uint8_t> tensors;  // DeviceTensor x num_tensors, then DeviceChunk x num_chunks
  int64_t num_groups = 0, num_tensors = 0, num_chunks = 0;
  int64_t phases_offset = 0;  // byte offset of the schedule rows in `groups`
  int64_t chunks_offset = 0;  // byte offset of the chunk table in `tensors`
  int64_t chunk_elems = kChunkElems;
  bool has_schedule = false;
  int32_t storage = kMixedStorage;  // LaunchArgs::storage
};

// Packs one step. `chunk_elems` (a positive multiple of 8) is the work of one chunk; every
// tensor gets at least one chunk, an empty one too, so its step counter advances like torch's.
// `cpu_lr_by_pointer`: CPU lr tensors are read by the kernel through their pointer (the
// emulated backend, whose "device" memory is host memory); otherwise their value was copied
// into the table at validation, as a GPU cannot read host memory.
// `tensor_bytes` false: the tensor table's sizes only (a cached copy of it is reused).
HostTables pack_tables(const StepTable& args, int64_t chunk_elems = kChunkElems,
                       bool cpu_lr_by_pointer = false, bool tensor_bytes = true);

// Whether two steps' tensor slots pack to the same tensor table: the table is a function of the
// slots alone, so a cache can key a packed table on them and skip packing (host_tables.cpp).
bool same_slots(const std::vector<TensorSlot>& a, const std::vector<TensorSlot>& b);

// The launch arguments for tables uploaded at `groups` and `tensors` (device addresses of the
// two byte tables), with `counters` (num_tensors + 1 zeroed int32s). grad_scale, found_inf,
// clip, grid and block are the caller's to set.
LaunchArgs make_launch_args(const HostTables& t, const StepTable& args, const void* groups,
                            const void* tensors, int32_t* counters);

// Blocks for a launch of `t` given the most the device runs at once: one per chunk, at least
// one when there is anything to do (a chunk, or an in-kernel schedule to advance).
int32_t launch_grid(const HostTables& t, int64_t max_blocks);

}  // namespace cuda
}  // namespace fusedopt
