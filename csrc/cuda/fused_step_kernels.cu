// The fused CUDA kernels: one launch walks the chunk table of every tensor of every param
// group and dtype on one device. Pure CUDA (no torch headers) so nvcc compiles it quickly; the
// per-element math is the rules of update_rules.h, which the CPU kernels use too, and this file
// is the one traversal all rules share: it loads every role (param or master, grad, states) into
// math values whatever its storage type, calls the rule, and stores them back.
#include <cuda/atomic>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../precision.h"
#include "../update_rules.h"
#include "device_tables.h"

namespace fusedopt {
namespace cuda {
namespace {

// Storage types as fusedopt::Elem numbers them (csrc/step_table.h).
enum : int32_t { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };
// What a tensor keeps of its float32 master (fusedopt::Master).
enum : int32_t { kNoMaster = 0, kFullMaster = 1, kRemainder = 2 };

// Storage <-> math conversions. bfloat16 is handled as its raw bits (precision.h), so the
// rounding is the same bit manipulation on the GPU, in the emulation and on the CPU.
template <typename S>
__device__ __forceinline__ S to_math(float x) { return static_cast<S>(x); }
template <typename S>
__device__ __forceinline__ S to_math(double x) { return static_cast<S>(x); }
template <typename S>
__device__ __forceinline__ S to_math(__half x) { return static_cast<S>(__half2float(x)); }
template <typename S>
__device__ __forceinline__ S to_math(uint16_t bf16_bits) { return static_cast<S>(bf16_bits_to_float(bf16_bits)); }

template <typename T>
struct FromMath;
template <>
struct FromMath<float> {
  template <typename S>
  static __device__ __forceinline__ float cast(S x) { return static_cast<float>(x); }
};
template <>
struct FromMath<double> {
  template <typename S>
  static __device__ __forceinline__ double cast(S x) { return static_cast<double>(x); }
};
template <>
struct FromMath<__half> {
  template <typename S>
  static __device__ __forceinline__ __half cast(S x) { return __float2half_rn(static_cast<float>(x)); }
};
template <>
struct FromMath<uint16_t> {  // bfloat16, to nearest even like torch's .to(bfloat16)
  template <typename S>
  static __device__ __forceinline__ uint16_t cast(S x) { return bf16_bits_nearest_even(static_cast<float>(x)); }
};

// N consecutive elements of T: one or more 16-byte accesses when Vec is set (the tensor's
// pointers are 16-byte aligned and N elements start at a multiple of N).
template <typename T, int N>
struct alignas(N * sizeof(T) < 16 ? N * sizeof(T) : 16) Elems {
  T v[N];
};

template <typename T, typename S, int N, bool Vec>
__device__ __forceinline__ void load_as(const void* base, int64_t j, S (&out)[N]) {
  const T* p = static_cast<const T*>(base) + j;
  if constexpr (Vec) {
    const Elems<T, N> x = *reinterpret_cast<const Elems<T, N>*>(p);
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = to_math<S>(x.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = to_math<S>(p[k]);
  }
}

template <typename T, typename S, int N, bool Vec>
__device__ __forceinline__ void store_as(void* base, int64_t j, const S (&in)[N]) {
  T* p = static_cast<T*>(base) + j;
  if constexpr (Vec) {
    Elems<T, N> x;
#pragma unroll
    for (int k = 0; k < N; ++k) x.v[k] = FromMath<T>::cast(in[k]);
    *reinterpret_cast<Elems<T, N>*>(p) = x;
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) p[k] = FromMath<T>::cast(in[k]);
  }
}

// A role of any storage type (the switch is uniform across a warp: one tensor per chunk).
template <typename S, int N, bool Vec>
__device__ __forceinline__ void load_role(const void* base, int32_t dtype, int64_t j, S (&out)[N]) {
  switch (dtype) {
    case kF32: load_as<float, S, N, Vec>(base, j, out); break;
    case kF64: load_as<double, S, N, Vec>(base, j, out); break;
    case kF16: load_as<__half, S, N, Vec>(base, j, out); break;
    default: load_as<uint16_t, S, N, Vec>(base, j, out); break;
  }
}

template <typename S, int N, bool Vec>
__device__ __forceinline__ void store_role(void* base, int32_t dtype, int64_t j, const S (&in)[N]) {
  switch (dtype) {
    case kF32: store_as<float, S, N, Vec>(base, j, in); break;
    case kF64: store_as<double, S, N, Vec>(base, j, in); break;
    case kF16: store_as<__half, S, N, Vec>(base, j, in); break;
    default: store_as<uint16_t, S, N, Vec>(base, j, in); break;
  }
}

// What every element of a launch reads besides its tensors: GradScaler's unscale and the clip.
struct GradScalars {
  bool unscale;
  float inv_scale;
  bool clip;
  double clip_coef;  // as the clip holds it; float32 math uses it rounded to float, as torch
};

// Element k of the clip ([grad norm, clip coefficient]).
__device__ __forceinline__ double read_clip(const LaunchArgs& a, int k) {
  return a.clip_is_double ? static_cast<const double*>(a.clip)[k]
                          : static_cast<double>(static_cast<const float*>(a.clip)[k]);
}

__device__ __forceinline__ GradScalars read_scalars(const LaunchArgs& a) {
  GradScalars s{a.has_host_scale != 0, a.host_inv_scale, false, 1.0f};
  if (a.grad_scale != nullptr) {
    // The float32 reciprocal GradScaler.unscale_ uses, so both paths agree exactly.
    s.unscale = true;
    s.inv_scale = static_cast<float>(1.0 / static_cast<double>(*a.grad_scale));
  }
  if (a.clip != nullptr) {
    s.clip_coef = read_clip(a, 1);
    s.clip = s.clip_coef != 1.0;  // a clamped coefficient of 1 leaves the grads as they are
  }
  return s;
}

// Whether the whole launch is skipped: GradScaler found an inf, or the clip's norm is not finite.
__device__ __forceinline__ bool skip_step(const LaunchArgs& a) {
  if (a.found_inf != nullptr && *a.found_inf != 0.0f) return true;
  if (a.clip != nullptr) {
    const double norm = read_clip(a, 0);
    if (!(norm - norm == 0.0)) return true;  // inf or NaN
  }
  return false;
}

__device__ __forceinline__ double read_lr(const LaunchArgs& a, const DeviceGroup& g) {
  if (g.sched_count > 0) {
    return schedule_lr(a.phases + static_cast<int64_t>(g.sched_begin) * phase_col::count,
                       g.sched_count, static_cast<double>(*a.schedule_step));
  }
  if (g.lr_ptr == nullptr) return g.row[col::lr];
  return g.lr_is_double ? *static_cast<const double*>(g.lr_ptr)
                        : static_cast<double>(*static_cast<const float*>(g.lr_ptr));
}

// A tensor's storage types and master as the kernel compiled for launch storage K sees them:
// K other than kMixedStorage is every role's type, with no master and no stochastic rounding, so
// the role switches fold to one case and the master and rounding paths drop out.
template <int32_t K>
struct Storage {
  static __device__ __forceinline__ int32_t of(int32_t stored) { return K == kMixedStorage ? stored : K; }
  static __device__ __forceinline__ int32_t master(const DeviceTensor& t) {
    return K == kMixedStorage ? t.master_kind : kNoMaster;
  }
  static constexpr bool kMayRound = K == kMixedStorage;
};

// N elements of tensor t starting at j: load every role, update, store.
template <typename Rule, int32_t K, typename S, int N, bool Vec>
__device__ __forceinline__ void update_elems(const DeviceTensor& t, int32_t index, int64_t j,
                                             uint32_t roles,
                                             const typename Rule::template Coeffs<S>& c,
                                             const GradScalars& gs, uint64_t seed, bool stochastic) {
  // t's fields are read at each use, not held in locals: held, they cost the mixed kernel spills
  using St = Storage<K>;
  stochastic = St::kMayRound && stochastic;
  S p[N], g[N], st[Rule::kStates][N];
  uint16_t bits[N];
  int16_t rem[N];
  if (St::master(t) == kFullMaster) {
    load_as<float, S, N, Vec>(t.master, j, p);
  } else if (St::master(t) == kRemainder) {
    const Elems<uint16_t, N> b = *reinterpret_cast<const Elems<uint16_t, N>*>(static_cast<const uint16_t*>(t.param) + j);
    const Elems<int16_t, N> r = *reinterpret_cast<const Elems<int16_t, N>*>(static_cast<const int16_t*>(t.master) + j);
#pragma unroll
    for (int k = 0; k < N; ++k) p[k] = static_cast<S>(join_master(b.v[k], r.v[k]));
  } else {
    load_role<S, N, Vec>(t.param, St::of(t.dtype), j, p);
  }
  load_role<S, N, Vec>(t.grad, St::of(t.dtype), j, g);
#pragma unroll
  for (int r = 0; r < Rule::kStates; ++r) {
    if (roles & (1u << r)) load_role<S, N, Vec>(t.state[r], St::of(t.state_dtype[r]), j, st[r]);
  }
  if (gs.unscale) {
#pragma unroll
    for (int k = 0; k < N; ++k) g[k] = g[k] * static_cast<S>(gs.inv_scale);
    store_role<S, N, Vec>(t.grad, St::of(t.dtype), j, g);
  }
  const bool fresh = (t.flags & kFresh) != 0;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    S gk = gs.clip ? g[k] * static_cast<S>(gs.clip_coef) : g[k];
    S sk[Rule::kStates];
#pragma unroll
    for (int r = 0; r < Rule::kStates; ++r) sk[r] = (roles & (1u << r)) ? st[r][k] : S(0);
    Rule::template update<S, S>(p[k], gk, sk, fresh, c);
#pragma unroll
    for (int r = 0; r < Rule::kStates; ++r) st[r][k] = sk[r];
  }
#pragma unroll
  for (int r = 0; r < Rule::kStates; ++r) {
    if (roles & (1u << r)) store_role<S, N, Vec>(t.state[r], St::of(t.state_dtype[r]), j, st[r]);
  }
  if (St::master(t) == kFullMaster) {
    store_as<float, S, N, Vec>(t.master, j, p);
    if (St::of(t.dtype) == kBF16) {
#pragma unroll
      for (int k = 0; k < N; ++k) bits[k] = bf16_bits_nearest_away(static_cast<float>(p[k]));
      Elems<uint16_t, N> b;
#pragma unroll
      for (int k = 0; k < N; ++k) b.v[k] = bits[k];
      *reinterpret_cast<Elems<uint16_t, N>*>(static_cast<uint16_t*>(t.param) + j) = b;
    } else {
      store_role<S, N, Vec>(t.param, St::of(t.dtype), j, p);  // float16: to nearest even
    }
  } else if (St::master(t) == kRemainder) {
    Elems<uint16_t, N> b;
    Elems<int16_t, N> r;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      split_master(static_cast<float>(p[k]), bits[k], rem[k]);
      b.v[k] = bits[k];
      r.v[k] = rem[k];
    }
    *reinterpret_cast<Elems<uint16_t, N>*>(static_cast<uint16_t*>(t.param) + j) = b;
    *reinterpret_cast<Elems<int16_t, N>*>(static_cast<int16_t*>(t.master) + j) = r;
  } else if (stochastic && St::of(t.dtype) == kBF16) {
    Elems<uint16_t, N> b;
#pragma unroll
    for (int k = 0; k < N; ++k) {
      b.v[k] = bf16_bits_stochastic(static_cast<float>(p[k]),
                                    rounding_bits(seed, static_cast<uint64_t>(index),
                                                  static_cast<uint64_t>(j + k)));
    }
    *reinterpret_cast<Elems<uint16_t, N>*>(static_cast<uint16_t*>(t.param) + j) = b;
  } else {
    store_role<S, N, Vec>(t.param, St::of(t.dtype), j, p);
  }
}

// Elements [begin, end) of tensor t: 16-byte accesses of N elements per thread where the tensor
// is aligned, then one element per thread.
template <typename Rule, int32_t K, typename S>
__device__ void update_range(const DeviceTensor& t, int32_t index, int64_t begin, int64_t end,
                             uint32_t roles, const typename Rule::template Coeffs<S>& c,
                             const GradScalars& gs, uint64_t seed, bool stochastic) {
  constexpr int kN = sizeof(S) == 8 ? 4 : 8;  // 16 bytes of bfloat16; 32 of float32 or float64
  int64_t i = begin;
  if (t.flags & kAligned16) {
    const int64_t units = (end - begin) / kN;
    for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
      update_elems<Rule, K, S, kN, true>(t, index, begin + u * kN, roles, c, gs, seed, stochastic);
    }
    i = begin + units * kN;
  }
  for (int64_t j = i + threadIdx.x; j < end; j += blockDim.x) {
    update_elems<Rule, K, S, 1, false>(t, index, j, roles, c, gs, seed, stochastic);
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

template <typename Rule, int32_t K>
__global__ void __launch_bounds__(kMaxBlock) step_kernel(const LaunchArgs a) {
  if (skip_step(a)) return;  // touch nothing
  const GradScalars gs = read_scalars(a);
  const bool stochastic = a.rounding_seed >= 0;
  for (int64_t c = blockIdx.x; c < a.num_chunks; c += gridDim.x) {
    const DeviceChunk ch = a.chunks[c];
    const DeviceTensor& t = a.tensors[ch.tensor];
    const DeviceGroup& g = a.groups[t.group];
    const int64_t end = ch.begin + a.chunk_elems < t.numel ? ch.begin + a.chunk_elems : t.numel;
    // Every chunk reads the counter before any block writes it (see below): all of a tensor's
    // chunks compute with the same new step.
    const double step = Rule::kHasStep ? static_cast<double>(*t.step) + 1.0 : 0.0;
    const uint64_t seed = step_seed(a.rounding_seed, step);
    const double lr = read_lr(a, g);
    if (Storage<K>::of(t.dtype) == kF64) {
      update_range<Rule, K, double>(t, ch.tensor, ch.begin, end, g.roles,
                                    Rule::template coeffs<double>(g.row, lr, step), gs, seed, stochastic);
    } else {
      update_range<Rule, K, float>(t, ch.tensor, ch.begin, end, g.roles,
                                   Rule::template coeffs<float>(g.row, lr, step), gs, seed, stochastic);
    }
    if constexpr (Rule::kHasStep) {
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
  }
  __syncthreads();
  if (threadIdx.x == 0) finish_launch(a);
}

template <typename Rule, int32_t K>
int launch_kernel(const LaunchArgs& args, CUstream_st* stream) {
#ifdef FUSEDOPT_EMULATED_CUDA
  (void)stream;
  return fusedopt_emulation::launch(step_kernel<Rule, K>, args.grid, args.block, args);
#else
  step_kernel<Rule, K><<<args.grid, args.block, 0, stream>>>(args);
  return static_cast<int>(cudaGetLastError());
#endif
}

template <typename Rule>
int launch_rule(const LaunchArgs& args, CUstream_st* stream) {
  switch (args.storage) {
    case kF32: return launch_kernel<Rule, kF32>(args, stream);
    case kBF16: return launch_kernel<Rule, kBF16>(args, stream);
    default: return launch_kernel<Rule, kMixedStorage>(args, stream);
  }
}

}  // namespace

// The emulated backend (emulation/cuda_shim.h) compiles this file as host C++ and runs the
// kernels on CPU threads; only the launch itself differs.
int launch_step(const LaunchArgs& args, CUstream_st* stream) {
  switch (static_cast<RuleId>(args.rule)) {
    case RuleId::sgd: return launch_rule<SgdRule>(args, stream);
    case RuleId::rmsprop: return launch_rule<RmspropRule>(args, stream);
    case RuleId::adagrad: return launch_rule<AdagradRule>(args, stream);
    case RuleId::lion: return launch_rule<LionRule>(args, stream);
    default: return launch_rule<AdamRule>(args, stream);
  }
}

}  // namespace cuda
}  // namespace fusedopt
