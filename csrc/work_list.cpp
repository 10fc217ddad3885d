#include "work_list.h"

#include <stdexcept>

namespace fusedopt {

std::vector<WorkChunk> build_work_list(const std::vector<int64_t>& numels, int64_t chunk_elems) {
  if (chunk_elems <= 0) throw std::invalid_argument("fusedopt: chunk size must be positive");
  std::vector<WorkChunk> chunks;
  int64_t total_chunks = 0;
  for (int64_t n : numels) {
    if (n < 0) throw std::invalid_argument("fusedopt: negative tensor size in work list");
    // (a 64-bit division costs more than the rest of a tensor's entry: most tensors fit one chunk)
    total_chunks += n <= chunk_elems ? (n > 0 ? 1 : 0) : (n + chunk_elems - 1) / chunk_elems;
  }
  chunks.reserve(static_cast<size_t>(total_chunks));
  for (size_t t = 0; t < numels.size(); ++t) {
    for (int64_t begin = 0; begin < numels[t]; begin += chunk_elems) {
      const int64_t end = begin + chunk_elems < numels[t] ? begin + chunk_elems : numels[t];
      chunks.push_back({static_cast<int64_t>(t), begin, end});
    }
  }
  return chunks;
}

std::vector<int64_t> balance_work(const std::vector<WorkChunk>& chunks, int64_t parts) {
  if (parts <= 0) throw std::invalid_argument("fusedopt: number of parts must be positive");
  int64_t total = 0;
  for (const auto& c : chunks) total += c.end - c.begin;
  std::vector<int64_t> bounds(static_cast<size_t>(parts) + 1, static_cast<int64_t>(chunks.size()));
  bounds[0] = 0;
  // Part i starts at the first chunk whose preceding elements reach i * total / parts.
  int64_t done = 0;
  size_t c = 0;
  for (int64_t i = 1; i < parts; ++i) {
    // Rounded-down share; computed in two steps so that total * i cannot overflow.
    const int64_t target = (total / parts) * i + ((total % parts) * i) / parts;
    while (c < chunks.size() && done + (chunks[c].end - chunks[c].begin) <= target) {
      done += chunks[c].end - chunks[c].begin;
      ++c;
    }
    // Take the straddling chunk too when that lands closer to the target.
    if (c < chunks.size() && target - done > (done + (chunks[c].end - chunks[c].begin)) - target) {
      done += chunks[c].end - chunks[c].begin;
      ++c;
    }
    bounds[static_cast<size_t>(i)] = static_cast<int64_t>(c);
  }
  return bounds;
}

}  // namespace fusedopt
