// Device-side helpers shared by the CUDA backend's kernels: element types and conversions, the
// launch plumbing (stream, launch check, workspace carving), and the value-check flag.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "core/carver.hpp"
#include "cuda/backend.hpp"
#include "cuda/check.hpp"
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

// ---------------------------------------------------------------------------------------------
// Value checks (see backend.hpp). Kernels OR these bits into the flag when they meet a bad value.
// ---------------------------------------------------------------------------------------------

enum ValueError : int {
  kBadLabel = 1,      // a label outside [0, C)
  kBadPermIndex = 2,  // a permutation index outside [0, N)
  kBadOffsets = 4,    // offsets not non-decreasing or outside [0, S]
  kBadSize = 8,       // a negative cluster size
};

// The device's flag word (a __device__ variable of runtime.cu; one per device).
int* value_error_flag();
// Before an op's launches: clears the flag when value checks are on and the stream is not capturing.
// Returns whether end_value_check must run.
bool begin_value_check(const Stream& stream);
// After them: synchronises, reads the flag and throws InvalidArgumentError naming `op`.
void end_value_check(const Stream& stream, const char* op);

// True while `stream` is being captured into a CUDA graph (no synchronisation allowed then).
bool is_capturing(cudaStream_t stream);

// Raises the dynamic shared-memory limit of a kernel once (thread-safe; not a stream operation, so it
// is allowed during graph capture).
void set_max_dynamic_smem(const void* kernel, int bytes);

}  // namespace sapattn::cuda
