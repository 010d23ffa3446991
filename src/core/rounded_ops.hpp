// Round-to-nearest float and double operations that the compiler may neither contract nor reorder,
// for the host/device arithmetic headers whose results both backends must agree on bit for bit
// (core/round_arithmetic.hpp, cuda/permute/chain_arithmetic.hpp). On the device they are the
// __f*_rn / __d*_rn intrinsics (nvcc's -fmad would otherwise be free to fuse a multiply and an add);
// on the host plain operators and std::fma (the project builds x86-64 without -mfma, so the host
// compiler contracts nothing).
//
// Plain C++ without nvcc; __host__ __device__ with it.
#pragma once

#include <cmath>
#include <type_traits>

#if defined(__CUDACC__)
#define SAPATTN_RN_FN __host__ __device__ __forceinline__
#else
#define SAPATTN_RN_FN inline
#endif

namespace sapattn::rn {

template <typename T>
inline constexpr bool kIsFloat = std::is_same_v<T, float>;

#if defined(__CUDA_ARCH__)
// clang-format off
template <typename T> SAPATTN_RN_FN T add(T a, T b) { if constexpr (kIsFloat<T>) return __fadd_rn(a, b); else return __dadd_rn(a, b); }
template <typename T> SAPATTN_RN_FN T sub(T a, T b) { if constexpr (kIsFloat<T>) return __fsub_rn(a, b); else return __dsub_rn(a, b); }
template <typename T> SAPATTN_RN_FN T mul(T a, T b) { if constexpr (kIsFloat<T>) return __fmul_rn(a, b); else return __dmul_rn(a, b); }
template <typename T> SAPATTN_RN_FN T div(T a, T b) { if constexpr (kIsFloat<T>) return __fdiv_rn(a, b); else return __ddiv_rn(a, b); }
// a * b + c rounded once.
template <typename T> SAPATTN_RN_FN T fma(T a, T b, T c) { if constexpr (kIsFloat<T>) return __fmaf_rn(a, b, c); else return __fma_rn(a, b, c); }
// clang-format on
#else
template <typename T> SAPATTN_RN_FN T add(T a, T b) { return a + b; }
template <typename T> SAPATTN_RN_FN T sub(T a, T b) { return a - b; }
template <typename T> SAPATTN_RN_FN T mul(T a, T b) { return a * b; }
template <typename T> SAPATTN_RN_FN T div(T a, T b) { return a / b; }
template <typename T> SAPATTN_RN_FN T fma(T a, T b, T c) { return std::fma(a, b, c); }
#endif

}  // namespace sapattn::rn
