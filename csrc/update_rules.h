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
#elif defined(__GNUC__)
// Always inlined: the CPU traversals instantiate the rules in several loops, and a rule called
// out of line costs its vector arguments a trip through memory on every element.
#define FUSEDOPT_HD inline __attribute__((always_inline))
#else
#define FUSEDOPT_HD inline
#endif

namespace fusedopt {

// Columns of the per-group hyperparameter table `hyper` (float64, one row per param group) that
// the ops take: the columns every rule shares come first, then the rule's own (the rule structs
// below). Python reads the names from the extension module (fusedopt._C.RULES).
// lr_index: the group's lr is lr_tensors[lr_index] (-1: the lr column).
// sched_begin / sched_count: the group's rows of the in-kernel schedule table (count 0: none).
namespace col {
enum : int { lr, lr_index, sched_begin, sched_count, first_rule };
}
// The most columns a row may have and the most state tensors a rule keeps per param: bounds of
// the fixed-size CUDA group and tensor tables.
constexpr int kMaxCols = 16;
constexpr int kMaxStates = 3;

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
  S inv_bias_correction2_sqrt;  // 1 / sqrt(1 - beta2^t)
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
  c.inv_bias_correction2_sqrt = S(1.0 / ::sqrt(bias_correction2));
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
  // torch divides sqrt(v) by sqrt(1 - beta2^t); multiplying by its reciprocal (rounded once, from
  // double) is within an ulp of that quotient and saves one of the two divides per element, which
  // with the square root bound Adam's arithmetic (bf16 params are compute-bound on the CPU).
  V denom;
  if (c.amsgrad) {
    vmax = fo_max(vmax, v);
    denom = fo_sqrt(vmax) * V(c.inv_bias_correction2_sqrt) + V(c.eps);
  } else {
    denom = fo_sqrt(v) * V(c.inv_bias_correction2_sqrt) + V(c.eps);
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

// ---------------------------------------------------------------------------------------
// The rules as plug-ins of the shared traversals
// ---------------------------------------------------------------------------------------
//
// Each backend walks every tensor of a step once (csrc/cpu/fused_step_cpu.cpp,
// csrc/cuda/fused_step_kernels.cu): it loads the param (or its float32 master), the gradient
// (unscaled and clipped) and the state tensors into math values whatever their storage dtypes,
// calls the rule's `update`, and stores them back (rounding the param as asked). A rule only says:
//   - its hyperparameter columns (after col::first_rule) and their names;
//   - its state roles, their torch state-dict keys, and when a group uses each (`kUses`; the op
//     takes each tensor's used states in role order);
//   - whether each param has a `step` counter the step increments (kHasStep);
//   - its per-(group, step) coefficients, computed in double like torch's Python scalars, and the
//     per-element update. `fresh` marks state never written yet (SGD's first momentum step).
// A new optimizer is one such struct here plus a Python class.

enum class RuleId : int32_t { adam = 0, sgd = 1, rmsprop = 2, adagrad = 3, lion = 4 };
constexpr int kNumRules = 5;

// When a group keeps a state role: always, or when one of its columns is nonzero / positive.
// Declarative, so that Python (fusedopt._C.RULES) reads the same conditions the host code does.
enum class Use : int32_t { always = 0, nonzero = 1, positive = 2 };
struct RoleUse {
  int col;
  Use use;
};

// The roles a group with hyper row `row` keeps, as a bit mask (bit k: role k). Host code only: the
// CUDA kernels read the mask from their group table.
template <typename Rule>
inline uint32_t role_mask(const double* row) {
  uint32_t mask = 0;
  for (int k = 0; k < Rule::kStates; ++k) {
    const RoleUse u = Rule::kUses[k];
    const bool on = u.use == Use::always ||
                    (u.use == Use::nonzero ? row[u.col] != 0.0 : row[u.col] > 0.0);
    mask |= (on ? 1u : 0u) << k;
  }
  return mask;
}

template <typename V>
FUSEDOPT_HD V fo_sign_scalar(V x) {
  return (x != x) ? x : (x > V(0) ? V(1) : (x < V(0) ? V(-1) : V(0)));
}
FUSEDOPT_HD float fo_sign(float x) { return fo_sign_scalar(x); }
FUSEDOPT_HD double fo_sign(double x) { return fo_sign_scalar(x); }

struct AdamRule {
  static constexpr RuleId kId = RuleId::adam;
  enum : int { beta1 = col::first_rule, beta2, eps, weight_decay, amsgrad, maximize, decoupled, count };
  static constexpr const char* kName = "adam";
  static constexpr const char* kColumns[] = {"beta1", "beta2", "eps", "weight_decay", "amsgrad",
                                             "maximize", "decoupled"};
  static constexpr int kStates = 3;
  static constexpr const char* kRoles[] = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"};
  static constexpr bool kHasStep = true;
  static constexpr RoleUse kUses[] = {{0, Use::always}, {0, Use::always}, {amsgrad, Use::nonzero}};
  template <typename S>
  using Coeffs = AdamCoeffs<S>;
  template <typename S>
  FUSEDOPT_HD static Coeffs<S> coeffs(const double* r, double lr, double step) {
    return make_adam_coeffs<S>(lr, r[beta1], r[beta2], r[eps], r[weight_decay], r[amsgrad] != 0.0,
                               r[maximize] != 0.0, r[decoupled] != 0.0, step);
  }
  template <typename V, typename S>
  FUSEDOPT_HD static void update(V& p, V g, V* s, bool /*fresh*/, const Coeffs<S>& c) {
    adam_update<V, S>(p, g, s[0], s[1], s[2], c);
  }
};

struct SgdRule {
  static constexpr RuleId kId = RuleId::sgd;
  enum : int { momentum = col::first_rule, dampening, weight_decay, nesterov, maximize, count };
  static constexpr const char* kName = "sgd";
  static constexpr const char* kColumns[] = {"momentum", "dampening", "weight_decay", "nesterov",
                                             "maximize"};
  static constexpr int kStates = 1;
  static constexpr const char* kRoles[] = {"momentum_buffer"};
  static constexpr bool kHasStep = false;
  static constexpr RoleUse kUses[] = {{momentum, Use::nonzero}};
  template <typename S>
  using Coeffs = SgdCoeffs<S>;
  template <typename S>
  FUSEDOPT_HD static Coeffs<S> coeffs(const double* r, double lr, double /*step*/) {
    return make_sgd_coeffs<S>(lr, r[momentum], r[dampening], r[weight_decay], r[nesterov] != 0.0,
                              r[maximize] != 0.0);
  }
  template <typename V, typename S>
  FUSEDOPT_HD static void update(V& p, V g, V* s, bool fresh, const Coeffs<S>& c) {
    sgd_update<V, S>(p, g, s[0], fresh, c);
  }
};

// torch.optim.RMSprop (`_single_tensor_rmsprop`), in its operation order.
struct RmspropRule {
  static constexpr RuleId kId = RuleId::rmsprop;
  enum : int { alpha = col::first_rule, eps, weight_decay, momentum, centered, maximize, count };
  static constexpr const char* kName = "rmsprop";
  static constexpr const char* kColumns[] = {"alpha", "eps", "weight_decay", "momentum", "centered",
                                             "maximize"};
  static constexpr int kStates = 3;
  static constexpr const char* kRoles[] = {"square_avg", "momentum_buffer", "grad_avg"};
  static constexpr bool kHasStep = true;
  static constexpr RoleUse kUses[] = {{0, Use::always}, {momentum, Use::positive},
                                      {centered, Use::nonzero}};
  template <typename S>
  struct Coeffs {
    S neg_lr, alpha, one_minus_alpha, eps, weight_decay, momentum;
    bool has_weight_decay, has_momentum, centered, maximize;
  };
  template <typename S>
  FUSEDOPT_HD static Coeffs<S> coeffs(const double* r, double lr, double /*step*/) {
    Coeffs<S> c;
    c.neg_lr = S(-lr);
    c.alpha = S(r[alpha]);
    c.one_minus_alpha = S(1.0 - r[alpha]);
    c.eps = S(r[eps]);
    c.weight_decay = S(r[weight_decay]);
    c.momentum = S(r[momentum]);
    c.has_weight_decay = r[weight_decay] != 0.0;
    c.has_momentum = r[momentum] > 0.0;
    c.centered = r[centered] != 0.0;
    c.maximize = r[maximize] != 0.0;
    return c;
  }
  template <typename V, typename S>
  FUSEDOPT_HD static void update(V& p, V g, V* s, bool /*fresh*/, const Coeffs<S>& c) {
    if (c.maximize) g = fo_neg(g);
    if (c.has_weight_decay) g = g + V(c.weight_decay) * p;
    V& square_avg = s[0];
    square_avg = square_avg * V(c.alpha);
    square_avg = square_avg + V(c.one_minus_alpha) * g * g;
    V avg;
    if (c.centered) {
      V& grad_avg = s[2];
      grad_avg = fo_lerp(grad_avg, g, c.one_minus_alpha);
      avg = fo_sqrt(square_avg + V(S(-1)) * grad_avg * grad_avg);
    } else {
      avg = fo_sqrt(square_avg);
    }
    avg = avg + V(c.eps);
    if (c.has_momentum) {
      V& buf = s[1];
      buf = buf * V(c.momentum);
      buf = buf + g / avg;
      p = p + V(c.neg_lr) * buf;
    } else {
      p = p + V(c.neg_lr) * (g / avg);
    }
  }
};

// torch.optim.Adagrad (`_single_tensor_adagrad`), in its operation order.
struct AdagradRule {
  static constexpr RuleId kId = RuleId::adagrad;
  enum : int { lr_decay = col::first_rule, weight_decay, eps, maximize, count };
  static constexpr const char* kName = "adagrad";
  static constexpr const char* kColumns[] = {"lr_decay", "weight_decay", "eps", "maximize"};
  static constexpr int kStates = 1;
  static constexpr const char* kRoles[] = {"sum"};
  static constexpr bool kHasStep = true;
  static constexpr RoleUse kUses[] = {{0, Use::always}};
  template <typename S>
  struct Coeffs {
    S neg_clr, eps, weight_decay;
    bool has_weight_decay, maximize;
  };
  template <typename S>
  FUSEDOPT_HD static Coeffs<S> coeffs(const double* r, double lr, double step) {
    Coeffs<S> c;
    c.neg_clr = S(-(lr / (1.0 + (step - 1.0) * r[lr_decay])));
    c.eps = S(r[eps]);
    c.weight_decay = S(r[weight_decay]);
    c.has_weight_decay = r[weight_decay] != 0.0;
    c.maximize = r[maximize] != 0.0;
    return c;
  }
  template <typename V, typename S>
  FUSEDOPT_HD static void update(V& p, V g, V* s, bool /*fresh*/, const Coeffs<S>& c) {
    if (c.maximize) g = fo_neg(g);
    if (c.has_weight_decay) g = g + V(c.weight_decay) * p;
    s[0] = s[0] + g * g;
    const V std = fo_sqrt(s[0]) + V(c.eps);
    p = p + V(c.neg_clr) * (g / std);
  }
};

// Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): the update is the
// sign of an interpolation of momentum and gradient; weight decay is decoupled.
struct LionRule {
  static constexpr RuleId kId = RuleId::lion;
  enum : int { beta1 = col::first_rule, beta2, weight_decay, maximize, count };
  static constexpr const char* kName = "lion";
  static constexpr const char* kColumns[] = {"beta1", "beta2", "weight_decay", "maximize"};
  static constexpr int kStates = 1;
  static constexpr const char* kRoles[] = {"exp_avg"};
  static constexpr bool kHasStep = false;
  static constexpr RoleUse kUses[] = {{0, Use::always}};
  template <typename S>
  struct Coeffs {
    S neg_lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay_factor;
    bool has_weight_decay, maximize;
  };
  template <typename S>
  FUSEDOPT_HD static Coeffs<S> coeffs(const double* r, double lr, double /*step*/) {
    Coeffs<S> c;
    c.neg_lr = S(-lr);
    c.beta1 = S(r[beta1]);
    c.one_minus_beta1 = S(1.0 - r[beta1]);
    c.beta2 = S(r[beta2]);
    c.one_minus_beta2 = S(1.0 - r[beta2]);
    c.decay_factor = S(1.0 - lr * r[weight_decay]);
    c.has_weight_decay = r[weight_decay] != 0.0;
    c.maximize = r[maximize] != 0.0;
    return c;
  }
  template <typename V, typename S>
  FUSEDOPT_HD static void update(V& p, V g, V* s, bool /*fresh*/, const Coeffs<S>& c) {
    if (c.maximize) g = fo_neg(g);
    V& m = s[0];
    const V direction = fo_sign(m * V(c.beta1) + g * V(c.one_minus_beta1));
    if (c.has_weight_decay) p = p * V(c.decay_factor);
    p = p + V(c.neg_lr) * direction;
    m = m * V(c.beta2) + g * V(c.one_minus_beta2);
  }
};

// Calls f(Rule{}) for a rule id: how the backends and the host code go from a runtime id to the
// rule's static description.
template <typename F>
FUSEDOPT_HD auto visit_rule(RuleId id, F&& f) {
  switch (id) {
    case RuleId::sgd: return f(SgdRule{});
    case RuleId::rmsprop: return f(RmspropRule{});
    case RuleId::adagrad: return f(AdagradRule{});
    case RuleId::lion: return f(LionRule{});
    default: return f(AdamRule{});
  }
}

static_assert(AdamRule::count <= kMaxCols && SgdRule::count <= kMaxCols &&
              RmspropRule::count <= kMaxCols && AdagradRule::count <= kMaxCols &&
              LionRule::count <= kMaxCols, "a rule's row must fit a CUDA group row");

}  // namespace fusedopt
