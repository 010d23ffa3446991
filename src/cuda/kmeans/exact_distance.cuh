// The CPU backend's fp32 squared distance (src/cpu/kmeans.cpp, squared_distance), bit for bit, for
// the kernels that must agree with it exactly: the exact assignment and the greedy seeding. Eight
// partial sums over d mod 8 in order, the tail into sum 0, combined as ((0+1)+(2+3))+((4+5)+(6+7));
// every operation rounds on its own (__f*_rn: no FMA contraction, which the host code never has).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace sapattn::cuda {

// ||x - c||^2 with x(d) the point's element d as fp32 and c an fp32 row of D elements.
template <typename X>
__device__ __forceinline__ float exact_squared_distance(const X& x, const float* c, int64_t D) {
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float diff = __fsub_rn(x(d + j), c[d + j]);
      part[j] = __fadd_rn(part[j], __fmul_rn(diff, diff));
    }
  for (; d < D; ++d) {
    const float diff = __fsub_rn(x(d), c[d]);
    part[0] = __fadd_rn(part[0], __fmul_rn(diff, diff));
  }
  return __fadd_rn(__fadd_rn(__fadd_rn(part[0], part[1]), __fadd_rn(part[2], part[3])),
                   __fadd_rn(__fadd_rn(part[4], part[5]), __fadd_rn(part[6], part[7])));
}

}  // namespace sapattn::cuda
