// The arithmetic of order_clusters' chain as one CUDA thread computes it for one candidate (the
// cluster kernel of cluster_order.cu), in functions the host can call too: tests/test_cluster_order.cpp
// runs them on the CPU and checks that they choose the CPU reference's chain bit for bit.
//
// The reference (src/cpu/cluster_order.cpp) computes a dot product as a warp would: lane l sums
// dimensions l, l + 32, ... with fused multiply-adds, then a xor butterfly of adds, and lane 0's
// value is the result. Lane 0's value is a fixed tree: at m = 16, 8, 4, 2, 1, v[l] = v[l] + v[l + m]
// for l < m (lane l and lane l ^ m add the same two values, and an IEEE add is commutative, so every
// lane ends with lane 0's value). One thread holding a whole row evaluates that tree with the same
// adds in the same order. Rows are padded with zeros to kD (64 or 128): fma(0, 0, s) is s, or +0
// for s = -0, so padding can change the sign of a zero similarity and nothing else, and the chain
// compares similarities with -0 == +0 (order_key).
//
// Plain C++ without nvcc; __host__ __device__ with it.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "core/rounded_ops.hpp"

#if defined(__CUDACC__)
#define SAPATTN_CHAIN_FN __host__ __device__ __forceinline__
#else
#define SAPATTN_CHAIN_FN inline
#endif
// Every loop below has constant bounds and is unrolled on the device, so that rows stay in registers.
#if defined(__CUDA_ARCH__)
#define SAPATTN_CHAIN_UNROLL _Pragma("unroll")
#else
#define SAPATTN_CHAIN_UNROLL
#endif

namespace sapattn::cuda::chain {

// Round-to-nearest operations that the compiler may neither fuse nor reorder.
using rn::add;
using rn::fma;
using rn::mul;

// 1 / sqrt(n) for a squared norm n > 0, else 0 (a zero, NaN or overflowed norm), both correctly rounded
// as the reference's 1.0f / std::sqrt(n).
SAPATTN_CHAIN_FN float inverse_norm(float n) {
#if defined(__CUDA_ARCH__)
  return n > 0.0f ? __frcp_rn(__fsqrt_rn(n)) : 0.0f;
#else
  return n > 0.0f ? 1.0f / std::sqrt(n) : 0.0f;
#endif
}

// The reference's dot product of `row` (kD floats, zero past the true D) with a second row read four
// floats at a time: load4(j, q) sets q[0..3] to its dimensions 4j .. 4j + 3. Dimensions are taken in
// ascending order, so each lane's fma chain runs as the reference's does; then the butterfly tree.
template <int kD, class Load4>
SAPATTN_CHAIN_FN float dot(const float (&row)[kD], Load4&& load4) {
  static_assert(kD % 32 == 0, "rows are padded to a multiple of the warp width");
  float lane[32];
  SAPATTN_CHAIN_UNROLL
  for (int l = 0; l < 32; ++l) lane[l] = 0.0f;
  SAPATTN_CHAIN_UNROLL
  for (int j = 0; j < kD / 4; ++j) {
    float q[4];
    load4(j, q);
    SAPATTN_CHAIN_UNROLL
    for (int e = 0; e < 4; ++e) {
      const int d = 4 * j + e;
      lane[d % 32] = fma(q[e], row[d], lane[d % 32]);
    }
  }
  // The butterfly's levels m = 16, 8, 4, 2, 1 written out: with a loop over m, nvcc leaves the
  // inner bound variable and `lane` in local memory.
  SAPATTN_CHAIN_UNROLL
  for (int l = 0; l < 16; ++l) lane[l] = add(lane[l], lane[l + 16]);
  SAPATTN_CHAIN_UNROLL
  for (int l = 0; l < 8; ++l) lane[l] = add(lane[l], lane[l + 8]);
  SAPATTN_CHAIN_UNROLL
  for (int l = 0; l < 4; ++l) lane[l] = add(lane[l], lane[l + 4]);
  lane[0] = add(lane[0], lane[2]);
  lane[1] = add(lane[1], lane[3]);
  return add(lane[0], lane[1]);
}

// A row's own squared norm, in the same arithmetic.
template <int kD>
SAPATTN_CHAIN_FN float squared_norm(const float (&row)[kD]) {
  return dot<kD>(row, [&](int j, float(&q)[4]) {
    SAPATTN_CHAIN_UNROLL
    for (int e = 0; e < 4; ++e) q[e] = row[4 * j + e];
  });
}

// The cosine similarity as the reference forms it, (dot * inv_cur) * inv_candidate, NaN -> -inf.
SAPATTN_CHAIN_FN float similarity(float dot_product, float inv_cur, float inv_candidate) {
  const float s = mul(mul(dot_product, inv_cur), inv_candidate);
  return s != s ? -std::numeric_limits<float>::infinity() : s;
}

// Candidates compare by (key, index): the larger key wins, then the lower index. A key orders
// similarities as floats do: -0 and +0 get one key (the reference's `sim > best_sim` ties them),
// -inf the smallest valid key (0x007fffff), and key 0 means "no candidate".
inline constexpr uint32_t kNoCandidate = 0;
SAPATTN_CHAIN_FN uint32_t order_key(float sim) {
  if (sim == 0.0f) sim = 0.0f;  // -0 -> +0
  uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(sim);
#else
  std::memcpy(&bits, &sim, sizeof bits);
#endif
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

}  // namespace sapattn::cuda::chain
