// dense_attention under every kernel: against the CPU op and the float64 reference under the error
// model of cuda_attention_support.hpp (bf16/f16, D 64/128, B = 2, H = 40, Sq != Sk, no lse), and a NaN
// in one query row makes that row's out and lse NaN and leaves every other row finite, as in the CPU
// backend and SDPA.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "cuda_attention_support.hpp"

namespace sapattn::cuda_test {
namespace {

std::vector<DenseCase> dense_cases() {
  std::vector<DenseCase> cases = in_both_dtypes<DenseCase>("S1000", DType::BF16, 128, {.Sq = 1000, .Sk = 1000});
  cases.push_back({.name = "B2_Sq300_Sk777_f16_D128_no_lse",
                   .B = 2,
                   .Sq = 300,
                   .Sk = 777,
                   .D = 128,
                   .dtype = DType::F16,
                   .with_lse = false});
  cases.push_back({.name = "H40_S65_bf16_D64", .H = 40, .Sq = 65, .Sk = 65});
  return cases;
}

class DenseAttentionCuda : public UnderKernel<DenseCase> {};

TEST_P(DenseAttentionCuda, MatchesCpuAndFloat64) {
  const DenseCase& c = test_case();
  ASSERT_TRUE(runs_expected_kernel(c.dtype, c.D));
  const Prepared& p = prepare(
      "dense/" + c.name,
      [&c] {
        ref::Rng rng(ref::test_seed(c.name));
        return random_qkv(c.B, c.H, c.Sq, c.Sk, c.D, c.dtype, 1.0, rng);
      },
      c.with_lse);
  const TestStream cs;
  const Outputs got =
      run_gpu(to_device(p.problem).inputs(), poisoned_outputs(c.dtype, p.problem.q.view, c.with_lse), cs, Buffer{});
  EXPECT_TRUE(matches(got, p.expected));
}

INSTANTIATE_TEST_SUITE_P(Cases, DenseAttentionCuda, ::testing::Combine(::testing::ValuesIn(dense_cases()), kKernels),
                         case_and_kernel<DenseCase>);

// One NaN in query 5 of head (0,0): its O row and LSE are NaN, as in the CPU backend and SDPA, and
// every other row is finite. The outputs start at zero (not poisoned), so a NaN was written.
class DenseNanRows : public UnderKernel<DenseCase> {};

TEST_P(DenseNanRows, NanQueryRowIsNan) {
  const DenseCase& c = test_case();
  ref::Rng rng(ref::test_seed("nan/" + c.name));
  HostProblem problem = random_qkv(c.B, c.H, c.Sq, c.Sk, c.D, c.dtype, 1.0, rng);
  ref::set(problem.q.view, {0, 0, 5, 7}, std::nan(""));
  const Outputs zeros{ref::make_tensor(c.dtype, shape_of(problem.q.view)),
                      ref::make_tensor(DType::F32, {c.B, c.H, c.Sq})};
  const TestStream cs;
  const Outputs got = run_gpu(to_device(problem).inputs(), zeros, cs, Buffer{});
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h)
      for (int64_t s = 0; s < c.Sq; ++s) {
        const bool nan_row = b == 0 && h == 0 && s == 5;
        ASSERT_EQ(std::isnan(ref::get(got.lse.view, {b, h, s})), nan_row) << "lse " << b << "," << h << "," << s;
        for (int64_t d = 0; d < c.D; ++d)
          ASSERT_EQ(std::isnan(ref::get(got.out.view, {b, h, s, d})), nan_row) << "out " << b << "," << h << "," << s;
      }
}

INSTANTIATE_TEST_SUITE_P(Cases, DenseNanRows, ::testing::Combine(::testing::ValuesIn(dense_cases()), kKernels),
                         case_and_kernel<DenseCase>);

}  // namespace
}  // namespace sapattn::cuda_test
