// SVG-EAR's estimates (docs/ear.md): cluster_means (the value centroids) against each cluster's
// mean, and ear_probe against its closed form on a hand-made case and against the float64 reference.
#include <gtest/gtest.h>

#include <algorithm>
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
    for (const double gamma : {1.0, 0.5}) {
      const std::vector<double> got = ref::to_vector(probe(c, k.view, v.view, scale, gamma).view());
      const std::vector<double> want = ref::ear_probe(c.qc.view(), c.kc.view(), c.vc.view(), k.view, v.view,
                                                      random.labels, random.q_sizes, random.k_sizes, scale, gamma);
      for (int64_t bh = 0; bh < B * H; ++bh)
        for (int64_t a = 0; a < Cq; ++a)
          for (int64_t j = 0; j < Ck; ++j) {
            const RandomProbe::PairError e = random.pair_error(bh, a, j, scale);
            const size_t i = static_cast<size_t>((bh * Cq + a) * Ck + j);
            const double area = static_cast<double>(random.q_sizes[static_cast<size_t>(bh * Cq + a)]) *
                                random.k_sizes[static_cast<size_t>(bh * Ck + j)];
            const double error = std::exp(want[i] + gamma * std::log(std::max(area, kEps)));
            EXPECT_NEAR(got[i], want[i], 4 * e.logit_error * e.magnitude / error + 1e-5)
                << dtype_name(dtype) << " gamma " << gamma << " bh " << bh << " pair " << a << "," << j;
          }
    }
  }
}

}  // namespace
}  // namespace sapattn
