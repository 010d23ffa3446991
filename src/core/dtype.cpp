#include "sapattn/dtype.hpp"

namespace sapattn {

float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);  // Inf or NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);  // normal: rebias 15 -> 127
  } else if (man == 0) {
    bits = sign;  // signed zero
  } else {
    // Subnormal half: shift the mantissa up until its leading one reaches the implicit bit.
    exp = 113;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  return std::bit_cast<float>(bits);
}

uint16_t f32_to_f16(float f) {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);   // NaN
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: Inf
  if (abs >= 0x38800000u) {
    // Normal half. Round the 13 dropped mantissa bits to nearest even; a carry bumps the exponent.
    const uint32_t rebased = abs - (112u << 23);
    const uint32_t rounded = rebased + 0xfffu + ((rebased >> 13) & 1u);
    return static_cast<uint16_t>(sign | (rounded >> 13));
  }
  // Subnormal half (or zero): value = m * 2^-24 with m rounded to nearest even.
  const float scaled = std::bit_cast<float>(abs) * 16777216.0f;  // * 2^24, exact
  const uint32_t m = static_cast<uint32_t>(scaled);
  const float frac = scaled - static_cast<float>(m);
  uint32_t r = m;
  if (frac > 0.5f || (frac == 0.5f && (m & 1u))) ++r;
  return static_cast<uint16_t>(sign | r);
}

}  // namespace sapattn
