// The integer arithmetic of kmeans_seed_greedy (include/sapattn/ops.hpp) that both backends share,
// so that they draw the same numbers and compare the same sums: the draws of the D^2 sampling, their
// targets, and the 64-bit fixed-point distances whose sums do not depend on their order. Plain C++
// for the CPU; under nvcc the same functions compile for the device too.
#pragma once

#include <cmath>
#include <cstdint>

#include "core/host_device.hpp"
#include "core/splitmix64.hpp"

namespace sapattn::seeding {

// Trials per step for C >= 1 clusters: 2 + floor(ln C), scikit-learn's default (host only). ln C is
// never within 1e-9 of an integer for an integer 2 <= C < 2^31 (e^k is irrational), so the double
// logarithm floors exactly.
inline int greedy_trials(int64_t clusters) {
  return 2 + static_cast<int>(std::floor(std::log(static_cast<double>(clusters))));
}

// The draws' own stream of the seed (the first hex digits of pi), so that they are independent of
// kmeans_init's keys, which use splitmix64(seed ^ splitmix64(id * 2^32 + i)).
inline constexpr uint64_t kDrawStream = 0x243f6a8885a308d3ull;

// The uniform 64-bit number of trial `trial` at step `step` of problem `id`.
SAPATTN_HOST_DEVICE constexpr uint64_t draw(uint64_t seed, uint64_t id, uint64_t step, uint64_t trial) {
  return splitmix64(splitmix64(seed ^ kDrawStream ^ splitmix64((id << 32) + step)) + trial);
}

// floor(total * r / 2^64): a target in [0, total) (0 when total is 0), exact. The high half of the
// 128-bit product from 32-bit halves, so that one code path serves every compiler and the device
// (cross cannot overflow: its three terms are at most 2^64 - 1 together).
SAPATTN_HOST_DEVICE constexpr uint64_t draw_target(uint64_t total, uint64_t r) {
  constexpr uint64_t kLow = 0xffffffffull;
  const uint64_t a_lo = total & kLow, a_hi = total >> 32, b_lo = r & kLow, b_hi = r >> 32;
  const uint64_t lo_lo = a_lo * b_lo, hi_lo = a_hi * b_lo, lo_hi = a_lo * b_hi, hi_hi = a_hi * b_hi;
  const uint64_t cross = (lo_lo >> 32) + (hi_lo & kLow) + lo_hi;
  return hi_hi + (hi_lo >> 32) + (cross >> 32);
}

// L = ceil(log2(M)) for a sample of M >= 1 points: M terms below 2^(63 - L) each sum below 2^63.
SAPATTN_HOST_DEVICE constexpr int sample_bits(int64_t sample) {
  int bits = 0;
  while ((int64_t{1} << bits) < sample) ++bits;
  return bits;
}

// The unit 2^E of the fixed-point distances of a problem, from the largest finite squared distance
// to its first centroid (every later distance is a minimum that includes that one): with E =
// ilogb(max) + 1 + L - 63, every finite distance is below 2^(63 - L) units. 0 when max is 0.
SAPATTN_HOST_DEVICE inline int fixed_point_exponent(float max_finite, int bits) {
  return max_finite > 0.0f ? ilogbf(max_finite) + 1 + bits - 63 : 0;
}

// floor(d / 2^E), exact (d is converted to double, scaled by a power of two and truncated). A value
// at or above 2^(63 - L) units (an infinite or NaN distance, or a finite one past the first step's
// largest, reachable only from an infinite first distance) counts as 2^(63 - L): sums stay exact.
// Squared distances are never negative.
SAPATTN_HOST_DEVICE inline uint64_t to_fixed(float d, int exponent, int bits) {
  const uint64_t cap = uint64_t{1} << (63 - bits);
  const double units = ldexp(static_cast<double>(d), -exponent);
  return units < static_cast<double>(cap) ? static_cast<uint64_t>(units) : cap;
}

// The smaller of the current distance and a new one; a NaN current distance stays (both backends
// must pick the same operand where std::min and fminf would differ).
SAPATTN_HOST_DEVICE constexpr float min_distance(float current, float d) { return d < current ? d : current; }

}  // namespace sapattn::seeding
