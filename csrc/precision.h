// How a float32 math value becomes a low-precision param, written once for the CPU and CUDA
// traversals: bfloat16 rounding (to nearest with ties away from zero, and stochastic), and the
// float32 master split into a bfloat16 param plus an int16 remainder.
//
// Plain C++ on bit patterns (no half-type intrinsics), so the CPU kernels, the CUDA kernels and
// their CPU emulation compute the same bits.
#pragma once

#include <cstdint>
#include <cstring>

#include "update_rules.h"  // FUSEDOPT_HD

namespace fusedopt {

FUSEDOPT_HD uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}
FUSEDOPT_HD float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

FUSEDOPT_HD bool bits_are_nan(uint32_t u) { return (u & 0x7fffffffu) > 0x7f800000u; }

// The bfloat16 bits of a float32 value, to nearest with ties away from zero. Floats are
// sign-magnitude, so adding half a bfloat16 ulp to the bits rounds the magnitude up at >= 1/2.
// A NaN stays a (quiet) NaN instead of carrying into the exponent.
//
// Why not ties-to-even (torch's .to(bfloat16))? The master-remainder mode keeps only the param
// and the master's low 16 bits, and under ties-to-even an even bfloat16 value has 65,537 float32
// preimages, one too many for 16 bits; under ties-away every value has exactly 65,536. Both master
// modes round this way so that they stay bit-identical; the two roundings differ only when the
// low 16 bits are exactly 0x8000.
FUSEDOPT_HD uint16_t bf16_bits_nearest_away(float f) {
  const uint32_t u = float_bits(f);
  if (bits_are_nan(u)) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  return static_cast<uint16_t>((u + 0x8000u) >> 16);
}

// Round-to-nearest-even bfloat16 bits, as torch's .to(bfloat16) rounds.
FUSEDOPT_HD uint16_t bf16_bits_nearest_even(float f) {
  const uint32_t u = float_bits(f);
  if (bits_are_nan(u)) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

FUSEDOPT_HD float bf16_bits_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

// Stochastic rounding to bfloat16: the value rounds up with probability (distance to the lower
// neighbour) / ulp, so the rounded value is unbiased. `random16`: 16 uniformly random bits.
FUSEDOPT_HD uint16_t bf16_bits_stochastic(float f, uint32_t random16) {
  const uint32_t u = float_bits(f);
  if (bits_are_nan(u)) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  const uint32_t exp = u & 0x7f800000u;
  if (exp == 0x7f800000u) return static_cast<uint16_t>(u >> 16);  // +-inf stays
  return static_cast<uint16_t>((u + (random16 & 0xffffu)) >> 16);
}

// The random bits of element `index` of tensor `tensor` in a step seeded with `seed`: a
// counter-based hash, so any thread, block or chunk that handles an element draws the same bits
// for it, and a seeded run repeats exactly. Split in two so that the CPU kernels hash per element
// in 32-bit arithmetic (which vectorizes): a 64-bit key per tensor and 2^32 elements (splitmix64's
// finaliser), then murmur3's 32-bit finaliser per element.
FUSEDOPT_HD uint32_t rounding_key(uint64_t seed, uint64_t tensor, uint64_t index_high) {
  uint64_t z = seed ^ (tensor * 0x9e3779b97f4a7c15ull) ^ (index_high * 0xd1b54a32d192ed03ull);
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return static_cast<uint32_t>(z);
}

FUSEDOPT_HD uint32_t rounding_bits_keyed(uint32_t key, uint32_t index_low) {
  uint32_t h = key ^ (index_low * 0x9e3779b1u);
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

FUSEDOPT_HD uint32_t rounding_bits(uint64_t seed, uint64_t tensor, uint64_t index) {
  return rounding_bits_keyed(rounding_key(seed, tensor, index >> 32), static_cast<uint32_t>(index));
}

// The seed of a tensor's stochastic rounding at a step: the step's seed mixed with the tensor's
// step counter where the rule keeps one (else 0), so that a CUDA graph replay, whose seed argument
// is frozen, still draws new bits every step.
FUSEDOPT_HD uint64_t step_seed(int64_t seed, double step) {
  return static_cast<uint64_t>(seed) ^ (static_cast<uint64_t>(step) * 0x2545f4914f6cdd1dull);
}

// Master remainders: the float32 master is the bfloat16 param (rounded as above) plus the
// master's low 16 bits, kept as an int16. A negative remainder (top bit set) says the param was
// rounded up, so the master's high half is the param's bits minus one.
FUSEDOPT_HD float join_master(uint16_t param_bits, int16_t remainder) {
  const uint32_t high = static_cast<uint32_t>(param_bits) - (remainder < 0 ? 1u : 0u);
  return bits_float((high << 16) | static_cast<uint16_t>(remainder));
}

FUSEDOPT_HD void split_master(float master, uint16_t& param_bits, int16_t& remainder) {
  const uint32_t u = float_bits(master);
  if (bits_are_nan(u)) {  // NaN: a NaN param, and a remainder that joins back to that NaN
    param_bits = static_cast<uint16_t>((u >> 16) | 0x0040u);
    remainder = 0;
    return;
  }
  param_bits = static_cast<uint16_t>((u + 0x8000u) >> 16);
  remainder = static_cast<int16_t>(static_cast<uint16_t>(u & 0xffffu));
}

}  // namespace fusedopt
