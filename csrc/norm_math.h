// The scalar math of the fused gradient norm, written once for the CPU kernel and the CUDA kernel
// (csrc/cuda/grad_norm_kernels.cu, compiled by nvcc and, for the emulated backend, by g++).
#pragma once

#include <math.h>

#include <cstdint>

#if defined(__CUDACC__)
#define FUSEDOPT_NORM_HD __host__ __device__ __forceinline__
#else
#define FUSEDOPT_NORM_HD inline
#endif

namespace fusedopt {

// Which reduction a norm order needs. p = 2 and p = inf are what training uses; p = 1 and any
// other finite p > 0 are supported too (the sum of |x|^p in float64, then its 1/p-th power).
enum class NormKind : int32_t { two = 0, inf = 1, one = 2, p = 3 };

FUSEDOPT_NORM_HD NormKind norm_kind(double p) {
  if (p == 2.0) return NormKind::two;
  if (isinf(p)) return NormKind::inf;
  if (p == 1.0) return NormKind::one;
  return NormKind::p;
}

// The contribution of one element (already in float64) to the reduced value.
FUSEDOPT_NORM_HD double norm_term(NormKind kind, double p, double x) {
  switch (kind) {
    case NormKind::two: return x * x;
    case NormKind::p: return pow(fabs(x), p);
    default: return fabs(x);
  }
}

// Combines two reduced values: a sum, or for the inf norm a NaN-propagating max.
FUSEDOPT_NORM_HD double norm_combine(NormKind kind, double a, double b) {
  if (kind != NormKind::inf) return a + b;
  if (a != a) return a;  // NaN
  return b > a || b != b ? b : a;
}

// The total norm from the reduced value: the sum of squares (two), of |x| (one), of |x|^p (p), or
// the largest |x| (inf).
FUSEDOPT_NORM_HD double finish_norm(NormKind kind, double p, double reduced) {
  switch (kind) {
    case NormKind::two: return sqrt(reduced);
    case NormKind::p: return pow(reduced, 1.0 / p);
    default: return reduced;
  }
}

// The clip coefficient exactly as torch.nn.utils.clip_grad_norm_ computes it from a total norm held
// in S (float or double): max_norm / (total_norm + 1e-6), which torch evaluates as
// reciprocal(total_norm + 1e-6) * max_norm, then clamped to at most 1 (a NaN stays NaN).
template <typename S>
FUSEDOPT_NORM_HD S clip_coefficient(S total_norm, double max_norm) {
  const S denom = total_norm + static_cast<S>(1e-6);
  const S coef = (S(1) / denom) * static_cast<S>(max_norm);
  return coef > S(1) ? S(1) : coef;
}

}  // namespace fusedopt
