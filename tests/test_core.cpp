// Core types: dtype conversions, tensor views and strides, buffers, config validation.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>

#include "sapattn/config.hpp"
#include "sapattn/dtype.hpp"
#include "sapattn/tensor.hpp"
#include "test_support.hpp"

namespace sapattn {
namespace {

TEST(DType, F16RoundTripsEveryFiniteHalf) {
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const uint16_t bits = static_cast<uint16_t>(h);
    const float f = f16_to_f32(bits);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(f))));
      continue;
    }
    EXPECT_EQ(f32_to_f16(f), bits) << "half 0x" << std::hex << h;
  }
}

TEST(DType, F16RoundsToNearestEven) {
  // 1 + 2^-11 lies halfway between 1 and the next half (1 + 2^-10): ties go to the even mantissa (1).
  EXPECT_EQ(f32_to_f16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);
  EXPECT_EQ(f32_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7bff);               // largest half
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);               // rounds past it: Inf
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -24)), 0x0001);  // smallest subnormal
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -26)), 0x0000);  // below half of it: zero
  EXPECT_EQ(f32_to_f16(-2.0f), 0xc000);
}

TEST(DType, BF16RoundsToNearestEvenAndKeepsNaN) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x3f808000u)), 0x3f80);  // tie -> even
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x3f818000u)), 0x3f82);  // tie -> even (up)
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-100.0f, 100.0f);
  for (int i = 0; i < 10000; ++i) {
    const float x = u(rng);
    const float y = bf16_to_f32(f32_to_bf16(x));
    EXPECT_LE(std::fabs(x - y), std::fabs(x) * std::ldexp(1.0f, -8)) << x;  // half an ulp of 8 bits
  }
}

TEST(TensorView, BshdViewAddressesTheRightElements) {
  const int64_t B = 2, H = 3, S = 5, D = 4;
  std::vector<float> mem(B * S * H * D);
  for (size_t i = 0; i < mem.size(); ++i) mem[i] = static_cast<float>(i) + 0.5f;
  const TensorView t = TensorView::bshd(mem.data(), DType::F32, B, H, S, D);
  EXPECT_EQ(t.shape[1], H);
  EXPECT_EQ(t.shape[2], S);
  EXPECT_FALSE(t.is_contiguous());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t s = 0; s < S; ++s)
        for (int64_t d = 0; d < D; ++d)
          EXPECT_EQ(static_cast<float*>(t.data)[t.offset({b, h, s, d})], mem[((b * S + s) * H + h) * D + d]);
}

TEST(TensorView, SliceAndDescribe) {
  Tensor t(DType::BF16, {2, 4, 10, 8});
  EXPECT_TRUE(t.view().is_contiguous());
  const TensorView s = t.view().slice(2, 3, 7);
  EXPECT_EQ(s.shape[2], 4);
  EXPECT_EQ(static_cast<char*>(s.data) - static_cast<char*>(t.data()), 3 * 8 * 2);
  EXPECT_FALSE(s.is_contiguous());
  EXPECT_EQ(s.describe(), "[2,4,4,8] bf16 cpu");
  EXPECT_THROW(t.view().slice(2, 5, 11), ShapeError);
  EXPECT_THROW(t.view().slice(4, 0, 1), ShapeError);
}

TEST(TensorView, DescribesAShapeInTheCallersOrder) {
  // Logical [B,H,S,D] = [1,2,100,64] over [B,S,H,D] memory: messages print [1,100,2,64].
  const TensorView s = TensorView::bshd(nullptr, DType::F32, 1, 2, 100, 64);
  EXPECT_EQ(s.shape[2], 100);
  EXPECT_EQ(s.describe(), "[1,100,2,64] f32 cpu");
  EXPECT_EQ(s.caller_dim(2), 1);
  EXPECT_EQ(s.caller_dim(1), 2);
  EXPECT_EQ(s.caller_dim(3), 3);
  EXPECT_STREQ(s.dim_names(), "[B,S,H,D]");
  EXPECT_EQ(s.slice(2, 0, 10).describe(), "[1,10,2,64] f32 cpu");  // a slice keeps the order
  const TensorView h = TensorView::bhsd(nullptr, DType::F32, 1, 2, 100, 64);
  EXPECT_EQ(h.describe(), "[1,2,100,64] f32 cpu");
  EXPECT_EQ(h.caller_dim(2), 2);
  EXPECT_STREQ(h.dim_names(), "[B,H,S,D]");
}

TEST(Buffer, CpuIsAlignedAndCudaIsRefusedInACpuOnlyBuild) {
  const Buffer b = Buffer::allocate(100);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(b.data()) % 64, 0u);
  EXPECT_EQ(b.bytes(), 100u);
#if !SAPATTN_HAS_CUDA
  EXPECT_THROW(Buffer::allocate(16, Device::cuda(0)), UnsupportedError);  // tests/cuda covers CUDA builds
#endif
  EXPECT_THROW(Tensor(DType::F32, {2, -1}), ShapeError);
}

TEST(Config, DefaultsAreTheOfficialWan720pOnes) {
  const Config c;
  EXPECT_EQ(c.q_clusters, 300);
  EXPECT_EQ(c.k_clusters, 1000);
  EXPECT_FLOAT_EQ(c.top_p, 0.9f);
  EXPECT_EQ(c.min_kept_clusters(), 100);
  // The first call is the CPU study's schedule (docs/cuda.md), not the official 50 iterations from a sample.
  EXPECT_EQ(c.kmeans_seeding, KMeansSeeding::GreedyPP);
  EXPECT_EQ(c.kmeans_sample_factor, 2);
  EXPECT_EQ(c.kmeans_candidates, 0);
  EXPECT_EQ(c.kmeans_iters_init, 14);
  EXPECT_EQ(c.kmeans_iters_step, 2);
  EXPECT_NO_THROW(c.validate());
  EXPECT_FLOAT_EQ(c.scale_for(128), 1.0f / std::sqrt(128.0f));
}

TEST(Config, RejectsOutOfRangeValues) {
  auto bad = [](auto mutate) {
    Config c;
    mutate(c);
    return c;
  };
  EXPECT_THROW(bad([](Config& c) { c.q_clusters = 0; }).validate(), InvalidArgumentError);
  EXPECT_THROW(bad([](Config& c) { c.k_clusters = -3; }).validate(), InvalidArgumentError);
  EXPECT_THROW(bad([](Config& c) { c.top_p = 0.0f; }).validate(), InvalidArgumentError);
  EXPECT_THROW(bad([](Config& c) { c.top_p = 1.5f; }).validate(), InvalidArgumentError);
  EXPECT_THROW(bad([](Config& c) { c.top_p = std::nanf(""); }).validate(), InvalidArgumentError);
  EXPECT_THROW(bad([](Config& c) { c.min_kc_ratio = -0.1f; }).validate(), InvalidArgumentError);
  EXPECT_THROW(bad([](Config& c) { c.kmeans_iters_init = -1; }).validate(), InvalidArgumentError);
  EXPECT_THROW(bad([](Config& c) { c.kmeans_sample_factor = 0; }).validate(), InvalidArgumentError);
  EXPECT_THROW(bad([](Config& c) { c.kmeans_sample_factor = 65; }).validate(), InvalidArgumentError);
  EXPECT_NO_THROW(bad([](Config& c) { c.kmeans_sample_factor = 1; }).validate());
  EXPECT_NO_THROW(bad([](Config& c) { c.kmeans_sample_factor = 64; }).validate());
  EXPECT_THROW(bad([](Config& c) { c.kmeans_candidates = -1; }).validate(), InvalidArgumentError);
  EXPECT_NO_THROW(bad([](Config& c) { c.kmeans_candidates = 1; }).validate());
  EXPECT_THROW(bad([](Config& c) { c.kmeans_seeding = static_cast<KMeansSeeding>(7); }).validate(),
               InvalidArgumentError);
  EXPECT_NO_THROW(bad([](Config& c) { c.kmeans_seeding = KMeansSeeding::Sample; }).validate());
  EXPECT_THROW(bad([](Config& c) { c.text_tokens = 10, c.prompt_length = 11; }).validate(), InvalidArgumentError);
  EXPECT_THROW(bad([](Config& c) { c.scale = -1.0f; }).validate(), InvalidArgumentError);
  EXPECT_THROW(bad([](Config& c) { c.text_tokens = 100; }).validate_for(100, 64), InvalidArgumentError);
  EXPECT_NO_THROW(bad([](Config& c) { c.text_tokens = 99, c.q_clusters = 1, c.k_clusters = 1; }).validate_for(100, 64));
  // At most one cluster per video token: 1000 key clusters need 1000 video tokens.
  EXPECT_NO_THROW(bad([](Config& c) { c.text_tokens = 10; }).validate_for(1010, 64));
  testing_support::expect_error_message<InvalidArgumentError>(
      [&] { bad([](Config& c) { c.text_tokens = 10; }).validate_for(1009, 64); },
      "k_clusters (1000) exceeds the 999 video tokens");
  testing_support::expect_error_message<ShapeError>([&] { Config().validate_for(0, 64); },
                                                    "the sequence is empty (S = 0, D = 64)");
  try {
    bad([](Config& c) { c.top_p = 2.0f; }).validate();
    FAIL() << "no throw";
  } catch (const InvalidArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("top_p"), std::string::npos) << e.what();
    EXPECT_GT(e.line(), 0);
  }
}

}  // namespace
}  // namespace sapattn
