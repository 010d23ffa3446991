// Block selection ops (select_top_p, select_blocks, apply_text_rule) against the float64 reference
// and the rules of their contracts in sapattn/ops.hpp. Kept sets are compared as sets; where the
// running sum or two weights are within rounding of each other, every set an fp32 evaluation could
// produce is accepted and nothing else.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "reference.hpp"
#include "sapattn/ops.hpp"
#include "test_support.hpp"

namespace {

using namespace sapattn;
using namespace sapattn::testing_support;

std::vector<uint8_t> mask_values(const TensorView& mask) {
  const std::vector<double> v = ref::to_vector(mask);
  return std::vector<uint8_t>(v.begin(), v.end());
}

::testing::AssertionResult all_written_as_bits(const TensorView& mask) {
  if (const int64_t n = ref::count_poisoned(mask); n != 0) {
    return ::testing::AssertionFailure() << n << " mask entries not written";
  }
  for (double v : ref::to_vector(mask)) {
    if (v != 0.0 && v != 1.0) return ::testing::AssertionFailure() << "mask entry " << v << " is neither 0 nor 1";
  }
  return ::testing::AssertionSuccess();
}

// ---------------------------------------------------------------------------------------------
// select_top_p: the op ranks the given fp32 weights exactly (ties by lower index), so the ranking is
// known; only the fp32 running sum may cross top_p one rank earlier or later than the exact sum.
// The kept set must be the first L ranks with L the crossing rank for a running sum within its
// rounding bound, raised to min_kept.
::testing::AssertionResult check_top_p_row(const double* w, const uint8_t* got, int64_t C, double top_p, int min_kept) {
  const std::vector<int64_t> order = ref::rank_descending(w, C);
  int64_t kept = 0;
  for (int64_t c = 0; c < C; ++c) kept += got[c] != 0;
  for (int64_t r = 0; r < C; ++r) {
    if ((got[order[static_cast<size_t>(r)]] != 0) != (r < kept)) {
      return ::testing::AssertionFailure()
             << "kept set is not a prefix of the ranking (ties by lower index): rank " << r << " (cluster "
             << order[static_cast<size_t>(r)] << ", weight " << w[order[static_cast<size_t>(r)]] << ") "
             << (r < kept ? "dropped" : "kept") << " with " << kept << " kept";
    }
  }
  int64_t lo = C, hi = C;  // the earliest possible and the latest certain crossing
  if (top_p < 1.0) {
    double running = 0.0;
    for (int64_t k = 1; k <= C; ++k) {
      running += w[order[static_cast<size_t>(k - 1)]];
      // A recursive fp32 sum of k terms errs by at most (k - 1) u times its partial sums; k + 1
      // covers the second order.
      const double tol = static_cast<double>(k + 1) * ref::kF32Eps * running;
      if (lo == C && running + tol >= top_p) lo = k;
      if (running - tol >= top_p) {
        hi = k;
        break;
      }
    }
  }
  const int64_t floor_kept = std::min<int64_t>(min_kept, C);
  const int64_t want_lo = std::max(lo, floor_kept), want_hi = std::max(hi, floor_kept);
  if (kept < want_lo || kept > want_hi) {
    return ::testing::AssertionFailure() << kept << " kept, expected " << want_lo
                                         << (want_hi != want_lo ? " to " + std::to_string(want_hi) : std::string())
                                         << " (top_p " << top_p << ", min_kept " << min_kept << ", C " << C << ")";
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult check_top_p(const TensorView& probs, const TensorView& mask, double top_p, int min_kept) {
  const int64_t C = probs.shape[3];
  const int64_t rows = probs.shape[0] * probs.shape[1] * probs.shape[2];
  const std::vector<double> w = ref::to_vector(probs);
  const std::vector<uint8_t> m = mask_values(mask);
  for (int64_t r = 0; r < rows; ++r) {
    auto res = check_top_p_row(&w[static_cast<size_t>(r * C)], &m[static_cast<size_t>(r * C)], C, top_p, min_kept);
    if (!res) return res << " in row " << r;
  }
  return ::testing::AssertionSuccess();
}

enum class Weights { HeavyTailed, WithZeros, WithTies, Flat };

const char* weights_name(Weights w) {
  constexpr const char* kNames[] = {"heavy_tailed", "with_zeros", "with_ties", "flat"};
  return kNames[static_cast<int>(w)];
}

// Rows of non-negative weights summing to 1 (in float64 before the fp32 rounding).
void fill_probs(const TensorView& probs, ref::Rng& rng, Weights kind) {
  const int64_t C = probs.shape[3];
  const int64_t rows = probs.shape[0] * probs.shape[1] * probs.shape[2];
  std::vector<double> all;
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<double> w(static_cast<size_t>(C));
    for (int64_t c = 0; c < C; ++c) {
      switch (kind) {
        case Weights::HeavyTailed:
          w[static_cast<size_t>(c)] = std::exp(2.0 * rng.normal());
          break;
        case Weights::WithZeros:
          w[static_cast<size_t>(c)] = rng.uniform() < 0.3 ? 0.0 : std::exp(rng.normal());
          break;
        // Few distinct values: many exact ties, at every rank.
        case Weights::WithTies:
          w[static_cast<size_t>(c)] = static_cast<double>(rng.integer(1, 4));
          break;
        case Weights::Flat:
          w[static_cast<size_t>(c)] = 1.0 + 0.01 * rng.uniform();
          break;
      }
    }
    if (kind == Weights::WithZeros) w[static_cast<size_t>(rng.integer(0, C - 1))] = 1.0;  // never all zero
    const double total = std::accumulate(w.begin(), w.end(), 0.0);
    for (double& x : w) all.push_back(x / total);
  }
  ref::from_vector(probs, all);
}

struct TopPCase {
  int64_t B, H, R, C;
  Weights weights;
  Layout probs_layout, mask_layout;
};

class SelectTopPRandom : public ::testing::TestWithParam<TopPCase> {};

TEST_P(SelectTopPRandom, KeepsTheShortestPrefixReachingTopP) {
  const TopPCase tc = GetParam();
  uint64_t index = 0;
  for (double top_p : {0.05, 0.3, 0.9, 0.99, 1.0}) {
    for (int min_kept : {0, 3, 9}) {
      SCOPED_TRACE("top_p " + std::to_string(top_p) + " min_kept " + std::to_string(min_kept));
      ref::Rng rng(case_seed(index++));
      HostTensor probs = ref::make_tensor(DType::F32, {tc.B, tc.H, tc.R, tc.C}, tc.probs_layout);
      fill_probs(probs.view, rng, tc.weights);
      HostTensor mask = ref::make_tensor(DType::U8, {tc.B, tc.H, tc.R, tc.C}, tc.mask_layout);
      ref::poison(mask);
      const std::vector<uint8_t> before = mask.bytes();
      const std::vector<uint8_t> probs_bytes = probs.bytes();
      select_top_p(probs.view, static_cast<float>(top_p), min_kept, mask.view, kStream);
      ASSERT_TRUE(all_written_as_bits(mask.view));
      EXPECT_TRUE(mask.outside_view_unchanged(before)) << "wrote outside its block of the larger mask";
      EXPECT_EQ(probs.bytes(), probs_bytes) << "select_top_p wrote its input";
      EXPECT_TRUE(check_top_p(probs.view, mask.view, static_cast<float>(top_p), min_kept));
      // And against the float64 reference rule directly: the two may differ only in rows where the
      // running sum sits within rounding of top_p (check_top_p has accepted those). For continuous
      // weights that takes a sum within ~1e-6 of p, which a handful of random rows hit at most: a
      // guard against check_top_p accepting too much. (Tied integer weights hit p exactly often.)
      if (tc.weights == Weights::WithTies) continue;
      const std::vector<uint8_t> want =
          ref::top_p_mask(ref::to_vector(probs.view), tc.B * tc.H * tc.R, tc.C, static_cast<float>(top_p), min_kept);
      const std::vector<uint8_t> got = mask_values(mask.view);
      int64_t differing_rows = 0;
      for (int64_t r = 0; r < tc.B * tc.H * tc.R; ++r) {
        differing_rows += !std::equal(got.begin() + r * tc.C, got.begin() + (r + 1) * tc.C, want.begin() + r * tc.C);
      }
      EXPECT_LE(differing_rows, std::max<int64_t>(1, tc.B * tc.H * tc.R / 50))
          << "too many rows away from the reference";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, SelectTopPRandom,
    ::testing::Values(TopPCase{2, 3, 17, 50, Weights::HeavyTailed, Layout::Contiguous, Layout::Contiguous},
                      TopPCase{1, 2, 9, 333, Weights::HeavyTailed, Layout::Transposed, Layout::Padded},
                      TopPCase{2, 2, 13, 40, Weights::WithZeros, Layout::Padded, Layout::TransposedPadded},
                      TopPCase{1, 3, 11, 64, Weights::WithTies, Layout::TransposedPadded, Layout::Transposed},
                      TopPCase{1, 1, 20, 1000, Weights::Flat, Layout::Contiguous, Layout::Padded},
                      TopPCase{2, 1, 5, 1, Weights::HeavyTailed, Layout::Contiguous, Layout::Contiguous}),
    [](const auto& p) {
      const TopPCase& c = p.param;
      return case_name(weights_name(c.weights), ref::layout_name(c.probs_layout), ref::layout_name(c.mask_layout),
                       "B" + std::to_string(c.B) + "H" + std::to_string(c.H), "R" + std::to_string(c.R),
                       "C" + std::to_string(c.C));
    });

// Rows of exactly representable weights: every running sum is exact in fp32, so the kept set is
// known exactly. Each row: weights, top_p, min_kept, the kept clusters.
struct ExactRow {
  std::vector<float> w;
  float top_p;
  int min_kept;
  std::vector<int> kept;
};

TEST(SelectTopP, ExactRows) {
  const std::vector<ExactRow> rows = {
      {{0.5f, 0.25f, 0.125f, 0.125f}, 0.75f, 0, {0, 1}},          // reaching p exactly counts
      {{0.5f, 0.25f, 0.125f, 0.125f}, 0.7500001f, 0, {0, 1, 2}},  // just above: one more
      {{0.125f, 0.375f, 0.125f, 0.375f}, 0.4f, 0, {1, 3}},        // exact tie: both 0.375 ranks
      {{0.125f, 0.375f, 0.125f, 0.375f}, 0.8f, 0, {0, 1, 3}},     // tie 0 vs 2: lower index
      {{0.25f, 0.25f, 0.25f, 0.25f}, 0.5f, 0, {0, 1}},            // all tied: lowest indices
      {{0.25f, 0.25f, 0.25f, 0.25f}, 0.5f, 3, {0, 1, 2}},         // min_kept beyond the crossing
      {{0.0f, 0.5f, 0.0f, 0.5f}, 0.9f, 0, {1, 3}},                // zeros not needed
      {{0.0f, 0.5f, 0.0f, 0.5f}, 1.0f, 0, {0, 1, 2, 3}},          // p = 1 keeps every cluster
      {{0.0f, 0.5f, 0.0f, 0.5f}, 0.9f, 3, {0, 1, 3}},             // min_kept takes the first zero
      {{0.0625f, 0.0625f, 0.75f, 0.125f}, 0.01f, 0, {2}},         // rank 0 alone reaches p
      {{0.0625f, 0.0625f, 0.75f, 0.125f}, 1e-30f, 0, {2}},        // rank 0 is always kept
      {{0.0625f, 0.0625f, 0.75f, 0.125f}, 0.01f, 2, {2, 3}},
      {{0.0625f, 0.0625f, 0.75f, 0.125f}, 0.01f, 100, {0, 1, 2, 3}},  // min_kept > C keeps all
      {{0.0625f, 0.0625f, 0.75f, 0.125f}, 0.9375f, 0, {0, 2, 3}},
      {{1.0f}, 0.5f, 0, {0}},
  };
  for (size_t i = 0; i < rows.size(); ++i) {
    const ExactRow& row = rows[i];
    const int64_t c = static_cast<int64_t>(row.w.size());
    SCOPED_TRACE("row " + std::to_string(i));
    HostTensor probs = ref::make_tensor(DType::F32, {1, 1, 1, c});
    std::memcpy(probs.view.data, row.w.data(), row.w.size() * sizeof(float));
    HostTensor mask = ref::make_tensor(DType::U8, {1, 1, 1, c}, Layout::Padded);
    ref::poison(mask);
    select_top_p(probs.view, row.top_p, row.min_kept, mask.view, kStream);
    ASSERT_TRUE(all_written_as_bits(mask.view));
    std::vector<int> kept;
    const std::vector<uint8_t> m = mask_values(mask.view);
    for (int64_t j = 0; j < c; ++j)
      if (m[static_cast<size_t>(j)]) kept.push_back(static_cast<int>(j));
    EXPECT_EQ(kept, row.kept);
    // The float64 reference agrees on exact data.
    const std::vector<uint8_t> want =
        ref::top_p_mask(std::vector<double>(row.w.begin(), row.w.end()), 1, c, row.top_p, row.min_kept);
    EXPECT_EQ(m, want);
  }
}

TEST(SelectTopP, TopPOneKeepsEveryClusterEvenWhenTheSumFallsShort) {
  // 10 equal weights a few ulps below 1/10: their fp32 sum is below 1, yet top_p = 1 keeps all.
  const int64_t C = 10;
  HostTensor probs = ref::make_tensor(DType::F32, {1, 2, 3, C});
  const auto fp32_sum = [&](float w) {
    float sum = 0.0f;
    for (int64_t c = 0; c < C; ++c) sum += w;
    return sum;
  };
  float w = 0.1f;
  while (fp32_sum(w) >= 1.0f) w = std::nextafter(w, 0.0f);  // the largest such weight, a few ulps below 0.1
  ASSERT_GT(w, 0.0999999f);
  ref::for_each_index(probs.view, [&](const auto& idx) { ref::set(probs.view, idx, w); });
  HostTensor mask = ref::make_tensor(DType::U8, {1, 2, 3, C});
  ref::poison(mask);
  select_top_p(probs.view, 1.0f, 0, mask.view, kStream);
  for (uint8_t v : mask_values(mask.view)) EXPECT_EQ(v, 1);
  // Just below 1 the sum reaches p within the row (0.99999994 <= fp32 sum? if not, all are kept).
  ref::poison(mask);
  select_top_p(probs.view, std::nextafter(1.0f, 0.0f), 0, mask.view, kStream);
  EXPECT_TRUE(check_top_p(probs.view, mask.view, std::nextafter(1.0f, 0.0f), 0));
}

TEST(SelectTopP, ThreadCountIndependent) {
  ref::Rng rng(case_seed());
  HostTensor probs = ref::make_tensor(DType::F32, {2, 5, 31, 200}, Layout::Transposed);
  fill_probs(probs.view, rng, Weights::HeavyTailed);
  std::vector<std::vector<uint8_t>> results;
  for (int threads : {1, 2, 3}) {
    HostTensor mask = ref::make_tensor(DType::U8, {2, 5, 31, 200});
    ref::poison(mask);
    select_top_p(probs.view, 0.9f, 5, mask.view, Stream::cpu(threads));
    results.push_back(mask.bytes());
  }
  EXPECT_EQ(results[0], results[1]);
  EXPECT_EQ(results[0], results[2]);
}

// ---------------------------------------------------------------------------------------------
// select_blocks: the op computes the weights in fp32, so near-equal weights may rank either way.
// A kept set is accepted when it is consistent with weights within their error bounds (ref::
// centroid_probs_error_bound): no dropped cluster clearly outweighs a kept one, the kept mass
// reaches top_p, and dropping the lightest kept cluster would fall short of top_p.
::testing::AssertionResult check_selection_row(const double* P, const double* e, const double* sizes,
                                               const uint8_t* got, int64_t C, double top_p, int min_kept) {
  bool any_nonempty = false;
  for (int64_t j = 0; j < C; ++j) any_nonempty |= sizes[j] > 0;
  int64_t kept = 0;
  for (int64_t j = 0; j < C; ++j) kept += got[j] != 0;
  if (!any_nonempty) {
    if (kept != 0) return ::testing::AssertionFailure() << "a row of only empty key clusters kept " << kept;
    return ::testing::AssertionSuccess();
  }
  if (top_p >= 1.0) {
    if (kept != C) return ::testing::AssertionFailure() << "top_p = 1 kept " << kept << " of " << C;
    return ::testing::AssertionSuccess();
  }
  const int64_t floor_kept = std::max<int64_t>(1, std::min<int64_t>(min_kept, C));
  if (kept < floor_kept) return ::testing::AssertionFailure() << kept << " kept, fewer than " << floor_kept;
  double kept_mass = 0.0, all_err = 0.0, lightest = std::numeric_limits<double>::infinity(), kept_err = 0.0;
  for (int64_t j = 0; j < C; ++j) {
    all_err += e[j];
    if (!got[j]) continue;
    kept_mass += P[j];
    lightest = std::min(lightest, P[j]);
    kept_err = std::max(kept_err, e[j]);
  }
  for (int64_t j = 0; j < C; ++j) {
    if (!got[j]) continue;
    for (int64_t o = 0; o < C; ++o) {
      if (got[o]) continue;
      if (P[o] - P[j] > e[j] + e[o]) {
        return ::testing::AssertionFailure() << "kept cluster " << j << " (P " << P[j] << ") but dropped cluster " << o
                                             << " (P " << P[o] << "), beyond the rounding bound " << e[j] + e[o];
      }
      if (sizes[j] == 0 && sizes[o] == 0 && o < j) {  // both exactly 0: ties by lower index
        return ::testing::AssertionFailure() << "kept empty cluster " << j << " but dropped empty cluster " << o;
      }
    }
  }
  // The running sums of the op err by the weights' bounds plus C roundings of a sum <= 1.
  const double sum_tol = all_err + static_cast<double>(C + 1) * ref::kF32Eps;
  if (kept < C && kept_mass < top_p - sum_tol) {
    return ::testing::AssertionFailure() << "kept mass " << kept_mass << " does not reach top_p " << top_p;
  }
  if (kept > floor_kept && kept_mass - lightest - 2.0 * kept_err >= top_p + sum_tol) {
    return ::testing::AssertionFailure() << kept << " kept: without the lightest (P " << lightest << ") the mass "
                                         << kept_mass - lightest << " still reaches top_p " << top_p;
  }
  return ::testing::AssertionSuccess();
}

struct BlocksCase {
  int64_t B, H, Cq, Ck, D;
  Layout mask_layout;
  double centroid_std;  // spread of the scores: larger = more peaked rows
};

struct Blocks {
  HostTensor qc, kc, sizes, mask;
  float scale;
};

Blocks make_blocks(const BlocksCase& bc, ref::Rng& rng) {
  Blocks b;
  b.qc = ref::make_tensor(DType::F32, {bc.B, bc.H, bc.Cq, bc.D});
  b.kc = ref::make_tensor(DType::F32, {bc.B, bc.H, bc.Ck, bc.D});
  ref::fill_normal(b.qc.view, rng, 0.0, bc.centroid_std);
  ref::fill_normal(b.kc.view, rng, 0.0, bc.centroid_std);
  b.sizes = ref::make_tensor(DType::I32, {bc.B, bc.H, bc.Ck});
  std::vector<double> all;
  for (int64_t bh = 0; bh < bc.B * bc.H; ++bh) {
    // Sizes of a sequence of ~30 tokens per cluster, with empty and 1-token clusters.
    const std::vector<int64_t> s = ref::random_cluster_sizes(rng, 30 * bc.Ck, bc.Ck);
    all.insert(all.end(), s.begin(), s.end());
  }
  ref::from_vector(b.sizes.view, all);
  b.mask = ref::make_tensor(DType::U8, {bc.B, bc.H, bc.Cq, bc.Ck}, bc.mask_layout);
  ref::poison(b.mask);
  b.scale = 1.0f / std::sqrt(static_cast<float>(bc.D));
  return b;
}

::testing::AssertionResult check_blocks(const Blocks& b, double top_p, int min_kept) {
  const int64_t Ck = b.kc.view.shape[2];
  const int64_t H = b.qc.view.shape[1], Cq = b.qc.view.shape[2];
  const int64_t rows = b.qc.view.shape[0] * H * Cq;
  const std::vector<double> P = ref::centroid_probs(b.qc.view, b.kc.view, b.sizes.view, b.scale);
  const std::vector<double> e = ref::centroid_probs_error_bound(b.qc.view, b.kc.view, b.sizes.view, b.scale);
  const std::vector<double> sizes = ref::to_vector(b.sizes.view);
  const std::vector<uint8_t> got = mask_values(b.mask.view);
  for (int64_t r = 0; r < rows; ++r) {
    const size_t o = static_cast<size_t>(r * Ck);
    auto res =
        check_selection_row(&P[o], &e[o], &sizes[static_cast<size_t>((r / Cq) * Ck)], &got[o], Ck, top_p, min_kept);
    if (!res) return res << " in row " << r % Cq << " of (b,h) " << r / Cq;
  }
  return ::testing::AssertionSuccess();
}

class SelectBlocksRandom : public ::testing::TestWithParam<BlocksCase> {};

TEST_P(SelectBlocksRandom, MatchesTheSizeWeightedSoftmaxReference) {
  const BlocksCase bc = GetParam();
  uint64_t index = 0;
  for (double top_p : {0.5, 0.9, 1.0}) {
    for (int min_kept : {0, 4}) {
      SCOPED_TRACE("top_p " + std::to_string(top_p) + " min_kept " + std::to_string(min_kept));
      ref::Rng rng(case_seed(index++));
      Blocks b = make_blocks(bc, rng);
      const std::vector<uint8_t> before = b.mask.bytes();
      select_blocks(b.qc.view, b.kc.view, b.sizes.view, b.scale, static_cast<float>(top_p), min_kept, b.mask.view,
                    kStream);
      ASSERT_TRUE(all_written_as_bits(b.mask.view));
      EXPECT_TRUE(b.mask.outside_view_unchanged(before)) << "wrote outside its block of the larger mask";
      EXPECT_TRUE(check_blocks(b, static_cast<float>(top_p), min_kept));
      // Exact agreement with the float64 reference rule in all but the rows near a rounding tie.
      const std::vector<uint8_t> want =
          ref::top_p_mask(ref::centroid_probs(b.qc.view, b.kc.view, b.sizes.view, b.scale), bc.B * bc.H * bc.Cq, bc.Ck,
                          static_cast<float>(top_p), min_kept);
      const std::vector<uint8_t> got = mask_values(b.mask.view);
      int64_t differing_rows = 0;
      for (int64_t r = 0; r < bc.B * bc.H * bc.Cq; ++r) {
        differing_rows += !std::equal(got.begin() + r * bc.Ck, got.begin() + (r + 1) * bc.Ck, want.begin() + r * bc.Ck);
      }
      EXPECT_LE(differing_rows, std::max<int64_t>(1, bc.B * bc.H * bc.Cq / 20));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, SelectBlocksRandom,
                         ::testing::Values(BlocksCase{2, 3, 12, 40, 64, Layout::Contiguous, 1.0},
                                           BlocksCase{1, 2, 20, 200, 128, Layout::Padded, 1.5},
                                           BlocksCase{2, 2, 7, 33, 24, Layout::TransposedPadded, 3.0},
                                           BlocksCase{1, 5, 9, 64, 64, Layout::Transposed, 0.3},
                                           BlocksCase{1, 1, 1, 1, 64, Layout::Contiguous, 1.0},
                                           BlocksCase{1, 2, 3, 5, 24, Layout::Padded, 1.0}),
                         [](const auto& p) {
                           const BlocksCase& c = p.param;
                           return case_name(
                               ref::layout_name(c.mask_layout), "B" + std::to_string(c.B) + "H" + std::to_string(c.H),
                               "Cq" + std::to_string(c.Cq), "Ck" + std::to_string(c.Ck), "D" + std::to_string(c.D));
                         });

TEST(SelectBlocks, RowMaxIsOverNonEmptyClustersOnly) {
  // An empty key cluster whose score is 320 above every other: were it in the row max, every
  // fp32 weight exp(s - m) would underflow to 0. The selection must ignore it entirely.
  ref::Rng rng(case_seed());
  const BlocksCase bc{1, 2, 6, 16, 64, Layout::Contiguous, 1.0};
  Blocks b = make_blocks(bc, rng);
  ref::for_each_index(b.qc.view, [&](const auto& idx) { ref::set(b.qc.view, idx, 1.0 + 0.1 * rng.normal()); });
  std::vector<double> sizes = ref::to_vector(b.sizes.view);
  for (int64_t h = 0; h < bc.H; ++h) {
    const int64_t hot = 5;
    sizes[static_cast<size_t>(h * bc.Ck + hot)] = 0;
    sizes[static_cast<size_t>(h * bc.Ck + 2)] = std::max(1.0, sizes[static_cast<size_t>(h * bc.Ck + 2)]);
    // score = scale * sum_d 1 * 40 = 40 * 64 / 8 = 320.
    for (int64_t d = 0; d < bc.D; ++d) ref::set(b.kc.view, {0, h, hot, d}, 40.0);
  }
  ref::from_vector(b.sizes.view, sizes);
  select_blocks(b.qc.view, b.kc.view, b.sizes.view, b.scale, 0.9f, 0, b.mask.view, kStream);
  ASSERT_TRUE(all_written_as_bits(b.mask.view));
  EXPECT_TRUE(check_blocks(b, 0.9f, 0));
  for (int64_t h = 0; h < bc.H; ++h) {
    for (int64_t a = 0; a < bc.Cq; ++a) EXPECT_EQ(ref::get(b.mask.view, {0, h, a, 5}), 0.0) << "kept the empty cluster";
  }
}

TEST(SelectBlocks, RowsWithOnlyEmptyKeyClustersKeepNothing) {
  ref::Rng rng(case_seed());
  const BlocksCase bc{2, 3, 5, 12, 24, Layout::Padded, 1.0};
  for (int min_kept : {0, 3}) {
    for (float top_p : {0.9f, 1.0f}) {
      Blocks b = make_blocks(bc, rng);
      std::vector<double> sizes = ref::to_vector(b.sizes.view);
      std::fill(sizes.begin() + 1 * bc.Ck, sizes.begin() + 2 * bc.Ck, 0.0);  // (b,h) = (0,1): all empty
      ref::from_vector(b.sizes.view, sizes);
      select_blocks(b.qc.view, b.kc.view, b.sizes.view, b.scale, top_p, min_kept, b.mask.view, kStream);
      ASSERT_TRUE(all_written_as_bits(b.mask.view));
      for (int64_t a = 0; a < bc.Cq; ++a) {
        for (int64_t j = 0; j < bc.Ck; ++j)
          EXPECT_EQ(ref::get(b.mask.view, {0, 1, a, j}), 0.0) << "min_kept " << min_kept << " top_p " << top_p;
      }
      EXPECT_TRUE(check_blocks(b, top_p, min_kept));
    }
  }
}

TEST(SelectBlocks, RowsWithANonFiniteScoreKeepEveryCluster) {
  // A NaN query centroid (a NaN query with check_finite off) cannot be ranked: its row keeps every
  // key cluster, so the NaN reaches the row's outputs as in dense attention instead of a row of 0.
  // The other rows select as they did before.
  ref::Rng rng(case_seed());
  const BlocksCase bc{1, 1, 4, 10, 16, Layout::Contiguous, 1.0};
  Blocks b = make_blocks(bc, rng);
  select_blocks(b.qc.view, b.kc.view, b.sizes.view, b.scale, 0.5f, 0, b.mask.view, kStream);
  const std::vector<double> finite_mask = ref::to_vector(b.mask.view);
  ASSERT_LT(std::accumulate(finite_mask.begin() + 2 * bc.Ck, finite_mask.begin() + 3 * bc.Ck, 0.0), bc.Ck);
  ref::set(b.qc.view, {0, 0, 2, 5}, std::nan(""));
  select_blocks(b.qc.view, b.kc.view, b.sizes.view, b.scale, 0.5f, 0, b.mask.view, kStream);
  const std::vector<double> mask = ref::to_vector(b.mask.view);
  for (int64_t a = 0; a < bc.Cq; ++a)
    for (int64_t j = 0; j < bc.Ck; ++j) {
      const size_t i = static_cast<size_t>(a * bc.Ck + j);
      EXPECT_EQ(mask[i], a == 2 ? 1.0 : finite_mask[i]) << "row " << a << ", column " << j;
    }
}

TEST(SelectBlocks, SizeWeightingDecides) {
  // Two key clusters with the same score for every query: the larger one has the larger weight and
  // must rank first, whatever its index.
  const int64_t D = 24, Ck = 3;
  HostTensor qc = ref::make_tensor(DType::F32, {1, 1, 2, D});
  HostTensor kc = ref::make_tensor(DType::F32, {1, 1, Ck, D});
  ref::Rng rng(case_seed());
  ref::fill_normal(qc.view, rng);
  ref::fill_normal(kc.view, rng);
  for (int64_t d = 0; d < D; ++d) ref::set(kc.view, {0, 0, 2, d}, ref::get(kc.view, {0, 0, 0, d}));  // c2 = c0
  // Cluster 1 far below: its weight is negligible.
  for (int64_t d = 0; d < D; ++d) ref::set(kc.view, {0, 0, 1, d}, -50.0 * ref::get(qc.view, {0, 0, 0, d}));
  HostTensor sizes = ref::make_tensor(DType::I32, {1, 1, Ck});
  ref::from_vector(sizes.view, {10, 50, 30});  // P(2) = 3/4, P(0) = 1/4 (for row 0, up to cluster 1)
  HostTensor mask = ref::make_tensor(DType::U8, {1, 1, 2, Ck});
  ref::poison(mask);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  select_blocks(qc.view, kc.view, sizes.view, scale, 0.7f, 0, mask.view, kStream);
  EXPECT_EQ(ref::get(mask.view, {0, 0, 0, 2}), 1.0);
  EXPECT_EQ(ref::get(mask.view, {0, 0, 0, 0}), 0.0);
  EXPECT_EQ(ref::get(mask.view, {0, 0, 0, 1}), 0.0);
  Blocks b{qc, kc, sizes, ref::make_tensor(DType::U8, {1, 1, 2, Ck}), scale};
  b.mask = mask;
  EXPECT_TRUE(check_blocks(b, 0.7f, 0));
}

TEST(SelectBlocks, ThreadCountIndependent) {
  ref::Rng rng(case_seed());
  const BlocksCase bc{2, 5, 17, 150, 64, Layout::Contiguous, 1.0};
  const Blocks b = make_blocks(bc, rng);
  std::vector<std::vector<uint8_t>> results;
  for (int threads : {1, 2, 3}) {
    HostTensor mask = ref::make_tensor(DType::U8, {bc.B, bc.H, bc.Cq, bc.Ck});
    ref::poison(mask);
    select_blocks(b.qc.view, b.kc.view, b.sizes.view, b.scale, 0.9f, 3, mask.view, Stream::cpu(threads));
    results.push_back(mask.bytes());
  }
  EXPECT_EQ(results[0], results[1]);
  EXPECT_EQ(results[0], results[2]);
}

// ---------------------------------------------------------------------------------------------

TEST(ApplyTextRule, ExactPattern) {
  ref::Rng rng(case_seed());
  for (Layout layout : {Layout::Contiguous, Layout::Padded, Layout::TransposedPadded}) {
    for (auto [Cq, Ck] : {std::pair<int64_t, int64_t>{5, 7}, {1, 1}, {12, 3}}) {
      SCOPED_TRACE(std::string(ref::layout_name(layout)) + " Cq " + std::to_string(Cq) + " Ck " + std::to_string(Ck));
      const int64_t B = 2, H = 3, R = Cq + 2, C = Ck + 2;
      HostTensor mask = ref::make_tensor(DType::U8, {B, H, R, C}, layout);
      ref::poison(mask);  // the padding around the view keeps 0xAB
      ref::for_each_index(mask.view,
                          [&](const auto& idx) { ref::set(mask.view, idx, static_cast<double>(rng.integer(0, 1))); });
      std::vector<uint8_t> want = mask_values(mask.view);
      ref::apply_text_rule(want, B, H, R, C);
      const std::vector<uint8_t> before = mask.bytes();
      apply_text_rule(mask.view, kStream);
      EXPECT_EQ(mask_values(mask.view), want);
      EXPECT_TRUE(mask.outside_view_unchanged(before));
    }
  }
}

TEST(ApplyTextRule, SpelledOut) {
  // The rule written out for Cq = Ck = 2 on an all-ones and an all-zeros mask.
  for (uint8_t fill : {uint8_t{0}, uint8_t{1}}) {
    HostTensor mask = ref::make_tensor(DType::U8, {1, 1, 4, 4});
    std::memset(mask.view.data, fill, 16);
    apply_text_rule(mask.view, kStream);
    const uint8_t f = fill;
    const std::vector<uint8_t> want = {f, f, 1, 0,   // video row: video block as is, prompt, no padding
                                       f, f, 1, 0,   //
                                       1, 1, 1, 0,   // prompt row: every video column and the prompt
                                       0, 0, 0, 1};  // padding row: only padding
    EXPECT_EQ(mask_values(mask.view), want) << "fill " << int(fill);
  }
}

// ---------------------------------------------------------------------------------------------
// Errors

TEST(SelectErrors, SelectTopP) {
  ref::Rng rng(case_seed());
  HostTensor probs = ref::make_tensor(DType::F32, {1, 2, 3, 8});
  fill_probs(probs.view, rng, Weights::HeavyTailed);
  HostTensor mask = ref::make_tensor(DType::U8, {1, 2, 3, 8});
  ref::poison(mask);
  for (float bad :
       {0.0f, -0.5f, 1.0001f, 2.0f, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, mask, select_top_p(probs.view, bad, 0, mask.view, kStream));
  }
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, mask, select_top_p(probs.view, 0.9f, -1, mask.view, kStream));
  HostTensor mask_short = ref::make_tensor(DType::U8, {1, 2, 3, 7});
  HostTensor mask_rows = ref::make_tensor(DType::U8, {1, 2, 4, 8});
  HostTensor mask_i32 = ref::make_tensor(DType::I32, {1, 2, 3, 8});
  HostTensor probs_f16 = ref::make_tensor(DType::F16, {1, 2, 3, 8});
  HostTensor probs_rank3 = ref::make_tensor(DType::F32, {2, 3, 8});
  EXPECT_ERROR_UNTOUCHED(ShapeError, mask_short, select_top_p(probs.view, 0.9f, 0, mask_short.view, kStream));
  EXPECT_ERROR_UNTOUCHED(ShapeError, mask_rows, select_top_p(probs.view, 0.9f, 0, mask_rows.view, kStream));
  EXPECT_ERROR_UNTOUCHED(ShapeError, mask, select_top_p(probs_rank3.view, 0.9f, 0, mask.view, kStream));
  EXPECT_ERROR_UNTOUCHED(DTypeError, mask_i32, select_top_p(probs.view, 0.9f, 0, mask_i32.view, kStream));
  EXPECT_ERROR_UNTOUCHED(DTypeError, mask, select_top_p(probs_f16.view, 0.9f, 0, mask.view, kStream));
  EXPECT_ERROR_UNTOUCHED(UnsupportedError, mask, select_top_p(ref::on_cuda(probs.view), 0.9f, 0, mask.view, kStream));
  EXPECT_ERROR_UNTOUCHED(UnsupportedError, mask,
                         select_top_p(probs.view, 0.9f, 0, mask.view, Stream{Device::cuda(0), nullptr, 0}));
}

TEST(SelectErrors, SelectBlocks) {
  ref::Rng rng(case_seed());
  Blocks b = make_blocks({1, 2, 4, 6, 24, Layout::Contiguous, 1.0}, rng);
  auto& m = b.mask;
  const auto sel = [&](const TensorView& qc, const TensorView& kc, const TensorView& sz, float top_p, int min_kept,
                       const TensorView& mask,
                       const Stream& st) { select_blocks(qc, kc, sz, b.scale, top_p, min_kept, mask, st); };
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, m, sel(b.qc.view, b.kc.view, b.sizes.view, 0.0f, 0, m.view, kStream));
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, m, sel(b.qc.view, b.kc.view, b.sizes.view, 1.5f, 0, m.view, kStream));
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, m, sel(b.qc.view, b.kc.view, b.sizes.view, 0.9f, -2, m.view, kStream));
  HostTensor kc_d = ref::make_tensor(DType::F32, {1, 2, 6, 25});
  HostTensor kc_h = ref::make_tensor(DType::F32, {1, 3, 6, 24});
  HostTensor sizes_short = ref::make_tensor(DType::I32, {1, 2, 5});
  HostTensor mask_t = ref::make_tensor(DType::U8, {1, 2, 6, 4});  // transposed extents
  HostTensor qc_f16 = ref::make_tensor(DType::F16, {1, 2, 4, 24});
  HostTensor sizes_f32 = ref::make_tensor(DType::F32, {1, 2, 6});
  HostTensor mask_f32 = ref::make_tensor(DType::F32, {1, 2, 4, 6});
  ref::fill_normal(kc_d.view, rng);
  ref::fill_normal(kc_h.view, rng);
  ref::from_vector(sizes_short.view, std::vector<double>(10, 3.0));
  EXPECT_ERROR_UNTOUCHED(ShapeError, m, sel(b.qc.view, kc_d.view, b.sizes.view, 0.9f, 0, m.view, kStream));
  EXPECT_ERROR_UNTOUCHED(ShapeError, m, sel(b.qc.view, kc_h.view, b.sizes.view, 0.9f, 0, m.view, kStream));
  EXPECT_ERROR_UNTOUCHED(ShapeError, m, sel(b.qc.view, b.kc.view, sizes_short.view, 0.9f, 0, m.view, kStream));
  EXPECT_ERROR_UNTOUCHED(ShapeError, mask_t, sel(b.qc.view, b.kc.view, b.sizes.view, 0.9f, 0, mask_t.view, kStream));
  EXPECT_ERROR_UNTOUCHED(DTypeError, m, sel(qc_f16.view, b.kc.view, b.sizes.view, 0.9f, 0, m.view, kStream));
  EXPECT_ERROR_UNTOUCHED(DTypeError, m, sel(b.qc.view, b.kc.view, sizes_f32.view, 0.9f, 0, m.view, kStream));
  EXPECT_ERROR_UNTOUCHED(DTypeError, mask_f32,
                         sel(b.qc.view, b.kc.view, b.sizes.view, 0.9f, 0, mask_f32.view, kStream));
  EXPECT_ERROR_UNTOUCHED(UnsupportedError, m,
                         sel(b.qc.view, ref::on_cuda(b.kc.view), b.sizes.view, 0.9f, 0, m.view, kStream));
  EXPECT_ERROR_UNTOUCHED(UnsupportedError, m,
                         sel(b.qc.view, b.kc.view, b.sizes.view, 0.9f, 0, ref::on_cuda(m.view), kStream));
  // A negative cluster size is a negative count: InvalidArgumentError.
  std::vector<double> sizes = ref::to_vector(b.sizes.view);
  sizes[3] = -1.0;
  ref::from_vector(b.sizes.view, sizes);
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, m, sel(b.qc.view, b.kc.view, b.sizes.view, 0.9f, 0, m.view, kStream));
}

TEST(SelectErrors, ApplyTextRule) {
  HostTensor mask_i32 = ref::make_tensor(DType::I32, {1, 1, 4, 4});
  HostTensor mask_rank3 = ref::make_tensor(DType::U8, {1, 4, 4});
  HostTensor mask = ref::make_tensor(DType::U8, {1, 1, 4, 4});
  ref::poison(mask_i32);
  ref::poison(mask_rank3);
  ref::poison(mask);
  EXPECT_ERROR_UNTOUCHED(DTypeError, mask_i32, apply_text_rule(mask_i32.view, kStream));
  EXPECT_ERROR_UNTOUCHED(ShapeError, mask_rank3, apply_text_rule(mask_rank3.view, kStream));
  EXPECT_ERROR_UNTOUCHED(UnsupportedError, mask, apply_text_rule(ref::on_cuda(mask.view), kStream));
}

}  // namespace
