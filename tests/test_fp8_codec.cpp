// The e4m3 codec (src/core/fp8.hpp) against the OCP E4M3 definition: every one of the 256 codes,
// every rounding tie, and a walk over the fp32 bit patterns compared with an independent reference
// (the nearest of the 254 finite values by binary search, ties to the even code).
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "core/fp8.hpp"

namespace {

using sapattn::fp8::e4m3_decode;
using sapattn::fp8::e4m3_encode;
using sapattn::fp8::e4m3_scale;

constexpr float kInf = std::numeric_limits<float>::infinity();

// The value of a code written from the format's definition (not from the codec): sign, 4 exponent
// bits of bias 7, 3 mantissa bits, subnormals at exponent 0, S.1111.111 NaN.
double defined_value(int code) {
  const int sign = code >> 7, exponent = (code >> 3) & 15, mantissa = code & 7;
  if (exponent == 15 && mantissa == 7) return std::numeric_limits<double>::quiet_NaN();
  const double magnitude = exponent == 0 ? std::ldexp(mantissa, -9) : std::ldexp(8 + mantissa, exponent - 10);
  return sign != 0 ? -magnitude : magnitude;
}

// The reference encoder: the nearest finite value (ties to the even code), +-448 beyond it, 0x7f
// for NaN; the sign of a zero result follows the input's.
uint8_t reference_encode(float x) {
  static const std::vector<double> values = [] {
    std::vector<double> v;
    for (int c = 0; c < 0x7f; ++c) v.push_back(defined_value(c));  // ascending: 0 .. 448
    return v;
  }();
  if (std::isnan(x)) return 0x7f;
  const uint8_t sign = std::signbit(x) ? 0x80 : 0x00;
  const double a = std::fabs(static_cast<double>(x));
  if (a >= 448.0) return sign | 0x7e;
  const auto hi = static_cast<int>(std::lower_bound(values.begin(), values.end(), a) - values.begin());
  if (values[hi] == a) return static_cast<uint8_t>(sign | hi);
  const int lo = hi - 1;
  const double below = a - values[lo], above = values[hi] - a;
  const int code = below < above ? lo : above < below ? hi : (lo % 2 == 0 ? lo : hi);
  return static_cast<uint8_t>(sign | code);
}

TEST(E4M3Codec, EveryCodeDecodesToItsDefinedValueAndBack) {
  int nans = 0;
  for (int c = 0; c < 256; ++c) {
    const auto code = static_cast<uint8_t>(c);
    const float value = e4m3_decode(code);
    const double want = defined_value(c);
    if (std::isnan(want)) {
      ++nans;
      EXPECT_TRUE(std::isnan(value)) << c;
      EXPECT_EQ(e4m3_encode(value), 0x7f) << "NaN encodes to the canonical NaN code";
      continue;
    }
    EXPECT_EQ(static_cast<double>(value), want) << "code " << c;
    EXPECT_EQ(std::signbit(value), c >= 0x80) << "code " << c << " keeps its sign (0x80 is -0)";
    EXPECT_EQ(e4m3_encode(value), code) << "code " << c << " = " << value;
  }
  EXPECT_EQ(nans, 2) << "E4M3FN has two NaN codes and no infinities";
  EXPECT_EQ(e4m3_decode(0x7e), 448.0f);
  EXPECT_EQ(e4m3_decode(0x08), 0x1p-6f);
  EXPECT_EQ(e4m3_decode(0x01), 0x1p-9f);
  EXPECT_EQ(e4m3_decode(0x38), 1.0f);
}

TEST(E4M3Codec, KnownValuesSaturationAndNaN) {
  EXPECT_EQ(e4m3_encode(1.0f), 0x38);
  EXPECT_EQ(e4m3_encode(-2.0f), 0xc0);
  EXPECT_EQ(e4m3_encode(0.1f), 0x1d) << "0.1 lies nearer 0.1015625 (1.625 * 2^-4) than 0.09375";
  EXPECT_EQ(e4m3_encode(448.0f), 0x7e);
  EXPECT_EQ(e4m3_encode(464.0f), 0x7e) << "the tie with 480 (which would be the NaN code) saturates";
  EXPECT_EQ(e4m3_encode(1e30f), 0x7e);
  EXPECT_EQ(e4m3_encode(-1e30f), 0xfe);
  EXPECT_EQ(e4m3_encode(kInf), 0x7e) << "satfinite: infinities saturate too";
  EXPECT_EQ(e4m3_encode(-kInf), 0xfe);
  EXPECT_EQ(e4m3_encode(std::numeric_limits<float>::quiet_NaN()), 0x7f);
  EXPECT_EQ(e4m3_encode(-std::numeric_limits<float>::quiet_NaN()), 0x7f);
  EXPECT_EQ(e4m3_encode(0.0f), 0x00);
  EXPECT_EQ(e4m3_encode(-0.0f), 0x80);
  EXPECT_EQ(e4m3_encode(std::numeric_limits<float>::denorm_min()), 0x00);
  EXPECT_EQ(e4m3_encode(-std::numeric_limits<float>::denorm_min()), 0x80);
}

// Halfway between two neighbouring codes the even code wins; one fp32 ulp either side decides.
TEST(E4M3Codec, TiesRoundToEven) {
  int ties = 0;
  for (int c = 0; c < 0x7e; ++c) {
    for (const float sign : {1.0f, -1.0f}) {
      const float lo = sign * e4m3_decode(static_cast<uint8_t>(c)),
                  hi = sign * e4m3_decode(static_cast<uint8_t>(c + 1));
      const float mid = (lo + hi) / 2.0f;  // exact: the values have at most 4 significant bits
      ASSERT_EQ(static_cast<double>(mid), (static_cast<double>(lo) + hi) / 2.0);
      const uint8_t neg = sign < 0.0f ? 0x80 : 0x00;
      const int even = c % 2 == 0 ? c : c + 1;
      EXPECT_EQ(e4m3_encode(mid), neg | even) << "tie between codes " << c << " and " << c + 1;
      EXPECT_EQ(e4m3_encode(std::nextafter(mid, lo)), neg | c) << "just below the tie of " << c;
      EXPECT_EQ(e4m3_encode(std::nextafter(mid, hi)), neg | (c + 1)) << "just above the tie of " << c;
      ++ties;
    }
  }
  EXPECT_EQ(ties, 2 * 126);
  EXPECT_EQ(e4m3_encode(0x1p-10f), 0x00) << "half the smallest subnormal rounds to even 0";
  EXPECT_EQ(e4m3_encode(std::nextafter(0x1p-10f, 1.0f)), 0x01);
}

// Every 97th fp32 bit pattern (44 million inputs: both signs, zeros, subnormals, normals, the
// saturating range, infinities and NaNs) against the reference encoder.
TEST(E4M3Codec, MatchesTheNearestValueReference) {
  int64_t checked = 0, wrong = 0;
  for (uint64_t u = 0; u < (uint64_t{1} << 32); u += 97) {
    const float x = std::bit_cast<float>(static_cast<uint32_t>(u));
    ++checked;
    if (e4m3_encode(x) != reference_encode(x)) {
      if (++wrong <= 5)
        ADD_FAILURE() << "bits 0x" << std::hex << u << " (" << x << "): codec 0x" << int{e4m3_encode(x)}
                      << ", reference 0x" << int{reference_encode(x)};
    }
  }
  EXPECT_EQ(wrong, 0) << "of " << checked;
}

TEST(E4M3Codec, ScaleMapsTheGroupMaximumTo448) {
  EXPECT_EQ(e4m3_scale(0.0f).scale, 0.0f) << "a group of zeros";
  EXPECT_EQ(e4m3_scale(0.0f).inverse, 0.0f);
  EXPECT_EQ(e4m3_scale(448.0f).scale, 1.0f);
  EXPECT_EQ(e4m3_scale(448.0f).inverse, 1.0f);
  EXPECT_TRUE(std::isnan(e4m3_scale(std::numeric_limits<float>::quiet_NaN()).scale));
  // amax * inverse is 448 within an fp32 rounding or two, which encodes to 448 exactly: the group's
  // largest value always takes the top code, never a saturated or NaN one.
  for (int e = -40; e <= 40; ++e)
    for (const float m : {1.0f, 1.1f, 1.37f, 1.5f, 1.9999f}) {
      const float amax = std::ldexp(m, e);
      EXPECT_EQ(e4m3_encode(amax * e4m3_scale(amax).inverse), 0x7e) << amax;
    }
}

}  // namespace
