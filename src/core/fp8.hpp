// The FP8 E4M3 format of the FP8 attention (docs/fp8.md), bit for bit: OCP 8-bit floating point
// E4M3 ("E4M3FN": 1 sign, 4 exponent bits of bias 7, 3 mantissa bits; no infinities, S.1111.111 is
// NaN, the largest magnitude is 448 = 1.75 * 2^8, the smallest normal 2^-6, subnormals m * 2^-9).
// The CPU reference and the CUDA kernels share these functions (SAPATTN_HOST_DEVICE), so that the
// codes a kernel writes can be compared with the reference's byte for byte.
//
// Encoding rounds to nearest, ties to even, and saturates: a finite value or an infinity beyond 448
// becomes +-448, NaN becomes the NaN code 0x7f. That is what PTX's cvt.rn.satfinite.e4m3x2.f32
// does (and __nv_cvt_float_to_fp8 with __NV_SATFINITE), so a kernel may convert with the instruction.
// A NaN code never comes from finite data: the ops report non-finite inputs upstream
// (check_finite; a group holding one gets a NaN scale, so NaN reaches its rows, as in dense
// attention).
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>

#include "core/host_device.hpp"

namespace sapattn::fp8 {

inline constexpr float kE4M3Max = 448.0f;
inline constexpr uint8_t kE4M3NaN = 0x7f;

// The bits of a value as another type of the same size (std::bit_cast, which device code lacks).
template <typename To, typename From>
SAPATTN_HOST_DEVICE inline To bits_as(From x) {
  static_assert(sizeof(To) == sizeof(From));
#if defined(__CUDA_ARCH__)
  To to;
  memcpy(&to, &x, sizeof to);
  return to;
#else
  return std::bit_cast<To>(x);
#endif
}

// fp32 -> e4m3 code: round to nearest even, saturating to +-448, NaN -> 0x7f. Signed zeros and
// values that round to zero keep their sign (0x80 is -0).
SAPATTN_HOST_DEVICE inline uint8_t e4m3_encode(float x) {
  const auto bits = bits_as<uint32_t>(x);
  const auto sign = static_cast<uint8_t>((bits >> 24) & 0x80u);
  const uint32_t mag = bits & 0x7fffffffu;
  if (mag > 0x7f800000u) return kE4M3NaN;
  if (mag >= 0x43e00000u) return static_cast<uint8_t>(sign | 0x7eu);  // |x| >= 448, infinities included
  if (mag >= 0x3c800000u) {
    // |x| >= 2^-6, a normal e4m3 number: rebias the exponent (127 -> 7), keep 3 of the 23 mantissa
    // bits and round the other 20 to nearest even. A carry out of the mantissa moves to the next
    // binade, which is the right code; it never passes 0x7e because |x| < 448.
    const uint32_t code = (mag >> 20) - ((127u - 7u) << 3);
    const uint32_t rest = mag & 0xfffffu;
    const uint32_t up = (rest > 0x80000u || (rest == 0x80000u && (code & 1u) != 0u)) ? 1u : 0u;
    return static_cast<uint8_t>(sign | (code + up));
  }
  // |x| < 2^-6: a subnormal m * 2^-9 with m = 0..7, or m = 8, the code of 2^-6, when it rounds up.
  // Up to 2^-10, half the smallest subnormal, it rounds to zero (2^-10 itself is a tie, to even 0).
  if (mag <= 0x3a800000u) return sign;
  // |x| = significand * 2^(exponent - 150) with exponent 117..120: in units of 2^-9 that is
  // significand >> (141 - exponent), a shift of 21..24, rounded to nearest even.
  const uint32_t exponent = mag >> 23;
  const uint32_t significand = (mag & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 141u - exponent;
  const uint32_t m = significand >> shift;
  const uint32_t rest = significand & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  const uint32_t up = (rest > half || (rest == half && (m & 1u) != 0u)) ? 1u : 0u;
  return static_cast<uint8_t>(sign | (m + up));
}

// e4m3 code -> fp32, exact (every e4m3 value is an fp32 value); 0x7f and 0xff give NaN.
SAPATTN_HOST_DEVICE inline float e4m3_decode(uint8_t code) {
  const uint32_t sign = static_cast<uint32_t>(code & 0x80u) << 24;
  const uint32_t mag = code & 0x7fu;
  if (mag == 0x7fu) return bits_as<float>(sign | 0x7fc00000u);
  if (mag >= 0x08u) return bits_as<float>(sign | ((mag + ((127u - 7u) << 3)) << 20));
  const float value = static_cast<float>(mag) * 0x1p-9f;
  return sign != 0u ? -value : value;
}

// The scale of a group of values whose largest magnitude is `amax`: the group is stored as
// e4m3_encode(x * inverse) and read as e4m3_decode(code) * scale, so that its largest value maps to
// 448. Both are fp32 divisions, rounded to nearest. A group of zeros (amax = 0) gets 0 and 0 (codes
// 0, read back as 0, and a zero scale never dominates a maximum over scales); a group holding a
// non-finite value has amax NaN by convention, and NaN scales.
struct E4M3Scale {
  float scale;    // amax / 448
  float inverse;  // 448 / amax
};

SAPATTN_HOST_DEVICE inline E4M3Scale e4m3_scale(float amax) {
  if (amax == 0.0f) return {0.0f, 0.0f};
  return {amax / kE4M3Max, kE4M3Max / amax};
}

}  // namespace sapattn::fp8
