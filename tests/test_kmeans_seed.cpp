// kmeans_seed_greedy (greedy k-means++ on kmeans_init's sample, include/sapattn/ops.hpp) on the CPU:
//   - against its documented rule, written again below in float64 from the contract's text, on
//     points of small integer values (their squared distances are exact in fp32 and float64, so the
//     two must pick the same points, ties included);
//   - closed-form cases: well-separated blobs of identical points get one seed each, duplicates
//     repeat the sample's last point, a sample factor of 1 reorders kmeans_init's sample, C >= N is
//     kmeans_init, C = 1 is its first point;
//   - properties of any input: seeds are points of the sample, distinct while the sample has distinct
//     points left, independent of the thread count, per problem id (sample_ids);
//   - the draws' formula as known values, and bad input (typed errors, outputs untouched);
//   - the CUDA cluster kernel's screen (src/cuda/kmeans/seed_screen.hpp, plain C++): its floor is never
//     above the CPU's fp32 distance when the norms and the dot product are off by the most its error
//     model allows, and it is close to the distance for ordinary points.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
#include <string>
#include <vector>

#include "core/kmeans_seeding.hpp"
#include "cpu/squared_distance.hpp"
#include "cuda/kmeans/seed_screen.hpp"
#include "reference.hpp"
#include "sapattn/ops.hpp"
#include "test_support.hpp"

namespace {

using namespace sapattn;
using namespace sapattn::testing_support;

// ---------------------------------------------------------------------------------------------
// The documented rule in float64
// ---------------------------------------------------------------------------------------------

__extension__ typedef unsigned __int128 U128;  // the target floor(Q r / 2^64), computed another way

struct GreedyReference {
  std::vector<double> centroids;  // [B,H,C,D]
  int64_t tie_steps = 0;          // steps where another trial's candidate had the best potential too
};

// kmeans_seed_greedy as ops.hpp words it, for points whose squared distances are exact in float64
// and fp32 (small integers): the sample is kmeans_init's first M points (ref::kmeans_init with M
// clusters lists them in key order), the fixed-point unit 2^E comes from the largest first distance.
GreedyReference greedy_reference(const TensorView& points, int64_t C, int factor, uint64_t seed) {
  const int64_t B = points.shape[0], H = points.shape[1], N = points.shape[2], D = points.shape[3];
  if (C >= N) return {ref::kmeans_init(points, C, seed), 0};
  const int64_t M = std::min<int64_t>(N, factor * C);
  const std::vector<double> sample = ref::kmeans_init(points, M, seed);  // [B,H,M,D]
  const int trials = 2 + static_cast<int>(std::floor(std::log(static_cast<double>(C))));
  int bits = 0;
  while ((int64_t{1} << bits) < M) ++bits;
  const double cap = std::ldexp(1.0, 63 - bits);
  GreedyReference out;
  out.centroids.resize(static_cast<size_t>(B * H * C * D));
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const double* x = sample.data() + bh * M * D;
    auto dist = [&](int64_t i, int64_t j) {
      double s = 0.0;
      for (int64_t d = 0; d < D; ++d) s += (x[i * D + d] - x[j * D + d]) * (x[i * D + d] - x[j * D + d]);
      return s;
    };
    std::vector<int64_t> chosen = {0};
    std::vector<double> d2(static_cast<size_t>(M));
    double largest = 0.0;
    for (int64_t i = 0; i < M; ++i) largest = std::max(largest, d2[i] = dist(i, 0));
    const int exponent = largest > 0.0 ? std::ilogb(largest) + 1 + bits - 63 : 0;
    auto fixed = [&](double d) { return static_cast<uint64_t>(std::min(std::floor(std::ldexp(d, -exponent)), cap)); };
    for (int64_t step = 1; step < C; ++step) {
      std::vector<uint64_t> running(static_cast<size_t>(M));
      uint64_t total = 0;
      for (int64_t i = 0; i < M; ++i) running[i] = total += fixed(d2[i]);
      const uint64_t h =
          ref::splitmix64(seed ^ 0x243f6a8885a308d3ull ^ ref::splitmix64((static_cast<uint64_t>(bh) << 32) + step));
      std::vector<uint64_t> potential(trials);
      std::vector<int64_t> candidate(trials);
      for (int t = 0; t < trials; ++t) {
        const uint64_t r = ref::splitmix64(h + static_cast<uint64_t>(t));
        const uint64_t target = static_cast<uint64_t>((static_cast<U128>(total) * r) >> 64);
        candidate[t] = M - 1;
        for (int64_t i = 0; i < M; ++i)
          if (running[i] > target) {
            candidate[t] = i;
            break;
          }
        potential[t] = 0;
        for (int64_t i = 0; i < M; ++i) potential[t] += fixed(std::min(d2[i], dist(i, candidate[t])));
      }
      const int best = static_cast<int>(std::min_element(potential.begin(), potential.end()) - potential.begin());
      for (int t = 0; t < trials; ++t)
        if (potential[t] == potential[best] && candidate[t] != candidate[best]) {
          ++out.tie_steps;
          break;
        }
      chosen.push_back(candidate[best]);
      for (int64_t i = 0; i < M; ++i) d2[i] = std::min(d2[i], dist(i, candidate[best]));
    }
    for (int64_t c = 0; c < C; ++c)
      std::copy(x + chosen[c] * D, x + (chosen[c] + 1) * D, out.centroids.begin() + (bh * C + c) * D);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------

struct Case {
  int64_t B, H, N, D, C;
  int factor;
  DType dtype;
  Layout layout;
  int lo, hi;  // the points' integer values
};

std::string describe(const Case& c) {
  return case_name("B" + std::to_string(c.B) + "H" + std::to_string(c.H), "N" + std::to_string(c.N),
                   "D" + std::to_string(c.D), "C" + std::to_string(c.C), "f" + std::to_string(c.factor),
                   dtype_name(c.dtype), ref::layout_name(c.layout));
}

HostTensor integer_points(const Case& c, ref::Rng& rng) {
  HostTensor p = ref::make_tensor(c.dtype, {c.B, c.H, c.N, c.D}, c.layout);
  ref::poison(p);
  ref::for_each_index(p.view,
                      [&](const auto& idx) { ref::set(p.view, idx, static_cast<double>(rng.integer(c.lo, c.hi))); });
  return p;
}

HostTensor poisoned_centroids(const Case& c) {
  HostTensor t = ref::make_tensor(DType::F32, {c.B, c.H, c.C, c.D});
  ref::poison(t);
  return t;
}

std::vector<double> row(const std::vector<double>& rows, int64_t index, int64_t D) {
  return {rows.begin() + index * D, rows.begin() + (index + 1) * D};
}

const std::vector<Case> kCases = {
    {2, 3, 300, 24, 16, 2, DType::F32, Layout::Contiguous, -4, 4},
    {1, 2, 257, 27, 20, 2, DType::BF16, Layout::Transposed, -4, 4},  // D not a multiple of 8
    {2, 2, 200, 16, 9, 3, DType::F16, Layout::TransposedPadded, -3, 3},
    {1, 2, 90, 2, 6, 4, DType::F32, Layout::Padded, 0, 3},        // 16 possible points: duplicates and ties
    {1, 1, 40, 8, 20, 2, DType::F32, Layout::Contiguous, -2, 2},  // M = N: the sample is every point
    {1, 2, 50, 8, 1, 2, DType::BF16, Layout::Contiguous, -4, 4},  // C = 1: kmeans_init's first point
    {1, 1, 30, 8, 30, 2, DType::F32, Layout::Contiguous, -4, 4},  // C = N: kmeans_init
    {1, 2, 20, 8, 25, 2, DType::F32, Layout::Transposed, -4, 4},  // C > N: kmeans_init
};

class KmeansSeedCase : public ::testing::TestWithParam<Case> {};

TEST_P(KmeansSeedCase, IsTheDocumentedRule) {
  const Case c = GetParam();
  ref::Rng rng(case_seed());
  const HostTensor points = integer_points(c, rng);
  for (uint64_t seed : {uint64_t{0}, uint64_t{1}, rng.next()}) {
    HostTensor centroids = poisoned_centroids(c);
    kmeans_seed_greedy(points.view, centroids.view, seed, c.factor, kStream);
    EXPECT_EQ(ref::to_vector(centroids.view), greedy_reference(points.view, c.C, c.factor, seed).centroids)
        << "seed " << seed;
  }
}

TEST_P(KmeansSeedCase, SeedsAreSamplePointsStartingWithKmeansInitsFirst) {
  const Case c = GetParam();
  ref::Rng rng(case_seed());
  const HostTensor points = integer_points(c, rng);
  const uint64_t seed = rng.next();
  HostTensor centroids = poisoned_centroids(c);
  kmeans_seed_greedy(points.view, centroids.view, seed, c.factor, kStream);
  const std::vector<double> got = ref::to_vector(centroids.view);
  const int64_t M = std::min<int64_t>(c.N, c.factor * c.C);
  const std::vector<double> sample = ref::kmeans_init(points.view, M, seed);  // the first M ranks, in order
  for (int64_t bh = 0; bh < c.B * c.H; ++bh) {
    std::set<std::vector<double>> in_sample;
    for (int64_t i = 0; i < M; ++i) in_sample.insert(row(sample, bh * M + i, c.D));
    EXPECT_EQ(row(got, bh * c.C, c.D), row(sample, bh * M, c.D)) << "centroid 0 of (b,h) " << bh;
    for (int64_t k = 0; k < c.C; ++k)
      EXPECT_TRUE(in_sample.count(row(got, bh * c.C + k, c.D))) << "centroid " << k << " of (b,h) " << bh;
  }
}

TEST_P(KmeansSeedCase, ThreadCountIndependent) {
  const Case c = GetParam();
  ref::Rng rng(case_seed());
  const HostTensor points = integer_points(c, rng);
  const uint64_t seed = rng.next();
  std::vector<std::vector<uint8_t>> runs;
  for (int threads : {1, 2, 3}) {
    HostTensor centroids = poisoned_centroids(c);
    kmeans_seed_greedy(points.view, centroids.view, seed, c.factor, Stream::cpu(threads));
    runs.push_back(centroids.bytes());
  }
  EXPECT_EQ(runs[0], runs[1]);
  EXPECT_EQ(runs[0], runs[2]);
}

INSTANTIATE_TEST_SUITE_P(Cases, KmeansSeedCase, ::testing::ValuesIn(kCases),
                         [](const auto& p) { return describe(p.param); });

// ---------------------------------------------------------------------------------------------
// Known answers
// ---------------------------------------------------------------------------------------------

TEST(KmeansSeed, DrawsAreTheDocumentedSplitmix) {
  // splitmix64(splitmix64(seed ^ 0x243f6a8885a308d3 ^ splitmix64(id * 2^32 + step)) + trial), as
  // tools/studies/kmeans_first_call.py computes them too (values from Python integers).
  EXPECT_EQ(seeding::draw(0, 0, 1, 0), 0x3ada39feb463f4d4ull);
  EXPECT_EQ(seeding::draw(7, 3, 5, 2), 0xedb6a4e9854fa1ceull);
  EXPECT_EQ(seeding::draw(~uint64_t{0}, 2147483647, 999, 7), 0x1762072169e055c5ull);
  // floor(total * r / 2^64), the high half of the 128-bit product.
  EXPECT_EQ(seeding::draw_target(0, ~uint64_t{0}), 0u);
  EXPECT_EQ(seeding::draw_target(1000, 0), 0u);
  EXPECT_EQ(seeding::draw_target(1000, ~uint64_t{0}), 999u);
  EXPECT_EQ(seeding::draw_target(uint64_t{1} << 63, uint64_t{1} << 63), uint64_t{1} << 62);
  EXPECT_EQ(seeding::draw_target(~uint64_t{0}, ~uint64_t{0}), ~uint64_t{0} - 1);
  ref::Rng rng(case_seed());
  for (int i = 0; i < 1000; ++i) {
    const uint64_t a = rng.next() >> rng.integer(0, 63), b = rng.next();
    EXPECT_EQ(seeding::draw_target(a, b), static_cast<uint64_t>((static_cast<U128>(a) * b) >> 64)) << a << " " << b;
  }
  // The fixed point: units of 2^E with every finite distance below 2^(63 - L), larger ones capped.
  EXPECT_EQ(seeding::sample_bits(1), 0);
  EXPECT_EQ(seeding::sample_bits(2000), 11);
  EXPECT_EQ(seeding::sample_bits(2048), 11);
  const int e = seeding::fixed_point_exponent(1000.0f, 11);  // ilogb(1000) = 9: E = 9 + 1 + 11 - 63
  EXPECT_EQ(e, -42);
  EXPECT_EQ(seeding::to_fixed(1000.0f, e, 11), uint64_t{1000} << 42);
  EXPECT_EQ(seeding::to_fixed(0.0f, e, 11), 0u);
  EXPECT_EQ(seeding::to_fixed(std::numeric_limits<float>::infinity(), e, 11), uint64_t{1} << 52);
  EXPECT_EQ(seeding::to_fixed(std::nanf(""), e, 11), uint64_t{1} << 52);
  EXPECT_EQ(seeding::fixed_point_exponent(0.0f, 11), 0);
}

TEST(KmeansSeed, TrialsAreTwoPlusTheFloorOfLnC) {
  EXPECT_EQ(kmeans_greedy_trials(1), 2);
  EXPECT_EQ(kmeans_greedy_trials(7), 3);   // ln 7 = 1.95
  EXPECT_EQ(kmeans_greedy_trials(8), 4);   // ln 8 = 2.08
  EXPECT_EQ(kmeans_greedy_trials(20), 4);  // ln 20 = 2.996
  EXPECT_EQ(kmeans_greedy_trials(21), 5);
  EXPECT_EQ(kmeans_greedy_trials(300), 7);
  EXPECT_EQ(kmeans_greedy_trials(1000), 8);
  EXPECT_EQ(kmeans_greedy_trials(1097), 9);  // e^7 = 1096.6
  EXPECT_THROW(kmeans_greedy_trials(0), InvalidArgumentError);
}

TEST(KmeansSeed, TiesGoToTheLowestTrial) {
  // Points of 2 dims with values 0..2 (9 possible points): trials often draw different points of
  // equal potential. The reference keeps the lowest trial's; the op must have done the same.
  const Case c{2, 2, 60, 2, 5, 3, DType::F32, Layout::Contiguous, 0, 2};
  ref::Rng rng(case_seed());
  int64_t ties = 0;
  for (int draw = 0; draw < 6; ++draw) {
    const HostTensor points = integer_points(c, rng);
    const uint64_t seed = rng.next();
    HostTensor centroids = poisoned_centroids(c);
    kmeans_seed_greedy(points.view, centroids.view, seed, c.factor, kStream);
    const GreedyReference want = greedy_reference(points.view, c.C, c.factor, seed);
    EXPECT_EQ(ref::to_vector(centroids.view), want.centroids) << "draw " << draw;
    ties += want.tie_steps;
  }
  EXPECT_GT(ties, 0) << "no step had two candidates of equal potential: the tie rule went untested";
}

// ---------------------------------------------------------------------------------------------
// Closed-form cases
// ---------------------------------------------------------------------------------------------

// [1,H,N,D] points: blob b is `copies` identical copies of a random point (coordinates 8 apart),
// in random token order. Returns the points and writes the blob centres.
HostTensor blobs(DType dtype, int64_t H, int64_t n_blobs, int64_t copies, int64_t D, ref::Rng& rng,
                 std::vector<std::set<std::vector<double>>>* centres) {
  const int64_t N = n_blobs * copies;
  HostTensor p = ref::make_tensor(dtype, {1, H, N, D}, Layout::Transposed);
  centres->assign(static_cast<size_t>(H), {});
  for (int64_t h = 0; h < H; ++h) {
    std::vector<std::vector<double>> centre(static_cast<size_t>(n_blobs), std::vector<double>(D));
    for (auto& c : centre)
      for (double& x : c) x = 8.0 * static_cast<double>(rng.integer(-8, 8));
    std::vector<int64_t> sizes(static_cast<size_t>(n_blobs), copies);
    const std::vector<int32_t> labels = ref::random_labels_with_sizes(rng, sizes);
    for (int64_t i = 0; i < N; ++i)
      for (int64_t d = 0; d < D; ++d) ref::set(p.view, {0, h, i, d}, centre[labels[i]][d]);
    for (const auto& c : centre) (*centres)[h].insert(c);
  }
  return p;
}

TEST(KmeansSeed, BlobsOfIdenticalPointsGetOneSeedEach) {
  // A point at distance 0 from a centroid is never drawn, so with the sample being every point the
  // C seeds are the C blob centres, whatever the draws.
  for (DType dtype : {DType::F32, DType::BF16}) {
    ref::Rng rng(case_seed(static_cast<uint64_t>(dtype)));
    const int64_t H = 3, C = 7, copies = 4, D = 16;
    std::vector<std::set<std::vector<double>>> centres;
    const HostTensor points = blobs(dtype, H, C, copies, D, rng, &centres);
    for (uint64_t seed : {uint64_t{3}, rng.next()}) {
      HostTensor centroids = ref::make_tensor(DType::F32, {1, H, C, D});
      kmeans_seed_greedy(points.view, centroids.view, seed, /*sample_factor=*/copies, kStream);  // M = N
      const std::vector<double> got = ref::to_vector(centroids.view);
      for (int64_t h = 0; h < H; ++h) {
        std::set<std::vector<double>> seeds;
        for (int64_t c = 0; c < C; ++c) seeds.insert(row(got, h * C + c, D));
        EXPECT_EQ(seeds, centres[h]) << dtype_name(dtype) << " head " << h << " seed " << seed;
      }
    }
  }
}

TEST(KmeansSeed, DuplicatesRepeatTheSamplesLastPointAndStayEmpty) {
  // 3 distinct points, 4 copies each, 5 clusters, the sample every point: seeds 0-2 are the 3 points,
  // then Q = 0 and seeds 3-4 repeat sample point M - 1; one Lloyd step leaves those 2 empty (ties go
  // to the lowest centroid).
  ref::Rng rng(case_seed());
  const int64_t H = 2, distinct = 3, copies = 4, D = 8, C = 5, N = distinct * copies;
  std::vector<std::set<std::vector<double>>> centres;
  const HostTensor points = blobs(DType::F32, H, distinct, copies, D, rng, &centres);
  HostTensor centroids = ref::make_tensor(DType::F32, {1, H, C, D});
  const uint64_t seed = rng.next();
  kmeans_seed_greedy(points.view, centroids.view, seed, /*sample_factor=*/3, kStream);  // M = min(12, 15)
  const std::vector<double> got = ref::to_vector(centroids.view);
  const std::vector<double> sample = ref::kmeans_init(points.view, N, seed);
  for (int64_t h = 0; h < H; ++h) {
    std::set<std::vector<double>> first;
    for (int64_t c = 0; c < distinct; ++c) first.insert(row(got, h * C + c, D));
    EXPECT_EQ(first, centres[h]) << "head " << h;
    for (int64_t c = distinct; c < C; ++c)
      EXPECT_EQ(row(got, h * C + c, D), row(sample, h * N + N - 1, D)) << "head " << h << " centroid " << c;
  }
  HostTensor labels = ref::make_tensor(DType::I32, {1, H, N}), sizes = ref::make_tensor(DType::I32, {1, H, C});
  kmeans(points.view, centroids.view, labels.view, sizes.view, 1, kStream);
  const std::vector<int32_t> sz = ref::to_i32(sizes.view);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t c = 0; c < C; ++c)
      EXPECT_EQ(sz[static_cast<size_t>(h * C + c)], c < distinct ? copies : 0) << "head " << h << " cluster " << c;
}

TEST(KmeansSeed, SampleFactorOneReordersKmeansInitsSample) {
  // M = C: every point of kmeans_init's sample becomes a seed (the points are distinct), centroid 0
  // first, the others in the greedy order.
  ref::Rng rng(case_seed());
  const int64_t B = 2, H = 2, N = 120, D = 24, C = 11;
  HostTensor points = ref::make_tensor(DType::BF16, {B, H, N, D}, Layout::Transposed);
  ref::fill_normal(points.view, rng);
  HostTensor greedy = ref::make_tensor(DType::F32, {B, H, C, D}), sample = ref::make_tensor(DType::F32, {B, H, C, D});
  const uint64_t seed = rng.next();
  kmeans_seed_greedy(points.view, greedy.view, seed, 1, kStream);
  kmeans_init(points.view, sample.view, seed, kStream);
  const std::vector<double> g = ref::to_vector(greedy.view), s = ref::to_vector(sample.view);
  bool reordered = false;
  for (int64_t bh = 0; bh < B * H; ++bh) {
    std::multiset<std::vector<double>> gs, ss;
    for (int64_t c = 0; c < C; ++c) {
      gs.insert(row(g, bh * C + c, D));
      ss.insert(row(s, bh * C + c, D));
      reordered |= row(g, bh * C + c, D) != row(s, bh * C + c, D);
    }
    EXPECT_EQ(gs, ss) << "(b,h) " << bh;
    EXPECT_EQ(row(g, bh * C, D), row(s, bh * C, D)) << "(b,h) " << bh;
  }
  EXPECT_TRUE(reordered) << "the greedy order equals the key order in all " << B * H << " problems";
}

TEST(KmeansSeed, NormalPointsGiveDistinctSeedsPerSeed) {
  // Distinct points: a point already chosen is at distance 0 and never drawn again.
  ref::Rng rng(case_seed());
  const int64_t B = 1, H = 3, N = 400, D = 64, C = 40;
  HostTensor points = ref::make_tensor(DType::F32, {B, H, N, D}, Layout::Padded);
  ref::fill_normal(points.view, rng);
  HostTensor a = ref::make_tensor(DType::F32, {B, H, C, D}), b = ref::make_tensor(DType::F32, {B, H, C, D});
  kmeans_seed_greedy(points.view, a.view, 7, 2, kStream);
  kmeans_seed_greedy(points.view, b.view, 8, 2, kStream);
  const std::vector<double> va = ref::to_vector(a.view);
  for (int64_t h = 0; h < H; ++h) {
    std::set<std::vector<double>> seeds;
    for (int64_t c = 0; c < C; ++c) seeds.insert(row(va, h * C + c, D));
    EXPECT_EQ(static_cast<int64_t>(seeds.size()), C) << "head " << h;
  }
  EXPECT_NE(va, ref::to_vector(b.view)) << "seeds 7 and 8 gave the same seeds";
}

TEST(KmeansSeed, SampleIdsKeepAHeadsSeedsWhenItRunsApart) {
  // With the ids it has in the whole call, a head's sample and its draws are those of the whole call.
  expect_sample_ids_keep_a_head(
      [](const TensorView& points, const TensorView& centroids, const TensorView& ids) {
        kmeans_seed_greedy(points, centroids, 11, 2, kStream, {}, ids);
      },
      2, 3, 80, 16, 9);
}

TEST(KmeansSeed, NonFiniteDistancesCountAsTheLargest) {
  // An infinite coordinate and a NaN one: their distances are non-finite, count as the cap (the op
  // stays defined and deterministic) and leave the finite points' unit alone.
  ref::Rng rng(case_seed());
  const int64_t B = 1, H = 2, N = 60, D = 8, C = 6;
  HostTensor points = ref::make_tensor(DType::F32, {B, H, N, D});
  ref::fill_normal(points.view, rng);
  for (int64_t h = 0; h < H; ++h) {
    ref::set(points.view, {0, h, 5, 3}, std::numeric_limits<double>::infinity());
    ref::set(points.view, {0, h, 17, 0}, std::numeric_limits<double>::quiet_NaN());
  }
  std::vector<std::vector<uint8_t>> runs;
  for (int threads : {1, 2}) {
    HostTensor centroids = ref::make_tensor(DType::F32, {B, H, C, D});
    ref::poison(centroids);
    kmeans_seed_greedy(points.view, centroids.view, 5, 10, Stream::cpu(threads));  // M = N: both points in
    EXPECT_EQ(ref::count_poisoned(centroids.view), 0);
    runs.push_back(centroids.bytes());
  }
  EXPECT_EQ(runs[0], runs[1]);
}

// ---------------------------------------------------------------------------------------------
// Bad input: the documented exception, and the centroids untouched.
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// The cluster kernel's screen
// ---------------------------------------------------------------------------------------------

float to_bf16(double v) { return bf16_to_f32(f32_to_bf16(static_cast<float>(v))); }

TEST(KmeansSeedScreen, FloorIsNeverAboveTheCpuDistance) {
  // Pairs of bf16 points: independent normals; near-duplicates (a distance far below the norms); a
  // large shared offset (cosine near 1); mixed magnitudes. The kernel's norms may be off by (D + 1) 2^-24
  // relative and its mma dot product by 2^-12 sum |x_d c_d| (seed_screen.hpp); every sign of those
  // errors is tried, and the floor must stay at or below the CPU's distance. Random pairs also check
  // that the floor is close (within 1%): a screen that clears nothing would pass the first check alone.
  ref::Rng rng(case_seed());
  int64_t close = 0, random_pairs = 0;
  for (const int64_t D : {int64_t{16}, int64_t{27}, int64_t{64}, int64_t{128}, cuda::screen::kMaxDim}) {
    for (int kind = 0; kind < 4; ++kind) {
      for (int pair = 0; pair < 60; ++pair) {
        std::vector<float> x(static_cast<size_t>(D)), c(static_cast<size_t>(D));
        const double offset = kind == 2 ? 30.0 : 0.0;
        for (int64_t d = 0; d < D; ++d) {
          const double scale = kind == 3 ? std::ldexp(1.0, static_cast<int>(rng.integer(-20, 20))) : 1.0;
          x[d] = to_bf16(scale * (offset + rng.normal()));
          c[d] = kind == 1 ? to_bf16(x[d] * (1.0 + 0x1p-7 * rng.integer(-1, 1)))
                           : to_bf16(scale * (offset + rng.normal()));
        }
        double nx = 0, nc = 0, dot = 0, abs_dot = 0;
        for (int64_t d = 0; d < D; ++d) {
          nx += static_cast<double>(x[d]) * x[d];
          nc += static_cast<double>(c[d]) * c[d];
          dot += static_cast<double>(x[d]) * c[d];
          abs_dot += std::fabs(static_cast<double>(x[d]) * c[d]);
        }
        const float distance = cpu::squared_distance(x.data(), c.data(), D);
        const double norm_error = static_cast<double>(D + 1) * 0x1p-24, dot_error = 0x1p-12 * abs_dot;
        for (const int sx : {-1, 1})
          for (const int sc : {-1, 1})
            for (const int sd : {-1, 1}) {
              const float floor = cuda::screen::distance_floor(static_cast<float>(nx * (1 + sx * norm_error)),
                                                               static_cast<float>(nc * (1 + sc * norm_error)),
                                                               static_cast<float>(dot + sd * dot_error));
              ASSERT_LE(floor, distance) << "D " << D << " kind " << kind << " pair " << pair;
            }
        if (kind == 0) {
          ++random_pairs;
          close += cuda::screen::distance_floor(static_cast<float>(nx), static_cast<float>(nc),
                                                static_cast<float>(dot)) >= 0.99f * distance;
        }
      }
    }
  }
  EXPECT_EQ(close, random_pairs);
  // Non-finite inputs never clear.
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_FALSE(cuda::screen::clears(inf, 1.0f, 0.0f, 1.0f));
  EXPECT_FALSE(cuda::screen::clears(nan, 1.0f, 0.0f, 0.0f));
  EXPECT_FALSE(cuda::screen::clears(1.0f, 1.0f, -inf, 1.0f));
  EXPECT_FALSE(cuda::screen::clears(1e30f, 1e30f, 0.0f, inf));
  EXPECT_FALSE(cuda::screen::clears(4.0f, 4.0f, 0.0f, nan));
  EXPECT_TRUE(cuda::screen::clears(4.0f, 4.0f, 0.0f, 7.9f));  // distance 8 with a margin of 2^-9 * 8
  EXPECT_FALSE(cuda::screen::clears(4.0f, 4.0f, 0.0f, 7.99f));
  // Below the absolute floor of 2^-100 nothing clears.
  EXPECT_FALSE(cuda::screen::clears(0x1p-102f, 0x1p-102f, 0.0f, 0x1p-110f));
}

TEST(KmeansSeedErrors, TypedErrorsLeaveTheCentroidsUntouched) {
  ref::Rng rng(case_seed());
  const int64_t B = 1, H = 2, N = 40, D = 24, C = 6;
  HostTensor points = ref::make_tensor(DType::F32, {B, H, N, D});
  ref::fill_normal(points.view, rng);
  HostTensor centroids = ref::make_tensor(DType::F32, {B, H, C, D});
  ref::poison(centroids);
  const Stream st = kStream;
  TensorView rank3 = points.view;
  rank3.rank = 3;
  HostTensor wrong_d = ref::make_tensor(DType::F32, {B, H, C, D + 1});
  HostTensor wrong_h = ref::make_tensor(DType::F32, {B, H + 1, C, D});
  HostTensor no_points = ref::make_tensor(DType::F32, {B, H, 0, D});
  HostTensor strided = ref::make_tensor(DType::F32, {B, H, C, D}, Layout::Transposed);
  HostTensor bf16_centroids = ref::make_tensor(DType::BF16, {B, H, C, D});
  HostTensor i32_points = ref::make_tensor(DType::I32, {B, H, N, D});
  HostTensor ids = ref::make_tensor(DType::I32, {B, H}), ids_short = ref::make_tensor(DType::I32, {B, 1});
  HostTensor ids_f32 = ref::make_tensor(DType::F32, {B, H});
  static_cast<int32_t*>(ids.view.data)[0] = 0;
  static_cast<int32_t*>(ids.view.data)[1] = -1;
  EXPECT_ERROR_UNTOUCHED(ShapeError, centroids, kmeans_seed_greedy(rank3, centroids.view, 0, 2, st));
  EXPECT_ERROR_UNTOUCHED(ShapeError, centroids, kmeans_seed_greedy(points.view, wrong_d.view, 0, 2, st));
  EXPECT_ERROR_UNTOUCHED(ShapeError, centroids, kmeans_seed_greedy(points.view, wrong_h.view, 0, 2, st));
  EXPECT_ERROR_UNTOUCHED(ShapeError, centroids, kmeans_seed_greedy(no_points.view, centroids.view, 0, 2, st));
  EXPECT_ERROR_UNTOUCHED(ShapeError, centroids, kmeans_seed_greedy(points.view, strided.view, 0, 2, st));
  EXPECT_ERROR_UNTOUCHED(ShapeError, centroids,
                         kmeans_seed_greedy(points.view, centroids.view, 0, 2, st, {}, ids_short.view));
  EXPECT_ERROR_UNTOUCHED(DTypeError, centroids, kmeans_seed_greedy(points.view, bf16_centroids.view, 0, 2, st));
  EXPECT_ERROR_UNTOUCHED(DTypeError, centroids, kmeans_seed_greedy(i32_points.view, centroids.view, 0, 2, st));
  EXPECT_ERROR_UNTOUCHED(DTypeError, centroids,
                         kmeans_seed_greedy(points.view, centroids.view, 0, 2, st, {}, ids_f32.view));
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, centroids,
                         kmeans_seed_greedy(points.view, centroids.view, 0, 2, st, {}, ids.view));
  for (int factor : {0, -3})
    EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, centroids,
                           kmeans_seed_greedy(points.view, centroids.view, 0, factor, st));
  expect_error_message<InvalidArgumentError>([&] { kmeans_seed_greedy(points.view, centroids.view, 0, 0, st); },
                                             "sample_factor must be >= 1, got 0");
  EXPECT_THROW(kmeans_seed_greedy_workspace_bytes(2, 40, 6, 0, Device::cpu()), InvalidArgumentError);
  EXPECT_THROW(kmeans_seed_greedy_workspace_bytes(-1, 40, 6, 2, Device::cpu()), InvalidArgumentError);
  EXPECT_EQ(kmeans_seed_greedy_workspace_bytes(2, 40, 6, 2, Device::cpu()), 0u);
}

TEST(KmeansSeedErrors, CudaTensorsAreUnsupportedOnACpuStream) {
  HostTensor points = ref::make_tensor(DType::F32, {1, 2, 40, 8});
  ref::Rng rng(case_seed());
  ref::fill_normal(points.view, rng);
  HostTensor centroids = ref::make_tensor(DType::F32, {1, 2, 5, 8});
  ref::poison(centroids);
  EXPECT_ERROR_UNTOUCHED(UnsupportedError, centroids,
                         kmeans_seed_greedy(ref::on_cuda(points.view), centroids.view, 0, 2, kStream));
  EXPECT_ERROR_UNTOUCHED(UnsupportedError, centroids,
                         kmeans_seed_greedy(points.view, ref::on_cuda(centroids.view), 0, 2, kStream));
  // CPU tensors on a CUDA stream (in a CPU-only build there is no CUDA backend at all).
  const Stream cuda{Device::cuda(0), nullptr, 0};
  EXPECT_ERROR_UNTOUCHED(UnsupportedError, centroids, kmeans_seed_greedy(points.view, centroids.view, 0, 2, cuda));
}

}  // namespace
