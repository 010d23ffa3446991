// Device pieces that both cost paths of round_query_clusters share (round_cost.cu: the exact fp32
// path; round_cost_tc.cu: the tensor-core one): the walk of the flat tile list and the ranking of a
// candidate's targets by cost.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/round/round_internal.hpp"

namespace sapattn::cuda::qround {

// The head whose range of the flat tile list holds tile t: the last bh with tiles[bh] <= t (a head
// without tiles has an empty range, so it is never the answer).
__device__ __forceinline__ int64_t head_of(const int32_t* tiles, int64_t BH, int64_t t) {
  int64_t lo = 0, hi = BH;  // tiles[lo] <= t < tiles[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (tiles[mid] <= t)
      lo = mid;
    else
      hi = mid;
  }
  return lo;
}

// (a, ra) before (b, rb): by cost, then target index. Costs are never NaN here.
__device__ __forceinline__ bool before(double a, int ra, double b, int rb) { return a < b || (a == b && ra < rb); }

// Each candidate i of [i0, i1), step di (this warp's share), gets its kk cheapest of the R targets
// (ties by lower index): kk rounds of a warp minimum over the (cost_of(i, r), r) pairs after the last
// one taken; lane 0 writes them to cand_idx / cand_cost[i * kk + k]. Every rank is a comparison of
// pairs, so the result does not depend on the order in which lanes see them.
template <class CostOf>
__device__ __forceinline__ void rank_targets(int i0, int i1, int di, int R, int64_t kk, CostOf&& cost_of,
                                             int32_t* cand_idx, double* cand_cost) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
  for (int i = i0; i < i1; i += di) {
    double prev_c = -INFINITY;
    int prev_r = -1;
    for (int64_t k = 0; k < kk; ++k) {
      double bc = INFINITY;
      int br = -1;
      for (int r = lane; r < R; r += 32) {
        const double c = cost_of(i, r);
        if (before(prev_c, prev_r, c, r) && (br < 0 || before(c, r, bc, br))) bc = c, br = r;
      }
#pragma unroll
      for (int off = 16; off > 0; off /= 2) {
        const double oc = __shfl_xor_sync(0xffffffffu, bc, off);
        const int orr = __shfl_xor_sync(0xffffffffu, br, off);
        if (orr >= 0 && (br < 0 || before(oc, orr, bc, br))) bc = oc, br = orr;
      }
      if (lane == 0) {
        cand_idx[static_cast<int64_t>(i) * kk + k] = br;
        cand_cost[static_cast<int64_t>(i) * kk + k] = bc;
      }
      prev_c = bc, prev_r = br;
    }
  }
}

}  // namespace sapattn::cuda::qround
