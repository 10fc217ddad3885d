#include "norm_tables.h"

#include <cstring>
#include <stdexcept>
#include <string>

namespace fusedopt {
namespace cuda {

NormHostTable pack_norm_table(const NormTable& t, int64_t chunk_elems) {
  if (chunk_elems <= 0 || chunk_elems % 8 != 0) {
    throw std::invalid_argument("fusedopt: the CUDA chunk size must be a positive multiple of 8, got " +
                                std::to_string(chunk_elems));
  }
  if (t.grads.size() >= (size_t{1} << 31)) {
    throw std::invalid_argument("fusedopt: too many tensors for one launch");
  }
  NormHostTable h;
  h.chunk_elems = chunk_elems;
  h.num_tensors = static_cast<int64_t>(t.grads.size());
  for (const auto& g : t.grads) h.num_chunks += (g.numel + chunk_elems - 1) / chunk_elems;
  h.tensors_offset = static_cast<int64_t>(sizeof(NormTableHeader));
  h.chunks_offset = h.tensors_offset + h.num_tensors * static_cast<int64_t>(sizeof(NormTensor));
  h.bytes.resize(static_cast<size_t>(h.chunks_offset + h.num_chunks * static_cast<int64_t>(sizeof(NormChunk))));
  const NormTableHeader header{kNormTableMagic, h.num_tensors};
  std::memcpy(h.bytes.data(), &header, sizeof(header));
  auto* tensors = reinterpret_cast<NormTensor*>(h.bytes.data() + h.tensors_offset);
  auto* chunks = reinterpret_cast<NormChunk*>(h.bytes.data() + h.chunks_offset);
  int64_t c = 0;
  for (int64_t i = 0; i < h.num_tensors; ++i) {
    const NormSlot& g = t.grads[static_cast<size_t>(i)];
    NormTensor nt{};
    nt.data = g.data;
    nt.numel = g.numel;
    nt.dtype = static_cast<int32_t>(g.dtype);
    nt.flags = reinterpret_cast<uintptr_t>(g.data) % 16 == 0 ? kNormAligned16 : 0;
    std::memcpy(&tensors[i], &nt, sizeof(nt));
    for (int64_t begin = 0; begin < g.numel; begin += chunk_elems) {
      const NormChunk ch{static_cast<int32_t>(i), 0, begin};
      std::memcpy(&chunks[c++], &ch, sizeof(ch));
    }
  }
  return h;
}

NormLaunchArgs make_norm_launch_args(const NormHostTable& h, const NormTable& t, const void* table,
                                     int32_t* counter, double* partials) {
  NormLaunchArgs la{};
  const auto* base = static_cast<const uint8_t*>(table);
  la.tensors = reinterpret_cast<const NormTensor*>(base + h.tensors_offset);
  la.chunks = reinterpret_cast<const NormChunk*>(base + h.chunks_offset);
  la.num_chunks = h.num_chunks;
  la.chunk_elems = h.chunk_elems;
  la.partials = partials;
  la.done_counter = counter;
  la.out = t.out;
  la.grad_scale = t.scale_ptr;
  la.has_host_scale = t.scaled && t.scale_ptr == nullptr ? 1 : 0;
  la.host_inv_scale = t.host_inv_scale;
  la.norm_type = t.norm_type;
  la.max_norm = t.max_norm;
  la.kind = static_cast<int32_t>(t.kind);
  la.out_is_double = t.out_is_double ? 1 : 0;
  return la;
}

int32_t norm_launch_grid(const NormHostTable& h, int64_t max_blocks) {
  if (h.num_chunks == 0) return 1;
  return static_cast<int32_t>(h.num_chunks < max_blocks ? h.num_chunks : max_blocks);
}

}  // namespace cuda
}  // namespace fusedopt
