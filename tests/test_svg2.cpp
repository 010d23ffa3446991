// The whole SVG2 layer call: equal to dense attention at top_p = 1, a subset of dense keys
// otherwise, the joint-text rule, warm starts and per-branch state, layouts, and bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "sapattn/svg2.hpp"
#include "test_support.hpp"

namespace sapattn {
namespace {

using testing_support::expect_error_message;
using testing_support::random_tensor;

// Clustered tokens, so that k-means and selection have structure to find (as in a video DiT).
Tensor clustered_tensor(DType dtype, int64_t B, int64_t H, int64_t S, int64_t D, int centers, uint32_t seed) {
  return testing_support::clustered_tensor(dtype, B, H, S, D, centers, seed, 2.0f, 0.3f);
}

struct Qkv {
  Tensor q, k, v;
};

// q and k [B,H,S,D] scattered around `centers` centres, v random; seeds seed, seed + 1, seed + 2.
Qkv clustered_qkv(DType dtype, int64_t B, int64_t H, int64_t S, int64_t D, int centers, uint32_t seed) {
  return {clustered_tensor(dtype, B, H, S, D, centers, seed), clustered_tensor(dtype, B, H, S, D, centers, seed + 1),
          random_tensor(dtype, {B, H, S, D}, seed + 2)};
}

// q, k and v [B,H,S,D] random; seeds seed, seed + 1, seed + 2.
Qkv random_qkv(DType dtype, int64_t B, int64_t H, int64_t S, int64_t D, uint32_t seed) {
  return {random_tensor(dtype, {B, H, S, D}, seed), random_tensor(dtype, {B, H, S, D}, seed + 1),
          random_tensor(dtype, {B, H, S, D}, seed + 2)};
}

double element(const Tensor& t, int64_t i) {
  return t.dtype() == DType::I32 ? t.data_as<int32_t>()[i] : static_cast<double>(load_as_f32(t.data(), t.dtype(), i));
}

double max_abs_diff(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.numel(), b.numel());
  double m = 0.0;
  for (int64_t i = 0; i < a.numel(); ++i) m = std::max(m, std::fabs(element(a, i) - element(b, i)));
  return m;
}

struct Svg2Run {
  Tensor out, lse, density, q_sizes, k_sizes;
};

Svg2Run run_svg2(const Tensor& q, const Tensor& k, const Tensor& v, const Config& config, BranchState& state,
                 int threads = 0) {
  const auto& s = q.shape();
  Svg2Run r{Tensor(DType::F32, s), Tensor(DType::F32, {s[0], s[1], s[2]}), Tensor(DType::F32, {s[0], s[1]}),
            Tensor(DType::I32, {s[0], s[1], config.q_clusters}), Tensor(DType::I32, {s[0], s[1], config.k_clusters})};
  svg2_attention(q.view(), k.view(), v.view(), config, state,
                 {r.out.view(), r.lse.view(), r.density.view(), r.q_sizes.view(), r.k_sizes.view()},
                 Stream::cpu(threads));
  return r;
}

Config small_config() {
  Config c;
  c.q_clusters = 8;
  c.k_clusters = 16;
  c.kmeans_iters_init = 10;
  c.seed = 3;
  return c;
}

TEST(Svg2, TopPOneEqualsDenseAttention) {
  const int64_t B = 2, H = 3, S = 150, D = 64;
  const auto [q, k, v] = random_qkv(DType::BF16, B, H, S, D, 1);
  Config c = small_config();
  c.top_p = 1.0f;
  BranchState state;
  const Svg2Run r = run_svg2(q, k, v, c, state);
  Tensor o(DType::F32, {B, H, S, D}), lse(DType::F32, {B, H, S});
  dense_attention(q.view(), k.view(), v.view(), c.scale_for(D), o.view(), lse.view(), Stream::cpu());
  // Same fp32 arithmetic on the same keys, in another order: differences are a few fp32 ulps.
  EXPECT_LT(max_abs_diff(r.out, o), 1e-5);
  EXPECT_LT(max_abs_diff(r.lse, lse), 1e-5);
  for (int64_t i = 0; i < B * H; ++i) EXPECT_FLOAT_EQ(r.density.data_as<float>()[i], 1.0f);
}

TEST(Svg2, SparseRowsAttendToASubsetOfDenseKeys) {
  const int64_t B = 1, H = 2, S = 400, D = 64;
  const auto [q, k, v] = clustered_qkv(DType::F32, B, H, S, D, 6, 4);
  Config c = small_config();
  c.top_p = 0.5f;
  c.min_kc_ratio = 0.0f;
  BranchState state;
  const Svg2Run r = run_svg2(q, k, v, c, state);
  Tensor o(DType::F32, {B, H, S, D}), lse(DType::F32, {B, H, S});
  dense_attention(q.view(), k.view(), v.view(), c.scale_for(D), o.view(), lse.view(), Stream::cpu());
  // A subset of the keys has a smaller log-sum-exp: recall exp(lse_s - lse_d) lies in (0, 1].
  double recall = 0.0;
  for (int64_t i = 0; i < B * H * S; ++i) {
    const float ls = r.lse.data_as<float>()[i], ld = lse.data_as<float>()[i];
    EXPECT_LE(ls, ld + 1e-5f) << i;
    recall += std::exp(static_cast<double>(ls) - ld);
  }
  recall /= static_cast<double>(B * H * S);
  for (int64_t i = 0; i < B * H; ++i) {
    const float dens = r.density.data_as<float>()[i];
    EXPECT_GT(dens, 0.0f);
    EXPECT_LT(dens, 1.0f);
  }
  EXPECT_GT(recall, 0.5);  // top-p 0.5 of the estimated mass keeps at least about half the true mass
  // Cluster sizes partition the tokens.
  for (int64_t bh = 0; bh < B * H; ++bh) {
    int64_t nq = 0, nk = 0;
    for (int a = 0; a < c.q_clusters; ++a) nq += r.q_sizes.data_as<int32_t>()[bh * c.q_clusters + a];
    for (int a = 0; a < c.k_clusters; ++a) nk += r.k_sizes.data_as<int32_t>()[bh * c.k_clusters + a];
    EXPECT_EQ(nq, S);
    EXPECT_EQ(nk, S);
  }
}

TEST(Svg2, JointTextRuleAtTopPOneMatchesTheBlockMaskOnOriginalOrder) {
  // [video 120 | prompt 10 | padding 6]: at top_p = 1 every video pair is kept, so the result is the
  // text rule alone, which on the original token order is a 3x3 block layout.
  const int64_t B = 2, H = 2, Sv = 120, P = 10, T = 16, S = Sv + T, D = 64;
  const auto [q, k, v] = random_qkv(DType::F16, B, H, S, D, 7);
  Config c = small_config();
  c.top_p = 1.0f;
  c.text_tokens = T;
  c.prompt_length = P;
  BranchState state;
  const Svg2Run r = run_svg2(q, k, v, c, state);

  Tensor offs(DType::I32, {B, H, 4}), mask(DType::U8, {B, H, 3, 3});
  const uint8_t rule[9] = {1, 1, 0, /*prompt*/ 1, 1, 0, /*padding*/ 0, 0, 1};
  for (int64_t bh = 0; bh < B * H; ++bh) {
    int32_t* o = offs.data_as<int32_t>() + bh * 4;
    o[0] = 0, o[1] = Sv, o[2] = Sv + P, o[3] = S;
    std::copy(rule, rule + 9, mask.data_as<uint8_t>() + bh * 9);
  }
  Tensor out(DType::F32, {B, H, S, D}), lse(DType::F32, {B, H, S}), dens(DType::F32, {B, H});
  const BlockLayout layout{offs.view(), offs.view(), mask.view()};
  block_sparse_attention(q.view(), k.view(), v.view(), layout, c.scale_for(D), out.view(), lse.view(), Stream::cpu());
  EXPECT_LT(max_abs_diff(r.out, out), 1e-5);
  EXPECT_LT(max_abs_diff(r.lse, lse), 1e-5);
  block_density(layout, dens.view(), Stream::cpu());
  // Video and prompt attend among themselves; padding only to padding.
  const float expected = static_cast<float>((Sv + P) * (Sv + P) + (T - P) * (T - P)) / static_cast<float>(S * S);
  for (int64_t i = 0; i < B * H; ++i) {
    EXPECT_FLOAT_EQ(dens.data_as<float>()[i], expected);
    EXPECT_FLOAT_EQ(r.density.data_as<float>()[i], expected);
  }
}

TEST(Svg2, WarmStartsPerBranchAndResets) {
  const int64_t B = 1, H = 2, S = 200, D = 64;
  const auto [q, k, v] = clustered_qkv(DType::F32, B, H, S, D, 5, 10);
  Config c = small_config();
  LayerState layer;
  EXPECT_FALSE(layer.branch(0).initialized());
  run_svg2(q, k, v, c, layer.branch(0));
  EXPECT_TRUE(layer.branch(0).initialized());
  EXPECT_FALSE(layer.branch(1).initialized());  // the unconditional branch has its own state
  const Tensor after_first = layer.branch(0).k_centroids;
  const std::vector<float> first(after_first.data_as<float>(), after_first.data_as<float>() + after_first.numel());
  run_svg2(q, k, v, c, layer.branch(0));
  EXPECT_EQ(layer.branch(0).calls, 2);
  // A warm start from converged centroids on the same data keeps them (k-means is at a fixed point).
  const Tensor& again = layer.branch(0).k_centroids;
  for (int64_t i = 0; i < again.numel(); ++i) EXPECT_NEAR(again.data_as<float>()[i], first[i], 1e-5f);
  layer.reset();
  EXPECT_FALSE(layer.has_branch(0));
  EXPECT_FALSE(layer.branch(0).initialized());
}

TEST(Svg2, FirstCallSeedsAsTheConfigSaysThenRunsTheInitIterations) {
  // The first call's centroids are the config's seeding (Q from the seed, K from its keys' stream),
  // then kmeans_iters_init Lloyd iterations, over the video tokens only; the keys' then numbered
  // along order_clusters' chain.
  const int64_t B = 1, H = 2, S = 260, D = 64, text = 20;
  const auto [q, k, v] = clustered_qkv(DType::F32, B, H, S, D, 6, 60);
  std::vector<std::vector<float>> k_centroids;
  for (const KMeansSeeding seeding : {KMeansSeeding::GreedyPP, KMeansSeeding::Sample}) {
    Config c = small_config();
    c.kmeans_seeding = seeding;
    c.kmeans_sample_factor = 3;
    c.kmeans_iters_init = 4;
    c.text_tokens = text;
    c.prompt_length = 8;
    BranchState state;
    run_svg2(q, k, v, c, state);
    const TensorView qv = q.view().slice(2, 0, S - text), kv = k.view().slice(2, 0, S - text);
    const Tensor qc(DType::F32, {B, H, c.q_clusters, D}), kc(DType::F32, {B, H, c.k_clusters, D});
    if (seeding == KMeansSeeding::GreedyPP) {
      kmeans_seed_greedy(qv, qc.view(), c.seed, 3, Stream::cpu());
      kmeans_seed_greedy(kv, kc.view(), key_sample_seed(c.seed), 3, Stream::cpu());
    } else {
      kmeans_init(qv, qc.view(), c.seed, Stream::cpu());
      kmeans_init(kv, kc.view(), key_sample_seed(c.seed), Stream::cpu());
    }
    for (const Tensor* t : {&qc, &kc}) {
      const int64_t C = t->shape()[2];
      const Tensor labels(DType::I32, {B, H, S - text}), sizes(DType::I32, {B, H, C});
      kmeans(t == &qc ? qv : kv, t->view(), labels.view(), sizes.view(), c.kmeans_iters_init, Stream::cpu());
      if (t == &kc) order_clusters(kc.view(), sizes.view(), labels.view(), Stream::cpu());  // a fresh key clustering
    }
    EXPECT_EQ(max_abs_diff(qc, state.q_centroids), 0.0);
    EXPECT_EQ(max_abs_diff(kc, state.k_centroids), 0.0);
    k_centroids.emplace_back(kc.data_as<float>(), kc.data_as<float>() + kc.numel());
  }
  EXPECT_NE(k_centroids[0], k_centroids[1]) << "the two seedings gave the same key centroids";
}

// The centroids a first call with kmeans_candidates m leaves, then those of a warm call after it:
// the seeding, 2 full Lloyd iterations, the rest against m candidates (keys then in chain order);
// a warm call runs 1 full iteration, then candidates.
TEST(Svg2, CandidateIterationsFollowTheFullOnes) {
  const int64_t B = 1, H = 2, S = 240, D = 32;
  const auto [q, k, v] = clustered_qkv(DType::F32, B, H, S, D, 6, 70);
  Config c = small_config();
  c.kmeans_iters_init = 5;
  c.kmeans_iters_step = 3;
  c.kmeans_candidates = 3;
  BranchState state;
  run_svg2(q, k, v, c, state);
  const Stream cpu = Stream::cpu();
  const Tensor qc(DType::F32, {B, H, c.q_clusters, D}), kc(DType::F32, {B, H, c.k_clusters, D});
  kmeans_seed_greedy(q.view(), qc.view(), c.seed, c.kmeans_sample_factor, cpu);
  kmeans_seed_greedy(k.view(), kc.view(), key_sample_seed(c.seed), c.kmeans_sample_factor, cpu);
  const auto lloyd = [&](const Tensor& x, const Tensor& cent, int iters, int full, bool order) {
    const int64_t C = cent.shape()[2];
    const Tensor labels(DType::I32, {B, H, S}), sizes(DType::I32, {B, H, C});
    kmeans(x.view(), cent.view(), labels.view(), sizes.view(), full, cpu);
    for (int it = full; it < iters; ++it) {
      kmeans_assign_candidates(x.view(), cent.view(), labels.view(), labels.view(), c.kmeans_candidates, cpu);
      kmeans_update(x.view(), labels.view(), cent.view(), sizes.view(), cpu);
    }
    if (order) order_clusters(cent.view(), sizes.view(), labels.view(), cpu);
  };
  lloyd(q, qc, c.kmeans_iters_init, 2, false);
  lloyd(k, kc, c.kmeans_iters_init, 2, true);
  EXPECT_EQ(max_abs_diff(qc, state.q_centroids), 0.0);
  EXPECT_EQ(max_abs_diff(kc, state.k_centroids), 0.0);
  run_svg2(q, k, v, c, state);  // a warm call
  lloyd(q, qc, c.kmeans_iters_step, 1, false);
  lloyd(k, kc, c.kmeans_iters_step, 1, false);
  EXPECT_EQ(max_abs_diff(qc, state.q_centroids), 0.0);
  EXPECT_EQ(max_abs_diff(kc, state.k_centroids), 0.0);
}

TEST(Svg2, CandidatesCoveringEveryClusterChangeNothing) {
  const int64_t B = 1, H = 2, S = 240, D = 32;
  const auto [q, k, v] = clustered_qkv(DType::F32, B, H, S, D, 6, 80);
  Config c = small_config();
  BranchState plain_state, covered_state;
  const Svg2Run plain = run_svg2(q, k, v, c, plain_state);
  c.kmeans_candidates = c.k_clusters;  // >= every cluster count of the call
  const Svg2Run covered = run_svg2(q, k, v, c, covered_state);
  EXPECT_EQ(max_abs_diff(plain.out, covered.out), 0.0);
  EXPECT_EQ(max_abs_diff(plain.lse, covered.lse), 0.0);
  EXPECT_EQ(max_abs_diff(plain_state.k_centroids, covered_state.k_centroids), 0.0);
}

TEST(Svg2, ChangedShapeNeedsAReset) {
  const Tensor q = random_tensor(DType::F32, {1, 2, 64, 64}, 13);
  Config c = small_config();
  BranchState state;
  run_svg2(q, q, q, c, state);
  const Tensor q3 = random_tensor(DType::F32, {1, 3, 64, 64}, 14);
  EXPECT_THROW(run_svg2(q3, q3, q3, c, state), InvalidArgumentError);
  c.q_clusters = 4;
  EXPECT_THROW(run_svg2(q, q, q, c, state), InvalidArgumentError);
}

TEST(Svg2, CallerOwnedCentroidsGiveTheBranchStateResults) {
  const int64_t B = 1, H = 2, S = 300, D = 64;
  const auto [q, k, v] = clustered_qkv(DType::F32, B, H, S, D, 6, 40);
  Config c = small_config();
  c.top_p = 0.7f;
  BranchState state;
  const Svg2Run first = run_svg2(q, k, v, c, state), second = run_svg2(q, k, v, c, state);

  // The same two calls with the centroids in the caller's tensors: initialise, then warm-start.
  const Tensor qc(DType::F32, {B, H, c.q_clusters, D}), kc(DType::F32, {B, H, c.k_clusters, D});
  const CentroidViews centroids{qc.view(), kc.view()};
  const Buffer ws = Buffer::allocate(svg2_workspace_bytes(AttentionShape::of(q.view()), c, q.dtype(), Device::cpu()));
  for (const auto& [init, expected] : {std::pair{true, &first}, {false, &second}}) {
    const Tensor out(DType::F32, {B, H, S, D});
    svg2_attention(q.view(), k.view(), v.view(), c, centroids, init, {out.view()}, Workspace{ws.data(), ws.bytes()},
                   Stream::cpu());
    EXPECT_EQ(max_abs_diff(out, expected->out), 0.0);
  }
  EXPECT_EQ(max_abs_diff(qc, state.q_centroids), 0.0);
  EXPECT_EQ(max_abs_diff(kc, state.k_centroids), 0.0);

  // Centroids of the wrong shape or dtype are rejected before anything is written.
  const Tensor out(DType::F32, {B, H, S, D});
  const Tensor short_q(DType::F32, {B, H, c.q_clusters - 1, D}), half_k(DType::F16, {B, H, c.k_clusters, D});
  const Workspace w{ws.data(), ws.bytes()};
  EXPECT_THROW(svg2_attention(q.view(), k.view(), v.view(), c, {short_q.view(), kc.view()}, false, {out.view()}, w,
                              Stream::cpu()),
               ShapeError);
  EXPECT_THROW(svg2_attention(q.view(), k.view(), v.view(), c, {qc.view(), half_k.view()}, false, {out.view()}, w,
                              Stream::cpu()),
               DTypeError);
  EXPECT_EQ(max_abs_diff(qc, state.q_centroids), 0.0);
}

TEST(Svg2, KeyShardsCombineByLseIntoTheWholeCall) {
  const int64_t B = 1, H = 2, S = 300, D = 64;
  const auto [q, k, v] = clustered_qkv(DType::F32, B, H, S, D, 6, 50);
  Config c = small_config();
  c.top_p = 0.8f;
  c.text_tokens = 20;
  c.prompt_length = 12;
  BranchState whole_state;
  const Svg2Run whole = run_svg2(q, k, v, c, whole_state);
  const int shards = 3;
  std::vector<Svg2Run> parts;
  for (int i = 0; i < shards; ++i) {
    Config ci = c;
    ci.key_shard_index = i;
    ci.key_shard_count = shards;
    BranchState state;  // the same seed: the same clusters and selection as the whole call
    parts.push_back(run_svg2(q, k, v, ci, state));
  }
  double max_out = 0.0, max_lse = 0.0;
  for (int64_t row = 0; row < B * H * S; ++row) {
    double m = -INFINITY;
    for (const auto& p : parts) m = std::max(m, static_cast<double>(p.lse.data_as<float>()[row]));
    double sum = 0.0;
    for (const auto& p : parts) sum += std::exp(p.lse.data_as<float>()[row] - m);
    const double lse = m + std::log(sum);
    max_lse = std::max(max_lse, std::fabs(lse - whole.lse.data_as<float>()[row]));
    for (int64_t d = 0; d < D; ++d) {
      double o = 0.0;
      for (const auto& p : parts) {
        const double w = std::exp(p.lse.data_as<float>()[row] - lse);
        if (w > 0.0) o += w * p.out.data_as<float>()[row * D + d];
      }
      max_out = std::max(max_out, std::fabs(o - whole.out.data_as<float>()[row * D + d]));
    }
  }
  EXPECT_LT(max_out, 1e-5);
  EXPECT_LT(max_lse, 1e-5);
  for (int64_t bh = 0; bh < B * H; ++bh) {
    double density = 0.0;
    for (const auto& p : parts) density += p.density.data_as<float>()[bh];
    EXPECT_NEAR(density, whole.density.data_as<float>()[bh], 1e-6);
    for (const auto& p : parts) EXPECT_LT(p.density.data_as<float>()[bh], whole.density.data_as<float>()[bh]);
  }
  Config bad = c;
  bad.key_shard_index = 3;
  bad.key_shard_count = 3;
  EXPECT_THROW(bad.validate(), InvalidArgumentError);
  Tensor mask(DType::U8, {1, 1, 2, 2});
  EXPECT_THROW(shard_key_clusters(mask.view(), 0, 0, Stream::cpu()), InvalidArgumentError);
}

TEST(Svg2, DeterministicForASeedAndThreadCount) {
  const auto [q, k, v] = clustered_qkv(DType::BF16, 1, 2, 300, 64, 7, 15);
  Config c = small_config();
  c.top_p = 0.7f;
  BranchState s1, s2;
  const Svg2Run a = run_svg2(q, k, v, c, s1, 1), b = run_svg2(q, k, v, c, s2, 2);
  EXPECT_EQ(max_abs_diff(a.out, b.out), 0.0);
  EXPECT_EQ(max_abs_diff(a.lse, b.lse), 0.0);
  EXPECT_EQ(max_abs_diff(a.q_sizes, b.q_sizes), 0.0);
  // On structureless data Lloyd's local optimum depends on the initial sample: another seed
  // gives another partition.
  const Tensor noise = random_tensor(DType::BF16, {1, 2, 300, 64}, 27);
  BranchState s4, s5;
  const Svg2Run x = run_svg2(noise, noise, v, c, s4, 2);
  c.seed = 99;
  const Svg2Run y = run_svg2(noise, noise, v, c, s5, 2);
  EXPECT_GT(max_abs_diff(x.q_sizes, y.q_sizes) + max_abs_diff(x.k_sizes, y.k_sizes), 0.0);
}

TEST(Svg2, BshdLayoutGivesTheSameResultAsBhsd) {
  const int64_t B = 2, H = 3, S = 97, D = 64;
  const auto [q, k, v] = random_qkv(DType::BF16, B, H, S, D, 18);
  // The same values laid out [B,S,H,D].
  auto to_bshd = [&](const Tensor& t) {
    Tensor r(DType::BF16, {B, S, H, D});
    const TensorView view = TensorView::bshd(r.data(), DType::BF16, B, H, S, D);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t s = 0; s < S; ++s)
          for (int64_t d = 0; d < D; ++d)
            static_cast<uint16_t*>(r.data())[view.offset({b, h, s, d})] =
                t.data_as<uint16_t>()[((b * H + h) * S + s) * D + d];
    return r;
  };
  const Tensor qs = to_bshd(q), ks = to_bshd(k), vs = to_bshd(v);
  Config c = small_config();
  c.top_p = 0.8f;
  BranchState s1, s2;
  const Svg2Run a = run_svg2(q, k, v, c, s1);
  Tensor out_bshd(DType::BF16, {B, S, H, D});
  svg2_attention(TensorView::bshd(qs.data(), DType::BF16, B, H, S, D),
                 TensorView::bshd(ks.data(), DType::BF16, B, H, S, D),
                 TensorView::bshd(vs.data(), DType::BF16, B, H, S, D), c, s2,
                 {TensorView::bshd(out_bshd.data(), DType::BF16, B, H, S, D)}, Stream::cpu());
  const TensorView ov = TensorView::bshd(out_bshd.data(), DType::BF16, B, H, S, D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t s = 0; s < S; ++s)
        for (int64_t d = 0; d < D; ++d) {
          const float want = a.out.data_as<float>()[((b * H + h) * S + s) * D + d];
          const float got = bf16_to_f32(static_cast<uint16_t*>(ov.data)[ov.offset({b, h, s, d})]);
          EXPECT_EQ(got, bf16_to_f32(f32_to_bf16(want)));  // the bf16 rounding of the same fp32 result
        }
}

TEST(Svg2, RejectsBadInput) {
  const Tensor q = random_tensor(DType::F32, {1, 2, 64, 64}, 21);
  Tensor out(DType::F32, {1, 2, 64, 64});
  Config c = small_config();
  BranchState state;
  const Stream cpu = Stream::cpu();
  // NaN and Inf.
  Tensor bad = random_tensor(DType::F32, {1, 2, 64, 64}, 22);
  bad.data_as<float>()[1000] = std::nanf("");
  EXPECT_THROW(svg2_attention(bad.view(), q.view(), q.view(), c, state, {out.view()}, cpu), NonFiniteError);
  bad.data_as<float>()[1000] = INFINITY;
  EXPECT_THROW(svg2_attention(q.view(), q.view(), bad.view(), c, state, {out.view()}, cpu), NonFiniteError);
  EXPECT_FALSE(state.initialized());
  {
    // The check can be turned off (hot paths, graph capture): then the Inf flows into the output.
    Config unchecked = small_config();
    unchecked.check_finite = false;
    BranchState scratch_state;
    EXPECT_NO_THROW(svg2_attention(q.view(), q.view(), bad.view(), unchecked, scratch_state, {out.view()}, cpu));
    bool any_non_finite = false;
    for (int64_t i = 0; i < out.numel(); ++i) any_non_finite |= !std::isfinite(out.data_as<float>()[i]);
    EXPECT_TRUE(any_non_finite);
  }
  // Shapes and dtypes.
  const Tensor short_k = random_tensor(DType::F32, {1, 2, 63, 64}, 23);
  EXPECT_THROW(svg2_attention(q.view(), short_k.view(), short_k.view(), c, state, {out.view()}, cpu), ShapeError);
  const Tensor half = random_tensor(DType::F16, {1, 2, 64, 64}, 24);
  EXPECT_THROW(svg2_attention(q.view(), half.view(), q.view(), c, state, {out.view()}, cpu), DTypeError);
  Tensor ints(DType::I32, {1, 2, 64, 64});
  EXPECT_THROW(svg2_attention(ints.view(), ints.view(), ints.view(), c, state, {out.view()}, cpu), DTypeError);
  // Config.
  c.top_p = 0.0f;
  EXPECT_THROW(svg2_attention(q.view(), q.view(), q.view(), c, state, {out.view()}, cpu), InvalidArgumentError);
  c = small_config();
  c.text_tokens = 64;
  EXPECT_THROW(svg2_attention(q.view(), q.view(), q.view(), c, state, {out.view()}, cpu), InvalidArgumentError);
  // Workspace.
  c = small_config();
  std::vector<char> small(16);
  EXPECT_THROW(svg2_attention(q.view(), q.view(), q.view(), c, state, {out.view()}, Workspace{small.data(), 16}, cpu),
               WorkspaceError);
  // Device.
  TensorView on_gpu = q.view();
  on_gpu.device = Device::cuda(0);
  EXPECT_THROW(svg2_attention(on_gpu, on_gpu, on_gpu, c, state, {out.view()}, cpu), UnsupportedError);
  EXPECT_FALSE(state.initialized());
}

TEST(Svg2, MoreClustersThanVideoTokensIsAnError) {
  // 20 tokens, 4 of them text: 16 video tokens hold at most 16 clusters of each kind. More would be
  // empty by construction (10,000 query clusters on 512 tokens once ran 5.8 s, silently).
  const Tensor q = random_tensor(DType::F32, {1, 1, 20, 64}, 25);
  Tensor out(DType::F32, {1, 1, 20, 64});
  Config c = small_config();
  c.text_tokens = 4;
  c.q_clusters = 17;
  BranchState state;
  const auto call = [&] { svg2_attention(q.view(), q.view(), q.view(), c, state, {out.view()}, Stream::cpu()); };
  expect_error_message<InvalidArgumentError>(call, "q_clusters (17) exceeds the 16 video tokens");
  c.q_clusters = 16;
  c.k_clusters = 17;
  expect_error_message<InvalidArgumentError>(call, "k_clusters (17) exceeds the 16 video tokens");
  EXPECT_FALSE(state.initialized());
  c.k_clusters = 16;  // one cluster per video token is the most there can be
  EXPECT_NO_THROW(call());
}

TEST(Svg2, ShapeErrorsSpeakTheCallersLayout) {
  // The case that was reported: q [1,256,2,64] and k [1,100,2,64] held as [B,S,H,D], as PyTorch passes them.
  std::vector<float> q(1 * 256 * 2 * 64, 0.5f), k(1 * 100 * 2 * 64, 0.5f), out(q.size());
  const auto bshd = [](std::vector<float>& m, int64_t S) {
    return TensorView::bshd(m.data(), DType::F32, 1, 2, S, 64);
  };
  const auto bhsd = [](std::vector<float>& m, int64_t S) {
    return TensorView::bhsd(m.data(), DType::F32, 1, 2, S, 64);
  };
  const Config c = small_config();
  BranchState state;
  const Stream cpu = Stream::cpu();
  expect_error_message<ShapeError>(
      [&] { svg2_attention(bshd(q, 256), bshd(k, 100), bshd(k, 100), c, state, {bshd(out, 256)}, cpu); },
      "k dim 1 (S of [B,S,H,D]) must be 256 as in q, got [1,100,2,64] f32 cpu");
  // The same memory seen as [B,H,S,D] is described in those terms.
  expect_error_message<ShapeError>(
      [&] { svg2_attention(bhsd(q, 256), bhsd(k, 100), bhsd(k, 100), c, state, {bhsd(out, 256)}, cpu); },
      "k dim 2 (S of [B,H,S,D]) must be 256 as in q, got [1,2,100,64] f32 cpu");
  // An empty sequence is reported as empty, not as a text-token or cluster-count problem.
  std::vector<float> none;
  expect_error_message<ShapeError>(
      [&] { svg2_attention(bshd(none, 0), bshd(none, 0), bshd(none, 0), c, state, {bshd(none, 0)}, cpu); },
      "q is empty ([1,0,2,64] f32 cpu as [B,S,H,D]): attention needs B, S, H and D >= 1");
  EXPECT_FALSE(state.initialized());
  // Sizing the workspace from the call's own arguments checks them the same way first.
  expect_error_message<ShapeError>(
      [&] { svg2_workspace_bytes(bshd(none, 0), bshd(none, 0), bshd(none, 0), c, {bshd(none, 0)}, cpu); },
      "q is empty ([1,0,2,64] f32 cpu as [B,S,H,D])");
  EXPECT_EQ(svg2_workspace_bytes(bshd(q, 256), bshd(q, 256), bshd(q, 256), c, {bshd(out, 256)}, cpu),
            svg2_workspace_bytes(AttentionShape{1, 2, 256, 64}, c, DType::F32, Device::cpu()));
  const AttentionShape empty = AttentionShape::of(bshd(none, 0));
  expect_error_message<ShapeError>([&] { svg2_workspace_bytes(empty, c, DType::F32, Device::cpu()); },
                                   "the sequence is empty (S = 0, D = 64)");
}

TEST(Svg2, NanRowsComeBackAsNanWithoutTheFiniteCheck) {
  // As in dense attention: a NaN query makes its own row NaN (O and LSE) and no other; a NaN key
  // reaches every row. Before, the NaN query's cluster kept no key cluster and its row read 0.
  const int64_t S = 256, D = 64;
  const Tensor k = clustered_tensor(DType::F32, 1, 2, S, D, 4, 40), v = random_tensor(DType::F32, {1, 2, S, D}, 41);
  Tensor q = clustered_tensor(DType::F32, 1, 2, S, D, 4, 42);
  const int64_t nan_row = 37;  // head 1
  q.data_as<float>()[((1 * S) + nan_row) * D + 5] = std::nanf("");
  Config c = small_config();
  c.check_finite = false;
  c.top_p = 0.5f;
  BranchState state;
  const Svg2Run r = run_svg2(q, k, v, c, state);
  for (int64_t s = 0; s < S; ++s) {
    const bool want_nan = s == nan_row;
    EXPECT_EQ(std::isnan(r.lse.data_as<float>()[S + s]), want_nan) << "row " << s;
    for (int64_t d = 0; d < D; ++d) ASSERT_EQ(std::isnan(r.out.data_as<float>()[(S + s) * D + d]), want_nan) << s;
    EXPECT_TRUE(std::isfinite(r.lse.data_as<float>()[s])) << "head 0, row " << s;
  }
  Tensor bad_k = clustered_tensor(DType::F32, 1, 2, S, D, 4, 40);
  bad_k.data_as<float>()[3 * D] = std::nanf("");  // head 0, key 3
  BranchState fresh;
  const Svg2Run rk = run_svg2(clustered_tensor(DType::F32, 1, 2, S, D, 4, 42), bad_k, v, c, fresh);
  for (int64_t s = 0; s < S; ++s) {
    EXPECT_TRUE(std::isnan(rk.lse.data_as<float>()[s])) << "head 0, row " << s;
    EXPECT_TRUE(std::isfinite(rk.lse.data_as<float>()[S + s])) << "head 1, row " << s;
  }
}

}  // namespace
}  // namespace sapattn
