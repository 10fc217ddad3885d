// The chunk table of one fused gradient-norm launch, packed on the host in plain C++ (no CUDA
// runtime, no torch headers): the real glue (grad_norm_cuda.cpp) uploads it, the emulated backend
// hands it to the same kernel run on CPU threads.
#pragma once

#include <cstdint>
#include <vector>

#include "../norm_table.h"
#include "norm_device_tables.h"

namespace fusedopt {
namespace cuda {

struct NormHostTable {
  std::vector<uint8_t> bytes;  // NormTableHeader, NormTensor x num_tensors, NormChunk x num_chunks
  int64_t num_tensors = 0, num_chunks = 0;
  int64_t tensors_offset = 0, chunks_offset = 0;
  int64_t chunk_elems = 0;
};

// `chunk_elems`: a positive multiple of 8, so every chunk of an aligned tensor starts 16-byte
// aligned. Throws std::invalid_argument otherwise.
NormHostTable pack_norm_table(const NormTable& t, int64_t chunk_elems);

// The launch arguments for the table uploaded at `table`, with its zeroed `counter` and a scratch
// of at least max(1, num_chunks) doubles at `partials`. grid and block are the caller's to set.
NormLaunchArgs make_norm_launch_args(const NormHostTable& h, const NormTable& t, const void* table,
                                     int32_t* counter, double* partials);

// Blocks for a launch: one per chunk up to `max_blocks`, and one when there is no chunk (the
// launch still writes the norm 0 and its coefficient).
int32_t norm_launch_grid(const NormHostTable& h, int64_t max_blocks);

}  // namespace cuda
}  // namespace fusedopt
