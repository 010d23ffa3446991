// SVG-EAR's centroid compensation (docs/ear.md) on the path svg2_attention takes (sparse attention,
// then centroid_compensation): a hand-made closed form, dense attention when every cluster's members
// are identical, and the float64 reference with text rows left untouched.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "ear_support.hpp"
#include "sapattn/svg2.hpp"
#include "test_support.hpp"

namespace sapattn {
namespace {

using namespace ear_test;
using namespace testing_support;

TEST(Compensation, ClosedFormOnAHandMadeCase) {
  // One query q = (1,0); key cluster 0 = one key (0,0) with v = (1,0), computed exactly; key
  // cluster 1 = three keys, skipped, with centroids kbar = (2,0), vbar = (0,1). With scale 1/2:
  //   out = (e^0 (1,0) + 3 e^1 (0,1)) / (1 + 3e),  lse = log(1 + 3e).
  const Tensor q = from_values(DType::F32, {1, 1, 1, 2}, {1, 0});
  const Tensor k = from_values(DType::F32, {1, 1, 4, 2}, {0, 0, 1, 0, 3, 0, 2, 0});
  const Tensor v = from_values(DType::F32, {1, 1, 4, 2}, {1, 0, 0, 1, 0, 1, 0, 1});
  const Tensor q_labels = sizes_tensor({1, 1, 1}, {0}), k_labels = sizes_tensor({1, 1, 4}, {0, 1, 1, 1});
  Tensor mask(DType::U8, {1, 1, 1, 2});
  mask.data_as<uint8_t>()[0] = 1;
  mask.data_as<uint8_t>()[1] = 0;
  const Tensor kc = from_values(DType::F32, {1, 1, 2, 2}, {0, 0, 2, 0});
  const Tensor vc = from_values(DType::F32, {1, 1, 2, 2}, {1, 0, 0, 1});
  const Tensor sizes = sizes_tensor({1, 1, 2}, {1, 3});
  const ref::Attention r = compensated(q.view(), k.view(), v.view(), q_labels, k_labels, mask, kc, vc, sizes, 0.5f, 1);
  const double e = std::exp(1.0);
  EXPECT_NEAR(r.out[0], 1 / (1 + 3 * e), 1e-6);
  EXPECT_NEAR(r.out[1], 3 * e / (1 + 3 * e), 1e-6);
  EXPECT_NEAR(r.lse[0], std::log(1 + 3 * e), 1e-6);
}

// The closed form behind the method: when every key cluster is a set of identical keys with
// identical values, the centroid stands in exactly, and the compensated output is dense attention
// whatever the mask.
TEST(Compensation, IdenticalClusterMembersGiveDenseAttention) {
  const int64_t B = 2, H = 2, S = 70, N = 70, D = 16, Cq = 6, Ck = 10;
  ref::Rng rng(case_seed());
  const CompensationCase c = compensation_case(rng, DType::F32, B, H, S, N, D, Cq, Ck, true);
  const float scale = 0.25f;
  const ref::Attention got =
      compensated(c.q.view, c.k.view, c.v.view, c.q_labels, c.k_labels, c.mask, c.kc, c.vc, c.k_sizes, scale, N);
  const ref::Attention dense = ref::attention_f64(c.q.view, c.k.view, c.v.view, scale, nullptr);
  expect_close(got, dense, max_abs(ref::to_vector(c.v.view)), D, S, "vs dense");
}

TEST(Compensation, MatchesFloat64Reference) {
  const int64_t B = 2, H = 2, S = 80, N = 64, D = 16, Cq = 5, Ck = 9;
  ref::Rng rng(case_seed());
  for (DType dtype : {DType::F32, DType::BF16}) {
    const CompensationCase c = compensation_case(rng, dtype, B, H, S, N, D, Cq, Ck, false);
    const float scale = 0.3f;
    ref::Attention before;
    const ref::Attention got = compensated(c.q.view, c.k.view, c.v.view, c.q_labels, c.k_labels, c.mask, c.kc, c.vc,
                                           c.k_sizes, scale, N, &before);
    const CompensationReference r = compensation_reference(c, N);
    const ref::Attention want =
        ref::compensated_attention(c.q.view, c.k.view, c.v.view, scale, r.tokens, r.video_labels, N, r.video_mask, Cq,
                                   c.kc.view(), c.vc.view(), c.k_size_values);
    expect_close(got, want, max_abs(ref::to_vector(c.v.view)), D, S, dtype_name(dtype));
    // Text rows (beyond N) are left exactly as the attention wrote them.
    for (int64_t bh = 0; bh < B * H; ++bh)
      for (int64_t i = N; i < S; ++i) {
        ASSERT_EQ(got.lse[static_cast<size_t>(bh * S + i)], before.lse[static_cast<size_t>(bh * S + i)]);
        for (int64_t d = 0; d < D; ++d)
          ASSERT_EQ(got.out[static_cast<size_t>((bh * S + i) * D + d)],
                    before.out[static_cast<size_t>((bh * S + i) * D + d)]);
      }
  }
}

}  // namespace
}  // namespace sapattn
