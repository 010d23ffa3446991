// The device pieces that the SVG-EAR files (ear_estimate.cu, ear_select.cu, ear_compensation.cu)
// share: the block size of their kernels, the strided [B,H,R,C] view the kernels take and the
// cluster-size read that raises kBadSize. Each file's kernels stay private to it; the host side they
// share is in ear_internal.hpp.
#pragma once

#include <cstdint>

#include "cuda/runtime/device.cuh"
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

}  // namespace sapattn::cuda::ear
