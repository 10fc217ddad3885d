// The per-element update rules of every fusedopt optimizer, written once.
//
// Both the CPU kernels (with V = float, double or at::vec::Vectorized<float|double>)
// and the CUDA kernels (V = float or double) include this header, so the two backends
// cannot drift apart. The operation order mirrors torch.optim's for-loop implementation
// (`_single_tensor_adam`, `_single_tensor_sgd`) so float32 results agree to rounding.
//
// Plain C++ only: no torch headers, so nvcc compiles it quickly.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FUSEDOPT_HD __host__ __device__ __forceinline__
#else
#define FUSEDOPT_HD inline
#endif

namespace fusedopt {

// Columns of the per-group hyperparameter table `hyper` (float64, one row per param
// group) that the ops take. Python reads these numbers from the extension module.
// sched_begin / sched_count: the group's rows of the in-kernel schedule table (count 0: none).
namespace adam_col {
enum : int {
  lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled, lr_index, sched_begin,
  sched_count, count
};
}
namespace sgd_col {
enum : int {
  lr, momentum, dampening, weight_decay, nesterov, maximize, lr_index, sched_begin, sched_count,
  count
};
}

// ---------------------------------------------------------------------------------------
// In-kernel learning-rate schedules
// ---------------------------------------------------------------------------------------

// A schedule is a list of phases, one row of `phase_col::count` doubles each. At step t the
// active phase is the last one whose start <= t; u = t - start. fusedopt.lr_scheduler builds the
// rows from a closed-form scheduler (fusedopt/lr_scheduler/phases.py holds the same formulas
// in Python as the reference the tests compare against).
namespace phase_col {
enum : int { start, kind, a, b, n, gamma, power, flag, count };
}
enum PhaseKind : int {
  kConstant = 0,     // a
  kLinear = 1,       // a + (b - a) * min(u, n) / n
  kCosine = 2,       // b + (a - b) * (1 + cos(pi * v / n)) / 2, v = flag ? min(u, n) : u
  kStepExp = 3,      // a * gamma ^ floor(u / n)
  kPoly = 4,         // (a - b) * (1 - min(u, n) / n) ^ power + b; flag: cycle the horizon
  kNaturalExp = 5,   // a * exp(-gamma * u)
  kInverseTime = 6,  // a / (1 + gamma * u)
  kNoam = 7,         // a * min(u ^ -0.5, u * n ^ -1.5), 0 at u = 0
  kSqrtDecay = 8,    // b + (a - b) * (1 - sqrt(min(u, n) / n))
};

FUSEDOPT_HD double schedule_lr(const double* rows, int64_t count, double t) {
  int64_t k = 0;
  for (int64_t i = 1; i < count; ++i) {
    if (rows[i * phase_col::count + phase_col::start] <= t) k = i;
  }
  const double* r = rows + k * phase_col::count;
  const double u = t - r[phase_col::start];
  const double a = r[phase_col::a], b = r[phase_col::b], n = r[phase_col::n];
  const double gamma = r[phase_col::gamma], power = r[phase_col::power];
  const bool flag = r[phase_col::flag] != 0.0;
  const double clipped = u < n ? u : n;
  switch (static_cast<int>(r[phase_col::kind])) {
    case kLinear: return a + (b - a) * clipped / n;
    case kCosine: {
      const double v = flag ? clipped : u;
      return b + (a - b) * (1.0 + ::cos(3.141592653589793 * v / n)) / 2.0;
    }
    case kStepExp: return a * ::pow(gamma, ::floor(u / n));
    case kPoly: {
      if (flag) {
        const double horizon = u > 0.0 ? n * ::ceil(u / n) : n;
        return (a - b) * ::pow(1.0 - u / horizon, power) + b;
      }
      return (a - b) * ::pow(1.0 - clipped / n, power) + b;
    }
    case kNaturalExp: return a * ::exp(-gamma * u);
    case kInverseTime: return a / (1.0 + gamma * u);
    case kNoam: {
      if (u <= 0.0) return 0.0;
      const double warm = u * ::pow(n, -1.5), decay = 1.0 / ::sqrt(u);
      return a * (warm < decay ? warm : decay);
    }
    case kSqrtDecay: return b + (a - b) * (1.0 - ::sqrt(clipped / n));
    default: return a;  // kConstant
  }
}

// Scalar helpers overloaded for float and double here; the CPU kernel adds overloads
// for at::vec::Vectorized before including this header.
FUSEDOPT_HD float fo_sqrt(float x) { return ::sqrtf(x); }
FUSEDOPT_HD double fo_sqrt(double x) { return ::sqrt(x); }
FUSEDOPT_HD float fo_neg(float x) { return -x; }
FUSEDOPT_HD double fo_neg(double x) { return -x; }
// NaN-propagating maximum, like torch.maximum.
template <typename S>
FUSEDOPT_HD S fo_max_scalar(S a, S b) {
  return (a != a) ? a : ((b != b) ? b : (a > b ? a : b));
}
FUSEDOPT_HD float fo_max(float a, float b) { return fo_max_scalar(a, b); }
FUSEDOPT_HD double fo_max(double a, double b) { return fo_max_scalar(a, b); }

// torch.lerp with a scalar weight: the two-sided formula keeps it exact at w = 0 and 1.
template <typename V, typename S>
FUSEDOPT_HD V fo_lerp(const V& self, const V& end, S weight) {
  if ((weight < S(0) ? -weight : weight) < S(0.5)) {
    return self + V(weight) * (end - self);
  }
  return end - (end - self) * V(S(1) - weight);
}

// ---------------------------------------------------------------------------------------
// Adam / AdamW
// ---------------------------------------------------------------------------------------

// The scalars of one Adam step of one tensor. Computed in double like torch's Python
// scalars, then rounded to the math type S (float for float32/float16/bfloat16 params).
template <typename S>
struct AdamCoeffs {
  S beta2, eps, weight_decay;
  S one_minus_beta1;        // lerp weight
  S one_minus_beta2;        // addcmul value
  S neg_step_size;          // -lr / (1 - beta1^t)
  S bias_correction2_sqrt;  // sqrt(1 - beta2^t)
  S decay_factor;           // 1 - lr * weight_decay (decoupled weight decay)
  bool has_weight_decay, decoupled, amsgrad, maximize;
};

// `step` is the step count after this step's increment (1 on the first step).
template <typename S>
FUSEDOPT_HD AdamCoeffs<S> make_adam_coeffs(double lr, double beta1, double beta2, double eps,
                                           double weight_decay, bool amsgrad, bool maximize,
                                           bool decoupled, double step) {
  AdamCoeffs<S> c;
  const double bias_correction1 = 1.0 - ::pow(beta1, step);
  const double bias_correction2 = 1.0 - ::pow(beta2, step);
  c.beta2 = S(beta2);
  c.eps = S(eps);
  c.weight_decay = S(weight_decay);
  c.one_minus_beta1 = S(1.0 - beta1);
  c.one_minus_beta2 = S(1.0 - beta2);
  c.neg_step_size = S(-(lr / bias_correction1));
  c.bias_correction2_sqrt = S(::sqrt(bias_correction2));
  c.decay_factor = S(1.0 - lr * weight_decay);
  c.has_weight_decay = weight_decay != 0.0;
  c.decoupled = decoupled;
  c.amsgrad = amsgrad;
  c.maximize = maximize;
  return c;
}

// One Adam update of values held in registers. `vmax` is read and written only when
// c.amsgrad is set.
template <typename V, typename S>
FUSEDOPT_HD void adam_update(V& p, V g, V& m, V& v, V& vmax, const AdamCoeffs<S>& c) {
  if (c.maximize) g = fo_neg(g);
  if (c.has_weight_decay) {
    if (c.decoupled) {
      p = p * V(c.decay_factor);
    } else {
      g = g + V(c.weight_decay) * p;
    }
  }
  m = fo_lerp(m, g, c.one_minus_beta1);
  v = v * V(c.beta2);
  v = v + V(c.one_minus_beta2) * g * g;
  V denom;
  if (c.amsgrad) {
    vmax = fo_max(vmax, v);
    denom = fo_sqrt(vmax) / V(c.bias_correction2_sqrt) + V(c.eps);
  } else {
    denom = fo_sqrt(v) / V(c.bias_correction2_sqrt) + V(c.eps);
  }
  p = p + V(c.neg_step_size) * m / denom;
}

// ---------------------------------------------------------------------------------------
// SGD
// ---------------------------------------------------------------------------------------

template <typename S>
struct SgdCoeffs {
  S neg_lr, momentum, one_minus_dampening, weight_decay;
  bool has_weight_decay, has_momentum, nesterov, maximize;
};

template <typename S>
FUSEDOPT_HD SgdCoeffs<S> make_sgd_coeffs(double lr, double momentum, double dampening,
                                         double weight_decay, bool nesterov, bool maximize) {
  SgdCoeffs<S> c;
  c.neg_lr = S(-lr);
  c.momentum = S(momentum);
  c.one_minus_dampening = S(1.0 - dampening);
  c.weight_decay = S(weight_decay);
  c.has_weight_decay = weight_decay != 0.0;
  c.has_momentum = momentum != 0.0;
  c.nesterov = nesterov;
  c.maximize = maximize;
  return c;
}

// One SGD update. `first` marks a momentum buffer that has never been written: torch
// initialises it with the (decayed) gradient itself instead of the momentum formula.
template <typename V, typename S>
FUSEDOPT_HD void sgd_update(V& p, V g, V& buf, bool first, const SgdCoeffs<S>& c) {
  if (c.maximize) g = fo_neg(g);
  if (c.has_weight_decay) g = g + V(c.weight_decay) * p;
  if (c.has_momentum) {
    if (first) {
      buf = g;
    } else {
      buf = buf * V(c.momentum);
      buf = buf + V(c.one_minus_dampening) * g;
    }
    if (c.nesterov) {
      g = g + V(c.momentum) * buf;
    } else {
      g = buf;
    }
  }
  p = p + V(c.neg_lr) * g;
}

}  // namespace fusedopt
