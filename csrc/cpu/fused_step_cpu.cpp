// CPU implementation of the fused ops: one parallel region per step over the flattened
// work list of all tensors of all param groups, SIMD through at::vec with a scalar tail.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <type_traits>

#if defined(FUSEDOPT_CPU_AVX2)
#include <immintrin.h>
#endif

namespace fusedopt {
// at::vec overloads of the helpers the shared update rules call; they must be declared
// before update_rules.h so its templates see them.
template <typename T>
inline at::vec::Vectorized<T> fo_sqrt(const at::vec::Vectorized<T>& x) { return x.sqrt(); }
template <typename T>
inline at::vec::Vectorized<T> fo_neg(const at::vec::Vectorized<T>& x) { return x.neg(); }
template <typename T>
inline at::vec::Vectorized<T> fo_sign(const at::vec::Vectorized<T>& x) {
  using V = at::vec::Vectorized<T>;
  const V zero(T(0)), one(T(1));
  const V sign = ((x > zero) & one) - ((x < zero) & one);
  return V::blendv(sign, x, x.isnan());  // NaN stays NaN, like torch.sign
}
template <typename T>
inline at::vec::Vectorized<T> fo_max(const at::vec::Vectorized<T>& a,
                                     const at::vec::Vectorized<T>& b) {
  return at::vec::maximum(a, b);  // NaN-propagating, like torch.maximum
}
}  // namespace fusedopt

#include "../precision.h"
#include "../step_args.h"
#include "../update_rules.h"
#include "parallel_chunks.h"

namespace fusedopt {
namespace {


// The scalars every element of a step reads: GradScaler's unscale (the float32 reciprocal of the
// scale, as GradScaler.unscale_ computes it, so a fused step matches unscale-then-step exactly)
// and the clip coefficient of fusedopt::grad_norm_.
struct GradScalars {
  bool unscale = false;
  float inv_scale = 1.0f;
  bool clip = false;
  double clip_coef = 1.0;  // as the clip holds it; float32 math uses it rounded to float, as torch
};

// Elements of one tensor converted at a time: the rule then runs on math values in L1-resident
// buffers, whatever each role's storage type; a role stored in the math type is used in place.
// A tensor whose every role is stored in the math type needs no conversion and takes longer
// blocks, so the per-block setup vanishes.
constexpr int64_t kBlockElems = 256;
constexpr int64_t kInPlaceBlockElems = 4096;

template <typename S>
constexpr Elem math_elem() {
  return std::is_same_v<S, double> ? Elem::f64 : Elem::f32;
}

// 16-bit values to float32, vectorized (at::vec::convert has no vector path in this direction).
template <typename T>
void widen_16bit(const T* src, float* dst, int64_t n) {
  using Vec16 = at::vec::Vectorized<T>;
  using VecF = at::vec::Vectorized<float>;
  int64_t i = 0;
  for (; i + Vec16::size() <= n; i += Vec16::size()) {
    const auto both = at::vec::convert_to_float<T>(Vec16::loadu(src + i));
    std::get<0>(both).store(dst + i);
    std::get<1>(both).store(dst + i + VecF::size());
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename S>
void load_block(const void* base, Elem e, int64_t begin, int64_t n, S* dst) {
  switch (e) {
    case Elem::f32: at::vec::convert(static_cast<const float*>(base) + begin, dst, n); break;
    case Elem::f64: at::vec::convert(static_cast<const double*>(base) + begin, dst, n); break;
    case Elem::f16:
      if constexpr (std::is_same_v<S, float>) {
        widen_16bit(static_cast<const c10::Half*>(base) + begin, dst, n);
      } else {
        at::vec::convert(static_cast<const c10::Half*>(base) + begin, dst, n);
      }
      break;
    default:
      if constexpr (std::is_same_v<S, float>) {
        widen_16bit(static_cast<const c10::BFloat16*>(base) + begin, dst, n);
      } else {
        at::vec::convert(static_cast<const c10::BFloat16*>(base) + begin, dst, n);
      }
      break;
  }
}

// Stores with round-to-nearest-even, as torch's .to() rounds.
template <typename S>
void store_block(const S* src, void* base, Elem e, int64_t begin, int64_t n) {
  switch (e) {
    case Elem::f32: at::vec::convert(src, static_cast<float*>(base) + begin, n); break;
    case Elem::f64: at::vec::convert(src, static_cast<double*>(base) + begin, n); break;
    case Elem::f16: at::vec::convert(src, static_cast<c10::Half*>(base) + begin, n); break;
    default: at::vec::convert(src, static_cast<c10::BFloat16*>(base) + begin, n); break;
  }
}

// A role's math values for elements [begin, begin + n): the storage itself when it holds the
// math type, else `scratch` filled by conversion.
template <typename S>
S* math_view(void* base, Elem e, int64_t begin, int64_t n, S* scratch) {
  if (e == math_elem<S>()) return static_cast<S*>(base) + begin;
  load_block(base, e, begin, n, scratch);
  return scratch;
}

#if defined(FUSEDOPT_CPU_AVX2)
using VecF = at::vec::Vectorized<float>;

// The register path's conversions, for the vector width at::vec was built with: W float lanes
// (8 with AVX2, 16 with AVX-512) and their W 16-bit values in one half-width integer register
// (`Bits`), 2W of them in a full-width one (`Bits2`). Only moving 16-bit lanes in and out, and the
// float16 conversions, differ between the instruction sets; the bit arithmetic below is written
// once, on int32 lanes. The rounding instructions are the ones at::vec::convert uses, so the bits
// equal the block path's.
using VecI = at::vec::Vectorized<int32_t>;
#if defined(CPU_CAPABILITY_AVX512)
using Bits = __m256i;
using Bits2 = __m512i;
C10_ALWAYS_INLINE Bits load_bits(const uint16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
C10_ALWAYS_INLINE void store_bits(uint16_t* p, Bits b) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), b); }
C10_ALWAYS_INLINE Bits2 load_bits2(const uint16_t* p) { return _mm512_loadu_si512(p); }
C10_ALWAYS_INLINE void store_bits2(uint16_t* p, Bits2 b) { _mm512_storeu_si512(p, b); }
C10_ALWAYS_INLINE Bits low_bits(Bits2 b) { return _mm512_castsi512_si256(b); }
C10_ALWAYS_INLINE Bits high_bits(Bits2 b) { return _mm512_extracti64x4_epi64(b, 1); }
C10_ALWAYS_INLINE Bits2 join_bits(Bits lo, Bits hi) { return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1); }
C10_ALWAYS_INLINE VecI bits_of(const VecF& v) { return _mm512_castps_si512(v); }
C10_ALWAYS_INLINE VecF float_of(const VecI& v) { return _mm512_castsi512_ps(v); }
C10_ALWAYS_INLINE VecI widen_u16(Bits h) { return _mm512_cvtepu16_epi32(h); }
C10_ALWAYS_INLINE VecI widen_s16(Bits h) { return _mm512_cvtepi16_epi32(h); }
C10_ALWAYS_INLINE Bits low_halves(const VecI& v) { return _mm512_cvtepi32_epi16(v); }  // truncates
C10_ALWAYS_INLINE VecF widen_f16(Bits h) { return _mm512_cvtph_ps(h); }
C10_ALWAYS_INLINE Bits narrow_f16(const VecF& v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT); }
#else
using Bits = __m128i;
using Bits2 = __m256i;
C10_ALWAYS_INLINE Bits load_bits(const uint16_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
C10_ALWAYS_INLINE void store_bits(uint16_t* p, Bits b) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), b); }
C10_ALWAYS_INLINE Bits2 load_bits2(const uint16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
C10_ALWAYS_INLINE void store_bits2(uint16_t* p, Bits2 b) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), b); }
C10_ALWAYS_INLINE Bits low_bits(Bits2 b) { return _mm256_castsi256_si128(b); }
C10_ALWAYS_INLINE Bits high_bits(Bits2 b) { return _mm256_extracti128_si256(b, 1); }
C10_ALWAYS_INLINE Bits2 join_bits(Bits lo, Bits hi) { return _mm256_set_m128i(hi, lo); }
C10_ALWAYS_INLINE VecI bits_of(const VecF& v) { return _mm256_castps_si256(v); }
C10_ALWAYS_INLINE VecF float_of(const VecI& v) { return _mm256_castsi256_ps(v); }
C10_ALWAYS_INLINE VecI widen_u16(Bits h) { return _mm256_cvtepu16_epi32(h); }
C10_ALWAYS_INLINE VecI widen_s16(Bits h) { return _mm256_cvtepi16_epi32(h); }
C10_ALWAYS_INLINE Bits low_halves(const VecI& v) {
  // AVX2 packs with saturation: keep the low halves first; the permute undoes packus's
  // interleaving of 128-bit lanes, so the 8 results are in order
  const __m256i low = _mm256_and_si256(v, _mm256_set1_epi32(0xffff));
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(low, low), 0xd8));
}
C10_ALWAYS_INLINE VecF widen_f16(Bits h) { return _mm256_cvtph_ps(h); }
C10_ALWAYS_INLINE Bits narrow_f16(const VecF& v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT); }
#endif

// (int32 lanes: >> shifts arithmetically; the results keep only low halves, or mask first)
C10_ALWAYS_INLINE VecF widen_bf16(Bits h) { return float_of(widen_u16(h) << VecI(16)); }

// bf16_bits_nearest_away (precision.h) of W floats.
C10_ALWAYS_INLINE Bits bf16_nearest_away(const VecF& v) {
  const VecI u = bits_of(v);
  const VecI nan = (u & VecI(0x7fffffff)) > VecI(0x7f800000);
  return low_halves(VecI::blendv((u + VecI(0x8000)) >> VecI(16), (u >> VecI(16)) | VecI(0x40), nan));
}

// join_master (precision.h) of W params and remainders.
C10_ALWAYS_INLINE VecF join_master_vec(Bits param_bits, Bits remainder) {
  const VecI r = widen_s16(remainder);
  const VecI high = widen_u16(param_bits) + (r >> VecI(31));  // minus one for a negative remainder
  return float_of((high << VecI(16)) | (r & VecI(0xffff)));
}

// split_master's remainder of W floats (its param is bf16_nearest_away): the low 16 bits, 0 for NaN.
C10_ALWAYS_INLINE Bits remainder_bits(const VecF& v) {
  const VecI u = bits_of(v);
  const VecI nan = (u & VecI(0x7fffffff)) > VecI(0x7f800000);
  return low_halves(VecI::blendv(u, VecI(0), nan));
}

// bf16_bits_stochastic of W floats, element `first + lane` drawing rounding_bits_keyed(key, .).
C10_ALWAYS_INLINE Bits bf16_stochastic(const VecF& v, uint32_t key, uint32_t first) {
  const auto u32 = [](uint32_t x) { return VecI(static_cast<int32_t>(x)); };
  const auto shift_xor = [](const VecI& h, int k) { return h ^ ((h >> VecI(k)) & VecI(static_cast<int32_t>(0xffffffffu >> k))); };
  VecI h = u32(key) ^ ((u32(first) + VecI::arange(0, 1)) * u32(0x9e3779b1u));
  h = shift_xor(shift_xor(shift_xor(h, 16) * u32(0x85ebca6bu), 13) * u32(0xc2b2ae35u), 16);
  const VecI u = bits_of(v), mag = u & VecI(0x7fffffff), high = u >> VecI(16);
  VecI bits = (u + (h & VecI(0xffff))) >> VecI(16);
  bits = VecI::blendv(bits, high, mag == VecI(0x7f800000));  // +-inf stays
  bits = VecI::blendv(bits, high | VecI(0x40), mag > VecI(0x7f800000));
  return low_halves(bits);
}

// A storage type fixed at compile time, or kDynamic: the one passed at run time. The register
// path is instantiated for the common role layouts, where the conversions then have no branches.
constexpr int kDynamic = -1;
// How the register path stores the param: a Master kind (none: to nearest even; full; remainder),
// or kStochastic: a bfloat16 param without a master, rounded stochastically.
constexpr int kStochastic = 3;

C10_ALWAYS_INLINE VecF widen(Elem e, Bits h) { return e == Elem::bf16 ? widen_bf16(h) : widen_f16(h); }

// One vector (W elements) of a float32 / float16 / bfloat16 role as floats, converted in
// registers (the block path below converts through L1 buffers instead).
template <int E>
C10_ALWAYS_INLINE VecF load_vec(const void* base, Elem dynamic, int64_t i) {
  const Elem e = E == kDynamic ? dynamic : static_cast<Elem>(E);
  if (e == Elem::f32) return VecF::loadu(static_cast<const float*>(base) + i);
  return widen(e, load_bits(static_cast<const uint16_t*>(base) + i));
}

// Stores one vector, 16-bit roles rounded to nearest even.
template <int E>
C10_ALWAYS_INLINE void store_vec(void* base, Elem dynamic, int64_t i, const VecF& v) {
  const Elem e = E == kDynamic ? dynamic : static_cast<Elem>(E);
  if (e == Elem::f32) {
    v.store(static_cast<float*>(base) + i);
    return;
  }
  auto* out = static_cast<uint16_t*>(base) + i;
  store_bits(out, e == Elem::bf16 ? at::vec::cvtfp32_bf16(v) : narrow_f16(v));
}

// Two vectors (2W elements), and back: one full-width load or store per 16-bit role, and one pack
// for both halves.
template <int E>
C10_ALWAYS_INLINE void load_vec2(const void* base, Elem dynamic, int64_t i, VecF& a, VecF& b) {
  const Elem e = E == kDynamic ? dynamic : static_cast<Elem>(E);
  if (e == Elem::f32) {
    a = VecF::loadu(static_cast<const float*>(base) + i);
    b = VecF::loadu(static_cast<const float*>(base) + i + VecF::size());
    return;
  }
  const Bits2 h = load_bits2(static_cast<const uint16_t*>(base) + i);
  a = widen(e, low_bits(h));
  b = widen(e, high_bits(h));
}

template <int E>
C10_ALWAYS_INLINE void store_vec2(void* base, Elem dynamic, int64_t i, const VecF& a, const VecF& b) {
  const Elem e = E == kDynamic ? dynamic : static_cast<Elem>(E);
  if (e == Elem::f32) {
    a.store(static_cast<float*>(base) + i);
    b.store(static_cast<float*>(base) + i + VecF::size());
    return;
  }
  auto* out = static_cast<uint16_t*>(base) + i;
  store_bits2(out, e == Elem::bf16 ? at::vec::cvtfp32_bf16(a, b) : join_bits(narrow_f16(a), narrow_f16(b)));
}

// Whether the register path below can take a float-math tensor: every role float32, float16 or
// bfloat16, and some role stored in 16 bits (all-float32 tensors take the in-place block path).
// A stochastically rounded param only with two or more states: there (Adam) the vector hash in
// registers measured faster than the block path's rounding loop, with one state (SGD, RMSprop)
// slower (GPT-2 bf16 on AVX-512: Adam 76 -> 61 ms, SGD 52 -> 87 ms).
inline bool register_path_fits(const TensorSlot& s, uint32_t roles, int kStates, bool stochastic) {
  if (s.dtype == Elem::f64) return false;
  if (stochastic && __builtin_popcount(roles) < 2) return false;
  bool narrow = s.dtype != Elem::f32;
  for (int k = 0; k < kStates; ++k) {
    if (!(roles & (1u << k))) continue;
    if (s.state_dtype[k] == Elem::f64) return false;
    narrow = narrow || s.state_dtype[k] != Elem::f32;
  }
  return narrow;
}

// N (1 or 2) vectors of a role.
template <int E, int N>
C10_ALWAYS_INLINE void load_n(const void* base, Elem dynamic, int64_t i, VecF* v) {
  if constexpr (N == 2) {
    load_vec2<E>(base, dynamic, i, v[0], v[1]);
  } else {
    v[0] = load_vec<E>(base, dynamic, i);
  }
}

template <int E, int N>
C10_ALWAYS_INLINE void store_n(void* base, Elem dynamic, int64_t i, const VecF* v) {
  if constexpr (N == 2) {
    store_vec2<E>(base, dynamic, i, v[0], v[1]);
  } else {
    store_vec<E>(base, dynamic, i, v[0]);
  }
}

// The elements [begin, end) of a float-math tensor N vectors a turn, every role converted in
// registers; returns where it stopped. The same operations in the same order as the block path,
// so the results are the same bits. GE: the grad's (and the param's) storage type; SE: every used
// state's; MASTER: how the param is stored (a Master kind or kStochastic; each may be kDynamic).
// `sr_key`: the stochastic rounding key of these elements (rounding_key), null without it.
template <typename Rule, int GE, int SE, int MASTER, int N>
int64_t rule_registers_by(const TensorSlot& s, int64_t begin, int64_t end, uint32_t roles,
                          const typename Rule::template Coeffs<float>& c, const GradScalars& gs,
                          const uint32_t* sr_key) {
  constexpr int kStates = Rule::kStates;
  constexpr int64_t W = VecF::size();
  const int kind = MASTER == kDynamic ? (sr_key != nullptr ? kStochastic : static_cast<int>(s.master_kind)) : MASTER;
  const bool master = kind == static_cast<int>(Master::full);
  const bool remainder = kind == static_cast<int>(Master::remainder), stochastic = kind == kStochastic;
  auto* const param_bits = static_cast<uint16_t*>(s.param);
  auto* const remainder_base = static_cast<uint16_t*>(s.master);
  void* const pbase = master ? s.master : s.param;
  const Elem pe = master ? Elem::f32 : s.dtype;
  // the param's type inside the loop: float32 with a master, else the grad's
  constexpr int PE = MASTER == 1 ? static_cast<int>(Elem::f32) : (MASTER == 0 || MASTER == kStochastic ? GE : kDynamic);
  const VecF inv_scale(gs.inv_scale), clip_coef(static_cast<float>(gs.clip_coef));
  int64_t i = begin;
  for (; i + N * W <= end; i += N * W) {
    VecF p[N], g[N], st[N][kStates > 0 ? kStates : 1];
    if (remainder) {
      for (int h = 0; h < N; ++h) {
        p[h] = join_master_vec(load_bits(param_bits + i + h * W), load_bits(remainder_base + i + h * W));
      }
    } else {
      load_n<PE, N>(pbase, pe, i, p);
    }
    load_n<GE, N>(s.grad, s.dtype, i, g);
    if (gs.unscale) {
      for (int h = 0; h < N; ++h) g[h] = g[h] * inv_scale;
      store_n<GE, N>(s.grad, s.dtype, i, g);
    }
    if (gs.clip) {
      for (int h = 0; h < N; ++h) g[h] = g[h] * clip_coef;
    }
    for (int k = 0; k < kStates; ++k) {
      VecF v[N];
      if (roles & (1u << k)) {
        load_n<SE, N>(s.state[k], s.state_dtype[k], i, v);
      } else {
        for (int h = 0; h < N; ++h) v[h] = VecF(0.0f);  // an unused role: never stored
      }
      for (int h = 0; h < N; ++h) st[h][k] = v[h];
    }
    for (int h = 0; h < N; ++h) Rule::template update<VecF, float>(p[h], g[h], st[h], s.fresh, c);
    if (remainder) {  // split_master: the param to nearest, ties away, and the low bits
      for (int h = 0; h < N; ++h) {
        store_bits(param_bits + i + h * W, bf16_nearest_away(p[h]));
        store_bits(remainder_base + i + h * W, remainder_bits(p[h]));
      }
    } else if (stochastic) {  // (its elements never cross a multiple of 2^32: one key holds)
      for (int h = 0; h < N; ++h) {
        store_bits(param_bits + i + h * W, bf16_stochastic(p[h], *sr_key, static_cast<uint32_t>(i + h * W)));
      }
    } else {
      store_n<PE, N>(pbase, pe, i, p);
    }
    if (master) {
      if (s.dtype == Elem::bf16) {
        for (int h = 0; h < N; ++h) store_bits(param_bits + i + h * W, bf16_nearest_away(p[h]));
      } else if (s.dtype != Elem::f32) {
        store_n<GE, N>(s.param, s.dtype, i, p);  // float16: to nearest even
      }
    }
    for (int k = 0; k < kStates; ++k) {
      if (!(roles & (1u << k))) continue;
      VecF v[N];
      for (int h = 0; h < N; ++h) v[h] = st[h][k];
      store_n<SE, N>(s.state[k], s.state_dtype[k], i, v);
    }
  }
  return i;
}

// Two vectors a turn (two independent updates in flight) for rules with at most one state, then
// one: Adam's two updates measured slower paired, with AVX2's 16 registers and AVX-512's 32. The block
// path takes what is left.
template <typename Rule, int GE, int SE, int MASTER>
int64_t rule_registers(const TensorSlot& s, int64_t begin, int64_t end, uint32_t roles,
                       const typename Rule::template Coeffs<float>& c, const GradScalars& gs,
                       const uint32_t* sr_key) {
  if constexpr (Rule::kStates <= 1) {
    begin = rule_registers_by<Rule, GE, SE, MASTER, 2>(s, begin, end, roles, c, gs, sr_key);
  }
  return rule_registers_by<Rule, GE, SE, MASTER, 1>(s, begin, end, roles, c, gs, sr_key);
}

// The register path for a tensor: a branch-free instantiation for the common layouts (16-bit
// params with states in their dtype, or with a float32 master and float32 states; bfloat16 params
// with remainders and bfloat16 states; float32 params with bfloat16 states), the dynamic one for
// the rest.
template <typename Rule>
int64_t rule_registers_any(const TensorSlot& s, int64_t begin, int64_t end, uint32_t roles,
                           const typename Rule::template Coeffs<float>& c, const GradScalars& gs,
                           const uint32_t* sr_key) {
  constexpr int f32 = static_cast<int>(Elem::f32), bf16 = static_cast<int>(Elem::bf16),
                f16 = static_cast<int>(Elem::f16);
  bool same = true;  // every used state in one type, `state`
  Elem state = s.dtype;
  bool first = true;
  for (int k = 0; k < Rule::kStates; ++k) {
    if (!(roles & (1u << k))) continue;
    if (first) state = s.state_dtype[k];
    same = same && s.state_dtype[k] == state;
    first = false;
  }
  constexpr int none = static_cast<int>(Master::none), full = static_cast<int>(Master::full),
                rem = static_cast<int>(Master::remainder);
  const bool nearest = s.master_kind == Master::none && sr_key == nullptr;
  const bool master = s.master_kind == Master::full, remainder = s.master_kind == Master::remainder;
  if (same) {
    if (nearest && s.dtype == Elem::bf16 && state == Elem::bf16) return rule_registers<Rule, bf16, bf16, none>(s, begin, end, roles, c, gs, sr_key);
    if (nearest && s.dtype == Elem::f16 && state == Elem::f16) return rule_registers<Rule, f16, f16, none>(s, begin, end, roles, c, gs, sr_key);
    if (master && s.dtype == Elem::bf16 && state == Elem::f32) return rule_registers<Rule, bf16, f32, full>(s, begin, end, roles, c, gs, sr_key);
    if (master && s.dtype == Elem::f16 && state == Elem::f32) return rule_registers<Rule, f16, f32, full>(s, begin, end, roles, c, gs, sr_key);
    if (remainder && state == Elem::bf16) return rule_registers<Rule, bf16, bf16, rem>(s, begin, end, roles, c, gs, sr_key);
    if (sr_key != nullptr && state == Elem::bf16) return rule_registers<Rule, bf16, bf16, kStochastic>(s, begin, end, roles, c, gs, sr_key);
    if (nearest && s.dtype == Elem::f32 && state == Elem::bf16) return rule_registers<Rule, f32, bf16, none>(s, begin, end, roles, c, gs, sr_key);
  }
  return rule_registers<Rule, kDynamic, kDynamic, kDynamic>(s, begin, end, roles, c, gs, sr_key);
}
#endif

// One tensor's elements [begin, end) through rule `Rule` in math type S. `index`: the tensor's
// place in the step (it seeds stochastic rounding).
template <typename Rule, typename S>
void rule_chunk(const TensorSlot& s, int64_t index, int64_t begin, int64_t end, uint32_t roles,
                const typename Rule::template Coeffs<S>& coeffs, const GradScalars& gs, int64_t seed,
                double step) {
  using Vec = at::vec::Vectorized<S>;
  constexpr int64_t W = Vec::size();
  constexpr int kStates = Rule::kStates;
  // A local copy: stores through the float pointers below cannot alias it, so the compiler keeps
  // the coefficients in registers instead of reloading them every vector.
  const typename Rule::template Coeffs<S> c = coeffs;
  const uint64_t seed_bits = step_seed(seed, step);
  // Conversion scratch per role, and one block that the roles a group does not use read and write
  // (its values are never used or stored), so the vector loop has no per-role branches.
  alignas(64) S buf[2 + kStates][kBlockElems];
  alignas(64) static thread_local S unused_role[kInPlaceBlockElems] = {};
  const Elem math = math_elem<S>();
  const bool param_in_place = s.master_kind == Master::none && s.dtype == math;
  const bool grad_in_place = s.dtype == math;
  const Vec inv_scale(static_cast<S>(gs.inv_scale)), clip_coef(static_cast<S>(gs.clip_coef));
  bool in_place = param_in_place && grad_in_place;
  for (int k = 0; k < kStates; ++k) in_place = in_place && (!(roles & (1u << k)) || s.state_dtype[k] == math);
  const int64_t block = in_place ? kInPlaceBlockElems : kBlockElems;
  // a bfloat16 param without a master is rounded stochastically when the step has a seed
  const bool stochastic = seed >= 0 && s.master_kind == Master::none && s.dtype == Elem::bf16;
#if defined(FUSEDOPT_CPU_AVX2)
  if constexpr (std::is_same_v<S, float>) {
    if (!in_place && register_path_fits(s, roles, kStates, stochastic)) {
      const uint32_t key = stochastic ? rounding_key(seed_bits, static_cast<uint64_t>(index),
                                                     static_cast<uint64_t>(begin) >> 32) : 0;
      begin = rule_registers_any<Rule>(s, begin, end, roles, c, gs, stochastic ? &key : nullptr);
    }
  }
#endif
  for (int64_t b = begin; b < end; b += block) {
    const int64_t n = std::min(block, end - b);
    S* P;
    if (s.master_kind == Master::full) {
      P = static_cast<S*>(s.master) + b;  // float32 master, updated in place (S is float)
    } else if (s.master_kind == Master::remainder) {
      const auto* bits = static_cast<const uint16_t*>(s.param) + b;
      const auto* rem = static_cast<const int16_t*>(s.master) + b;
      P = buf[0];
      for (int64_t i = 0; i < n; ++i) P[i] = static_cast<S>(join_master(bits[i], rem[i]));
    } else {
      P = math_view(s.param, s.dtype, b, n, buf[0]);
    }
    S* G = math_view(s.grad, s.dtype, b, n, buf[1]);
    S* St[kStates];
    for (int k = 0; k < kStates; ++k) {
      St[k] = (roles & (1u << k)) ? math_view(s.state[k], s.state_dtype[k], b, n, buf[2 + k]) : unused_role;
    }
    int64_t i = 0;
    for (; i + W <= n; i += W) {
      Vec p = Vec::loadu(P + i), g = Vec::loadu(G + i);
      if (gs.unscale) {
        g = g * inv_scale;
        g.store(G + i);
      }
      if (gs.clip) g = g * clip_coef;
      Vec st[kStates];
      for (int k = 0; k < kStates; ++k) st[k] = Vec::loadu(St[k] + i);
      Rule::template update<Vec, S>(p, g, st, s.fresh, c);
      p.store(P + i);
      for (int k = 0; k < kStates; ++k) st[k].store(St[k] + i);
    }
    for (; i < n; ++i) {
      S p = P[i], g = G[i];
      if (gs.unscale) {
        g = g * static_cast<S>(gs.inv_scale);
        G[i] = g;
      }
      if (gs.clip) g = g * static_cast<S>(gs.clip_coef);
      S st[kStates];
      for (int k = 0; k < kStates; ++k) st[k] = St[k][i];
      Rule::template update<S, S>(p, g, st, s.fresh, c);
      P[i] = p;
      for (int k = 0; k < kStates; ++k) St[k][i] = st[k];
    }
    // Back to storage: the param rounded as asked, converted roles stored.
    if constexpr (std::is_same_v<S, float>) {
      if (s.master_kind == Master::full && s.dtype == Elem::bf16) {
        auto* out = static_cast<uint16_t*>(s.param) + b;
        for (int64_t j = 0; j < n; ++j) out[j] = bf16_bits_nearest_away(P[j]);
      } else if (s.master_kind == Master::full) {
        store_block(P, s.param, s.dtype, b, n);  // float16: round to nearest even
      } else if (s.master_kind == Master::remainder) {
        auto* bits = static_cast<uint16_t*>(s.param) + b;
        auto* rem = static_cast<int16_t*>(s.master) + b;
        for (int64_t j = 0; j < n; ++j) split_master(P[j], bits[j], rem[j]);
      } else if (stochastic) {
        auto* out = static_cast<uint16_t*>(s.param) + b;
        // (a block never crosses a multiple of 2^32 elements: the key holds for all of it)
        const uint32_t key = rounding_key(seed_bits, static_cast<uint64_t>(index),
                                          static_cast<uint64_t>(b) >> 32);
        const auto first = static_cast<uint32_t>(b);
        for (int64_t j = 0; j < n; ++j) {
          out[j] = bf16_bits_stochastic(P[j], rounding_bits_keyed(key, first + static_cast<uint32_t>(j)));
        }
      } else if (!param_in_place) {
        store_block(P, s.param, s.dtype, b, n);
      }
    } else if (!param_in_place) {
      store_block(P, s.param, s.dtype, b, n);
    }
    if (gs.unscale && !grad_in_place) store_block(G, s.grad, s.dtype, b, n);
    for (int k = 0; k < kStates; ++k) {
      if ((roles & (1u << k)) && s.state_dtype[k] != math) store_block(St[k], s.state[k], s.state_dtype[k], b, n);
    }
  }
}

// Many small tensors live in scattered allocations where the hardware prefetcher restarts at
// every one; fetching the head of the next chunk while this one computes hides that latency.
constexpr int kPrefetchLines = 8;
constexpr int64_t kPrefetchChunks = 16;

inline void prefetch_role(const void* base, Elem e, int64_t numel, int64_t begin) {
  if (base == nullptr) return;
  const int64_t elem = elem_size(e);
  const int64_t bytes = std::min<int64_t>((numel - begin) * elem, kPrefetchLines * 64);
  const char* p = static_cast<const char*>(base) + begin * elem;
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 1, 3);
}

inline void prefetch_chunk(const TensorSlot& s, int64_t begin) {
  prefetch_role(s.param, s.dtype, s.numel, begin);
  prefetch_role(s.grad, s.dtype, s.numel, begin);
  prefetch_role(s.master, s.master_kind == Master::full ? Elem::f32 : Elem::i16, s.numel, begin);
  for (int k = 0; k < kMaxStates; ++k) prefetch_role(s.state[k], s.state_dtype[k], s.numel, begin);
}

// Runs `per_chunk(index, slot, begin, end)` over all chunks of all tensors in one parallel region
// (`numels`: each slot's, gathered by the caller's one serial pass over the slots).
template <typename F>
void for_each_chunk(const StepArgs& args, const std::vector<int64_t>& numels, const F& per_chunk) {
  const std::vector<WorkChunk> chunks = cpu_work_list(numels);
  const auto prefetch = [&](int64_t c) {
    const WorkChunk& n = chunks[static_cast<size_t>(c)];
    prefetch_chunk(args.tensors[static_cast<size_t>(n.tensor)], n.begin);
  };
  for_chunks_in_parallel(chunks, [&](int64_t c, int64_t part_end) {
    // the next chunk, and one kPrefetchChunks ahead: a tiny tensor's update takes less time than
    // a memory round trip, so fetching only the next one would leave most of its latency exposed
    if (c + 1 < part_end) prefetch(c + 1);
    if (c + kPrefetchChunks < part_end) prefetch(c + kPrefetchChunks);
    const WorkChunk& w = chunks[static_cast<size_t>(c)];
    per_chunk(w.tensor, args.tensors[static_cast<size_t>(w.tensor)], w.begin, w.end);
  });
}

// Reads the scalars the step depends on; false when the whole step is skipped: found_inf is
// set (GradScaler), or the clip's grad norm is not finite.
bool read_scalars(const StepArgs& args, GradScalars& gs) {
  if (args.found_inf.has_value() && args.found_inf->item<double>() != 0.0) return false;
  if (args.grad_scale.has_value()) {
    gs.unscale = true;
    gs.inv_scale = static_cast<float>(1.0 / args.grad_scale->item<double>());
  }
  if (args.clip_data != nullptr) {
    const auto read = [&](int k) {
      return args.clip_is_double ? static_cast<const double*>(args.clip_data)[k]
                                 : static_cast<double>(static_cast<const float*>(args.clip_data)[k]);
    };
    if (!std::isfinite(read(0))) return false;
    gs.clip_coef = read(1);
    gs.clip = gs.clip_coef != 1.0;  // a clamped coefficient of 1 leaves the grads as they are
  }
  return true;
}

// In-kernel schedule, CPU side: the step uses lr(t) (written into the group's lr column),
// and once it has run every scheduled group's lr tensor receives lr(t + 1) and t advances.
void apply_schedule(StepArgs& args) {
  if (args.schedule_step == nullptr) return;
  const auto t = static_cast<double>(*args.schedule_step);
  for (int64_t g = 0; g < args.num_groups; ++g) {
    args.hyper[g * args.num_cols + col::lr] = scheduled_lr(args, g, t);
  }
}

void advance_schedule(const StepArgs& args) {
  if (args.schedule_step == nullptr) return;
  const auto next = static_cast<double>(*args.schedule_step + 1);
  for (int64_t g = 0; g < args.num_groups; ++g) {
    const ScheduleOut& out = args.schedule_out[static_cast<size_t>(g)];
    if (out.lr == nullptr) continue;
    const double lr = scheduled_lr(args, g, next);
    if (out.is_double) {
      *static_cast<double*>(out.lr) = lr;
    } else {
      *static_cast<float*>(out.lr) = static_cast<float>(lr);
    }
  }
  *args.schedule_step += 1;
}

double read_step(const TensorSlot& s) {
  if (s.step == nullptr) return 0.0;
  return s.step_is_double ? *static_cast<const double*>(s.step)
                          : static_cast<double>(*static_cast<const float*>(s.step));
}

// Counter k of a slot + 1, rounded to the counter's dtype, and a count written back.
double counter_plus_one(const TensorSlot& s, int64_t k) {
  return s.step_is_double ? static_cast<const double*>(s.step)[k] + 1.0
                          : static_cast<double>(static_cast<const float*>(s.step)[k] + 1.0f);
}
void set_counter(const TensorSlot& s, int64_t k, double value) {
  if (s.step_is_double) {
    static_cast<double*>(s.step)[k] = value;
  } else {
    static_cast<float*>(s.step)[k] = static_cast<float>(value);  // exact: a counter_plus_one
  }
}

// One group's coefficients at the step most of its tensors are at (the first seen): bias
// corrections cost pow() calls, and tensors of a group almost always share a step.
template <typename Rule>
struct CoeffCache {
  bool valid = false;
  double step = 0.0;
  typename Rule::template Coeffs<float> f;
  typename Rule::template Coeffs<double> d;
};

// Whether a slot's step counter is bumped by its one chunk (see run_rule).
bool bumped_in_chunk(const StepArgs& args, const TensorSlot& s) {
  return args.distinct_step_counters && s.step != nullptr && s.step_count == 1 && s.numel > 0 &&
         s.numel <= kCpuChunk;
}

template <typename Rule>
void run_rule(StepArgs& args, const GradScalars& gs) {
  apply_schedule(args);
  // Step counters before any chunk reads them, so that every chunk of a tensor reads the same new
  // count. A tensor of one chunk whose counter no other slot shares is the exception: its chunk
  // reads the counter, steps with the count + 1 and writes that back, on whichever thread it runs
  // (thousands of small tensors' counters are then not a serial pass of cache misses).
  // This is also the one full serial pass over the slots (with thousands of small tensors the
  // table is most of a megabyte, out of cache after the plan's check): it gathers the work list's
  // sizes.
  std::vector<int64_t> numels;
  numels.reserve(args.tensors.size());
  for (const auto& s : args.tensors) {
    numels.push_back(s.numel);
    if constexpr (Rule::kHasStep) {
      if (bumped_in_chunk(args, s)) continue;
      for (int64_t k = 0; k < s.step_count; ++k) set_counter(s, k, counter_plus_one(s, k));
    }
  }
  // the count a slot's update uses
  const auto step_of = [&](const TensorSlot& s) {
    return bumped_in_chunk(args, s) ? counter_plus_one(s, 0) : read_step(s);
  };
  const auto row = [&](int64_t g) { return &args.hyper[static_cast<size_t>(g * args.num_cols)]; };
  std::vector<CoeffCache<Rule>> caches(static_cast<size_t>(args.num_groups));
  std::vector<uint32_t> roles(static_cast<size_t>(args.num_groups));
  for (int64_t g = 0; g < args.num_groups; ++g) roles[static_cast<size_t>(g)] = role_mask<Rule>(row(g));
  // each group's coefficients at its first slot's step; the scan ends once every group has them
  // (at the first slot of the last group; it reads on only when a group has no slots)
  int64_t groups_left = args.num_groups;
  for (const auto& s : args.tensors) {
    if (groups_left == 0) break;
    CoeffCache<Rule>& cache = caches[static_cast<size_t>(s.group)];
    if (cache.valid) continue;
    cache.valid = true;
    --groups_left;
    cache.step = step_of(s);
    const double lr = args.at(s.group, col::lr);
    cache.f = Rule::template coeffs<float>(row(s.group), lr, cache.step);
    cache.d = Rule::template coeffs<double>(row(s.group), lr, cache.step);
  }
  const int64_t seed = args.rounding_seed;
  for_each_chunk(args, numels, [&](int64_t index, const TensorSlot& s, int64_t begin, int64_t end) {
    const CoeffCache<Rule>& cache = caches[static_cast<size_t>(s.group)];
    const double step = step_of(s);
    if (bumped_in_chunk(args, s)) set_counter(s, 0, step);
    const bool hit = cache.step == step;
    const double lr = args.at(s.group, col::lr);
    const uint32_t r = roles[static_cast<size_t>(s.group)];
    if (s.dtype == Elem::f64) {
      rule_chunk<Rule, double>(s, index, begin, end, r,
                               hit ? cache.d : Rule::template coeffs<double>(row(s.group), lr, step),
                               gs, seed, step);
    } else {
      rule_chunk<Rule, float>(s, index, begin, end, r,
                              hit ? cache.f : Rule::template coeffs<float>(row(s.group), lr, step),
                              gs, seed, step);
    }
  });
  advance_schedule(args);
}

// The CPU step of any rule, after validation.
void run_step(StepArgs& args) {
  GradScalars gs;
  if (!read_scalars(args, gs)) return;
  const CoalescedSlots flat(args, /*merge_steps=*/true);  // CPU counters: readable here
  visit_rule(args.rule, [&](auto rule) { run_rule<decltype(rule)>(args, gs); });
}

void adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
              at::TensorList state_steps, c10::IntArrayRef group_sizes, const at::Tensor& hyper,
              at::TensorList lr_tensors, const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf, at::TensorList schedule_state,
              const std::optional<at::Tensor>& schedule) {
  StepArgs args = collect_adam_args("fusedopt::adam_", params, grads, exp_avgs, exp_avg_sqs,
                                    max_exp_avg_sqs, state_steps, group_sizes, hyper, lr_tensors,
                                    grad_scale, found_inf, schedule_state, schedule);
  run_step(args);
}

void sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
             c10::IntArrayRef group_sizes, const at::Tensor& hyper, at::TensorList lr_tensors,
             c10::IntArrayRef fresh_buffers, const std::optional<at::Tensor>& grad_scale,
             const std::optional<at::Tensor>& found_inf, at::TensorList schedule_state,
             const std::optional<at::Tensor>& schedule) {
  StepArgs args = collect_sgd_args("fusedopt::sgd_", params, grads, momentum_buffers, group_sizes,
                                   hyper, lr_tensors, fresh_buffers, grad_scale, found_inf,
                                   schedule_state, schedule);
  run_step(args);
}

void step_cpu(c10::string_view rule, at::TensorList params, at::TensorList grads,
              at::TensorList states, at::TensorList masters, at::TensorList state_steps,
              c10::IntArrayRef group_sizes, const at::Tensor& hyper, at::TensorList lr_tensors,
              c10::IntArrayRef fresh, const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf, at::TensorList schedule_state,
              const std::optional<at::Tensor>& schedule, const std::optional<at::Tensor>& clip,
              int64_t master_mode, int64_t seed) {
  StepArgs args = collect_step_args("fusedopt::step_", std::string(rule), params, grads, states,
                                    masters, state_steps, group_sizes, hyper, lr_tensors, fresh,
                                    grad_scale, found_inf, schedule_state, schedule, clip,
                                    master_mode, seed);
  run_step(args);
}

// A plan's steps (eager_entry.cpp) reach the same kernels on a table it keeps validated.
const bool cpu_runner_registered = register_step_runner(c10::DeviceType::CPU, &run_step);

}  // namespace

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) {
  m.impl("adam_", &adam_cpu);
  m.impl("sgd_", &sgd_cpu);
  m.impl("step_", &step_cpu);
}

// A sparse gradient routes the call here; the shared validation rejects it with a message
// that names the tensor, instead of the dispatcher's "no kernel for SparseCPU".
TORCH_LIBRARY_IMPL(fusedopt, SparseCPU, m) {
  m.impl("adam_", &adam_cpu);
  m.impl("sgd_", &sgd_cpu);
  m.impl("step_", &step_cpu);
}

}  // namespace fusedopt
