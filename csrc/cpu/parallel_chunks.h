// The one parallel region of a CPU op: the work list (../work_list.h) of every tensor, split into
// contiguous parts of nearly equal element counts, one per thread. Shared by the fused step and
// the gradient norm.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

#include "../work_list.h"

namespace fusedopt {

// Elements per work-list chunk: large enough that per-chunk bookkeeping vanishes, small
// enough that a big tensor spreads evenly over the threads.
constexpr int64_t kCpuChunk = 1 << 16;
// Below this much work an op runs on the calling thread: waking the pool costs more. Work counts
// elements, and each chunk as kChunkCostElems more: a chunk's fixed cost (its tensor's pointers
// and coefficients, a first touch of each role) is about that of updating as many elements, so
// thousands of tiny tensors are worth the pool even when their elements are few.
constexpr int64_t kMinParallelElems = 1 << 15;
constexpr int64_t kChunkCostElems = 64;

// The chunks of tensors of these sizes.
inline std::vector<WorkChunk> cpu_work_list(const std::vector<int64_t>& numels) {
  return build_work_list(numels, kCpuChunk);
}

// Calls per_chunk(c, part_end) for every chunk index c, in one parallel region; the same thread
// takes chunks c + 1 up to part_end (exclusive) next, in order (a hint for prefetching them).
template <typename F>
void for_chunks_in_parallel(const std::vector<WorkChunk>& chunks, const F& per_chunk) {
  int64_t total = 0;
  for (const WorkChunk& w : chunks) total += w.end - w.begin;
  const int64_t work = total + static_cast<int64_t>(chunks.size()) * kChunkCostElems;
  const int64_t parts = work < kMinParallelElems ? 1 : at::get_num_threads();
  const std::vector<int64_t> bounds = balance_work(chunks, parts);
  auto run_parts = [&](int64_t first, int64_t last) {
    for (int64_t part = first; part < last; ++part) {
      for (int64_t c = bounds[part]; c < bounds[part + 1]; ++c) per_chunk(c, bounds[part + 1]);
    }
  };
  if (parts == 1) {
    run_parts(0, 1);
  } else {
    at::parallel_for(0, parts, 1, run_parts);
  }
}

}  // namespace fusedopt
