// SVG-EAR's ops (docs/ear.md): value centroids, the error probe and the compensation against closed
// forms on hand-made cases and against float64 references, the routing against a brute-force
// characterisation, the layer call with error-aware routing, and bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "sapattn/svg2.hpp"
#include "test_support.hpp"

namespace sapattn {
namespace {

using testing_support::case_seed;
using testing_support::kStream;

constexpr double kEps = 1e-8;  // the probe's floor on errors and areas (ops.hpp)

Tensor from_values(DType dtype, std::vector<int64_t> shape, const std::vector<double>& values) {
  Tensor t(dtype, std::move(shape));
  ref::from_vector(t.view(), values);
  return t;
}

Tensor sizes_tensor(std::vector<int64_t> shape, const std::vector<int32_t>& sizes) {
  Tensor t(DType::I32, std::move(shape));
  std::copy(sizes.begin(), sizes.end(), t.data_as<int32_t>());
  return t;
}

std::vector<int32_t> counts_of(const std::vector<int32_t>& labels, int64_t BH, int64_t N, int64_t C) {
  std::vector<int32_t> counts(static_cast<size_t>(BH * C), 0);
  for (int64_t bh = 0; bh < BH; ++bh)
    for (int64_t i = 0; i < N; ++i) ++counts[static_cast<size_t>(bh * C + labels[static_cast<size_t>(bh * N + i)])];
  return counts;
}

// Random labels [B*H, N] over C clusters with empty, 1-token and larger clusters in every (b,h).
std::vector<int32_t> random_labels(ref::Rng& rng, int64_t BH, int64_t N, int64_t C) {
  std::vector<int32_t> labels;
  for (int64_t bh = 0; bh < BH; ++bh) {
    const std::vector<int32_t> l = ref::random_labels_with_sizes(rng, ref::random_cluster_sizes(rng, N, C));
    labels.insert(labels.end(), l.begin(), l.end());
  }
  return labels;
}

// ---------------------------------------------------------------------------------------------
// cluster_means
// ---------------------------------------------------------------------------------------------

TEST(ClusterMeans, MeanOfEachClusterAndZeroForEmpty) {
  const int64_t B = 2, H = 2, N = 60, C = 7, D = 12;
  ref::Rng rng(case_seed());
  ref::HostTensor v = ref::make_tensor(DType::BF16, {B, H, N, D}, ref::Layout::TransposedPadded);
  ref::fill_normal(v.view, rng);
  const std::vector<int32_t> labels = random_labels(rng, B * H, N, C);
  const Tensor label_t = sizes_tensor({B, H, N}, labels);
  Tensor means(DType::F32, {B, H, C, D});
  cluster_means(v.view, label_t.view(), means.view(), kStream);
  const std::vector<double> values = ref::to_vector(v.view), got = ref::to_vector(means.view());
  const std::vector<int32_t> counts = counts_of(labels, B * H, N, C);
  for (int64_t bh = 0; bh < B * H; ++bh)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t d = 0; d < D; ++d) {
        double sum = 0;
        for (int64_t i = 0; i < N; ++i)
          if (labels[static_cast<size_t>(bh * N + i)] == c) sum += values[static_cast<size_t>((bh * N + i) * D + d)];
        const int32_t n = counts[static_cast<size_t>(bh * C + c)];
        const double want = n > 0 ? sum / n : 0.0;
        EXPECT_NEAR(got[static_cast<size_t>((bh * C + c) * D + d)], want, ref::kF32Eps * (std::fabs(want) + 1e-30))
            << "bh " << bh << " cluster " << c << " (" << n << " points)";
      }
}

// ---------------------------------------------------------------------------------------------
// ear_probe
// ---------------------------------------------------------------------------------------------

struct ProbeCase {
  Tensor qc, kc, vc, labels, q_sizes, k_sizes;
};

Tensor probe(const ProbeCase& c, const TensorView& k, const TensorView& v, float scale, float gamma) {
  Tensor scores(DType::F32, {c.qc.shape()[0], c.qc.shape()[1], c.qc.shape()[2], c.kc.shape()[2]});
  ear_probe(c.qc.view(), c.kc.view(), c.vc.view(), k, v, c.labels.view(), c.q_sizes.view(), c.k_sizes.view(), scale,
            gamma, scores.view(), kStream);
  return scores;
}

// One query centroid (1, 0) of 3 queries. Key cluster 0 holds k = (1,0), v = (1,0) and
// k = (-1,0), v = (0,1), with centroids kbar = (0,0), vbar = (1/2,1/2); key cluster 1 is empty
// (a stale centroid (5,5)); key cluster 2 holds two copies of k = (0,1), v = (2,0), which are
// exactly its centroids. The keys and values, in token order: the k and v of the tests below.
ProbeCase hand_made_probe_case() {
  ProbeCase c;
  c.qc = from_values(DType::F32, {1, 1, 1, 2}, {1, 0});
  c.kc = from_values(DType::F32, {1, 1, 3, 2}, {0, 0, 5, 5, 0, 1});
  c.vc = from_values(DType::F32, {1, 1, 3, 2}, {0.5, 0.5, 0, 0, 2, 0});
  c.labels = sizes_tensor({1, 1, 4}, {0, 2, 0, 2});
  c.q_sizes = sizes_tensor({1, 1, 1}, {3});
  c.k_sizes = sizes_tensor({1, 1, 3}, {2, 0, 2});
  return c;
}

TEST(EarProbe, ClosedFormOnAHandMadeCase) {
  const ProbeCase c = hand_made_probe_case();
  const Tensor k = from_values(DType::F32, {1, 1, 4, 2}, {1, 0, 0, 1, -1, 0, 0, 1});
  const Tensor v = from_values(DType::F32, {1, 1, 4, 2}, {1, 0, 2, 0, 0, 1, 2, 0});
  for (const float scale : {1.0f, 0.5f}) {
    for (const float gamma : {1.0f, 0.5f, 0.0f}) {
      const std::vector<double> got = ref::to_vector(probe(c, k.view(), v.view(), scale, gamma).view());
      // Cluster 0: s = +scale and -scale, c = 0: E = |e^s (1,0) - (1/2,1/2)|^2 + |e^-s (0,1) - (1/2,1/2)|^2.
      const double es = std::exp(scale), em = std::exp(-scale);
      const double e0 = (es - 0.5) * (es - 0.5) + 0.25 + 0.25 + (em - 0.5) * (em - 0.5);
      EXPECT_NEAR(got[0], std::log(e0) - gamma * std::log(6.0), 1e-5) << "scale " << scale << " gamma " << gamma;
      // Cluster 1 is empty: E and the area are both floored at eps.
      EXPECT_NEAR(got[1], std::log(kEps) - gamma * std::log(kEps), 1e-4);
      // Cluster 2's keys and values are its centroids: E = 0, floored at eps.
      EXPECT_NEAR(got[2], std::log(kEps) - gamma * std::log(6.0), 1e-4);
    }
  }
}

// Random centroids of Cq query clusters; keys and values (strided) in Ck random clusters (empty and
// 1-token ones included) with their means as centroids; query-cluster sizes with 0 and 1 among them.
struct RandomProbe {
  ProbeCase c;
  ref::HostTensor k, v;
  std::vector<int32_t> labels, k_sizes, q_sizes;
  std::vector<double> qd, kd, vd, ck, cv;  // float64 copies of the query centroids, k, v and k, v centroids
  int64_t D = 0;
  const double* row(const std::vector<double>& x, int64_t r) const { return &x[static_cast<size_t>(r * D)]; }
  // x . y, or sum |x_d y_d| with `magnitude`.
  double dot(const double* x, const double* y, bool magnitude) const {
    double sum = 0;
    for (int64_t d = 0; d < D; ++d) sum += magnitude ? std::fabs(x[d] * y[d]) : x[d] * y[d];
    return sum;
  }
};

RandomProbe random_probe(ref::Rng& rng, DType dtype, int64_t B, int64_t H, int64_t N, int64_t Cq, int64_t Ck,
                         int64_t D) {
  RandomProbe r{{},
                ref::make_tensor(dtype, {B, H, N, D}, ref::Layout::Padded),
                ref::make_tensor(dtype, {B, H, N, D}, ref::Layout::Transposed)};
  ProbeCase& c = r.c;
  c.qc = Tensor(DType::F32, {B, H, Cq, D});
  ref::fill_normal(c.qc.view(), rng);
  ref::fill_normal(r.k.view, rng);
  ref::fill_normal(r.v.view, rng);
  r.labels = random_labels(rng, B * H, N, Ck);
  r.k_sizes = counts_of(r.labels, B * H, N, Ck);
  for (int64_t i = 0; i < B * H * Cq; ++i) r.q_sizes.push_back(i % 7 == 1 ? 0 : static_cast<int32_t>(1 + i * 5 % 11));
  c.labels = sizes_tensor({B, H, N}, r.labels);
  c.k_sizes = sizes_tensor({B, H, Ck}, r.k_sizes);
  c.q_sizes = sizes_tensor({B, H, Cq}, r.q_sizes);
  c.kc = Tensor(DType::F32, {B, H, Ck, D});
  c.vc = Tensor(DType::F32, {B, H, Ck, D});
  cluster_means(r.k.view, c.labels.view(), c.kc.view(), kStream);
  cluster_means(r.v.view, c.labels.view(), c.vc.view(), kStream);
  r.qd = ref::to_vector(c.qc.view());
  r.kd = ref::to_vector(r.k.view);
  r.vd = ref::to_vector(r.v.view);
  r.ck = ref::to_vector(c.kc.view());
  r.cv = ref::to_vector(c.vc.view());
  r.D = D;
  return r;
}

// Against the float64 formula. The op's logits are fp32 dot products: |ds| <= (D + 2) u scale
// sum_d |q_d k_d| (Higham 3.5); E is a sum of terms of total magnitude T (each exp(s) at most
// doubled in exponent), so log E moves by at most 2 |ds| T / E to first order (twice that allowed).
TEST(EarProbe, MatchesFloat64Reference) {
  const int64_t B = 2, H = 2, N = 90, Cq = 5, Ck = 9, D = 16;
  const double scale = 0.25;
  ref::Rng rng(case_seed());
  for (DType dtype : {DType::F32, DType::BF16}) {
    const RandomProbe random = random_probe(rng, dtype, B, H, N, Cq, Ck, D);
    const ProbeCase& c = random.c;
    const ref::HostTensor &k = random.k, &v = random.v;
    const std::vector<int32_t>&labels = random.labels, &k_sizes = random.k_sizes, &q_sizes = random.q_sizes;
    const std::vector<double>&qd = random.qd, &kd = random.kd, &vd = random.vd, &ck = random.ck, &cv = random.cv;
    const auto row = [&](const std::vector<double>& x, int64_t r) { return random.row(x, r); };
    const auto dot = [&](const double* x, const double* y, bool magnitude) { return random.dot(x, y, magnitude); };
    for (const double gamma : {1.0, 0.5}) {
      const std::vector<double> got = ref::to_vector(probe(c, k.view, v.view, scale, gamma).view());
      const std::vector<double> want =
          ref::ear_probe(c.qc.view(), c.kc.view(), c.vc.view(), k.view, v.view, labels, q_sizes, k_sizes, scale, gamma);
      for (int64_t bh = 0; bh < B * H; ++bh)
        for (int64_t a = 0; a < Cq; ++a)
          for (int64_t j = 0; j < Ck; ++j) {
            const double* qa = row(qd, bh * Cq + a);
            const double* vbar = row(cv, bh * Ck + j);
            const double c_logit = scale * dot(qa, row(ck, bh * Ck + j), false);
            double magnitude = 0, ds = (D + 2) * ref::kF32Eps * scale * dot(qa, row(ck, bh * Ck + j), true);
            for (int64_t t = 0; t < N; ++t) {
              if (labels[static_cast<size_t>(bh * N + t)] != j) continue;
              const double* kt = row(kd, bh * N + t);
              const double* vt = row(vd, bh * N + t);
              const double st = scale * dot(qa, kt, false);
              ds = std::max(ds, (D + 2) * ref::kF32Eps * scale * dot(qa, kt, true));
              magnitude += std::exp(2 * st) * dot(vt, vt, false) + 2 * std::exp(st + c_logit) * dot(vt, vbar, true) +
                           std::exp(2 * c_logit) * dot(vbar, vbar, false);
            }
            const size_t i = static_cast<size_t>((bh * Cq + a) * Ck + j);
            const double area = static_cast<double>(q_sizes[static_cast<size_t>(bh * Cq + a)]) *
                                k_sizes[static_cast<size_t>(bh * Ck + j)];
            const double error = std::exp(want[i] + gamma * std::log(std::max(area, kEps)));
            EXPECT_NEAR(got[i], want[i], 4 * ds * magnitude / error + 1e-5)
                << dtype_name(dtype) << " gamma " << gamma << " bh " << bh << " pair " << a << "," << j;
          }
    }
  }
}

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

// ---------------------------------------------------------------------------------------------
// centroid_compensation
// ---------------------------------------------------------------------------------------------

// Sparse attention in token order through the clusters of `q_labels` / `k_labels` and the mask,
// then the compensation: the path svg2_attention takes.
// With `corrections`, the compensation is corrected_centroid_compensation's with these terms.
struct Corrections {
  TensorView spread, pair_values;
};

ref::Attention compensated(const TensorView& q, const TensorView& k, const TensorView& v, const Tensor& q_labels,
                           const Tensor& k_labels, const Tensor& mask, const Tensor& k_centroids,
                           const Tensor& v_centroids, const Tensor& k_sizes, float scale, int64_t N,
                           ref::Attention* before = nullptr, const Corrections* corrections = nullptr) {
  const int64_t B = q.shape[0], H = q.shape[1], S = q.shape[2], D = q.shape[3];
  const int64_t Cq = mask.shape()[2], Ck = mask.shape()[3];
  Tensor qp(DType::I32, {B, H, S}), kp(DType::I32, {B, H, k.shape[2]}), qo(DType::I32, {B, H, Cq + 1}),
      ko(DType::I32, {B, H, Ck + 1});
  cluster_permutation(q_labels.view(), static_cast<int>(Cq), qp.view(), qo.view(), kStream);
  cluster_permutation(k_labels.view(), static_cast<int>(Ck), kp.view(), ko.view(), kStream);
  Tensor out(DType::F32, {B, H, S, D}), lse(DType::F32, {B, H, S});
  block_sparse_attention(q, k, v, {qo.view(), ko.view(), mask.view()}, scale, out.view(), lse.view(), kStream, {},
                         {qp.view(), kp.view()});
  if (before != nullptr) *before = {ref::to_vector(out.view()), ref::to_vector(lse.view())};
  const TensorView video_labels = q_labels.view().slice(2, 0, N);
  if (corrections != nullptr)
    corrected_centroid_compensation(q, video_labels, mask.view(), k_centroids.view(), v_centroids.view(),
                                    k_sizes.view(), corrections->spread, corrections->pair_values, scale, out.view(),
                                    lse.view(), kStream);
  else
    centroid_compensation(q, video_labels, mask.view(), k_centroids.view(), v_centroids.view(), k_sizes.view(), scale,
                          out.view(), lse.view(), kStream);
  return {ref::to_vector(out.view()), ref::to_vector(lse.view())};
}

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

struct CompensationCase {
  ref::HostTensor q, k, v;
  Tensor q_labels, k_labels, mask, kc, vc, k_sizes;
  std::vector<int32_t> q_label_values, k_label_values, k_size_values;
  std::vector<uint8_t> mask_values;
};

// Random clusters (empty ones included) and a random mask; N video query rows of S (the rest
// stand for text tokens: label Cq, attending everything, never compensated).
CompensationCase compensation_case(ref::Rng& rng, DType dtype, int64_t B, int64_t H, int64_t S, int64_t N, int64_t D,
                                   int64_t Cq, int64_t Ck, bool identical_clusters) {
  CompensationCase c{ref::make_tensor(dtype, {B, H, S, D}, ref::Layout::Transposed),
                     ref::make_tensor(dtype, {B, H, S, D}, ref::Layout::Contiguous),
                     ref::make_tensor(dtype, {B, H, S, D}, ref::Layout::Padded)};
  ref::fill_normal(c.q.view, rng);
  c.k_label_values = random_labels(rng, B * H, S, Ck);
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const std::vector<int32_t> l = random_labels(rng, 1, N, Cq);
    c.q_label_values.insert(c.q_label_values.end(), l.begin(), l.end());
    c.q_label_values.insert(c.q_label_values.end(), static_cast<size_t>(S - N), static_cast<int32_t>(Cq));
  }
  if (identical_clusters) {  // every key (value) equals its cluster's own random vector
    std::vector<double> kd(static_cast<size_t>(B * H * S * D)), vd(kd.size()), centers(static_cast<size_t>(2 * Ck * D));
    for (double& x : centers) x = rng.normal();
    for (int64_t r = 0; r < B * H * S; ++r)
      for (int64_t d = 0; d < D; ++d) {
        const int64_t j = c.k_label_values[static_cast<size_t>(r)];
        kd[static_cast<size_t>(r * D + d)] = centers[static_cast<size_t>(j * D + d)];
        vd[static_cast<size_t>(r * D + d)] = centers[static_cast<size_t>((Ck + j) * D + d)];
      }
    ref::from_vector(c.k.view, kd);
    ref::from_vector(c.v.view, vd);
  } else {
    ref::fill_normal(c.k.view, rng);
    ref::fill_normal(c.v.view, rng);
  }
  c.q_labels = sizes_tensor({B, H, S}, c.q_label_values);
  c.k_labels = sizes_tensor({B, H, S}, c.k_label_values);
  c.k_size_values = counts_of(c.k_label_values, B * H, S, Ck);
  c.k_sizes = sizes_tensor({B, H, Ck}, c.k_size_values);
  c.mask = Tensor(DType::U8, {B, H, Cq + 1, Ck});  // row Cq: the text rows, keep all
  for (int64_t i = 0; i < c.mask.numel(); ++i) {
    const bool text_row = (i / Ck) % (Cq + 1) == Cq;
    c.mask.data_as<uint8_t>()[i] = text_row || rng.integer(0, 2) == 0 ? 1 : 0;
  }
  c.mask_values.assign(c.mask.data_as<uint8_t>(), c.mask.data_as<uint8_t>() + c.mask.numel());
  c.kc = Tensor(DType::F32, {B, H, Ck, D});
  c.vc = Tensor(DType::F32, {B, H, Ck, D});
  cluster_means(c.k.view, c.k_labels.view(), c.kc.view(), kStream);
  cluster_means(c.v.view, c.k_labels.view(), c.vc.view(), kStream);
  return c;
}

// The fp32 attention error model of the attention suite: |out - out64| <= 4 (D + Sk) u max|v| per
// element (the sums of Sk weights and D products, the exp and the division), lse to (D + Sk) u.
void expect_close(const ref::Attention& got, const ref::Attention& want, double max_v, int64_t D, int64_t Sk,
                  std::string_view what) {
  const double tol_out = 4.0 * static_cast<double>(D + Sk) * ref::kF32Eps * max_v;
  for (size_t i = 0; i < want.out.size(); ++i) ASSERT_NEAR(got.out[i], want.out[i], tol_out) << what << " out " << i;
  for (size_t i = 0; i < want.lse.size(); ++i)
    ASSERT_NEAR(got.lse[i], want.lse[i],
                4.0 * static_cast<double>(D + Sk) * ref::kF32Eps * (1 + std::fabs(want.lse[i])))
        << what << " lse " << i;
}

double max_abs(const std::vector<double>& x) {
  double m = 0;
  for (double e : x) m = std::max(m, std::fabs(e));
  return m;
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
    // The token mask of the layout, in token order.
    std::vector<uint8_t> tokens(static_cast<size_t>(B * H * S * S));
    for (int64_t bh = 0; bh < B * H; ++bh)
      for (int64_t i = 0; i < S; ++i)
        for (int64_t j = 0; j < S; ++j) {
          const int64_t a = c.q_label_values[static_cast<size_t>(bh * S + i)];
          const int64_t b = c.k_label_values[static_cast<size_t>(bh * S + j)];
          tokens[static_cast<size_t>((bh * S + i) * S + j)] =
              c.mask_values[static_cast<size_t>((bh * (Cq + 1) + a) * Ck + b)];
        }
    // The reference takes the video rows' labels [B,H,N] and the video part of the mask.
    std::vector<int32_t> video_labels;
    std::vector<uint8_t> video_mask;
    for (int64_t bh = 0; bh < B * H; ++bh) {
      video_labels.insert(video_labels.end(), c.q_label_values.begin() + bh * S, c.q_label_values.begin() + bh * S + N);
      video_mask.insert(video_mask.end(), c.mask_values.begin() + bh * (Cq + 1) * Ck,
                        c.mask_values.begin() + (bh * (Cq + 1) + Cq) * Ck);
    }
    const ref::Attention want = ref::compensated_attention(c.q.view, c.k.view, c.v.view, scale, tokens, video_labels, N,
                                                           video_mask, Cq, c.kc.view(), c.vc.view(), c.k_size_values);
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

// ---------------------------------------------------------------------------------------------
// ear-plus: ear_plus_probe, split_clusters, corrected_centroid_compensation
// ---------------------------------------------------------------------------------------------

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
    const std::vector<int32_t>&labels = random.labels, &k_sizes = random.k_sizes, &q_sizes = random.q_sizes;
    const std::vector<double>&qd = random.qd, &kd = random.kd, &vd = random.vd, &ck = random.ck, &cv = random.cv;
    const auto row = [&](const std::vector<double>& x, int64_t r) { return random.row(x, r); };
    const auto dot = [&](const double* x, const double* y, bool magnitude) { return random.dot(x, y, magnitude); };
    const double max_v = max_abs(vd);
    for (const double gamma : {1.0, 0.5}) {
      const PlusProbe got = plus_probe(c, k.view, v.view, static_cast<float>(scale), static_cast<float>(gamma));
      const std::vector<double> scores = ref::to_vector(got.scores.view()), spread = ref::to_vector(got.spread.view());
      const std::vector<double> values = ref::to_vector(got.pair_values.view());
      const ref::EarPlusProbe want = ref::ear_plus_probe(c.qc.view(), c.kc.view(), c.vc.view(), k.view, v.view, labels,
                                                         q_sizes, k_sizes, scale, gamma);
      for (int64_t bh = 0; bh < B * H; ++bh)
        for (int64_t a = 0; a < Cq; ++a) {
          const double* qa = row(qd, bh * Cq + a);
          double ds = 0;
          for (int64_t t = 0; t < N; ++t) ds = std::max(ds, dot(qa, row(kd, bh * N + t), true));
          for (int64_t j = 0; j < Ck; ++j) ds = std::max(ds, dot(qa, row(ck, bh * Ck + j), true));
          ds *= (D + 2) * ref::kF32Eps * scale;
          for (int64_t j = 0; j < Ck; ++j) {
            const double* vbar = row(cv, bh * Ck + j);
            const double c_logit = scale * dot(qa, row(ck, bh * Ck + j), false);
            double magnitude = 0, error = 0;
            for (int64_t t = 0; t < N; ++t) {
              if (labels[static_cast<size_t>(bh * N + t)] != j) continue;
              const double* vt = row(vd, bh * N + t);
              const double st = scale * dot(qa, row(kd, bh * N + t), false);
              magnitude += std::exp(2 * st) * dot(vt, vt, false) + 2 * std::exp(st + c_logit) * dot(vt, vbar, true) +
                           std::exp(2 * c_logit) * dot(vbar, vbar, false);
              for (int64_t d = 0; d < D; ++d) error += std::pow(std::exp(st) * vt[d] - std::exp(c_logit) * vbar[d], 2);
            }
            const size_t i = static_cast<size_t>((bh * Cq + a) * Ck + j);
            const std::string where = std::string(dtype_name(dtype)) + " gamma " + std::to_string(gamma) + " bh " +
                                      std::to_string(bh) + " pair " + std::to_string(a) + "," + std::to_string(j);
            const double relative = error > 0 ? magnitude / error : 0.0;
            EXPECT_NEAR(scores[i], want.scores[i], 4 * ds * relative + 4 * ds + 1e-5) << where;
            EXPECT_NEAR(spread[i], want.spread[i], 4 * ds + 1e-6) << where;
            for (int64_t d = 0; d < D; ++d) {
              const size_t e = i * static_cast<size_t>(D) + static_cast<size_t>(d);
              EXPECT_NEAR(values[e], want.pair_values[e], 8 * ds * max_v + 2 * ref::kF32Eps * max_v) << where;
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
    std::vector<int32_t> video_labels;
    std::vector<uint8_t> video_mask;
    for (int64_t bh = 0; bh < B * H; ++bh) {
      video_labels.insert(video_labels.end(), c.q_label_values.begin() + bh * S, c.q_label_values.begin() + bh * S + N);
      video_mask.insert(video_mask.end(), c.mask_values.begin() + bh * (Cq + 1) * Ck,
                        c.mask_values.begin() + (bh * (Cq + 1) + Cq) * Ck);
    }
    std::vector<uint8_t> tokens(static_cast<size_t>(B * H * S * S));
    for (int64_t bh = 0; bh < B * H; ++bh)
      for (int64_t i = 0; i < S; ++i)
        for (int64_t j = 0; j < S; ++j)
          tokens[static_cast<size_t>((bh * S + i) * S + j)] = c.mask_values[static_cast<size_t>(
              (bh * (Cq + 1) + c.q_label_values[static_cast<size_t>(bh * S + i)]) * Ck +
              c.k_label_values[static_cast<size_t>(bh * S + j)])];
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
            ref::compensated_attention(c.q.view, c.k.view, c.v.view, scale, tokens, video_labels, N, video_mask, Cq,
                                       kc.view(), vc.view(), size_values, want_terms);
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

// ---------------------------------------------------------------------------------------------
// Bad input: typed errors, outputs untouched
// ---------------------------------------------------------------------------------------------

TEST(EarErrors, ClusterMeans) {
  ref::HostTensor means = ref::make_tensor(DType::F32, {1, 2, 4, 8});
  ref::poison(means);
  const Tensor points(DType::F32, {1, 2, 10, 8});
  std::fill_n(points.data_as<float>(), points.numel(), 1.0f);
  const Tensor labels = sizes_tensor({1, 2, 10}, std::vector<int32_t>(20, 1));
  const Tensor bad_labels = sizes_tensor({1, 2, 10}, {0, 1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0});
  const Tensor short_labels = sizes_tensor({1, 2, 9}, std::vector<int32_t>(18, 0));
  const Tensor f16_means(DType::F16, {1, 2, 4, 8});
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, means,
                         cluster_means(points.view(), bad_labels.view(), means.view, kStream));
  EXPECT_ERROR_UNTOUCHED(ShapeError, means, cluster_means(points.view(), short_labels.view(), means.view, kStream));
  EXPECT_THROW(cluster_means(points.view(), labels.view(), f16_means.view(), kStream), DTypeError);
  EXPECT_ERROR_UNTOUCHED(UnsupportedError, means,
                         cluster_means(ref::on_cuda(points.view()), labels.view(), means.view, kStream));
}

TEST(EarErrors, ProbeAndRouting) {
  const int64_t Cq = 2, Ck = 3, N = 6, D = 4;
  const Tensor qc(DType::F32, {1, 1, Cq, D}), kc(DType::F32, {1, 1, Ck, D}), vc(DType::F32, {1, 1, Ck, D});
  const Tensor k(DType::F32, {1, 1, N, D}), v(DType::F32, {1, 1, N, D}), v_short(DType::F32, {1, 1, N - 1, D});
  for (const Tensor* t : {&qc, &kc, &vc, &k, &v}) std::fill_n(t->data_as<float>(), t->numel(), 0.5f);
  const Tensor labels = sizes_tensor({1, 1, N}, {0, 1, 2, 0, 1, 2});
  const Tensor q_sizes = sizes_tensor({1, 1, Cq}, {3, 3}), k_sizes = sizes_tensor({1, 1, Ck}, {2, 2, 2});
  const Tensor negative = sizes_tensor({1, 1, Cq}, {3, -1});
  ref::HostTensor scores = ref::make_tensor(DType::F32, {1, 1, Cq, Ck});
  ref::poison(scores);
  const auto run = [&](const Tensor& vv, const Tensor& qs, float gamma, const TensorView& out) {
    ear_probe(qc.view(), kc.view(), vc.view(), k.view(), vv.view(), labels.view(), qs.view(), k_sizes.view(), 0.5f,
              gamma, out, kStream);
  };
  EXPECT_ERROR_UNTOUCHED(ShapeError, scores, run(v_short, q_sizes, 1.0f, scores.view));
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, scores, run(v, negative, 1.0f, scores.view));
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, scores, run(v, q_sizes, -1.0f, scores.view));
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, scores,
                         run(v, q_sizes, std::numeric_limits<float>::quiet_NaN(), scores.view));
  const Tensor wrong_scores(DType::F32, {1, 1, Ck, Cq});
  EXPECT_THROW(run(v, q_sizes, 1.0f, wrong_scores.view()), ShapeError);

  run(v, q_sizes, 1.0f, scores.view);
  ref::HostTensor mask = ref::make_tensor(DType::U8, {1, 1, Cq, Ck});
  ref::poison(mask);
  Tensor budget(DType::U8, {1, 1, Cq, Ck});
  std::fill_n(budget.data_as<uint8_t>(), budget.numel(), uint8_t{1});
  const Tensor probs(DType::F32, {1, 1, Cq, Ck});
  std::fill_n(probs.data_as<float>(), probs.numel(), 1.0f / Ck);
  const Tensor f32_budget(DType::F32, {1, 1, Cq, Ck});
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, mask,
                         select_error_aware(probs.view(), budget.view(), scores.view, q_sizes.view(), k_sizes.view(),
                                            -1, mask.view, kStream));
  EXPECT_ERROR_UNTOUCHED(DTypeError, mask,
                         select_error_aware(probs.view(), f32_budget.view(), scores.view, q_sizes.view(),
                                            k_sizes.view(), 1, mask.view, kStream));
  EXPECT_ERROR_UNTOUCHED(ShapeError, mask,
                         select_error_aware(probs.view(), budget.view(), scores.view, k_sizes.view(), q_sizes.view(), 1,
                                            mask.view, kStream));
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, mask,
                         select_error_aware(probs.view(), budget.view(), scores.view, negative.view(), k_sizes.view(),
                                            1, mask.view, kStream));
}

TEST(EarErrors, Compensation) {
  const int64_t S = 5, N = 4, D = 4, Cq = 2, Ck = 3;
  const Tensor q(DType::F32, {1, 1, S, D}), kc(DType::F32, {1, 1, Ck, D}), vc(DType::F32, {1, 1, Ck, D});
  for (const Tensor* t : {&q, &kc, &vc}) std::fill_n(t->data_as<float>(), t->numel(), 0.25f);
  const Tensor labels = sizes_tensor({1, 1, N}, {0, 1, 1, 0}), bad_labels = sizes_tensor({1, 1, N}, {0, 2, 1, 0});
  const Tensor long_labels = sizes_tensor({1, 1, S + 1}, std::vector<int32_t>(S + 1, 0));
  const Tensor sizes = sizes_tensor({1, 1, Ck}, {2, 0, 3}), negative = sizes_tensor({1, 1, Ck}, {2, -2, 3});
  Tensor mask(DType::U8, {1, 1, Cq, Ck});
  std::fill_n(mask.data_as<uint8_t>(), mask.numel(), uint8_t{0});
  ref::HostTensor out = ref::make_tensor(DType::F32, {1, 1, S, D});
  ref::HostTensor lse = ref::make_tensor(DType::F32, {1, 1, S});
  ref::Rng rng(case_seed());
  ref::fill_normal(out.view, rng);
  std::fill_n(static_cast<float*>(lse.view.data), S, 0.0f);
  const std::vector<const ref::HostTensor*> outputs{&out, &lse};
  const auto run = [&](const Tensor& l, const Tensor& n, const TensorView& lse_view) {
    centroid_compensation(q.view(), l.view(), mask.view(), kc.view(), vc.view(), n.view(), 0.5f, out.view, lse_view,
                          kStream);
  };
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, outputs, run(bad_labels, sizes, lse.view));
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, outputs, run(labels, negative, lse.view));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outputs, run(long_labels, sizes, lse.view));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outputs, run(labels, sizes, TensorView{}));  // lse is required
  EXPECT_ERROR_UNTOUCHED(UnsupportedError, outputs, run(labels, sizes, ref::on_cuda(lse.view)));
}

TEST(EarErrors, EarPlusOps) {
  const int64_t Cq = 2, Ck = 3, N = 6, D = 4;
  const Tensor qc(DType::F32, {1, 1, Cq, D}), kc(DType::F32, {1, 1, Ck, D}), vc(DType::F32, {1, 1, Ck, D});
  const Tensor k(DType::F32, {1, 1, N, D}), v(DType::F32, {1, 1, N, D});
  for (const Tensor* t : {&qc, &kc, &vc, &k, &v}) std::fill_n(t->data_as<float>(), t->numel(), 0.5f);
  const Tensor labels = sizes_tensor({1, 1, N}, {0, 1, 2, 0, 1, 2}),
               bad_labels = sizes_tensor({1, 1, N}, {0, 1, 3, 0, 1, 2});
  const Tensor q_sizes = sizes_tensor({1, 1, Cq}, {3, 3}), k_sizes = sizes_tensor({1, 1, Ck}, {2, 2, 2});
  ref::HostTensor scores = ref::make_tensor(DType::F32, {1, 1, Cq, Ck});
  ref::HostTensor spread = ref::make_tensor(DType::F32, {1, 1, Cq, Ck});
  ref::HostTensor values = ref::make_tensor(DType::F32, {1, 1, Cq * Ck, D});
  for (ref::HostTensor* t : {&scores, &spread, &values}) ref::poison(*t);
  const std::vector<const ref::HostTensor*> probe_outputs{&scores, &spread, &values};
  const auto probe = [&](const TensorView& l, const TensorView& s, const TensorView& pv) {
    ear_plus_probe(qc.view(), kc.view(), vc.view(), k.view(), v.view(), l, q_sizes.view(), k_sizes.view(), 0.5f, 1.0f,
                   scores.view, s, pv, kStream);
  };
  const Tensor spread_t(DType::F32, {1, 1, Ck, Cq}), spread_u8(DType::U8, {1, 1, Cq, Ck});
  const Tensor values_short(DType::F32, {1, 1, Cq * Ck - 1, D});
  EXPECT_ERROR_UNTOUCHED(ShapeError, probe_outputs, probe(labels.view(), spread_t.view(), values.view));
  EXPECT_ERROR_UNTOUCHED(DTypeError, probe_outputs, probe(labels.view(), spread_u8.view(), values.view));
  EXPECT_ERROR_UNTOUCHED(ShapeError, probe_outputs, probe(labels.view(), spread.view, values_short.view()));
  const ref::HostTensor values_padded = ref::make_tensor(DType::F32, {1, 1, Cq * Ck, D}, ref::Layout::Padded);
  EXPECT_ERROR_UNTOUCHED(ShapeError, probe_outputs, probe(labels.view(), spread.view, values_padded.view));
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, probe_outputs, probe(bad_labels.view(), spread.view, values.view));
  EXPECT_ERROR_UNTOUCHED(UnsupportedError, probe_outputs, probe(labels.view(), ref::on_cuda(spread.view), values.view));

  // split_clusters: sub_sizes must have 2C entries; labels within [0, C).
  ref::HostTensor sub_labels = ref::make_tensor(DType::I32, {1, 1, N});
  ref::HostTensor sub_sizes = ref::make_tensor(DType::I32, {1, 1, 2 * Ck});
  ref::poison(sub_labels);
  ref::poison(sub_sizes);
  const std::vector<const ref::HostTensor*> split_outputs{&sub_labels, &sub_sizes};
  const Tensor sizes_c(DType::I32, {1, 1, Ck});
  EXPECT_ERROR_UNTOUCHED(ShapeError, split_outputs,
                         split_clusters(k.view(), labels.view(), kc.view(), sub_labels.view, sizes_c.view(), kStream));
  EXPECT_ERROR_UNTOUCHED(
      InvalidArgumentError, split_outputs,
      split_clusters(k.view(), bad_labels.view(), kc.view(), sub_labels.view, sub_sizes.view, kStream));

  // corrected_centroid_compensation: pseudo-keys a whole multiple of the mask's key clusters.
  const int64_t S = 5;
  const Tensor q(DType::F32, {1, 1, S, D}), kc4(DType::F32, {1, 1, 4, D}), vc4(DType::F32, {1, 1, 4, D});
  for (const Tensor* t : {&q, &kc4, &vc4}) std::fill_n(t->data_as<float>(), t->numel(), 0.25f);
  const Tensor q_labels = sizes_tensor({1, 1, S}, {0, 1, 1, 0, 0}), sizes4 = sizes_tensor({1, 1, 4}, {1, 1, 1, 1});
  Tensor mask(DType::U8, {1, 1, Cq, Ck});
  std::fill_n(mask.data_as<uint8_t>(), mask.numel(), uint8_t{0});
  ref::HostTensor out = ref::make_tensor(DType::F32, {1, 1, S, D});
  ref::HostTensor lse = ref::make_tensor(DType::F32, {1, 1, S});
  ref::Rng rng(case_seed());
  ref::fill_normal(out.view, rng);
  std::fill_n(static_cast<float*>(lse.view.data), S, 0.0f);
  const std::vector<const ref::HostTensor*> outputs{&out, &lse};
  EXPECT_ERROR_UNTOUCHED(ShapeError, outputs,
                         corrected_centroid_compensation(q.view(), q_labels.view(), mask.view(), kc4.view(), vc4.view(),
                                                         sizes4.view(), {}, {}, 0.5f, out.view, lse.view, kStream));
  EXPECT_ERROR_UNTOUCHED(
      ShapeError, outputs,
      corrected_centroid_compensation(q.view(), q_labels.view(), mask.view(), kc.view(), vc.view(), k_sizes.view(),
                                      spread_t.view(), {}, 0.5f, out.view, lse.view, kStream));
}

// ---------------------------------------------------------------------------------------------
// The layer call with error-aware routing and compensation
// ---------------------------------------------------------------------------------------------

Config ear_config() {
  Config c;
  c.q_clusters = 6;
  c.k_clusters = 14;
  c.kmeans_iters_init = 8;
  c.routing = Routing::ErrorAware;
  c.compensate = true;
  return c;
}

// ear_config with every ear-plus idea on.
Config ear_plus_config() {
  Config c = ear_config();
  c.ear_spread = c.ear_pair_values = c.ear_head_budget = c.ear_split = true;
  return c;
}

struct LayerRun {
  Tensor out, lse, density;
};

LayerRun run_layer(const Tensor& q, const Tensor& k, const Tensor& v, const Config& config) {
  const auto& s = q.shape();
  LayerRun r{Tensor(DType::F32, s), Tensor(DType::F32, {s[0], s[1], s[2]}), Tensor(DType::F32, {s[0], s[1]})};
  BranchState state;
  svg2_attention(q.view(), k.view(), v.view(), config, state, {r.out.view(), r.lse.view(), r.density.view()}, kStream);
  return r;
}

Tensor blobs(int64_t S, uint32_t seed) {
  return testing_support::clustered_tensor(DType::BF16, 1, 2, S, 32, 5, seed, 1.5f, 0.5f);
}

TEST(EarLayer, TopPOneIsDenseAttention) {
  const Tensor q = blobs(120, 1), k = blobs(120, 2), v = blobs(120, 3);
  for (Config c : {ear_config(), ear_plus_config()}) {
    c.top_p = 1.0f;
    const LayerRun r = run_layer(q, k, v, c);
    const ref::Attention dense = ref::attention_f64(q.view(), k.view(), v.view(), c.scale_for(32), nullptr);
    const std::vector<double> out = ref::to_vector(r.out.view());
    for (size_t i = 0; i < out.size(); ++i)
      ASSERT_NEAR(out[i], dense.out[i], 1e-4) << i << " ear-plus " << c.ear_plus();
    for (int64_t i = 0; i < 2; ++i) EXPECT_FLOAT_EQ(r.density.data_as<float>()[i], 1.0f);
  }
}

// HunyuanVideo's text rows attend by the joint-text rule and are never compensated: with the same
// clusters and mask, compensation changes the video rows only.
TEST(EarLayer, TextRowsAreNotCompensated) {
  const int64_t S = 140, text = 20;
  const Tensor q = blobs(S, 4), k = blobs(S, 5), v = blobs(S, 6);
  for (Config c : {ear_config(), ear_plus_config()}) {
    c.text_tokens = text;
    c.prompt_length = 12;
    c.top_p = 0.6f;
    const LayerRun with = run_layer(q, k, v, c);
    c.compensate = c.ear_spread = c.ear_pair_values = c.ear_split = false;
    const LayerRun without = run_layer(q, k, v, c);
    const float* a = with.out.data_as<float>();
    const float* b = without.out.data_as<float>();
    double video_change = 0;
    for (int64_t h = 0; h < 2; ++h)
      for (int64_t i = 0; i < S; ++i)
        for (int64_t d = 0; d < 32; ++d) {
          const int64_t e = (h * S + i) * 32 + d;
          if (i >= S - text)
            ASSERT_EQ(a[e], b[e]) << "text row " << i;
          else
            video_change = std::max(video_change, static_cast<double>(std::fabs(a[e] - b[e])));
        }
    EXPECT_GT(video_change, 1e-3) << "compensation changed no video row";
    EXPECT_EQ(with.density.data_as<float>()[0], without.density.data_as<float>()[0]);
  }
}

TEST(EarLayer, BadInputIsATypedError) {
  const Tensor q = blobs(64, 7), k = blobs(64, 8);
  Tensor v = blobs(64, 9);
  store_from_f32(v.data(), v.dtype(), 100, std::numeric_limits<float>::quiet_NaN());
  EXPECT_THROW(run_layer(q, k, v, ear_config()), NonFiniteError);
  Config c = ear_config();
  c.key_shard_count = 2;
  EXPECT_THROW(c.validate(), InvalidArgumentError);  // compensation needs every key cluster
  c = ear_config();
  c.ear_gamma = -1.0f;
  EXPECT_THROW(c.validate(), InvalidArgumentError);
  c = ear_config();
  c.ear_keep_ratio = 1.5f;
  EXPECT_THROW(c.validate(), InvalidArgumentError);
  c = ear_config();
  c.routing = static_cast<Routing>(7);
  EXPECT_THROW(c.validate(), InvalidArgumentError);
  // The ear-plus ideas refine error-aware routing; the compensation ones need the compensation.
  c = ear_plus_config();
  c.routing = Routing::TopP;
  EXPECT_THROW(c.validate(), InvalidArgumentError);
  for (bool Config::*idea : {&Config::ear_spread, &Config::ear_pair_values, &Config::ear_split}) {
    c = ear_config();
    c.compensate = false;
    c.*idea = true;
    EXPECT_THROW(c.validate(), InvalidArgumentError);
  }
  c = ear_config();
  c.compensate = false;
  c.ear_head_budget = true;
  EXPECT_NO_THROW(c.validate());
  // EAR itself runs on CUDA (tests/cuda/test_cuda_ear.cpp); each ear-plus idea is refused there, with
  // its own message (a CPU-only build would refuse any CUDA call, but with another one), before the
  // call touches the branch state or any tensor: the views are CUDA-tagged host memory.
  Tensor out(DType::F32, q.shape());
  for (bool Config::*idea :
       {&Config::ear_spread, &Config::ear_pair_values, &Config::ear_head_budget, &Config::ear_split}) {
    c = ear_config();
    c.*idea = true;
    BranchState state;
    try {
      svg2_attention(ref::on_cuda(q.view()), ref::on_cuda(k.view()), ref::on_cuda(v.view()), c, state,
                     {ref::on_cuda(out.view())}, Stream{Device::cuda(0), nullptr, 0});
      ADD_FAILURE() << "an ear-plus idea on a CUDA stream was not refused";
    } catch (const UnsupportedError& e) {
      EXPECT_NE(std::string(e.what()).find("ear-plus ideas"), std::string::npos) << e.what();
    }
    EXPECT_FALSE(state.initialized());
  }
  EXPECT_EQ(ear_config().ear_guaranteed_clusters(), 1);  // max(1, floor(0.05 * 14))
  c.ear_keep_ratio = 0.0f;
  EXPECT_EQ(c.ear_guaranteed_clusters(), 0);
}

}  // namespace
}  // namespace sapattn
