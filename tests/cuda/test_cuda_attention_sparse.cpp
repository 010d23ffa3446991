// block_sparse_attention on random block layouts and their edge cases, under every kernel, against the
// CPU op and the float64 reference with the block mask expanded to tokens, under the error model of
// cuda_attention_support.hpp: bf16/f16, D 64/128, B = 2, H = 40, S not a multiple of a tile, Sq != Sk,
// no lse, large scores, empty, 1-token and multi-tile clusters, all, one or no key cluster kept per
// row (all kept: also against GPU dense_attention), one cluster in all, Wan-like spread sizes.
// Tests whose name contains "Large" take realistic sizes; the sanitizer runs skip them.
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "cuda_attention_support.hpp"

namespace sapattn::cuda_test {
namespace {

// The cases in list order; most run twice, in bf16 and in f16 (in_both_dtypes).
std::vector<SparseCase> sparse_cases() {
  std::vector<SparseCase> cases;
  auto one = [&](const char* name, SparseCase c) {
    c.name = name;
    cases.push_back(c);
  };
  auto both = [&](const char* prefix, DType first, int64_t first_D, const SparseCase& c, const char* suffix = "") {
    const std::vector<SparseCase> two = in_both_dtypes(prefix, first, first_D, c, suffix);
    cases.insert(cases.end(), two.begin(), two.end());
  };
  const DType bf16 = DType::BF16, f16 = DType::F16;
  both("S1000", bf16, 128, {.Sq = 1000, .Sk = 1000});
  both("B2_S600", bf16, 64, {.B = 2, .Sq = 600, .Sk = 600});
  both("H40_S70", bf16, 64, {.H = 40, .Sq = 70, .Sk = 70, .Cq = 4, .Ck = 6});
  both("Sq700_Sk1300", bf16, 64, {.Sq = 700, .Sk = 1300});
  both("S333", bf16, 128, {.Sq = 333, .Sk = 333, .Cq = 5, .Ck = 7, .with_lse = false}, "_no_lse");
  // Scores of standard deviation 30: exp without the running maximum would overflow.
  one("large_scores_bf16_D64", {.Sq = 300, .Sk = 400, .Cq = 4, .Ck = 6, .keep = 0.6, .q_std = 30.0});
  both("gappy_clusters", f16, 64, {.Sq = 400, .Sk = 450, .Cq = 9, .Ck = 13, .sizes = Sizes::Gappy});
  both("unit_clusters", f16, 64, {.Sq = 40, .Sk = 45, .Cq = 40, .Ck = 45, .sizes = Sizes::Unit});
  // Four clusters over 1500 tokens: one holds more than a thousand, many 128-row tiles.
  both("big_clusters", bf16, 64, {.Sq = 1500, .Sk = 1500, .Cq = 4, .Ck = 4, .keep = 0.75});
  one("all_kept_bf16_D128", {.Sq = 500, .Sk = 700, .D = 128, .Cq = 5, .Ck = 6, .mask = Mask::AllKept});
  one("all_kept_f16_D64", {.B = 2, .Sq = 300, .Sk = 200, .Cq = 4, .Ck = 5, .dtype = f16, .mask = Mask::AllKept});
  both("one_key_cluster", f16, 128,
       {.B = 2, .Sq = 300, .Sk = 500, .Cq = 6, .Ck = 9, .mask = Mask::OneKeyClusterPerRow});
  both("none_kept", bf16, 64, {.Sq = 100, .Sk = 120, .Cq = 3, .Ck = 3, .mask = Mask::NoneKept});
  both("single_cluster", bf16, 64, {.Sq = 300, .Sk = 257, .Cq = 1, .Ck = 1, .mask = Mask::AllKept});
  // Wan-like layouts: 16 query and 54 key clusters of spread sizes, density ~0.2.
  one("spread_sizes_f16_D64",
      {.Sq = 2048, .Sk = 2048, .Cq = 16, .Ck = 54, .dtype = f16, .sizes = Sizes::Spread, .keep = 0.2});
  one("WanLarge_bf16_D128",
      {.H = 4, .Sq = 4096, .Sk = 4096, .D = 128, .Cq = 16, .Ck = 54, .sizes = Sizes::Spread, .keep = 0.2});
  return cases;
}

class SparseAttention : public UnderKernel<SparseCase> {};

TEST_P(SparseAttention, MatchesCpuAndFloat64) {
  const SparseCase& c = test_case();
  ASSERT_TRUE(runs_expected_kernel(c.dtype, c.D));
  const SparseRun r(c);
  const Expected& expected = r.prepared.expected;
  EXPECT_TRUE(matches(r.first, expected));
  EXPECT_TRUE(identical(run_gpu(r.device.inputs(), r.poisoned, r.cs, r.workspace), r.first)) << "a second run differs";
  // The layout exercises what its kind promises.
  const auto empty_rows = std::count(expected.lse.begin(), expected.lse.end(), -kInf);
  if (c.mask == Mask::Random) {
    EXPECT_GT(empty_rows, 0) << "no query row without keys";
  } else if (c.mask == Mask::NoneKept) {
    EXPECT_EQ(empty_rows, c.B * c.H * c.Sq);
  } else {
    EXPECT_EQ(empty_rows, 0);
  }
  if (c.mask == Mask::AllKept) {
    // Every block kept: dense_attention computes the same attention.
    Inputs dense = r.device.inputs();
    dense.layout = {};
    EXPECT_TRUE(matches(run_gpu(dense, r.poisoned, r.cs, Buffer{}), expected)) << "dense_attention";
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, SparseAttention, ::testing::Combine(::testing::ValuesIn(sparse_cases()), kKernels),
                         case_and_kernel<SparseCase>);

}  // namespace
}  // namespace sapattn::cuda_test
