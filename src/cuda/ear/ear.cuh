// The device pieces that the SVG-EAR files (ear_estimate.cu, ear_select.cu, ear_compensation*.cu)
// share: the block size of their kernels, the strided [B,H,R,C] view the kernels take, the
// cluster-size read that raises kBadSize, and what the two tensor-core compensation kernels
// (ear_compensation_tc.cu, ear_compensation_sm90.cu) share: the row read that rounds q to the bf16
// operand and the merge of a row with its exact part. Each file's kernels stay private to it; the
// host side they share is in ear_internal.hpp.
#pragma once

#include <cstdint>

#include "cuda/runtime/device.cuh"
#include "cuda/runtime/primitives.cuh"
#include "sapattn/tensor.hpp"

namespace sapattn::cuda::ear {

inline constexpr int kThreads = 256;

// A [B,H,R,C] (or [B,H,S,D]) view's data and element strides, as kernels take them.
template <typename T>
struct Strided4 {
  T* data = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  __device__ T& at(int64_t b, int64_t h, int64_t r, int64_t c) const { return data[b * s0 + h * s1 + r * s2 + c * s3]; }
};

template <typename T>
Strided4<T> strided(const TensorView& t) {
  return {static_cast<T*>(t.data), t.stride[0], t.stride[1], t.stride[2], t.stride[3]};
}

// Clusters sizes are non-negative by contract; a negative one counts as 0 and raises kBadSize.
__device__ __forceinline__ int64_t checked_size(int32_t n, int* flag) {
  if (n < 0) {
    atomicOr(flag, kBadSize);
    return 0;
  }
  return n;
}

// ---------------------------------------------------------------------------------------------
// The tensor-core compensation kernels
// ---------------------------------------------------------------------------------------------

// Elements [d0, d0 + 8) of a row of D elements with element stride `stride`, as floats (0 past D or
// for a null row).
template <typename T>
__device__ __forceinline__ void load8(const T* row, int64_t stride, int64_t d0, int64_t D, float (&f)[8]) {
#pragma unroll
  for (int e = 0; e < 8; ++e) f[e] = 0.0f;
  if (row == nullptr || d0 >= D) return;
  const T* src = row + d0 * stride;
  if (stride == 1 && d0 + 8 <= D && reinterpret_cast<uintptr_t>(src) % 16 == 0) {
    if constexpr (sizeof(T) == 4) {
      const float4 lo = reinterpret_cast<const float4*>(src)[0], hi = reinterpret_cast<const float4*>(src)[1];
      f[0] = lo.x, f[1] = lo.y, f[2] = lo.z, f[3] = lo.w, f[4] = hi.x, f[5] = hi.y, f[6] = hi.z, f[7] = hi.w;
    } else {
      const uint4 raw = *reinterpret_cast<const uint4*>(src);
      const T* x = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int e = 0; e < 8; ++e) f[e] = to_f32(x[e]);
    }
    return;
  }
#pragma unroll
  for (int e = 0; e < 8; ++e)
    if (d0 + e < D) f[e] = to_f32(src[e * stride]);
}

// Eight floats rounded to nearest into a 16-byte chunk of bf16 operands.
__device__ __forceinline__ uint4 pack8_bf16(const float (&f)[8]) {
  using B = __nv_bfloat16;
  return make_uint4(pack2<B>(f[0], f[1]), pack2<B>(f[2], f[3]), pack2<B>(f[4], f[5]), pack2<B>(f[6], f[7]));
}

// How a row's exact part (out, lse0) and its compensation merge: the compensation's unnormalised O
// with its (max, sum) in the log2 domain (lse_c = (max + log2 sum) ln 2) gives
//   lse' = logaddexp(lse0, lse_c),  out' = keep out + add O,
// keep = exp(lse0 - lse'), add = exp(lse_c - lse') / sum. sum > 0 (the row skips a pseudo-key).
struct RowMerge {
  float keep, add, lse;
};

__device__ __forceinline__ RowMerge merge_row(float lse0, float max_log2, float sum) {
  const float lse_c = (max_log2 + log2f(sum)) * 0.6931471805599453f;
  const float m = fmaxf(lse0, lse_c);
  const float e0 = expf(lse0 - m), ec = expf(lse_c - m), total = e0 + ec;
  return {e0 / total, ec / (total * sum), m + logf(total)};
}

}  // namespace sapattn::cuda::ear
