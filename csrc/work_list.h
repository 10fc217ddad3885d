// The flattened work list of one fused step: every tensor of every param group cut into
// chunks, built in plain C++ shared by the CPU kernel (which splits it across threads)
// and the CUDA kernel (which uploads it as the chunk table blocks walk over).
#pragma once

#include <cstdint>
#include <vector>

namespace fusedopt {

struct WorkChunk {
  int64_t tensor;  // index into the op's tensor lists
  int64_t begin;   // first element of the chunk in that tensor
  int64_t end;     // one past the last element
};

// Cuts tensors of the given sizes into chunks of at most `chunk_elems` elements, in tensor
// order; empty tensors get no chunk. `chunk_elems` must be positive.
std::vector<WorkChunk> build_work_list(const std::vector<int64_t>& numels, int64_t chunk_elems);

// Splits the chunk list into `parts` contiguous ranges holding nearly the same number of
// elements (not chunks: a list mixing tiny and large tensors stays balanced). Returns
// parts + 1 boundaries into `chunks`; range i is [bounds[i], bounds[i + 1]).
std::vector<int64_t> balance_work(const std::vector<WorkChunk>& chunks, int64_t parts);

}  // namespace fusedopt
