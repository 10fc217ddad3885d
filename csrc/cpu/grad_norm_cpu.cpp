// CPU implementation of fusedopt::grad_norm_: the total norm of every gradient in one parallel
// region over the shared work list (work_list.h), accumulated in float64 (float32 2-norms: float64 across
// 128-element blocks summed in float, see sumsq_f32).
//
// Deterministic: each chunk of the work list reduces its elements in a fixed order into its own
// slot of a vector indexed by chunk, and the slots are combined serially in chunk order. The chunks
// do not depend on the thread count, so neither does any bit of the result.
// The norm only reads, at memory speed, and its reductions are written for 256-bit vectors: in an
// AVX-512 build this unit keeps at::vec's AVX2 flavour (its own inline namespace, as in torch's
// per-capability kernels), so Vectorized<float> is 8 lanes here whatever the step kernel uses.
#if defined(CPU_CAPABILITY_AVX512)
#undef CPU_CAPABILITY_AVX512
#undef CPU_CAPABILITY
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#if defined(FUSEDOPT_CPU_AVX2)
#include <immintrin.h>
#endif

#include "../grad_norm_args.h"
#include "parallel_chunks.h"

namespace fusedopt {
namespace {

// Elements per chunk (the unit of the per-chunk partials), and the size below which the reduction
// stays on the calling thread.

// One element as the norm sees it, in float64: the gradient value, or with a grad scale the
// unscaled value GradScaler.unscale_ would store (the product in float, or double for float64
// grads, rounded to the grad's dtype).
template <typename T>
inline double load_elem(const T* p, int64_t i, bool scaled, float inv) {
  if constexpr (std::is_same_v<T, double>) {
    return scaled ? p[i] * static_cast<double>(inv) : p[i];
  } else {
    const float x = static_cast<float>(p[i]);
    return static_cast<double>(scaled ? static_cast<float>(static_cast<T>(x * inv)) : x);
  }
}

template <typename T>
double chunk_scalar(const T* p, int64_t begin, int64_t end, NormKind kind, double np, bool scaled,
                    float inv) {
  // Four interleaved accumulators, combined in a fixed order.
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t i = begin;
  for (; i + 4 <= end; i += 4) {
    for (int k = 0; k < 4; ++k) {
      acc[k] = norm_combine(kind, acc[k], norm_term(kind, np, load_elem(p, i + k, scaled, inv)));
    }
  }
  for (; i < end; ++i) acc[0] = norm_combine(kind, acc[0], norm_term(kind, np, load_elem(p, i, scaled, inv)));
  return norm_combine(kind, norm_combine(kind, acc[0], acc[1]), norm_combine(kind, acc[2], acc[3]));
}

#if defined(FUSEDOPT_CPU_AVX2)
using VecF = at::vec::Vectorized<float>;
using VecD = at::vec::Vectorized<double>;

// 16 consecutive elements of T as two float vectors (float, half and bfloat16 grads), unscaled and
// rounded back to T as GradScaler would store them.
template <typename T>
inline void load16(const T* p, bool scaled, const VecF& inv, VecF& a, VecF& b) {
  if constexpr (std::is_same_v<T, float>) {
    a = VecF::loadu(p);
    b = VecF::loadu(p + 8);
    if (scaled) {
      a = a * inv;
      b = b * inv;
    }
  } else {
    auto both = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
    a = std::get<0>(both);
    b = std::get<1>(both);
    if (scaled) {
      auto rounded = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(a * inv, b * inv));
      a = std::get<0>(rounded);
      b = std::get<1>(rounded);
    }
  }
}

inline __m256d lo_pd(const VecF& v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
inline __m256d hi_pd(const VecF& v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }

inline double hsum(__m256d v) {
  alignas(32) double d[4];
  _mm256_store_pd(d, v);
  return (d[0] + d[1]) + (d[2] + d[3]);
}

inline double hmax(const VecF& v) {
  alignas(32) float f[8];
  v.store(f);
  double m = f[0];
  for (int k = 1; k < 8; ++k) m = norm_combine(NormKind::inf, m, static_cast<double>(f[k]));
  return m;
}

// The 2-, 1- and inf-norm reductions of a chunk of float / half / bfloat16 grads: float64
// accumulators for the sums (the max is exact in float).
template <typename T>
double chunk_vec16(const T* p, int64_t begin, int64_t end, NormKind kind, bool scaled, float inv_f) {
  const VecF inv(inv_f);
  int64_t i = begin;
  double head = 0.0;
  if (kind == NormKind::inf) {
    VecF m0(0.0f), m1(0.0f);
    for (; i + 16 <= end; i += 16) {
      VecF a, b;
      load16(p + i, scaled, inv, a, b);
      m0 = at::vec::maximum(m0, a.abs());  // NaN-propagating
      m1 = at::vec::maximum(m1, b.abs());
    }
    head = hmax(at::vec::maximum(m0, m1));
  } else {
    __m256d s0 = _mm256_setzero_pd(), s1 = s0, s2 = s0, s3 = s0;
    if (kind == NormKind::two) {
      for (; i + 16 <= end; i += 16) {
        VecF a, b;
        load16(p + i, scaled, inv, a, b);
        const __m256d a0 = lo_pd(a), a1 = hi_pd(a), b0 = lo_pd(b), b1 = hi_pd(b);
        s0 = _mm256_fmadd_pd(a0, a0, s0);
        s1 = _mm256_fmadd_pd(a1, a1, s1);
        s2 = _mm256_fmadd_pd(b0, b0, s2);
        s3 = _mm256_fmadd_pd(b1, b1, s3);
      }
    } else {
      for (; i + 16 <= end; i += 16) {
        VecF a, b;
        load16(p + i, scaled, inv, a, b);
        a = a.abs();
        b = b.abs();
        s0 = _mm256_add_pd(lo_pd(a), s0);
        s1 = _mm256_add_pd(hi_pd(a), s1);
        s2 = _mm256_add_pd(lo_pd(b), s2);
        s3 = _mm256_add_pd(hi_pd(b), s3);
      }
    }
    head = hsum(_mm256_add_pd(_mm256_add_pd(s0, s1), _mm256_add_pd(s2, s3)));
  }
  return norm_combine(kind, head, chunk_scalar(p, i, end, kind, 0.0, scaled, inv_f));
}

double chunk_vec_f64(const double* p, int64_t begin, int64_t end, NormKind kind, bool scaled,
                     float inv_f) {
  const VecD inv(static_cast<double>(inv_f));
  int64_t i = begin;
  VecD s[4] = {VecD(0.0), VecD(0.0), VecD(0.0), VecD(0.0)};
  for (; i + 16 <= end; i += 16) {
    for (int k = 0; k < 4; ++k) {
      VecD x = VecD::loadu(p + i + 4 * k);
      if (scaled) x = x * inv;
      if (kind == NormKind::two) {
        s[k] = at::vec::fmadd(x, x, s[k]);
      } else if (kind == NormKind::one) {
        s[k] = s[k] + x.abs();
      } else {
        s[k] = at::vec::maximum(s[k], x.abs());
      }
    }
  }
  alignas(32) double d[4][4];
  for (int k = 0; k < 4; ++k) s[k].store(d[k]);
  double head = 0.0;
  for (int lane = 0; lane < 4; ++lane) {
    const double l = norm_combine(kind, norm_combine(kind, d[0][lane], d[1][lane]),
                                  norm_combine(kind, d[2][lane], d[3][lane]));
    head = norm_combine(kind, head, l);
  }
  return norm_combine(kind, head, chunk_scalar(p, i, end, kind, 0.0, scaled, inv_f));
}

// Sub-ranges of a chunk read in lockstep. One sequential stream per core leaves the memory system
// idle between the prefetcher's requests; four, advanced a block at a time, keep it busy (a plain
// read of 500 MB on 2 cores: about 25% faster than one stream, and than software prefetch).
constexpr int kStreams = 4;

// Calls block(j, i) for each of the kStreams block-aligned shares of [begin, end), share j's
// blocks in order, the shares in turn; returns where the elements left over start.
template <int64_t Block, typename F>
inline int64_t in_lockstep(int64_t begin, int64_t end, const F& block) {
  const int64_t share = (end - begin) / (kStreams * Block) * Block;
  for (int64_t k = 0; k < share; k += Block) {
    for (int j = 0; j < kStreams; ++j) block(j, begin + j * share + k);
  }
  return begin + kStreams * share;
}

// The sum of squares of float32 grads (unscaled by `inv` first when scaled), the hot case, at the
// speed of a plain read: each 128-element block is summed in float (four FMA chains, each lane
// adding 4 squares: a relative error of a few float32 ulps on a block, random in sign across
// blocks) and the block sums are accumulated in float64, per share, combined in a fixed order.
// Widening every element to double instead made this pass compute-bound (about 20% slower on
// 2 cores). `bits` gets the OR of every element's bits (as squared), so the caller can tell a
// chunk of zeros from one of squares that underflowed.
double sumsq_f32(const float* p, int64_t begin, int64_t end, bool scaled, float inv_f, uint32_t& bits) {
  constexpr int64_t kBlock = 128;
  const __m256 inv = _mm256_set1_ps(inv_f);
  __m256d lo[kStreams], hi[kStreams];
  for (int j = 0; j < kStreams; ++j) lo[j] = hi[j] = _mm256_setzero_pd();
  __m256 any = _mm256_setzero_ps();
  const auto block = [&](int j, int64_t i) {
    __m256 f0 = _mm256_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
    for (int64_t k = 0; k < kBlock; k += 32) {
      __m256 a = _mm256_loadu_ps(p + i + k);
      __m256 b = _mm256_loadu_ps(p + i + k + 8);
      __m256 c = _mm256_loadu_ps(p + i + k + 16);
      __m256 d = _mm256_loadu_ps(p + i + k + 24);
      if (scaled) {  // the float product GradScaler.unscale_ would store
        a = _mm256_mul_ps(a, inv);
        b = _mm256_mul_ps(b, inv);
        c = _mm256_mul_ps(c, inv);
        d = _mm256_mul_ps(d, inv);
      }
      f0 = _mm256_fmadd_ps(a, a, f0);
      f1 = _mm256_fmadd_ps(b, b, f1);
      f2 = _mm256_fmadd_ps(c, c, f2);
      f3 = _mm256_fmadd_ps(d, d, f3);
      any = _mm256_or_ps(any, _mm256_or_ps(_mm256_or_ps(a, b), _mm256_or_ps(c, d)));
    }
    const __m256 f = _mm256_add_ps(_mm256_add_ps(f0, f1), _mm256_add_ps(f2, f3));
    lo[j] = _mm256_add_pd(lo[j], _mm256_cvtps_pd(_mm256_castps256_ps128(f)));
    hi[j] = _mm256_add_pd(hi[j], _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)));
  };
  int64_t i = in_lockstep<kBlock>(begin, end, block);
  for (; i + kBlock <= end; i += kBlock) block(0, i);  // the blocks left over, in share 0
  double head = 0.0;
  for (int j = 0; j < kStreams; ++j) head += hsum(_mm256_add_pd(lo[j], hi[j]));
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm256_castps_si256(any));
  for (const uint32_t lane : lanes) bits |= lane & 0x7fffffffu;  // (-0.0 squares to 0)
  const double tail = chunk_scalar(p, i, end, NormKind::two, 0.0, scaled, inv_f);
  if (tail != 0.0) bits |= 1u;
  return head + tail;
}
#endif

template <typename T>
double chunk_partial(const T* p, int64_t begin, int64_t end, NormKind kind, double np, bool scaled,
                     float inv) {
#if defined(FUSEDOPT_CPU_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    if (kind == NormKind::two) {
      // The float squares and block sums hold in float as long as they stay normal and finite.
      // Past about 1.6e18 a block's float sum overflows (squares summing past FLT_MAX); below
      // about 1e-19 a square is subnormal (off by up to 2^-150) or 0. Such a chunk again with
      // float64 squares gives the true norm (inf only from inf elements): when the float sum is
      // inf, or so small that n squares' underflow errors could reach 2^-30 of it, unless every
      // element is zero. Grads that large or that small are rare; this costs a test per chunk.
      uint32_t bits = 0;
      const double r = sumsq_f32(p, begin, end, scaled, inv, bits);
      const bool underflow = bits != 0 && r < static_cast<double>(end - begin) * 0x1p-120;
      return std::isinf(r) || underflow ? chunk_vec16(p, begin, end, kind, scaled, inv) : r;
    }
  }
  if (kind != NormKind::p) {
    if constexpr (std::is_same_v<T, double>) {
      return chunk_vec_f64(p, begin, end, kind, scaled, inv);
    } else {
      return chunk_vec16(p, begin, end, kind, scaled, inv);
    }
  }
#endif
  return chunk_scalar(p, begin, end, kind, np, scaled, inv);
}

void grad_norm_cpu(at::TensorList grads, double norm_type, double max_norm, const at::Tensor& out,
                   const std::optional<at::Tensor>& grad_scale) {
  const char* op = "fusedopt::grad_norm_";
  const NormArgs a = collect_norm_args(op, grads, norm_type, max_norm, out, grad_scale);
  std::vector<int64_t> numels;
  numels.reserve(a.grads.size());
  for (const auto& g : a.grads) numels.push_back(g.numel);
  const std::vector<WorkChunk> chunks = cpu_work_list(numels);
  // One partial per chunk, combined below in chunk order: the same norm whatever the threads.
  std::vector<double> partials(chunks.size(), 0.0);
  for_chunks_in_parallel(chunks, [&](int64_t c, int64_t /*part_end*/) {
    const WorkChunk& w = chunks[static_cast<size_t>(c)];
    const NormSlot& s = a.grads[static_cast<size_t>(w.tensor)];
    double r = 0.0;
    switch (s.dtype) {
      case Elem::f32:
        r = chunk_partial(static_cast<const float*>(s.data), w.begin, w.end, a.kind, a.norm_type, a.scaled, a.host_inv_scale);
        break;
      case Elem::f64:
        r = chunk_partial(static_cast<const double*>(s.data), w.begin, w.end, a.kind, a.norm_type, a.scaled, a.host_inv_scale);
        break;
      case Elem::f16:
        r = chunk_partial(static_cast<const c10::Half*>(s.data), w.begin, w.end, a.kind, a.norm_type, a.scaled, a.host_inv_scale);
        break;
      case Elem::bf16:
        r = chunk_partial(static_cast<const c10::BFloat16*>(s.data), w.begin, w.end, a.kind, a.norm_type, a.scaled, a.host_inv_scale);
        break;
    }
    partials[static_cast<size_t>(c)] = r;
  });
  double reduced = 0.0;
  for (const double r : partials) reduced = norm_combine(a.kind, reduced, r);
  const double norm = finish_norm(a.kind, a.norm_type, reduced);
  if (a.out_is_double) {
    auto* o = static_cast<double*>(a.out);
    o[0] = norm;
    o[1] = clip_coefficient<double>(norm, a.max_norm);
  } else {
    auto* o = static_cast<float*>(a.out);
    o[0] = static_cast<float>(norm);  // rounded once
    o[1] = clip_coefficient<float>(o[0], a.max_norm);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) { m.impl("grad_norm_", &grad_norm_cpu); }

// A sparse gradient routes the call here; the validation rejects it, naming the tensor.
TORCH_LIBRARY_IMPL(fusedopt, SparseCPU, m) { m.impl("grad_norm_", &grad_norm_cpu); }

}  // namespace fusedopt
