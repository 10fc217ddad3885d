// The fused gradient-norm kernel: ONE launch reduces every gradient on a device, whatever their
// number, sizes and dtypes, and writes the total norm and torch's clip coefficient. Pure CUDA (no
// torch headers); the emulated backend (emulation/) compiles it unchanged as host C++.
//
// Each block walks chunks of the device-resident chunk table (grid-stride), reduces each chunk in
// float64 (per thread, then a fixed tree over the block) and stores the result in the chunk's slot
// of `partials`. The last block to finish (an acq_rel completion counter) reduces the partials, in
// an order fixed by the chunk index and the block size alone, and writes out[0] (the norm) and
// out[1] (the clip coefficient); it then returns the counter to zero for the next launch. The
// result is thus independent of the grid and of the order blocks run in: the same grads give the
// same bits. Nothing is read back by the host, so the launch can be captured in a CUDA graph.
#include <cuda/atomic>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../norm_math.h"
#include "device_tables.h"
#include "norm_device_tables.h"

// Shared memory: a real __shared__ variable on the GPU; in the emulation, the block's buffer.
#ifdef FUSEDOPT_EMULATED_CUDA
#define FUSEDOPT_BLOCK_SHARED(type, name) type& name = *::fusedopt_emulation::block_shared<type>()
#else
#define FUSEDOPT_BLOCK_SHARED(type, name) __shared__ type name
#endif

namespace fusedopt {
namespace cuda {
namespace {

enum : int32_t { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };  // fusedopt::Elem

struct Unscale {
  bool active;
  float inv;
};

// One element as the norm sees it, in float64: the grad, or with a grad scale the value
// GradScaler.unscale_ would store (the product in float, or double for float64, rounded to the
// grad's dtype).
__device__ __forceinline__ double elem(float x, Unscale u) {
  return static_cast<double>(u.active ? x * u.inv : x);
}
__device__ __forceinline__ double elem(double x, Unscale u) {
  return u.active ? x * static_cast<double>(u.inv) : x;
}
__device__ __forceinline__ double elem(__half x, Unscale u) {
  const float f = __half2float(x);
  return static_cast<double>(u.active ? __half2float(__float2half_rn(f * u.inv)) : f);
}
__device__ __forceinline__ double elem(__nv_bfloat16 x, Unscale u) {
  const float f = __bfloat162float(x);
  return static_cast<double>(u.active ? __bfloat162float(__float2bfloat16_rn(f * u.inv)) : f);
}

template <typename T>
struct alignas(16) Pack {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};

// This thread's share of elements [begin, end) of one tensor, reduced in float64.
template <typename T>
__device__ double thread_partial(const NormTensor& t, int64_t begin, int64_t end, NormKind kind,
                                 double p, Unscale u) {
  const T* x = static_cast<const T*>(t.data);
  double acc = 0.0;
  int64_t i = begin;
  if (t.flags & kNormAligned16) {
    constexpr int kN = Pack<T>::kN;
    const int64_t nvec = (end - begin) / kN;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      const Pack<T> pk = *reinterpret_cast<const Pack<T>*>(x + begin + v * kN);
#pragma unroll
      for (int k = 0; k < kN; ++k) acc = norm_combine(kind, acc, norm_term(kind, p, elem(pk.v[k], u)));
    }
    i = begin + nvec * kN;
  }
  for (int64_t j = i + threadIdx.x; j < end; j += blockDim.x) {
    acc = norm_combine(kind, acc, norm_term(kind, p, elem(x[j], u)));
  }
  return acc;
}

struct NormShared {
  double v[kMaxBlock];
  int32_t last;
};

// Reduces one value per thread over the block, by a tree fixed by blockDim alone (any size, not
// only powers of two). Every thread must call it; the result is valid in thread 0.
__device__ double block_reduce(NormShared& sh, double x, NormKind kind) {
  sh.v[threadIdx.x] = x;
  __syncthreads();
  for (unsigned width = blockDim.x; width > 1;) {
    const unsigned half = (width + 1) / 2;
    if (threadIdx.x < width - half) {
      sh.v[threadIdx.x] = norm_combine(kind, sh.v[threadIdx.x], sh.v[threadIdx.x + half]);
    }
    __syncthreads();
    width = half;
  }
  return sh.v[0];
}

// The completion counter, as in fused_step_kernels.cu: an acq_rel add publishes this block's
// partials and, in the last block, acquires everyone's; a store returns it to zero.
__device__ __forceinline__ int count_done(int32_t* counter) {
  return ::cuda::atomic_ref<int32_t, ::cuda::thread_scope_device>(*counter).fetch_add(
      1, ::cuda::memory_order_acq_rel);
}
__device__ __forceinline__ void reset_count(int32_t* counter) {
  ::cuda::atomic_ref<int32_t, ::cuda::thread_scope_device>(*counter).store(0, ::cuda::memory_order_relaxed);
}

__global__ void __launch_bounds__(kMaxBlock) grad_norm_kernel(const NormLaunchArgs a) {
  FUSEDOPT_BLOCK_SHARED(NormShared, sh);
  const NormKind kind = static_cast<NormKind>(a.kind);
  Unscale u{a.has_host_scale != 0, a.host_inv_scale};
  if (a.grad_scale != nullptr) {
    // The float32 reciprocal GradScaler.unscale_ multiplies by.
    u = {true, static_cast<float>(1.0 / static_cast<double>(*a.grad_scale))};
  }
  for (int64_t c = blockIdx.x; c < a.num_chunks; c += gridDim.x) {
    const NormChunk ch = a.chunks[c];
    const NormTensor& t = a.tensors[ch.tensor];
    const int64_t end = ch.begin + a.chunk_elems < t.numel ? ch.begin + a.chunk_elems : t.numel;
    double x = 0.0;
    switch (t.dtype) {
      case kF32: x = thread_partial<float>(t, ch.begin, end, kind, a.norm_type, u); break;
      case kF64: x = thread_partial<double>(t, ch.begin, end, kind, a.norm_type, u); break;
      case kF16: x = thread_partial<__half>(t, ch.begin, end, kind, a.norm_type, u); break;
      default: x = thread_partial<__nv_bfloat16>(t, ch.begin, end, kind, a.norm_type, u); break;
    }
    const double r = block_reduce(sh, x, kind);
    if (threadIdx.x == 0) a.partials[c] = r;
    // (block_reduce's last barrier orders thread 0's read of sh.v[0] before any thread writes
    // sh.v again for the next chunk, and only thread 0 writes sh.v[0].)
  }
  if (threadIdx.x == 0) {
    sh.last = count_done(a.done_counter) == static_cast<int>(gridDim.x) - 1 ? 1 : 0;
  }
  __syncthreads();
  if (!sh.last) return;
  // The last block: every other block has counted (released its partials) before this block's
  // thread 0 acquired the final count; the barrier above passes that on to the block's threads.
  double x = 0.0;
  for (int64_t c = threadIdx.x; c < a.num_chunks; c += blockDim.x) {
    x = norm_combine(kind, x, a.partials[c]);
  }
  const double reduced = block_reduce(sh, x, kind);
  if (threadIdx.x == 0) {
    const double norm = finish_norm(kind, a.norm_type, reduced);
    if (a.out_is_double) {
      double* o = static_cast<double*>(a.out);
      o[0] = norm;
      o[1] = clip_coefficient<double>(norm, a.max_norm);
    } else {
      float* o = static_cast<float*>(a.out);
      const float n = static_cast<float>(norm);  // rounded once
      o[0] = n;
      o[1] = clip_coefficient<float>(n, a.max_norm);
    }
    reset_count(a.done_counter);
  }
}

}  // namespace

int launch_grad_norm(const NormLaunchArgs& args, CUstream_st* stream) {
#ifdef FUSEDOPT_EMULATED_CUDA
  return fusedopt_emulation::launch(grad_norm_kernel, args.grid, args.block, args);
#else
  grad_norm_kernel<<<args.grid, args.block, 0, stream>>>(args);
  return static_cast<int>(cudaGetLastError());
#endif
}

}  // namespace cuda
}  // namespace fusedopt
