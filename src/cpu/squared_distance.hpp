// The fp32 squared distance of the CPU backend's k-means (src/cpu/kmeans.cpp), the arithmetic that the
// CUDA kernels which must agree with it exactly copy (src/cuda/kmeans/exact_distance.cuh), and that the
// host tests of the seeding's screen measure against (tests/test_kmeans_seed.cpp).
#pragma once

#include <cstdint>

namespace sapattn::cpu {

// Squared distance with 8 independent partial sums, so the compiler vectorises it without
// reassociating (the result is the same on every run and thread count): d mod 8 in order, the tail
// into sum 0, combined as ((0+1)+(2+3))+((4+5)+(6+7)).
inline float squared_distance(const float* x, const float* c, int64_t D) {
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int j = 0; j < 8; ++j) {
      const float diff = x[d + j] - c[d + j];
      part[j] += diff * diff;
    }
  for (; d < D; ++d) {
    const float diff = x[d] - c[d];
    part[0] += diff * diff;
  }
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

}  // namespace sapattn::cpu
