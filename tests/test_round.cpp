// round_query_clusters (include/sapattn/ops.hpp): closed-form cases of the role choice, the cap, the
// slack and the matching's tie rules on small hand-built heads, then the invariants and the
// determinism on random heads, then the argument errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "core/round_arithmetic.hpp"
#include "reference.hpp"
#include "sapattn/ops.hpp"
#include "sapattn/svg2.hpp"
#include "test_support.hpp"

namespace {

using namespace sapattn;
using testing_support::kStream;

// One problem of B x H heads with D-dimensional points, Cq query and Ck key clusters.
struct Problem {
  int64_t B, H, N, D, Cq, Ck;
  Tensor q, qc, kc, ks, mask, labels, sizes;
  Problem(int64_t B_, int64_t H_, int64_t N_, int64_t D_, int64_t Cq_, int64_t Ck_)
      : B(B_), H(H_), N(N_), D(D_), Cq(Cq_), Ck(Ck_),
        q(DType::F32, {B, H, N, D}), qc(DType::F32, {B, H, Cq, D}), kc(DType::F32, {B, H, Ck, D}),
        ks(DType::I32, {B, H, Ck}), mask(DType::U8, {B, H, Cq, Ck}), labels(DType::I32, {B, H, N}),
        sizes(DType::I32, {B, H, Cq}) {
    std::fill_n(q.data_as<float>(), q.numel(), 0.0f);
    std::fill_n(qc.data_as<float>(), qc.numel(), 0.0f);
    std::fill_n(kc.data_as<float>(), kc.numel(), 0.0f);
    std::fill_n(ks.data_as<int32_t>(), ks.numel(), 1);
    std::fill_n(mask.data_as<uint8_t>(), mask.numel(), uint8_t{1});
    std::fill_n(labels.data_as<int32_t>(), labels.numel(), 0);
    std::fill_n(sizes.data_as<int32_t>(), sizes.numel(), -1);
  }
  float* point(int64_t i, int64_t bh = 0) { return q.data_as<float>() + (bh * N + i) * D; }
  float* qcent(int64_t c, int64_t bh = 0) { return qc.data_as<float>() + (bh * Cq + c) * D; }
  float* kcent(int64_t c, int64_t bh = 0) { return kc.data_as<float>() + (bh * Ck + c) * D; }
  uint8_t& kept(int64_t a, int64_t j, int64_t bh = 0) { return mask.data_as<uint8_t>()[(bh * Cq + a) * Ck + j]; }
  int32_t* lab(int64_t bh = 0) { return labels.data_as<int32_t>() + bh * N; }
  int32_t* sz(int64_t bh = 0) { return sizes.data_as<int32_t>() + bh * Cq; }
  // Labels 0..: `counts[c]` consecutive points each.
  void label_runs(const std::vector<int64_t>& counts, int64_t bh = 0) {
    int64_t i = 0;
    for (size_t c = 0; c < counts.size(); ++c)
      for (int64_t n = 0; n < counts[c]; ++n) lab(bh)[i++] = static_cast<int32_t>(c);
    ASSERT_EQ(i, N);
  }
  std::vector<int32_t> label_vec(int64_t bh = 0) { return {lab(bh), lab(bh) + N}; }
  std::vector<int32_t> size_vec(int64_t bh = 0) { return {sz(bh), sz(bh) + Cq}; }
  void run(const RoundQueryOptions& o, const Stream& s = kStream, float scale = 1.0f) {
    round_query_clusters(q.view(), qc.view(), kc.view(), ks.view(), mask.view(), scale, o, labels.view(),
                         sizes.view(), s);
  }
};

RoundQueryOptions options(int slack, float max_cost, int prefilter = 4, int rounds = 8) {
  RoundQueryOptions o;
  o.slack = slack;
  o.max_cost = max_cost;
  o.prefilter = prefilter;
  o.rounds = rounds;
  return o;
}

constexpr float kUncapped = std::numeric_limits<float>::infinity();

TEST(RoundQueryClusters, MultiplesOf64MoveNothing) {
  Problem p(1, 1, 64 + 128, 2, 3, 2);
  p.label_runs({64, 0, 128});
  for (int64_t i = 0; i < p.N; ++i) p.point(i)[0] = static_cast<float>(i % 7);
  const std::vector<int32_t> before = p.label_vec();
  for (int slack : {0, 16, 63}) {
    p.run(options(slack, kUncapped));
    EXPECT_EQ(p.label_vec(), before);
    EXPECT_EQ(p.size_vec(), (std::vector<int32_t>{64, 0, 128}));
  }
}

// Cluster 0 has 70 points (tail 6, the donor), cluster 1 44 (tail 40 < 48, the receiver: it needs
// 4 and takes up to 20). Every mask row keeps every key, so every move costs exactly 0 and the
// candidates go in the prefilter's order: the 6 points of cluster 0 nearest to centroid 1 move.
TEST(RoundQueryClusters, OneDonorOneReceiver) {
  Problem p(1, 1, 70 + 44, 2, 2, 2);
  p.label_runs({70, 44});
  for (int64_t i = 0; i < 70; ++i) p.point(i)[0] = 0.01f * static_cast<float>(i);
  for (int64_t i = 70; i < p.N; ++i) p.point(i)[0] = 5.0f;
  p.qcent(0)[0] = 0.345f;
  p.qcent(1)[0] = 5.0f;
  p.kcent(0)[0] = 1.0f;
  p.kcent(1)[1] = 1.0f;
  p.run(options(16, 0.1f));
  EXPECT_EQ(p.size_vec(), (std::vector<int32_t>{64, 50}));
  const std::vector<int32_t> got = p.label_vec();
  for (int64_t i = 0; i < p.N; ++i) EXPECT_EQ(got[i], i < 64 ? 0 : 1) << "point " << i;
}

// Cluster 0 keeps key cluster 0 only, cluster 1 key cluster 1 only. Points near key 0 lose about
// all their mass by moving (cost ~1 > cap); points near key 1 gain (cost ~ -1).
TEST(RoundQueryClusters, CapBlocksExpensiveMovesAndDonorsMoveAllOrNothing) {
  Problem p(1, 1, 70 + 44, 2, 2, 2);
  p.label_runs({70, 44});
  p.kcent(0)[0] = 1.0f;
  p.kcent(1)[1] = 1.0f;
  p.kept(0, 1) = 0;
  p.kept(1, 0) = 0;
  for (int64_t i = 0; i < 70; ++i) p.point(i)[0] = 10.0f;
  for (int64_t i = 70; i < p.N; ++i) p.point(i)[1] = 10.0f;
  p.qcent(0)[0] = 10.0f;
  p.qcent(1)[1] = 10.0f;
  const std::vector<int32_t> before = p.label_vec();
  p.run(options(16, 0.1f, 0));
  EXPECT_EQ(p.label_vec(), before) << "every move costs ~1 > 0.1";
  EXPECT_EQ(p.size_vec(), (std::vector<int32_t>{70, 44}));

  // Five cheap points: the donor cannot give its whole tail of 6 within the cap, so none moves.
  for (int64_t i : {3, 11, 20, 41, 69}) p.point(i)[0] = 0.0f, p.point(i)[1] = 10.0f;
  p.run(options(16, 0.1f, 0));
  EXPECT_EQ(p.label_vec(), before) << "a donor short of its tail takes its points back";

  // A sixth: exactly those six move.
  p.point(50)[0] = 0.0f, p.point(50)[1] = 10.0f;
  p.run(options(16, 0.1f, 0));
  EXPECT_EQ(p.size_vec(), (std::vector<int32_t>{64, 50}));
  for (int64_t i = 0; i < 70; ++i) {
    const bool cheap = i == 3 || i == 11 || i == 20 || i == 41 || i == 50 || i == 69;
    EXPECT_EQ(p.lab()[i], cheap ? 1 : 0) << "point " << i;
  }

  // Uncapped, the expensive points move too (the original head: nothing cheap).
  Problem u(1, 1, 70 + 44, 2, 2, 2);
  u.label_runs({70, 44});
  std::copy_n(p.kc.data_as<float>(), p.kc.numel(), u.kc.data_as<float>());
  std::copy_n(p.mask.data_as<uint8_t>(), p.mask.numel(), u.mask.data_as<uint8_t>());
  for (int64_t i = 0; i < 70; ++i) u.point(i)[0] = 10.0f;
  for (int64_t i = 70; i < u.N; ++i) u.point(i)[1] = 10.0f;
  u.run(options(16, kUncapped, 0));
  EXPECT_EQ(u.size_vec(), (std::vector<int32_t>{64, 50}));
}

// Tails 10, 40, 30 (all open at slack 16 and at 0). Slack 16: k = 1 (pad 16 against 64, 48, 48):
// cluster 0 gives 10; every move costs 0, so every point's first target is cluster 1 (lower
// index); in the need phase cluster 1 accepts its need of 8 and the last 2 go to cluster 2 in the
// next round. Slack 0: k = 1 again (pad 48 at k = 1 and k = 2, less supply at k = 1); cluster 1
// needs 24 and takes all 10.
TEST(RoundQueryClusters, SlackDecidesRolesAndNeeds) {
  for (const auto& [slack, expect] : {std::pair{16, std::vector<int32_t>{64, 112, 96}},
                                      std::pair{0, std::vector<int32_t>{64, 114, 94}}}) {
    Problem p(1, 1, 74 + 104 + 94, 2, 3, 2);
    p.label_runs({74, 104, 94});
    for (int64_t i = 0; i < p.N; ++i) p.point(i)[0] = static_cast<float>(p.lab()[i]);
    for (int64_t c = 0; c < 3; ++c) p.qcent(c)[0] = static_cast<float>(c);
    p.kcent(0)[0] = 1.0f;
    p.run(options(slack, 0.1f));
    EXPECT_EQ(p.size_vec(), expect) << "slack " << slack;
  }
  // Every tail already within the slack: nothing moves.
  Problem p(1, 1, 64 + 50 + 64 + 60, 2, 2, 2);
  p.label_runs({114, 124});
  p.run(options(16, kUncapped));
  EXPECT_EQ(p.size_vec(), (std::vector<int32_t>{114, 124}));
}

// An empty query cluster (t = 0: done, no capacity) and an empty key cluster (out of the softmax).
TEST(RoundQueryClusters, EmptyClusters) {
  Problem p(1, 1, 70 + 44, 2, 3, 3);
  p.label_runs({0, 70, 44});
  p.ks.data_as<int32_t>()[2] = 0;
  for (int64_t i = 0; i < p.N; ++i) p.point(i)[0] = static_cast<float>(p.lab()[i]);
  for (int64_t c = 0; c < 3; ++c) p.qcent(c)[0] = static_cast<float>(c);
  p.kcent(0)[0] = 1.0f;
  p.kcent(2)[0] = 100.0f;  // empty: would dominate the softmax if it counted
  p.kept(1, 2) = 0;        // differs only on the empty key cluster: the moves still cost 0
  p.run(options(16, 0.0f));
  EXPECT_EQ(p.size_vec(), (std::vector<int32_t>{0, 64, 50}));
  // No key cluster at all: every cost is 0.
  std::fill_n(p.ks.data_as<int32_t>(), 3, 0);
  p.label_runs({0, 70, 44});
  p.run(options(16, 0.0f));
  EXPECT_EQ(p.size_vec(), (std::vector<int32_t>{0, 64, 50}));
}

// Random heads: sizes are the labels' counts; a cluster either keeps its size, gives its whole
// tail (ending at a multiple of 64), or receives without crossing into a new 64-row block; no
// point leaves a receiving cluster; the result is the same for 1 and 2 threads and on a rerun.
TEST(RoundQueryClusters, InvariantsAndDeterminismOnRandomHeads) {
  const int64_t B = 2, H = 3, N = 1500, D = 16, Cq = 20, Ck = 12;
  Problem p(B, H, N, D, Cq, Ck);
  std::mt19937_64 rng(testing_support::case_seed(7));
  std::normal_distribution<float> normal;
  for (int64_t i = 0; i < p.q.numel(); ++i) p.q.data_as<float>()[i] = normal(rng);
  for (int64_t i = 0; i < p.qc.numel(); ++i) p.qc.data_as<float>()[i] = normal(rng);
  for (int64_t i = 0; i < p.kc.numel(); ++i) p.kc.data_as<float>()[i] = normal(rng);
  for (int64_t i = 0; i < p.ks.numel(); ++i) p.ks.data_as<int32_t>()[i] = static_cast<int32_t>(rng() % 200);
  for (int64_t i = 0; i < p.mask.numel(); ++i) p.mask.data_as<uint8_t>()[i] = rng() % 3 != 0;
  // Labels: the nearest centroid (a k-means assignment), so the moves are near boundaries.
  for (int64_t bh = 0; bh < B * H; ++bh)
    for (int64_t i = 0; i < N; ++i) {
      float best = std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < Cq; ++c) {
        float d = 0;
        for (int64_t k = 0; k < D; ++k) d += (p.point(i, bh)[k] - p.qcent(c, bh)[k]) * (p.point(i, bh)[k] - p.qcent(c, bh)[k]);
        if (d < best) best = d, p.lab(bh)[i] = static_cast<int32_t>(c);
      }
    }
  const Tensor before(DType::I32, {B, H, N});
  std::copy_n(p.labels.data_as<int32_t>(), p.labels.numel(), before.data_as<int32_t>());
  int64_t total_moved = 0;
  std::vector<int32_t> first_run;
  for (const auto& [threads, slack, cap] : {std::tuple{1, 16, 0.1f}, std::tuple{2, 16, 0.1f},
                                            std::tuple{2, 0, kUncapped}, std::tuple{1, 8, 0.3f}}) {
    std::copy_n(before.data_as<int32_t>(), before.numel(), p.labels.data_as<int32_t>());
    p.run(options(slack, cap), Stream::cpu(threads), 0.25f);
    if (threads == 1 && slack == 16) first_run.assign(p.labels.data_as<int32_t>(), p.labels.data_as<int32_t>() + B * H * N);
    if (threads == 2 && slack == 16) {
      EXPECT_TRUE(std::equal(first_run.begin(), first_run.end(), p.labels.data_as<int32_t>())) << "thread count";
    }
    for (int64_t bh = 0; bh < B * H; ++bh) {
      std::vector<int64_t> old(Cq, 0), now(Cq, 0);
      for (int64_t i = 0; i < N; ++i) ++old[before.data_as<int32_t>()[bh * N + i]], ++now[p.lab(bh)[i]];
      std::vector<bool> gave(Cq), took(Cq);
      for (int64_t c = 0; c < Cq; ++c) {
        EXPECT_EQ(p.sz(bh)[c], now[c]);
        const int64_t t = old[c] % 64;
        gave[c] = now[c] < old[c];
        took[c] = now[c] > old[c];
        if (gave[c]) {
          EXPECT_EQ(now[c], old[c] - t) << "a donor gives its whole tail";
          EXPECT_LT(t, 64 - slack) << "only an open cluster gives";
        }
        if (took[c]) {
          EXPECT_LE(now[c], old[c] + 64 - t) << "a receiver stays within its last block";
        }
      }
      for (int64_t i = 0; i < N; ++i) {
        const int32_t a = before.data_as<int32_t>()[bh * N + i], r = p.lab(bh)[i];
        if (a == r) continue;
        ++total_moved;
        EXPECT_TRUE(gave[a] && took[r]);
      }
    }
  }
  EXPECT_GT(total_moved, 0) << "the random heads should move something";
}

// The mass cost's exp (core/round_arithmetic.hpp, shared with the CUDA backend) against the C
// library's: within 2 ulp wherever the result is normal (measured: at most 1), the subnormal range
// within 2 units of its last place, and the edges.
TEST(RoundQueryClusters, SharedExpMatchesTheLibrary) {
  std::mt19937_64 rng(testing_support::case_seed(3));
  std::uniform_real_distribution<double> wide(-745.0, 0.0), narrow(-1.0, 1.0);
  double worst_ulp = 0.0;
  for (int i = 0; i < 200000; ++i) {
    const double x = i % 2 == 0 ? wide(rng) : narrow(rng);
    const double got = round_math::mass_exp(x), want = std::exp(x);
    if (want < std::numeric_limits<double>::min()) {
      EXPECT_LE(std::abs(got - want), 2 * std::numeric_limits<double>::denorm_min()) << x;
      continue;
    }
    const double ulp = std::nextafter(want, INFINITY) - want;
    worst_ulp = std::max(worst_ulp, std::abs(got - want) / ulp);
  }
  EXPECT_LE(worst_ulp, 2.0);
  EXPECT_EQ(round_math::mass_exp(0.0), 1.0);
  EXPECT_EQ(round_math::mass_exp(-0.0), 1.0);
  EXPECT_EQ(round_math::mass_exp(-INFINITY), 0.0);
  EXPECT_EQ(round_math::mass_exp(-800.0), 0.0);
  EXPECT_TRUE(std::isnan(round_math::mass_exp(std::nan(""))));
  EXPECT_EQ(round_math::mass_exp(710.0), INFINITY);
  std::printf("[round] shared exp: worst %.2f ulp over 200,000 arguments\n", worst_ulp);
}

TEST(RoundQueryClusters, ArgumentErrorsLeaveOutputsUntouched) {
  Problem p(1, 1, 70 + 44, 2, 2, 2);
  p.label_runs({70, 44});
  const std::vector<int32_t> labels = p.label_vec();
  auto untouched = [&] {
    EXPECT_EQ(p.label_vec(), labels);
    EXPECT_EQ(p.size_vec(), (std::vector<int32_t>{-1, -1}));
  };
  auto call = [&](const TensorView& q, const TensorView& mask, const TensorView& lab, const TensorView& sizes,
                  const RoundQueryOptions& o, float scale = 1.0f) {
    round_query_clusters(q, p.qc.view(), p.kc.view(), p.ks.view(), mask, scale, o, lab, sizes, kStream);
  };
  const RoundQueryOptions ok = options(16, 0.1f);
  EXPECT_THROW(call(p.q.view(), p.mask.view(), p.labels.view(), p.sizes.view(), options(64, 0.1f)), InvalidArgumentError);
  EXPECT_THROW(call(p.q.view(), p.mask.view(), p.labels.view(), p.sizes.view(), options(-1, 0.1f)), InvalidArgumentError);
  EXPECT_THROW(call(p.q.view(), p.mask.view(), p.labels.view(), p.sizes.view(), options(16, std::nanf(""))),
               InvalidArgumentError);
  EXPECT_THROW(call(p.q.view(), p.mask.view(), p.labels.view(), p.sizes.view(), options(16, 0.1f, -1)),
               InvalidArgumentError);
  EXPECT_THROW(call(p.q.view(), p.mask.view(), p.labels.view(), p.sizes.view(), options(16, 0.1f, 4, 0)),
               InvalidArgumentError);
  EXPECT_THROW(call(p.q.view(), p.mask.view(), p.labels.view(), p.sizes.view(), ok, 0.0f), InvalidArgumentError);
  const Tensor q_short(DType::F32, {1, 1, 100, 2}), q_i32(DType::I32, {1, 1, p.N, 2}), q_d3(DType::F32, {1, 1, p.N, 3});
  EXPECT_THROW(call(q_short.view(), p.mask.view(), p.labels.view(), p.sizes.view(), ok), ShapeError);
  EXPECT_THROW(call(q_d3.view(), p.mask.view(), p.labels.view(), p.sizes.view(), ok), ShapeError);
  EXPECT_THROW(call(q_i32.view(), p.mask.view(), p.labels.view(), p.sizes.view(), ok), DTypeError);
  const Tensor mask_f32(DType::F32, {1, 1, 2, 2}), mask_wide(DType::U8, {1, 1, 2, 3});
  EXPECT_THROW(call(p.q.view(), mask_f32.view(), p.labels.view(), p.sizes.view(), ok), DTypeError);
  EXPECT_THROW(call(p.q.view(), mask_wide.view(), p.labels.view(), p.sizes.view(), ok), ShapeError);
  const Tensor sizes_f32(DType::F32, {1, 1, 2}), sizes_3(DType::I32, {1, 1, 3});
  EXPECT_THROW(call(p.q.view(), p.mask.view(), p.labels.view(), sizes_f32.view(), ok), DTypeError);
  EXPECT_THROW(call(p.q.view(), p.mask.view(), p.labels.view(), sizes_3.view(), ok), ShapeError);
  untouched();
  p.lab()[5] = 2;  // out of [0, Cq)
  EXPECT_THROW(call(p.q.view(), p.mask.view(), p.labels.view(), p.sizes.view(), ok), InvalidArgumentError);
  EXPECT_EQ(p.size_vec(), (std::vector<int32_t>{-1, -1}));
  p.lab()[5] = 0;
  EXPECT_THROW(call(p.q.view(), p.mask.view(), ref::on_cuda(p.labels.view()), p.sizes.view(), ok), UnsupportedError);
  untouched();
}

// The Config switch: svg2_attention with round_q_clusters rounds the sizes it reports the way the op
// does (whole donor tails, receivers within their last block, fewer padding rows), and at top_p = 1
// (every key kept, every move free) its output is still dense attention.
TEST(RoundQueryClusters, Svg2ConfigSwitch) {
  const int64_t B = 1, H = 2, S = 1000, D = 32;
  const Tensor q = testing_support::clustered_tensor(DType::F32, B, H, S, D, 7, 11, 1.5f, 0.5f),
               k = testing_support::clustered_tensor(DType::F32, B, H, S, D, 7, 12, 1.5f, 0.5f),
               v = testing_support::clustered_tensor(DType::F32, B, H, S, D, 7, 13, 1.5f, 0.5f);
  Config c;
  c.q_clusters = 12;
  c.k_clusters = 20;
  c.kmeans_iters_init = 10;
  EXPECT_FALSE(c.round_q_clusters) << "off by default";
  auto run = [&](const Config& config, Tensor& out) {
    Tensor sizes(DType::I32, {B, H, config.q_clusters});
    BranchState state;
    Svg2Outputs o;
    o.out = out.view();
    o.q_cluster_sizes = sizes.view();
    svg2_attention(q.view(), k.view(), v.view(), config, state, o, kStream);
    return std::vector<int32_t>(sizes.data_as<int32_t>(), sizes.data_as<int32_t>() + sizes.numel());
  };
  auto padding = [](const std::vector<int32_t>& sizes) {
    int64_t pad = 0;
    for (int32_t n : sizes) pad += (n + 63) / 64 * 64 - n;
    return pad;
  };
  for (float top_p : {0.9f, 1.0f}) {
    c.top_p = top_p;
    Tensor out_off(DType::F32, {B, H, S, D}), out_on(DType::F32, {B, H, S, D});
    c.round_q_clusters = false;
    const std::vector<int32_t> off = run(c, out_off);
    c.round_q_clusters = true;
    const std::vector<int32_t> on = run(c, out_on);
    EXPECT_LE(padding(on), padding(off)) << "top_p " << top_p;
    if (top_p == 1.0f) {
      EXPECT_LT(padding(on), padding(off)) << "free moves must round something";
    }
    for (int64_t h = 0; h < H; ++h) {
      int64_t total = 0;
      for (int64_t a = 0; a < c.q_clusters; ++a) {
        const int64_t before = off[h * c.q_clusters + a], now = on[h * c.q_clusters + a], t = before % 64;
        total += now;
        if (now < before) {
          EXPECT_EQ(now, before - t);
        }
        if (now > before) {
          EXPECT_LE(now, before + 64 - t);
        }
      }
      EXPECT_EQ(total, S);
    }
    if (top_p == 1.0f) {
      const ref::Attention dense = ref::attention_f64(q.view(), k.view(), v.view(), c.scale_for(D), nullptr);
      const std::vector<double> got = ref::to_vector(out_on.view());
      for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], dense.out[i], 1e-4) << i;
    }
  }
}

}  // namespace
