// The fused CUDA kernels: one launch walks the chunk table of every tensor of every param
// group and dtype on one device. Pure CUDA (no torch headers) so nvcc compiles it quickly;
// the per-element math is the same header the CPU kernels use.
#include <cuda/atomic>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../update_rules.h"
#include "device_tables.h"

namespace fusedopt {
namespace cuda {
namespace {

// Element types as fusedopt::Elem numbers them (csrc/step_args.h).
enum : int32_t { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

template <typename T>
struct Elt;
template <>
struct Elt<float> {
  using Math = float;
  static __device__ __forceinline__ float load(float x) { return x; }
  static __device__ __forceinline__ float store(float x) { return x; }
};
template <>
struct Elt<double> {
  using Math = double;
  static __device__ __forceinline__ double load(double x) { return x; }
  static __device__ __forceinline__ double store(double x) { return x; }
};
template <>
struct Elt<__half> {
  using Math = float;
  static __device__ __forceinline__ float load(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half store(float x) { return __float2half_rn(x); }
};
template <>
struct Elt<__nv_bfloat16> {
  using Math = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

// 16 bytes of T: one vector load or store.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T>*>(p);
}
template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& x) {
  *reinterpret_cast<Pack<T>*>(p) = x;
}

struct Unscale {
  bool active;
  float inv_scale;
};

__device__ __forceinline__ Unscale read_unscale(const LaunchArgs& a) {
  if (a.grad_scale != nullptr) {
    // The float32 reciprocal GradScaler.unscale_ uses, so both paths agree exactly.
    return {true, static_cast<float>(1.0 / static_cast<double>(*a.grad_scale))};
  }
  return {a.has_host_scale != 0, a.host_inv_scale};
}

__device__ __forceinline__ double read_lr(const LaunchArgs& a, const DeviceGroup& g) {
  if (g.sched_count > 0) {
    return schedule_lr(a.phases + static_cast<int64_t>(g.sched_begin) * phase_col::count,
                       g.sched_count, static_cast<double>(*a.schedule_step));
  }
  if (g.lr_ptr == nullptr) return g.lr;
  return g.lr_is_double ? *static_cast<const double*>(g.lr_ptr)
                        : static_cast<double>(*static_cast<const float*>(g.lr_ptr));
}

template <typename T>
__device__ void adam_range(const DeviceTensor& t, int64_t begin, int64_t end,
                           const AdamCoeffs<typename Elt<T>::Math>& c, Unscale us) {
  using S = typename Elt<T>::Math;
  T* P = static_cast<T*>(t.param);
  T* G = static_cast<T*>(t.grad);
  T* M = static_cast<T*>(t.state0);
  T* V = static_cast<T*>(t.state1);
  T* VM = static_cast<T*>(t.state2);
  const S inv = static_cast<S>(us.inv_scale);
  int64_t i = begin;
  if (t.flags & kAligned16) {
    constexpr int kN = Pack<T>::kN;
    const int64_t nvec = (end - begin) / kN;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      const int64_t j = begin + v * kN;
      Pack<T> p = load_pack(P + j), g = load_pack(G + j), m = load_pack(M + j),
              v2 = load_pack(V + j), vm;
      if (c.amsgrad) vm = load_pack(VM + j);
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        S ps = Elt<T>::load(p.v[k]), gs = Elt<T>::load(g.v[k]), ms = Elt<T>::load(m.v[k]);
        S vs = Elt<T>::load(v2.v[k]), vms = c.amsgrad ? Elt<T>::load(vm.v[k]) : S(0);
        if (us.active) {
          gs = gs * inv;
          g.v[k] = Elt<T>::store(gs);
        }
        adam_update<S, S>(ps, gs, ms, vs, vms, c);
        p.v[k] = Elt<T>::store(ps);
        m.v[k] = Elt<T>::store(ms);
        v2.v[k] = Elt<T>::store(vs);
        if (c.amsgrad) vm.v[k] = Elt<T>::store(vms);
      }
      store_pack(P + j, p);
      store_pack(M + j, m);
      store_pack(V + j, v2);
      if (c.amsgrad) store_pack(VM + j, vm);
      if (us.active) store_pack(G + j, g);
    }
    i = begin + nvec * kN;
  }
  for (int64_t j = i + threadIdx.x; j < end; j += blockDim.x) {
    S ps = Elt<T>::load(P[j]), gs = Elt<T>::load(G[j]), ms = Elt<T>::load(M[j]);
    S vs = Elt<T>::load(V[j]), vms = c.amsgrad ? Elt<T>::load(VM[j]) : S(0);
    if (us.active) {
      gs = gs * inv;
      G[j] = Elt<T>::store(gs);
    }
    adam_update<S, S>(ps, gs, ms, vs, vms, c);
    P[j] = Elt<T>::store(ps);
    M[j] = Elt<T>::store(ms);
    V[j] = Elt<T>::store(vs);
    if (c.amsgrad) VM[j] = Elt<T>::store(vms);
  }
}

template <typename T>
__device__ void sgd_range(const DeviceTensor& t, int64_t begin, int64_t end,
                          const SgdCoeffs<typename Elt<T>::Math>& c, Unscale us) {
  using S = typename Elt<T>::Math;
  T* P = static_cast<T*>(t.param);
  T* G = static_cast<T*>(t.grad);
  T* B = static_cast<T*>(t.state0);
  const bool fresh = (t.flags & kFresh) != 0;
  const bool read_buf = c.has_momentum && !fresh;
  const S inv = static_cast<S>(us.inv_scale);
  int64_t i = begin;
  if (t.flags & kAligned16) {
    constexpr int kN = Pack<T>::kN;
    const int64_t nvec = (end - begin) / kN;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      const int64_t j = begin + v * kN;
      Pack<T> p = load_pack(P + j), g = load_pack(G + j), b;
      if (read_buf) b = load_pack(B + j);
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        S ps = Elt<T>::load(p.v[k]), gs = Elt<T>::load(g.v[k]);
        S bs = read_buf ? Elt<T>::load(b.v[k]) : S(0);
        if (us.active) {
          gs = gs * inv;
          g.v[k] = Elt<T>::store(gs);
        }
        sgd_update<S, S>(ps, gs, bs, fresh, c);
        p.v[k] = Elt<T>::store(ps);
        if (c.has_momentum) b.v[k] = Elt<T>::store(bs);
      }
      store_pack(P + j, p);
      if (c.has_momentum) store_pack(B + j, b);
      if (us.active) store_pack(G + j, g);
    }
    i = begin + nvec * kN;
  }
  for (int64_t j = i + threadIdx.x; j < end; j += blockDim.x) {
    S ps = Elt<T>::load(P[j]), gs = Elt<T>::load(G[j]);
    S bs = read_buf ? Elt<T>::load(B[j]) : S(0);
    if (us.active) {
      gs = gs * inv;
      G[j] = Elt<T>::store(gs);
    }
    sgd_update<S, S>(ps, gs, bs, fresh, c);
    P[j] = Elt<T>::store(ps);
    if (c.has_momentum) B[j] = Elt<T>::store(bs);
  }
}

// "Last block" counters. A block counts its finished work with an acq_rel add: the release
// publishes its reads and writes of the tensor (and of its step counter) before the count, and
// the acquire lets the block that sees the final count act on everything the others did. It
// resets the counter for the next launch with an atomic store (the next launch is stream-ordered
// after this one).
__device__ __forceinline__ int count_done(int32_t* counter) {
  return ::cuda::atomic_ref<int32_t, ::cuda::thread_scope_device>(*counter).fetch_add(
      1, ::cuda::memory_order_acq_rel);
}
__device__ __forceinline__ void reset_count(int32_t* counter) {
  ::cuda::atomic_ref<int32_t, ::cuda::thread_scope_device>(*counter).store(0, ::cuda::memory_order_relaxed);
}

// Called by thread 0 of every block after its last chunk: the last block of the launch to get
// here advances the in-kernel schedule (every block has read the counter by then).
__device__ void finish_launch(const LaunchArgs& a) {
  if (a.schedule_step == nullptr) return;
  int32_t* launch_counter = a.done_counters + a.num_tensors;
  if (count_done(launch_counter) != static_cast<int>(gridDim.x) - 1) return;
  const double next = static_cast<double>(*a.schedule_step + 1);
  for (int32_t i = 0; i < a.num_groups; ++i) {
    const DeviceGroup& g = a.groups[i];
    if (g.sched_out == nullptr) continue;
    const double lr = schedule_lr(a.phases + static_cast<int64_t>(g.sched_begin) * phase_col::count,
                                  g.sched_count, next);
    if (g.sched_out_is_double) {
      *static_cast<double*>(g.sched_out) = lr;
    } else {
      *static_cast<float*>(g.sched_out) = static_cast<float>(lr);
    }
  }
  *a.schedule_step += 1;
  reset_count(launch_counter);
}

__global__ void __launch_bounds__(kMaxBlock) adam_kernel(const LaunchArgs a) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // GradScaler skip: touch nothing
  const Unscale us = read_unscale(a);
  for (int64_t c = blockIdx.x; c < a.num_chunks; c += gridDim.x) {
    const DeviceChunk ch = a.chunks[c];
    const DeviceTensor& t = a.tensors[ch.tensor];
    const DeviceGroup& g = a.groups[t.group];
    const int64_t end = ch.begin + a.chunk_elems < t.numel ? ch.begin + a.chunk_elems : t.numel;
    // Every chunk reads the counter before any block writes it (see below): all of a tensor's
    // chunks compute with the same new step.
    const double step = static_cast<double>(*t.step) + 1.0;
    const double lr = read_lr(a, g);
    const bool ams = g.flags & kAmsgrad, maxi = g.flags & kMaximize, dec = g.flags & kDecoupled;
    switch (t.dtype) {
      case kF32:
        adam_range<float>(t, ch.begin, end,
                          make_adam_coeffs<float>(lr, g.h[0], g.h[1], g.h[2], g.h[3], ams, maxi, dec, step), us);
        break;
      case kF64:
        adam_range<double>(t, ch.begin, end,
                           make_adam_coeffs<double>(lr, g.h[0], g.h[1], g.h[2], g.h[3], ams, maxi, dec, step), us);
        break;
      case kF16:
        adam_range<__half>(t, ch.begin, end,
                           make_adam_coeffs<float>(lr, g.h[0], g.h[1], g.h[2], g.h[3], ams, maxi, dec, step), us);
        break;
      default:
        adam_range<__nv_bfloat16>(t, ch.begin, end,
                                  make_adam_coeffs<float>(lr, g.h[0], g.h[1], g.h[2], g.h[3], ams, maxi, dec, step), us);
        break;
    }
    // The last block to finish a chunk of this tensor bumps its step counter: by then every
    // chunk has read the old value. The counter returns to zero for the next launch.
    __syncthreads();
    if (threadIdx.x == 0) {
      if (count_done(&a.done_counters[ch.tensor]) == t.num_chunks - 1) {
        *t.step = static_cast<float>(step);
        reset_count(&a.done_counters[ch.tensor]);
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) finish_launch(a);
}

__global__ void __launch_bounds__(kMaxBlock) sgd_kernel(const LaunchArgs a) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;
  const Unscale us = read_unscale(a);
  for (int64_t c = blockIdx.x; c < a.num_chunks; c += gridDim.x) {
    const DeviceChunk ch = a.chunks[c];
    const DeviceTensor& t = a.tensors[ch.tensor];
    const DeviceGroup& g = a.groups[t.group];
    const int64_t end = ch.begin + a.chunk_elems < t.numel ? ch.begin + a.chunk_elems : t.numel;
    const double lr = read_lr(a, g);
    const bool nest = g.flags & kNesterov, maxi = g.flags & kMaximize;
    switch (t.dtype) {
      case kF32:
        sgd_range<float>(t, ch.begin, end, make_sgd_coeffs<float>(lr, g.h[0], g.h[1], g.h[2], nest, maxi), us);
        break;
      case kF64:
        sgd_range<double>(t, ch.begin, end, make_sgd_coeffs<double>(lr, g.h[0], g.h[1], g.h[2], nest, maxi), us);
        break;
      case kF16:
        sgd_range<__half>(t, ch.begin, end, make_sgd_coeffs<float>(lr, g.h[0], g.h[1], g.h[2], nest, maxi), us);
        break;
      default:
        sgd_range<__nv_bfloat16>(t, ch.begin, end, make_sgd_coeffs<float>(lr, g.h[0], g.h[1], g.h[2], nest, maxi), us);
        break;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) finish_launch(a);
}

}  // namespace

// The emulated backend (emulation/cuda_shim.h) compiles this file as host C++ and runs the
// kernels on CPU threads; only the launch itself differs.
int launch_adam(const LaunchArgs& args, CUstream_st* stream) {
#ifdef FUSEDOPT_EMULATED_CUDA
  return fusedopt_emulation::launch(adam_kernel, args.grid, args.block, args);
#else
  adam_kernel<<<args.grid, args.block, 0, stream>>>(args);
  return static_cast<int>(cudaGetLastError());
#endif
}

int launch_sgd(const LaunchArgs& args, CUstream_st* stream) {
#ifdef FUSEDOPT_EMULATED_CUDA
  return fusedopt_emulation::launch(sgd_kernel, args.grid, args.block, args);
#else
  sgd_kernel<<<args.grid, args.block, 0, stream>>>(args);
  return static_cast<int>(cudaGetLastError());
#endif
}

}  // namespace cuda
}  // namespace fusedopt
