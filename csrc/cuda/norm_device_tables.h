// The tables one fused gradient-norm launch (grad_norm_kernels.cu) reads from device memory, shared
// by the host packing (norm_tables.cpp, plain C++) and the kernel (nvcc, no torch headers).
#pragma once

#include <cstdint>

struct CUstream_st;

namespace fusedopt {
namespace cuda {

// The packed table starts with this header, so a gradient table never equals another op's table
// byte for byte (the glue caches uploads by their bytes).
struct NormTableHeader {
  uint64_t magic;
  int64_t num_tensors;
};
constexpr uint64_t kNormTableMagic = 0x4d524f4e44415247ull;  // "GRADNORM"

enum NormTensorFlags : int32_t {
  kNormAligned16 = 1,  // data is 16-byte aligned: vector loads
};

struct NormTensor {
  const void* data;
  int64_t numel;
  int32_t dtype;  // fusedopt::Elem
  int32_t flags;
};

// Elements [begin, min(begin + chunk_elems, numel)) of one tensor; empty tensors have no chunk.
struct NormChunk {
  int32_t tensor;
  int32_t pad;
  int64_t begin;
};

struct NormLaunchArgs {
  const NormTensor* tensors;
  const NormChunk* chunks;
  int64_t num_chunks;
  int64_t chunk_elems;
  double* partials;        // one per chunk (scratch, written and read within the launch)
  int32_t* done_counter;   // zero between launches
  void* out;               // 2 elements: total norm, clip coefficient
  const float* grad_scale; // device scalar read by the kernel, or null
  double norm_type;
  double max_norm;
  float host_inv_scale;    // used when grad_scale is null and has_host_scale is set
  int32_t has_host_scale;
  int32_t kind;            // fusedopt::NormKind
  int32_t out_is_double;
  int32_t grid;
  int32_t block;
};

// Returns the cudaError_t of the launch as an int (0 on success).
int launch_grad_norm(const NormLaunchArgs& args, CUstream_st* stream);

}  // namespace cuda
}  // namespace fusedopt
