// The tensor-core screen of kmeans_seed_greedy's cluster kernel (seed_cluster.cu): from an approximate
// dot product, whether the CPU's fp32 squared distance of a point to a candidate is certainly at least
// the point's current distance D2, so that the candidate cannot lower it (min_distance keeps D2) and
// its exact distance need not be computed. Only the pairs the screen does not clear are computed
// exactly, so the results stay the CPU's bit for bit; the screen decides how much work is done, never
// what is written. Plain C++ (the host tests, tests/test_kmeans_seed.cpp, check the bound against the
// CPU's arithmetic); under nvcc the same functions compile for the device.
//
// The bound. For points x, c of D <= kMaxDim elements and exact reals n_x = |x|^2, n_c = |c|^2,
// s = x.c, the true distance is n_x + n_c - 2s. The kernel has:
//   - norms in fp32, summed in any order: relative error <= (D + 1) 2^-24 <= 2^-13;
//   - s from mma.sync (bf16 or f16 operands, the points' own values, so the products are exact; fp32
//     accumulation whose alignment and rounding the PTX ISA leaves open): taken as within
//     2^-12 sum |x_d c_d| <= 2^-13 (n_x + n_c), about 16 times what a truncating 24-bit accumulator
//     loses over D / 16 = 64 chained mma at D = 1024;
//   - the CPU's fp32 distance, within (D / 8 + 6) 2^-24 of the true one relative, and the true one is
//     at most 2 (n_x + n_c).
// Together under 2^-11 (n_x + n_c); the margin is 2^-9 (n_x + n_c), four times that, plus 2^-100 for
// products and norms that underflow. A point with a subnormal element (which a tensor core may flush)
// gets a NaN norm and is never cleared; infinities and NaN fail the comparisons.
#pragma once

#include <cfloat>
#include <cstdint>

#include "core/host_device.hpp"

namespace sapattn::cuda::screen {

inline constexpr int64_t kMaxDim = 1024;    // head dims the bound covers (mma accumulation error above)
inline constexpr float kMargin = 0x1p-9f;   // relative to n_x + n_c
inline constexpr float kFloor = 0x1p-100f;  // absolute: underflowing products and squares

// A value below which the CPU's fp32 distance cannot fall, from the approximate norms and dot product
// (NaN or infinite when they are).
SAPATTN_HOST_DEVICE inline float distance_floor(float norm_x, float norm_c, float dot) {
  const float sum = norm_x + norm_c;
  return (sum - 2.0f * dot) - (sum * kMargin + kFloor);
}

// Whether the pair is cleared: its exact distance is at least d2 (false for NaN or infinite inputs).
SAPATTN_HOST_DEVICE inline bool clears(float norm_x, float norm_c, float dot, float d2) {
  return dot >= -FLT_MAX && dot <= FLT_MAX && distance_floor(norm_x, norm_c, dot) >= d2;
}

// The smallest positive normal value of a point dtype of 2 bytes (exponent bits 8: bf16, else f16):
// elements below it in magnitude, other than zero, make a point's norm NaN.
SAPATTN_HOST_DEVICE constexpr float smallest_normal(bool bf16) { return bf16 ? 0x1p-126f : 0x1p-14f; }

}  // namespace sapattn::cuda::screen
