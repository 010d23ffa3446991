// ear-plus, SVG-EAR's refinement (docs/ear.md): ear_plus_probe against its closed form and the
// float64 contract, split_clusters on blobs and random clusters, and corrected_centroid_compensation
// against the float64 reference and exact for queries at their cluster's centroid.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "ear_support.hpp"
#include "sapattn/svg2.hpp"
#include "test_support.hpp"

namespace sapattn {
namespace {

using namespace ear_test;
using namespace testing_support;

constexpr double kNormalisedEps = 1e-30;  // ear_plus_probe's floor on the normalised error (ops.hpp)

struct PlusProbe {
  Tensor scores, spread, pair_values;
};

PlusProbe plus_probe(const TensorView& qc, const TensorView& kc, const TensorView& vc, const TensorView& labels,
                     const TensorView& q_sizes, const TensorView& k_sizes, const TensorView& k, const TensorView& v,
                     float scale, float gamma) {
  const int64_t B = qc.shape[0], H = qc.shape[1], Cq = qc.shape[2], Ck = kc.shape[2];
  PlusProbe r{Tensor(DType::F32, {B, H, Cq, Ck}), Tensor(DType::F32, {B, H, Cq, Ck}),
              Tensor(DType::F32, {B, H, Cq * Ck, k.shape[3]})};
  ear_plus_probe(qc, kc, vc, k, v, labels, q_sizes, k_sizes, scale, gamma, r.scores.view(), r.spread.view(),
                 r.pair_values.view(), kStream);
  return r;
}

PlusProbe plus_probe(const ProbeCase& c, const TensorView& k, const TensorView& v, float scale, float gamma) {
  return plus_probe(c.qc.view(), c.kc.view(), c.vc.view(), c.labels.view(), c.q_sizes.view(), c.k_sizes.view(), k, v,
                    scale, gamma);
}

// EarProbe's hand-made case: key cluster 0 = k (1,0), v (1,0) and k (-1,0), v (0,1) around
// kbar = 0; cluster 1 empty; cluster 2 = two copies of its centroids k (0,1), v (2,0). From
// q = (1,0): masses M_0 = e^s + e^-s, M_2 = 2, Z = M_0 + M_2.
TEST(EarPlusProbe, ClosedFormOnAHandMadeCase) {
  const ProbeCase c = hand_made_probe_case();
  const Tensor k = from_values(DType::F32, {1, 1, 4, 2}, {1, 0, 0, 1, -1, 0, 0, 1});
  const Tensor v = from_values(DType::F32, {1, 1, 4, 2}, {1, 0, 2, 0, 0, 1, 2, 0});
  for (const float scale : {1.0f, 0.5f}) {
    for (const float gamma : {1.0f, 0.5f}) {
      const PlusProbe r = plus_probe(c, k.view(), v.view(), scale, gamma);
      const std::vector<double> scores = ref::to_vector(r.scores.view()), spread = ref::to_vector(r.spread.view());
      const std::vector<double> values = ref::to_vector(r.pair_values.view());
      const double es = std::exp(scale), em = std::exp(-scale), z = es + em + 2;
      const double e0 = (es - 0.5) * (es - 0.5) + 0.25 + 0.25 + (em - 0.5) * (em - 0.5);
      EXPECT_NEAR(scores[0], std::log(3 * e0 / (z * z)) - gamma * std::log(6.0), 1e-5);
      // Empty cluster: no error and no area, both floored; cluster 2: no error (floored).
      EXPECT_NEAR(scores[1], std::log(kNormalisedEps) - gamma * std::log(kEps), 1e-4);
      EXPECT_NEAR(scores[2], std::log(kNormalisedEps) - gamma * std::log(6.0), 1e-4);
      // Spread: log mean exp(s q . (k - kbar)) = log cosh(s) for cluster 0, 0 for the others.
      EXPECT_NEAR(spread[0], std::log(std::cosh(static_cast<double>(scale))), 1e-6);
      EXPECT_EQ(spread[1], 0.0);
      EXPECT_NEAR(spread[2], 0.0, 1e-7);
      // Pair values: attention-weighted values; the empty cluster's value centroid; cluster 2's values.
      EXPECT_NEAR(values[0], es / (es + em), 1e-6);
      EXPECT_NEAR(values[1], em / (es + em), 1e-6);
      EXPECT_EQ(values[2], 0.0);
      EXPECT_EQ(values[3], 0.0);
      EXPECT_NEAR(values[4], 2.0, 1e-6);
      EXPECT_NEAR(values[5], 0.0, 1e-7);
    }
  }
}

// Against the float64 contract. Error model: every fp32 logit is off by at most ds = (D + 2) u scale
// sum_d |q_d k_d| (Higham 3.5; the largest over the row's keys and centroids is used). The error E
// moves relatively by 2 ds T / E (T: its terms' total magnitude, as in EarProbe) and Z by ds, so the
// score by 2 ds T / E + 2 ds (twice allowed); the spread by 2 ds; a weighted mean of values by
// 2 ds max|v - mean| <= 4 ds max|v| (twice allowed), plus its fp32 rounding.
TEST(EarPlusProbe, MatchesFloat64Reference) {
  const int64_t B = 2, H = 2, N = 90, Cq = 5, Ck = 9, D = 16;
  const double scale = 0.25;
  ref::Rng rng(case_seed());
  for (DType dtype : {DType::F32, DType::BF16}) {
    const RandomProbe random = random_probe(rng, dtype, B, H, N, Cq, Ck, D);
    const ProbeCase& c = random.c;
    const ref::HostTensor &k = random.k, &v = random.v;
    const double max_v = max_abs(random.vd);
    for (const double gamma : {1.0, 0.5}) {
      const PlusProbe got = plus_probe(c, k.view, v.view, static_cast<float>(scale), static_cast<float>(gamma));
      const std::vector<double> scores = ref::to_vector(got.scores.view()), spread = ref::to_vector(got.spread.view());
      const std::vector<double> values = ref::to_vector(got.pair_values.view());
      const ref::EarPlusProbe want = ref::ear_plus_probe(c.qc.view(), c.kc.view(), c.vc.view(), k.view, v.view,
                                                         random.labels, random.q_sizes, random.k_sizes, scale, gamma);
      for (int64_t bh = 0; bh < B * H; ++bh)
        for (int64_t a = 0; a < Cq; ++a) {
          // Z sums every key's term: ds is the largest logit error over all of the row's keys and centroids.
          std::vector<RandomProbe::PairError> errors;
          double ds = 0;
          for (int64_t j = 0; j < Ck; ++j) {
            errors.push_back(random.pair_error(bh, a, j, scale));
            ds = std::max(ds, errors.back().logit_error);
          }
          for (int64_t j = 0; j < Ck; ++j) {
            const RandomProbe::PairError& e = errors[static_cast<size_t>(j)];
            const size_t i = static_cast<size_t>((bh * Cq + a) * Ck + j);
            const std::string where = std::string(dtype_name(dtype)) + " gamma " + std::to_string(gamma) + " bh " +
                                      std::to_string(bh) + " pair " + std::to_string(a) + "," + std::to_string(j);
            const double relative = e.error > 0 ? e.magnitude / e.error : 0.0;
            EXPECT_NEAR(scores[i], want.scores[i], 4 * ds * relative + 4 * ds + 1e-5) << where;
            EXPECT_NEAR(spread[i], want.spread[i], 4 * ds + 1e-6) << where;
            for (int64_t d = 0; d < D; ++d) {
              const size_t x = i * static_cast<size_t>(D) + static_cast<size_t>(d);
              EXPECT_NEAR(values[x], want.pair_values[x], 8 * ds * max_v + 2 * ref::kF32Eps * max_v) << where;
            }
          }
        }
    }
  }
}

TEST(SplitClusters, SeparatesTwoBlobsAndKeepsDegenerateClustersWhole) {
  // Cluster 0: three points near (10, y) and three near (-10, y), interleaved in token order;
  // cluster 1: three identical points; cluster 2: one point; cluster 3: empty.
  const Tensor points =
      from_values(DType::F32, {1, 1, 10, 2}, {10, 1, -10, 0.5, 9, -1, 2, 2, -11, -0.5, 11, 0, 2, 2, -9, 1, 2, 2, 7, 7});
  const Tensor labels = sizes_tensor({1, 1, 10}, {0, 0, 0, 1, 0, 0, 1, 0, 1, 2});
  Tensor centroids(DType::F32, {1, 1, 4, 2});
  cluster_means(points.view(), labels.view(), centroids.view(), kStream);
  Tensor sub_labels(DType::I32, {1, 1, 10}), sub_sizes(DType::I32, {1, 1, 8});
  split_clusters(points.view(), labels.view(), centroids.view(), sub_labels.view(), sub_sizes.view(), kStream);
  const std::vector<int32_t> sub = ref::to_i32(sub_labels.view()), sizes = ref::to_i32(sub_sizes.view());
  const int32_t right = sub[0], left = sub[1];
  EXPECT_NE(right, left);
  for (const int t : {0, 2, 5}) EXPECT_EQ(sub[static_cast<size_t>(t)], right) << t;
  for (const int t : {1, 4, 7}) EXPECT_EQ(sub[static_cast<size_t>(t)], left) << t;
  for (const int t : {3, 6, 8}) EXPECT_EQ(sub[static_cast<size_t>(t)], 2) << t;  // identical: side 0
  EXPECT_EQ(sub[9], 4);                                                          // one point: side 0
  EXPECT_EQ(sizes, (std::vector<int32_t>{3, 3, 3, 0, 1, 0, 0, 0}));
}

// On random clusters (empty and 1-point ones included), f32 and bf16, strided: the halves nest in
// the clusters, sub_sizes counts them, and the thread count does not change the result.
TEST(SplitClusters, NestsInTheClustersAndCountsTheHalves) {
  const int64_t B = 2, H = 2, N = 80, C = 9, D = 12;
  ref::Rng rng(case_seed());
  for (DType dtype : {DType::F32, DType::BF16}) {
    ref::HostTensor points = ref::make_tensor(dtype, {B, H, N, D}, ref::Layout::TransposedPadded);
    ref::fill_normal(points.view, rng);
    const std::vector<int32_t> label_values = random_labels(rng, B * H, N, C);
    const Tensor labels = sizes_tensor({B, H, N}, label_values);
    Tensor centroids(DType::F32, {B, H, C, D});
    cluster_means(points.view, labels.view(), centroids.view(), kStream);
    std::vector<int32_t> first;
    for (const int threads : {1, 3}) {
      Tensor sub_labels(DType::I32, {B, H, N}), sub_sizes(DType::I32, {B, H, 2 * C});
      split_clusters(points.view, labels.view(), centroids.view(), sub_labels.view(), sub_sizes.view(),
                     Stream::cpu(threads));
      const std::vector<int32_t> sub = ref::to_i32(sub_labels.view());
      for (size_t i = 0; i < sub.size(); ++i) ASSERT_EQ(sub[i] / 2, label_values[i]) << dtype_name(dtype) << " " << i;
      EXPECT_EQ(ref::to_i32(sub_sizes.view()), counts_of(sub, B * H, N, 2 * C));
      const std::vector<int32_t> sizes = counts_of(label_values, B * H, N, C);
      for (size_t i = 0; i < sub.size(); ++i)  // a 1-point cluster stays on side 0
        if (sizes[i / N * C + static_cast<size_t>(label_values[i])] == 1) {
          EXPECT_EQ(sub[i] % 2, 0) << i;
        }
      if (first.empty()) first = sub;
      EXPECT_EQ(sub, first) << threads << " threads";
    }
  }
}

// Random spread and pair values (one pseudo-key per key cluster), and random sub-centroids (two per
// key cluster, empty ones included), against the float64 softmax over exact keys and pseudo-keys.
TEST(CorrectedCompensation, MatchesFloat64Reference) {
  const int64_t B = 2, H = 2, S = 80, N = 64, D = 16, Cq = 5, Ck = 9;
  const float scale = 0.3f;
  ref::Rng rng(case_seed());
  for (DType dtype : {DType::F32, DType::BF16}) {
    const CompensationCase c = compensation_case(rng, dtype, B, H, S, N, D, Cq, Ck, false);
    const CompensationReference r = compensation_reference(c, N);
    for (const int64_t per_cluster : {1, 2}) {
      const int64_t Cc = per_cluster * Ck;  // pseudo-keys
      // Two per key cluster: random sub-centroids and sizes (the op does not require them to be means).
      Tensor sub_kc(DType::F32, {B, H, Cc, D}), sub_vc(DType::F32, {B, H, Cc, D});
      std::vector<int32_t> size_values = c.k_size_values;
      if (per_cluster == 2) {
        ref::fill_normal(sub_kc.view(), rng);
        ref::fill_normal(sub_vc.view(), rng);
        size_values.resize(static_cast<size_t>(B * H * Cc));
        for (int32_t& n : size_values) n = static_cast<int32_t>(rng.integer(0, 5));
      }
      const Tensor& kc = per_cluster == 2 ? sub_kc : c.kc;
      const Tensor& vc = per_cluster == 2 ? sub_vc : c.vc;
      const Tensor k_sizes = sizes_tensor({B, H, Cc}, size_values);
      // The op's terms cover the mask's rows (the video ones and the text row Cq, which no video
      // row reads); the reference's the video rows only.
      Tensor spread(DType::F32, {B, H, Cq + 1, Cc}), pair_values(DType::F32, {B, H, (Cq + 1) * Cc, D});
      for (int64_t i = 0; i < spread.numel(); ++i) spread.data_as<float>()[i] = static_cast<float>(rng.uniform(0, 1));
      ref::fill_normal(pair_values.view(), rng);
      const auto video_rows = [&](const std::vector<double>& x, int64_t row) {  // row: entries per (a) row
        std::vector<double> kept;
        for (int64_t bh = 0; bh < B * H; ++bh)
          kept.insert(kept.end(), x.begin() + bh * (Cq + 1) * row, x.begin() + (bh * (Cq + 1) + Cq) * row);
        return kept;
      };
      const std::vector<double> spread_values = video_rows(ref::to_vector(spread.view()), Cc);
      const std::vector<double> value_values = video_rows(ref::to_vector(pair_values.view()), Cc * D);
      const double max_v =
          std::max({max_abs(ref::to_vector(c.v.view)), max_abs(value_values), max_abs(ref::to_vector(vc.view()))});
      for (const int terms : {1, 2, 3}) {  // spread, pair values, both
        const Corrections corrections{terms & 1 ? spread.view() : TensorView{},
                                      terms & 2 ? pair_values.view() : TensorView{}};
        const ref::Attention got = compensated(c.q.view, c.k.view, c.v.view, c.q_labels, c.k_labels, c.mask, kc, vc,
                                               k_sizes, scale, N, nullptr, &corrections);
        const ref::CompensationTerms want_terms{terms & 1 ? &spread_values : nullptr,
                                                terms & 2 ? &value_values : nullptr, per_cluster};
        const ref::Attention want =
            ref::compensated_attention(c.q.view, c.k.view, c.v.view, scale, r.tokens, r.video_labels, N, r.video_mask,
                                       Cq, kc.view(), vc.view(), size_values, want_terms);
        expect_close(got, want, max_v, D, S + Cc,
                     std::string(dtype_name(dtype)) + " per_cluster " + std::to_string(per_cluster) + " terms " +
                         std::to_string(terms));
      }
    }
  }
}

// The closed form behind the corrections: for a query equal to its cluster's centroid, the pseudo-key
// of skipped cluster j (logit log|K_j| + c_aj + spread = log M_aj, value U_aj / M_aj) is j's exact
// contribution, so the compensated output is dense attention whatever the mask, for one pseudo-key
// per key cluster and for the halves of split_clusters.
TEST(CorrectedCompensation, ExactForQueriesAtTheirCentroid) {
  const int64_t B = 1, H = 2, S = 72, D = 8, Cq = 4, Ck = 7;
  const float scale = 0.4f;
  ref::Rng rng(case_seed());
  const CompensationCase c = compensation_case(rng, DType::F32, B, H, S, S, D, Cq, Ck, false);
  // Every query becomes its cluster's centre. No row is text here (N = S), but the mask keeps its
  // text row Cq: the probe gets a centroid for it too, so that its terms cover the mask's rows.
  Tensor qc(DType::F32, {B, H, Cq + 1, D});
  ref::fill_normal(qc.view(), rng);
  std::vector<double> qd(static_cast<size_t>(B * H * S * D));
  for (int64_t bh = 0; bh < B * H; ++bh)
    for (int64_t i = 0; i < S; ++i)
      for (int64_t d = 0; d < D; ++d)
        qd[static_cast<size_t>((bh * S + i) * D + d)] =
            qc.data_as<float>()[(bh * (Cq + 1) + c.q_label_values[static_cast<size_t>(bh * S + i)]) * D + d];
  ref::from_vector(c.q.view, qd);
  std::vector<int32_t> q_size_values(static_cast<size_t>(B * H * (Cq + 1)), 1);
  const Tensor q_sizes = sizes_tensor({B, H, Cq + 1}, q_size_values);
  const ref::Attention dense = ref::attention_f64(c.q.view, c.k.view, c.v.view, scale, nullptr);
  // The halves of split_clusters and their means.
  Tensor sub_labels(DType::I32, {B, H, S}), sub_sizes(DType::I32, {B, H, 2 * Ck});
  Tensor sub_kc(DType::F32, {B, H, 2 * Ck, D}), sub_vc(DType::F32, {B, H, 2 * Ck, D});
  split_clusters(c.k.view, c.k_labels.view(), c.kc.view(), sub_labels.view(), sub_sizes.view(), kStream);
  cluster_means(c.k.view, sub_labels.view(), sub_kc.view(), kStream);
  cluster_means(c.v.view, sub_labels.view(), sub_vc.view(), kStream);
  for (const bool split : {false, true}) {
    const Tensor& labels = split ? sub_labels : c.k_labels;
    const Tensor& sizes = split ? sub_sizes : c.k_sizes;
    const Tensor& kc = split ? sub_kc : c.kc;
    const Tensor& vc = split ? sub_vc : c.vc;
    const PlusProbe r = plus_probe(qc.view(), kc.view(), vc.view(), labels.view(), q_sizes.view(), sizes.view(),
                                   c.k.view, c.v.view, scale, 1.0f);
    const Corrections corrections{r.spread.view(), r.pair_values.view()};
    const ref::Attention got = compensated(c.q.view, c.k.view, c.v.view, c.q_labels, c.k_labels, c.mask, kc, vc, sizes,
                                           scale, S, nullptr, &corrections);
    // The probe's weights carry the same fp32 logit error as the attention's: twice its model.
    expect_close(got, dense, 2 * max_abs(ref::to_vector(c.v.view)), D, S, split ? "split" : "one pseudo-key");
  }
}

}  // namespace
}  // namespace sapattn
