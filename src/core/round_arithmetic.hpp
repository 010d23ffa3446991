// The floating-point steps of round_query_clusters' mass cost (include/sapattn/ops.hpp) that both
// backends share, so that they compute the same costs bit for bit: the fp32 dot product in the CPU
// reference's order (cpu/rows.hpp's dot: 8 lanes, separate multiply and add roundings, a fixed tree)
// and an exp built from IEEE double operations alone. The C library's exp and CUDA's differ in the
// last bit for some inputs; one function for both removes that source of difference.
//
// Plain C++ without nvcc; __host__ __device__ with it. Every operation is one of core/rounded_ops.hpp,
// so no compiler contracts a multiply and an add into an FMA or reorders anything.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "core/rounded_ops.hpp"

#if defined(__CUDACC__)
#define SAPATTN_ROUND_FN __host__ __device__ __forceinline__
#else
#define SAPATTN_ROUND_FN inline
#endif

namespace sapattn::round_math {

// a . b over D floats in cpu/rows.hpp's order: lane j sums dimensions j, j + 8, ... of the first
// floor(D / 8) * 8, the rest go to lane 0 in order, then ((0+1)+(2+3))+((4+5)+(6+7)).
SAPATTN_ROUND_FN float lane_dot(const float* a, const float* b, int64_t D) {
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int j = 0; j < 8; ++j) part[j] = rn::add(part[j], rn::mul(a[d + j], b[d + j]));
  for (; d < D; ++d) part[0] = rn::add(part[0], rn::mul(a[d], b[d]));
  return rn::add(rn::add(rn::add(part[0], part[1]), rn::add(part[2], part[3])), rn::add(rn::add(part[4], part[5]), rn::add(part[6], part[7])));
}

// 2^e for a normal exponent e in [-1022, 1023], exact.
SAPATTN_ROUND_FN double pow2(int e) {
  const uint64_t bits = static_cast<uint64_t>(1023 + e) << 52;
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(bits));
#else
  double v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
#endif
}

// exp(x), within a few ulp, for the softmax of the mass cost: k = rint(x / ln 2), r = x - k ln 2 in
// two steps (Cody and Waite: k * kLn2Hi is exact for |k| < 2^21), the Taylor polynomial of degree 13
// in r (|r| <= 0.35: truncation below 1e-17 relative) by Horner, then times 2^k in two exact halves
// (the second multiply rounds a subnormal result once). NaN stays NaN; below -746 the result is 0,
// above 709 it is +inf.
SAPATTN_ROUND_FN double mass_exp(double x) {
  if (x != x) return x;
  if (x < -746.0) return 0.0;
  if (x > 709.0) return std::numeric_limits<double>::infinity();
  constexpr double kLog2e = 0x1.71547652b82fep+0;
  constexpr double kLn2Hi = 0x1.62e42fee00000p-1;
  constexpr double kLn2Lo = 0x1.a39ef35793c76p-33;
  // 1/n! for n = 13 down to 0, each correctly rounded.
  constexpr double kInvFactorial[14] = {0x1.0000000000000p+0,  0x1.0000000000000p+0,  0x1.0000000000000p-1,
                                        0x1.5555555555555p-3,  0x1.5555555555555p-5,  0x1.1111111111111p-7,
                                        0x1.6c16c16c16c17p-10, 0x1.a01a01a01a01ap-13, 0x1.a01a01a01a01ap-16,
                                        0x1.71de3a556c734p-19, 0x1.27e4fb7789f5cp-22, 0x1.ae64567f544e4p-26,
                                        0x1.1eed8eff8d898p-29, 0x1.6124613a86d09p-33};
#if defined(__CUDA_ARCH__)
  const double k = rint(rn::mul(x, kLog2e));
#else
  const double k = std::rint(rn::mul(x, kLog2e));
#endif
  const double r = rn::sub(rn::sub(x, rn::mul(k, kLn2Hi)), rn::mul(k, kLn2Lo));
  double p = kInvFactorial[13];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int n = 12; n >= 0; --n) p = rn::add(rn::mul(p, r), kInvFactorial[n]);
  const int e = static_cast<int>(k), e1 = e / 2;
  return rn::mul(rn::mul(p, pow2(e1)), pow2(e - e1));
}

}  // namespace sapattn::round_math
