// Device-side helpers shared by the CUDA backend's kernels: element types and conversions and the
// launch plumbing (stream, launch check, workspace carving). The host side of the runtime (the
// value-check flag, graph-capture queries) is declared in runtime/runtime.hpp, included here so that
// every kernel file has both.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "core/carver.hpp"
#include "core/cuda_check.hpp"
#include "cuda/backend.hpp"
#include "cuda/runtime/runtime.hpp"
#include "sapattn/error.hpp"
#include "sapattn/tensor.hpp"

// Checks that the last launch was accepted (bad configuration, missing kernel image, ...).
#define SAPATTN_CUDA_CHECK_LAUNCH() SAPATTN_CUDA_CHECK(cudaGetLastError())

namespace sapattn::cuda {

inline cudaStream_t stream_of(const Stream& s) { return static_cast<cudaStream_t>(s.handle); }

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

template <typename T>
__host__ __device__ constexpr T min_of(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
__host__ __device__ constexpr T max_of(T a, T b) {
  return a < b ? b : a;
}

// ---------------------------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------------------------

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with T the C++ type of a floating dtype (float, __half, __nv_bfloat16).
template <typename F>
decltype(auto) dispatch_float(DType dtype, F&& f) {
  switch (dtype) {
    case DType::F32:
      return f(TypeTag<float>{});
    case DType::F16:
      return f(TypeTag<__half>{});
    case DType::BF16:
      return f(TypeTag<__nv_bfloat16>{});
    default:
      break;
  }
  SAPATTN_THROW(DTypeError, "expected a floating dtype, got ", dtype_name(dtype));
}

template <typename T>
__device__ __forceinline__ float to_f32(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else {
    return __bfloat162float(v);
  }
}

// Round to nearest even, as the host conversions of dtype.hpp do.
template <typename T>
__device__ __forceinline__ T from_f32(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(v);
  } else {
    return __float2bfloat16_rn(v);
  }
}

}  // namespace sapattn::cuda
