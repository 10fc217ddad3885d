#include "table_cache.h"

namespace fusedopt {
namespace cuda {

TableCache& table_cache() {
  static TableCache cache;
  return cache;
}

}  // namespace cuda
}  // namespace fusedopt
