// The CPU backend's fp32 squared distance (src/cpu/squared_distance.hpp), bit for bit, for
// the kernels that must agree with it exactly: the exact assignment and the greedy seeding. Eight
// partial sums over d mod 8 in order, the tail into sum 0, combined as ((0+1)+(2+3))+((4+5)+(6+7));
// every operation rounds on its own (__f*_rn: no FMA contraction, which the host code never has).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace sapattn::cuda {

// The distance split over kLanes consecutive lanes (1, 2, 4 or 8; `sub` = lane % kLanes): lane sub
// keeps the partial sums [sub * 8 / kLanes, (sub + 1) * 8 / kLanes), combines them as the tree does
// within that subtree, and xor-shuffles add the subtrees in the tree's order (an fp32 sum is
// commutative, so both lanes of a pair get the same value). Every lane of the warp must call it when
// kLanes > 1; each lane of a group returns the group's distance. x(d), c(d): element d as fp32.
template <int kLanes, typename X, typename C>
__device__ __forceinline__ float exact_squared_distance_lanes(const X& x, const C& c, int64_t D, int sub) {
  static_assert(kLanes == 1 || kLanes == 2 || kLanes == 4 || kLanes == 8);
  constexpr int kParts = 8 / kLanes;
  float part[kParts];
#pragma unroll
  for (int j = 0; j < kParts; ++j) part[j] = 0.0f;
  const int64_t first = static_cast<int64_t>(sub) * kParts, whole = D & ~int64_t{7};
  for (int64_t d = first; d < whole; d += 8)
#pragma unroll
    for (int j = 0; j < kParts; ++j) {
      const float diff = __fsub_rn(x(d + j), c(d + j));
      part[j] = __fadd_rn(part[j], __fmul_rn(diff, diff));
    }
  if (sub == 0)
    for (int64_t d = whole; d < D; ++d) {
      const float diff = __fsub_rn(x(d), c(d));
      part[0] = __fadd_rn(part[0], __fmul_rn(diff, diff));
    }
#pragma unroll
  for (int width = 1; width < kParts; width *= 2)  // the lane's subtree, level by level
#pragma unroll
    for (int j = 0; j < kParts; j += 2 * width) part[j] = __fadd_rn(part[j], part[j + width]);
  float v = part[0];
#pragma unroll
  for (int m = 1; m < kLanes; m *= 2) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}

// ||x - c||^2 with x(d) the point's element d as fp32 and c an fp32 row of D elements.
template <typename X>
__device__ __forceinline__ float exact_squared_distance(const X& x, const float* c, int64_t D) {
  return exact_squared_distance_lanes<1>(
      x, [c](int64_t d) { return c[d]; }, D, 0);
}

}  // namespace sapattn::cuda
