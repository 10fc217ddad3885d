#include "table_cache.h"

#include <unordered_map>

namespace fusedopt {
namespace cuda {

TableCache& table_cache() {
  // Never destroyed: at exit, static destructors run after torch's CUDA stream pools are gone,
  // and freeing a cached table's device memory then aborts the process ("Unrecognized stream",
  // seen on an H200). The process's end releases the memory anyway.
  static TableCache* cache = new TableCache;
  return *cache;
}

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

}  // namespace cuda
}  // namespace fusedopt
