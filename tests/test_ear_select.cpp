// SVG-EAR's selections (docs/ear.md): the error-aware routing (select_error_aware, and its per-head
// budget of ear-plus) and the density budget (select_top_p_at_density) against brute-force
// characterisations on random rows with ties, empty clusters and NaN scores.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "ear_support.hpp"
#include "sapattn/svg2.hpp"
#include "test_support.hpp"

namespace sapattn {
namespace {

using namespace ear_test;
using namespace testing_support;

// ---------------------------------------------------------------------------------------------
// select_error_aware
// ---------------------------------------------------------------------------------------------

// Random rows with ties (scores and probs drawn from a few values), empty key and query clusters,
// NaN scores, and budgets from SVG2's top-p rule; compared with the brute-force characterisation,
// per row (EAR) and per head (ear-plus).
TEST(EarRouting, MatchesBruteForce) {
  const int64_t B = 2, H = 3, R = 7, C = 11;
  ref::Rng rng(case_seed());
  for (int trial = 0; trial < 20; ++trial) {
    std::vector<double> probs(static_cast<size_t>(B * H * R * C)), scores(probs.size());
    for (int64_t r = 0; r < B * H * R; ++r) {
      double total = 0;
      for (int64_t j = 0; j < C; ++j) total += probs[static_cast<size_t>(r * C + j)] = 1.0 + rng.integer(0, 3);
      for (int64_t j = 0; j < C; ++j) probs[static_cast<size_t>(r * C + j)] /= total;
    }
    for (double& x : scores)
      x = rng.integer(0, 9) == 0 ? std::numeric_limits<double>::quiet_NaN() : static_cast<double>(rng.integer(-4, 4));
    std::vector<int32_t> q_sizes(static_cast<size_t>(B * H * R)), k_sizes(static_cast<size_t>(B * H * C));
    for (int32_t& n : q_sizes) n = static_cast<int32_t>(rng.integer(0, 5));
    for (int32_t& n : k_sizes) n = static_cast<int32_t>(rng.integer(0, 9));
    const std::vector<uint8_t> budget = ref::top_p_mask(probs, B * H * R, C, rng.uniform(0.2, 1.0), 1);
    const Tensor probs_t = from_values(DType::F32, {B, H, R, C}, probs);
    const Tensor scores_t = from_values(DType::F32, {B, H, R, C}, scores);
    Tensor budget_t(DType::U8, {B, H, R, C}), mask(DType::U8, {B, H, R, C});
    std::copy(budget.begin(), budget.end(), budget_t.data_as<uint8_t>());
    const Tensor q_sizes_t = sizes_tensor({B, H, R}, q_sizes), k_sizes_t = sizes_tensor({B, H, C}, k_sizes);
    for (const bool per_head : {false, true})
      for (const int guaranteed : {0, 1, 3, static_cast<int>(C) + 2}) {
        if (per_head)  // ear-plus: one budget per head
          select_error_aware_per_head(probs_t.view(), budget_t.view(), scores_t.view(), q_sizes_t.view(),
                                      k_sizes_t.view(), guaranteed, mask.view(), kStream);
        else
          select_error_aware(probs_t.view(), budget_t.view(), scores_t.view(), q_sizes_t.view(), k_sizes_t.view(),
                             guaranteed, mask.view(), kStream);
        // The brute force reads the values the op read: fp32 probs and scores.
        const std::vector<uint8_t> want =
            ref::error_aware_mask(ref::to_vector(probs_t.view()), budget, ref::to_vector(scores_t.view()), q_sizes,
                                  k_sizes, B, H, R, C, guaranteed, per_head);
        const std::vector<int32_t> got = ref::to_i32(mask.view());
        for (size_t i = 0; i < want.size(); ++i)
          ASSERT_EQ(got[i], want[i]) << "trial " << trial << " per_head " << per_head << " guaranteed " << guaranteed
                                     << " entry " << i;
      }
  }
}

// Top-p 1 makes the budget everything: every cluster is computed, whatever the scores say.
TEST(EarRouting, FullBudgetKeepsEveryCluster) {
  const int64_t C = 6;
  const Tensor probs = from_values(DType::F32, {1, 1, 1, C}, {0.5, 0.1, 0.1, 0.1, 0.1, 0.1});
  const Tensor scores = from_values(DType::F32, {1, 1, 1, C}, {-3, 2, 7, -1, 0, 1});
  Tensor budget(DType::U8, {1, 1, 1, C}), mask(DType::U8, {1, 1, 1, C});
  std::fill_n(budget.data_as<uint8_t>(), C, uint8_t{1});
  const Tensor q_sizes = sizes_tensor({1, 1, 1}, {4}), k_sizes = sizes_tensor({1, 1, C}, {1, 2, 3, 4, 5, 6});
  select_error_aware(probs.view(), budget.view(), scores.view(), q_sizes.view(), k_sizes.view(), 1, mask.view(),
                     kStream);
  for (int64_t j = 0; j < C; ++j) EXPECT_EQ(mask.data_as<uint8_t>()[j], 1) << j;
}

// ---------------------------------------------------------------------------------------------
// select_top_p_at_density (the --density budget)
// ---------------------------------------------------------------------------------------------

// Brute force over every candidate top-p (each row's fp32 running sums in rank order, and 1):
// select_top_p at each, keep the smallest whose kept area reaches the target.
TEST(DensityBudget, SmallestTopPThatReachesTheDensity) {
  const int64_t B = 1, H = 2, R = 5, C = 9;
  ref::Rng rng(case_seed());
  for (int trial = 0; trial < 10; ++trial) {
    std::vector<double> probs(static_cast<size_t>(B * H * R * C));
    for (int64_t r = 0; r < B * H * R; ++r) {
      double total = 0;
      for (int64_t j = 0; j < C; ++j)
        total += probs[static_cast<size_t>(r * C + j)] = rng.uniform() + rng.integer(0, 1);
      for (int64_t j = 0; j < C; ++j) probs[static_cast<size_t>(r * C + j)] /= total;
    }
    std::vector<int32_t> q_sizes(static_cast<size_t>(B * H * R)), k_sizes(static_cast<size_t>(B * H * C));
    for (int32_t& n : q_sizes) n = static_cast<int32_t>(rng.integer(0, 6));
    for (int32_t& n : k_sizes) n = static_cast<int32_t>(rng.integer(0, 9));
    const Tensor probs_t = from_values(DType::F32, {B, H, R, C}, probs);
    const Tensor q_sizes_t = sizes_tensor({B, H, R}, q_sizes), k_sizes_t = sizes_tensor({B, H, C}, k_sizes);
    const float density = static_cast<float>(rng.uniform(0.05, 1.0));
    const int min_kept = static_cast<int>(rng.integer(0, 2));
    Tensor got(DType::U8, {B, H, R, C}), at_p(DType::U8, {B, H, R, C});
    select_top_p_at_density(probs_t.view(), q_sizes_t.view(), k_sizes_t.view(), density, min_kept, got.view(), kStream);
    const std::vector<double> pf = ref::to_vector(probs_t.view());
    for (int64_t bh = 0; bh < B * H; ++bh) {
      std::vector<float> candidates{1.0f};
      for (int64_t r = 0; r < R; ++r) {
        const std::vector<int64_t> order = ref::rank_descending(&pf[static_cast<size_t>((bh * R + r) * C)], C);
        float sum = 0.0f;
        for (int64_t i : order)
          candidates.push_back(sum += static_cast<float>(pf[static_cast<size_t>((bh * R + r) * C + i)]));
      }
      std::sort(candidates.begin(), candidates.end());
      double q_total = 0, k_total = 0;
      for (int64_t r = 0; r < R; ++r) q_total += q_sizes[static_cast<size_t>(bh * R + r)];
      for (int64_t j = 0; j < C; ++j) k_total += k_sizes[static_cast<size_t>(bh * C + j)];
      for (float p : candidates) {
        if (p <= 0.0f || p > 1.0f) continue;
        select_top_p(probs_t.view(), p, min_kept, at_p.view(), kStream);
        double area = 0;
        for (int64_t r = 0; r < R; ++r)
          for (int64_t j = 0; j < C; ++j)
            if (at_p.data_as<uint8_t>()[(bh * R + r) * C + j] != 0)
              area += static_cast<double>(q_sizes[static_cast<size_t>(bh * R + r)]) *
                      k_sizes[static_cast<size_t>(bh * C + j)];
        if (area < density * q_total * k_total && p < 1.0f) continue;
        for (int64_t i = bh * R * C; i < (bh + 1) * R * C; ++i)
          ASSERT_EQ(got.data_as<uint8_t>()[i], at_p.data_as<uint8_t>()[i])
              << "trial " << trial << " head " << bh << " top-p " << p << " density " << density;
        break;
      }
    }
  }
}

}  // namespace
}  // namespace sapattn
