// k-means ops (kmeans_init, kmeans_assign, kmeans_update, kmeans) against the float64 reference and
// the properties their contracts in sapattn/ops.hpp state.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "reference.hpp"
#include "sapattn/ops.hpp"
#include "test_support.hpp"

namespace {

using namespace sapattn;
using namespace sapattn::testing_support;

struct Shape {
  int64_t B, H, N, D, C;
  DType dtype = DType::F32;
  Layout layout = Layout::Contiguous;
};

std::string describe(const Shape& s) {
  return "B=" + std::to_string(s.B) + " H=" + std::to_string(s.H) + " N=" + std::to_string(s.N) +
         " D=" + std::to_string(s.D) + " C=" + std::to_string(s.C) + " " + std::string(dtype_name(s.dtype)) + " " +
         ref::layout_name(s.layout);
}

struct Kmeans {
  HostTensor points, centroids, labels, sizes;
};

// Points drawn from a mixture of Gaussians (so k-means has structure to find), centroids set to the
// documented seeded sample of the points, labels and sizes poisoned.
Kmeans make_kmeans(const Shape& s, ref::Rng& rng) {
  Kmeans k;
  k.points = ref::make_tensor(s.dtype, {s.B, s.H, s.N, s.D}, s.layout);
  const int64_t modes = std::max<int64_t>(1, s.C / 2 + 1);
  for (int64_t b = 0; b < s.B; ++b) {
    for (int64_t h = 0; h < s.H; ++h) {
      std::vector<double> centers(static_cast<size_t>(modes * s.D));
      for (double& c : centers) c = 2.0 * rng.normal();
      for (int64_t i = 0; i < s.N; ++i) {
        const int64_t m = rng.integer(0, modes - 1);
        for (int64_t d = 0; d < s.D; ++d) {
          ref::set(k.points.view, {b, h, i, d}, centers[static_cast<size_t>(m * s.D + d)] + rng.normal());
        }
      }
    }
  }
  k.centroids = ref::make_tensor(DType::F32, {s.B, s.H, s.C, s.D});
  ref::from_vector(k.centroids.view, ref::kmeans_init(k.points.view, s.C, rng.next()));
  k.labels = ref::make_tensor(DType::I32, {s.B, s.H, s.N});
  k.sizes = ref::make_tensor(DType::I32, {s.B, s.H, s.C});
  ref::poison(k.labels);
  ref::poison(k.sizes);
  return k;
}

Kmeans clone(const Kmeans& k) {
  Kmeans c;
  for (auto [dst, src] : {std::pair{&c.points, &k.points}, std::pair{&c.centroids, &k.centroids},
                          std::pair{&c.labels, &k.labels}, std::pair{&c.sizes, &k.sizes}}) {
    *dst = ref::make_tensor(src->view.dtype, std::vector<int64_t>(src->storage.shape()), Layout::Contiguous);
    // Same storage shape and bytes; the view keeps the source's offset and strides.
    std::memcpy(dst->storage.data(), src->storage.data(), src->storage.bytes());
    dst->view = src->view;
    dst->view.data = static_cast<char*>(dst->storage.data()) +
                     (static_cast<char*>(src->view.data) - static_cast<char*>(src->storage.data()));
  }
  return c;
}

bool same_bytes(const HostTensor& a, const HostTensor& b) {
  return a.storage.bytes() == b.storage.bytes() &&
         std::memcmp(a.storage.data(), b.storage.data(), a.storage.bytes()) == 0;
}

// Labels in range, and each one's distance within the fp32 rounding bound of the float64 minimum:
// where the two best distances tie within rounding, either index is a correct fp32 argmin.
::testing::AssertionResult labels_are_argmin(const TensorView& points, const TensorView& centroids,
                                             const std::vector<int32_t>& labels) {
  const int64_t C = centroids.shape[2];
  const std::vector<double> d = ref::sq_distances(points, centroids);
  const std::vector<double> e = ref::sq_distance_error_bound(points, centroids);
  const std::vector<int32_t> exact = ref::kmeans_assign(points, centroids);
  int64_t ties = 0;
  for (size_t p = 0; p < labels.size(); ++p) {
    const int32_t l = labels[p];
    if (l < 0 || l >= C)
      return ::testing::AssertionFailure() << "point " << p << ": label " << l << " outside [0," << C << ")";
    const int32_t r = exact[p];
    if (l == r) continue;
    const double gap = d[p * C + l] - d[p * C + r];
    if (gap > e[p * C + l] + e[p * C + r]) {
      return ::testing::AssertionFailure() << "point " << p << ": label " << l << " at distance " << d[p * C + l]
                                           << " but centroid " << r << " is at " << d[p * C + r] << " (gap " << gap
                                           << " > rounding bound " << e[p * C + l] + e[p * C + r] << ")";
    }
    ++ties;
  }
  return ::testing::AssertionSuccess() << ties << " near-ties";
}

// sizes count the labels; every non-empty centroid is the mean of its labelled points within the
// fp32 summation bound (ref::KmeansUpdate::error_bound).
::testing::AssertionResult centroids_are_means(const TensorView& points, const TensorView& centroids,
                                               const std::vector<int32_t>& labels, const std::vector<int32_t>& sizes) {
  const int64_t C = centroids.shape[2], D = centroids.shape[3];
  const ref::KmeansUpdate want = ref::kmeans_update(points, labels, centroids);
  if (sizes != want.sizes) return ::testing::AssertionFailure() << "sizes do not count the labels";
  const std::vector<double> got = ref::to_vector(centroids);
  for (size_t o = 0; o < got.size(); ++o) {
    const size_t cluster = o / static_cast<size_t>(D);
    if (want.sizes[cluster] == 0) continue;
    if (!(std::abs(got[o] - want.centroids[o]) <= want.error_bound[o])) {
      return ::testing::AssertionFailure()
             << "centroid " << cluster % static_cast<size_t>(C) << " of (b,h) " << cluster / static_cast<size_t>(C)
             << " dim " << o % static_cast<size_t>(D) << ": " << got[o] << " vs mean " << want.centroids[o]
             << " (bound " << want.error_bound[o] << ")";
    }
  }
  return ::testing::AssertionSuccess();
}

const std::vector<Shape> kShapes = {
    {2, 3, 300, 64, 16, DType::F32, Layout::Contiguous},
    {1, 2, 257, 128, 20, DType::F16, Layout::Transposed},
    {2, 2, 200, 24, 9, DType::BF16, Layout::TransposedPadded},
    {1, 3, 150, 24, 7, DType::F32, Layout::Transposed},
    {1, 1, 50, 64, 60, DType::F32, Layout::Padded},    // C > N: some clusters must be empty
    {1, 2, 1, 24, 3, DType::F32, Layout::Contiguous},  // N = 1
    // D = 27 is not a multiple of any vector width; N = 1100 spans several work chunks per head.
    {1, 2, 1100, 27, 33, DType::BF16, Layout::Transposed},
};

// ---------------------------------------------------------------------------------------------

class KmeansKnownAnswer : public ::testing::TestWithParam<DType> {};

TEST_P(KmeansKnownAnswer, RecoversWellSeparatedBlobs) {
  ref::Rng rng(case_seed(static_cast<uint64_t>(GetParam())));
  const int64_t B = 1, H = 2, D = 24, C = 4;
  const std::vector<int64_t> blob_sizes = {30, 50, 70, 45};
  const int64_t N = 195;
  HostTensor points = ref::make_tensor(GetParam(), {B, H, N, D}, Layout::Transposed);
  HostTensor centroids = ref::make_tensor(DType::F32, {B, H, C, D});
  HostTensor labels = ref::make_tensor(DType::I32, {B, H, N});
  HostTensor sizes = ref::make_tensor(DType::I32, {B, H, C});
  ref::poison(labels);
  ref::poison(sizes);
  std::vector<int32_t> truth;
  for (int64_t h = 0; h < H; ++h) {
    // Centers 20 apart along distinct axes, noise 0.1: every point is far nearer its own center.
    const std::vector<int32_t> order = ref::random_labels_with_sizes(rng, blob_sizes);
    std::vector<bool> seeded(C, false);
    for (int64_t i = 0; i < N; ++i) {
      const int32_t c = order[static_cast<size_t>(i)];
      for (int64_t d = 0; d < D; ++d) {
        const double center = (d == 3 * c) ? 20.0 : 0.0;
        ref::set(points.view, {0, h, i, d}, center + 0.1 * rng.normal());
      }
      if (!seeded[c]) {  // start blob c's centroid at its first point
        seeded[c] = true;
        for (int64_t d = 0; d < D; ++d) ref::set(centroids.view, {0, h, c, d}, ref::get(points.view, {0, h, i, d}));
      }
    }
    truth.insert(truth.end(), order.begin(), order.end());
  }
  kmeans(points.view, centroids.view, labels.view, sizes.view, 5, kStream);
  const std::vector<int32_t> got = ref::to_i32(labels.view);
  EXPECT_EQ(got, truth);
  std::vector<int32_t> want_sizes;
  for (int64_t h = 0; h < H; ++h)
    for (int64_t s : blob_sizes) want_sizes.push_back(static_cast<int32_t>(s));
  EXPECT_EQ(ref::to_i32(sizes.view), want_sizes);
  EXPECT_TRUE(centroids_are_means(points.view, centroids.view, truth, want_sizes));
  // The recovered centroids sit on the true centers (mean of n points of noise 0.1: within 0.1).
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t d = 0; d < D; ++d) {
        EXPECT_NEAR(ref::get(centroids.view, {0, h, c, d}), d == 3 * c ? 20.0 : 0.0, 0.1);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, KmeansKnownAnswer, ::testing::Values(DType::F32, DType::F16, DType::BF16),
                         [](const auto& p) { return std::string(dtype_name(p.param)); });

// ---------------------------------------------------------------------------------------------

class KmeansShapes : public ::testing::TestWithParam<Shape> {};

TEST_P(KmeansShapes, CentroidsAreMeansOfTheirLabels) {
  const Shape s = GetParam();
  SCOPED_TRACE(describe(s));
  for (int iters : {1, 3}) {
    ref::Rng rng(case_seed(static_cast<uint64_t>(iters)));
    Kmeans k = make_kmeans(s, rng);
    const HostTensor initial = clone(k).centroids;
    kmeans(k.points.view, k.centroids.view, k.labels.view, k.sizes.view, iters, kStream);
    EXPECT_EQ(ref::count_poisoned(k.labels.view), 0);
    EXPECT_EQ(ref::count_poisoned(k.sizes.view), 0);
    EXPECT_EQ(ref::count_poisoned(k.centroids.view), 0);
    const std::vector<int32_t> labels = ref::to_i32(k.labels.view);
    const std::vector<int32_t> sizes = ref::to_i32(k.sizes.view);
    EXPECT_TRUE(centroids_are_means(k.points.view, k.centroids.view, labels, sizes)) << "iters " << iters;
    if (iters == 1) {
      // One iteration: labels are the argmin against the initial centroids, and the empty clusters
      // still hold their initial centroid, bit for bit.
      EXPECT_TRUE(labels_are_argmin(k.points.view, initial.view, labels));
      for (int64_t bh = 0; bh < s.B * s.H; ++bh) {
        for (int64_t c = 0; c < s.C; ++c) {
          if (sizes[static_cast<size_t>(bh * s.C + c)] != 0) continue;
          for (int64_t d = 0; d < s.D; ++d) {
            const std::array<int64_t, 4> idx{bh / s.H, bh % s.H, c, d};
            ASSERT_EQ(ref::get(k.centroids.view, idx), ref::get(initial.view, idx)) << "empty cluster " << c;
          }
        }
      }
    }
  }
}

TEST_P(KmeansShapes, LabelsAreTheArgminOfThePreviousIteration) {
  // kmeans(t)'s labels are the assignment against the centroids after t-1 iterations, which
  // kmeans(t-1) from the same start returns.
  const Shape s = GetParam();
  SCOPED_TRACE(describe(s));
  ref::Rng rng(case_seed());
  const Kmeans start = make_kmeans(s, rng);
  for (int t = 1; t <= 3; ++t) {
    Kmeans before = clone(start), after = clone(start);
    kmeans(before.points.view, before.centroids.view, before.labels.view, before.sizes.view, t - 1, kStream);
    kmeans(after.points.view, after.centroids.view, after.labels.view, after.sizes.view, t, kStream);
    EXPECT_TRUE(labels_are_argmin(after.points.view, before.centroids.view, ref::to_i32(after.labels.view)))
        << "iteration " << t;
  }
}

TEST_P(KmeansShapes, AssignMatchesFloat64Argmin) {
  const Shape s = GetParam();
  SCOPED_TRACE(describe(s));
  ref::Rng rng(case_seed());
  Kmeans k = make_kmeans(s, rng);
  // Centroids near data points (a sample plus small noise): many points have close second choices.
  std::vector<double> c = ref::to_vector(k.centroids.view);
  for (double& x : c) x += 0.05 * rng.normal();
  ref::from_vector(k.centroids.view, c);
  const std::vector<uint8_t> centroid_bytes = k.centroids.bytes();
  kmeans_assign(k.points.view, k.centroids.view, k.labels.view, kStream);
  EXPECT_EQ(ref::count_poisoned(k.labels.view), 0);
  EXPECT_TRUE(labels_are_argmin(k.points.view, k.centroids.view, ref::to_i32(k.labels.view)));
  EXPECT_EQ(k.centroids.bytes(), centroid_bytes) << "kmeans_assign wrote its centroids";
}

TEST_P(KmeansShapes, UpdateIsTheMeanOfRandomLabels) {
  const Shape s = GetParam();
  SCOPED_TRACE(describe(s));
  ref::Rng rng(case_seed());
  Kmeans k = make_kmeans(s, rng);
  std::vector<int32_t> labels;
  for (int64_t bh = 0; bh < s.B * s.H; ++bh) {
    // Random sizes with empty clusters; exactly `N` labels per (b,h).
    const std::vector<int32_t> l = ref::random_labels_with_sizes(rng, ref::random_cluster_sizes(rng, s.N, s.C));
    labels.insert(labels.end(), l.begin(), l.end());
  }
  std::vector<double> lv(labels.begin(), labels.end());
  ref::from_vector(k.labels.view, lv);
  const HostTensor previous = clone(k).centroids;
  const std::vector<uint8_t> label_bytes = k.labels.bytes();
  kmeans_update(k.points.view, k.labels.view, k.centroids.view, k.sizes.view, kStream);
  const std::vector<int32_t> sizes = ref::to_i32(k.sizes.view);
  EXPECT_TRUE(centroids_are_means(k.points.view, k.centroids.view, labels, sizes));
  EXPECT_EQ(k.labels.bytes(), label_bytes) << "kmeans_update wrote its labels";
  const ref::KmeansUpdate want = ref::kmeans_update(k.points.view, labels, previous.view);
  EXPECT_EQ(sizes, want.sizes);
  // Empty clusters keep the previous centroid bit for bit.
  for (int64_t bh = 0; bh < s.B * s.H; ++bh) {
    for (int64_t c = 0; c < s.C; ++c) {
      if (want.sizes[static_cast<size_t>(bh * s.C + c)] != 0) continue;
      for (int64_t d = 0; d < s.D; ++d) {
        const std::array<int64_t, 4> idx{bh / s.H, bh % s.H, c, d};
        ASSERT_EQ(ref::get(k.centroids.view, idx), ref::get(previous.view, idx));
      }
    }
  }
}

TEST_P(KmeansShapes, InitIsTheDocumentedSample) {
  const Shape s = GetParam();
  SCOPED_TRACE(describe(s));
  ref::Rng rng(case_seed());
  Kmeans k = make_kmeans(s, rng);
  for (uint64_t seed : {uint64_t{0}, uint64_t{1}, rng.next()}) {
    HostTensor centroids = ref::make_tensor(DType::F32, {s.B, s.H, s.C, s.D});
    ref::poison(centroids);
    kmeans_init(k.points.view, centroids.view, seed, kStream);
    // Sampled data points are copied exactly (f16/bf16 values are exact in fp32).
    EXPECT_EQ(ref::to_vector(centroids.view), ref::kmeans_init(k.points.view, s.C, seed)) << "seed " << seed;
  }
}

TEST_P(KmeansShapes, ThreadCountIndependentAndDeterministic) {
  const Shape s = GetParam();
  SCOPED_TRACE(describe(s));
  ref::Rng rng(case_seed());
  const Kmeans start = make_kmeans(s, rng);
  const uint64_t seed = rng.next();
  std::vector<Kmeans> runs;
  for (int threads : {1, 2, 3, 2}) {
    Kmeans k = clone(start);
    const Stream stream = Stream::cpu(threads);
    kmeans_init(k.points.view, k.centroids.view, seed, stream);
    kmeans(k.points.view, k.centroids.view, k.labels.view, k.sizes.view, 4, stream);
    runs.push_back(std::move(k));
  }
  for (size_t r = 1; r < runs.size(); ++r) {
    EXPECT_TRUE(same_bytes(runs[0].centroids, runs[r].centroids)) << "run " << r;
    EXPECT_TRUE(same_bytes(runs[0].labels, runs[r].labels)) << "run " << r;
    EXPECT_TRUE(same_bytes(runs[0].sizes, runs[r].sizes)) << "run " << r;
  }
  // The separate steps too.
  std::vector<Kmeans> steps;
  for (int threads : {1, 2, 3}) {
    Kmeans k = clone(start);
    const Stream stream = Stream::cpu(threads);
    kmeans_assign(k.points.view, k.centroids.view, k.labels.view, stream);
    kmeans_update(k.points.view, k.labels.view, k.centroids.view, k.sizes.view, stream);
    steps.push_back(std::move(k));
  }
  for (size_t r = 1; r < steps.size(); ++r) {
    EXPECT_TRUE(same_bytes(steps[0].centroids, steps[r].centroids)) << "run " << r;
    EXPECT_TRUE(same_bytes(steps[0].labels, steps[r].labels)) << "run " << r;
    EXPECT_TRUE(same_bytes(steps[0].sizes, steps[r].sizes)) << "run " << r;
  }
}

TEST_P(KmeansShapes, ZeroItersOnlyAssigns) {
  const Shape s = GetParam();
  SCOPED_TRACE(describe(s));
  ref::Rng rng(case_seed());
  Kmeans k = make_kmeans(s, rng);
  Kmeans assigned = clone(k);
  const std::vector<uint8_t> centroid_bytes = k.centroids.bytes();
  kmeans(k.points.view, k.centroids.view, k.labels.view, k.sizes.view, 0, kStream);
  EXPECT_EQ(k.centroids.bytes(), centroid_bytes) << "iters = 0 moved the centroids";
  kmeans_assign(assigned.points.view, assigned.centroids.view, assigned.labels.view, kStream);
  EXPECT_TRUE(same_bytes(k.labels, assigned.labels));
  const std::vector<int32_t> labels = ref::to_i32(k.labels.view);
  EXPECT_TRUE(labels_are_argmin(k.points.view, k.centroids.view, labels));
  // "On return ... sizes count them" holds for every iteration count, 0 included.
  EXPECT_EQ(ref::to_i32(k.sizes.view), ref::kmeans_update(k.points.view, labels, k.centroids.view).sizes);
}

TEST_P(KmeansShapes, WarmStartContinuesTheSameIterations) {
  // kmeans(2) then kmeans(3) from its centroids runs exactly the iterations of kmeans(5).
  const Shape s = GetParam();
  SCOPED_TRACE(describe(s));
  ref::Rng rng(case_seed());
  const Kmeans start = make_kmeans(s, rng);
  Kmeans once = clone(start), twice = clone(start);
  kmeans(once.points.view, once.centroids.view, once.labels.view, once.sizes.view, 5, kStream);
  kmeans(twice.points.view, twice.centroids.view, twice.labels.view, twice.sizes.view, 2, kStream);
  kmeans(twice.points.view, twice.centroids.view, twice.labels.view, twice.sizes.view, 3, kStream);
  EXPECT_TRUE(same_bytes(once.centroids, twice.centroids));
  EXPECT_TRUE(same_bytes(once.labels, twice.labels));
  EXPECT_TRUE(same_bytes(once.sizes, twice.sizes));
}

INSTANTIATE_TEST_SUITE_P(Cases, KmeansShapes, ::testing::ValuesIn(kShapes), [](const auto& p) {
  const Shape& s = p.param;
  return case_name("B" + std::to_string(s.B) + "H" + std::to_string(s.H), "N" + std::to_string(s.N),
                   "D" + std::to_string(s.D), "C" + std::to_string(s.C), dtype_name(s.dtype),
                   ref::layout_name(s.layout));
});

// ---------------------------------------------------------------------------------------------

TEST(Kmeans, LabelsMayBeTheVideoPartOfALongerTensor) {
  // labels need only unit stride along N: a [B,H,N] slice of [B,H,N+7] gives the same results as
  // contiguous labels, and the 7 trailing entries per (b,h) are not touched.
  const Shape s{2, 3, 150, 64, 10, DType::F16, Layout::Transposed};
  ref::Rng rng(case_seed());
  const Kmeans start = make_kmeans(s, rng);
  Kmeans plain = clone(start), sliced = clone(start);
  HostTensor longer = ref::make_tensor(DType::I32, {s.B, s.H, s.N + 7});
  ref::poison(longer);
  HostTensor view_of_longer = longer;
  view_of_longer.view = longer.view.slice(2, 0, s.N);
  const std::vector<uint8_t> before = longer.bytes();
  kmeans(plain.points.view, plain.centroids.view, plain.labels.view, plain.sizes.view, 3, kStream);
  kmeans(sliced.points.view, sliced.centroids.view, view_of_longer.view, sliced.sizes.view, 3, kStream);
  EXPECT_TRUE(same_bytes(plain.centroids, sliced.centroids));
  EXPECT_TRUE(same_bytes(plain.sizes, sliced.sizes));
  EXPECT_EQ(ref::to_i32(view_of_longer.view), ref::to_i32(plain.labels.view));
  EXPECT_TRUE(view_of_longer.outside_view_unchanged(before));
  // The separate steps too.
  ref::poison(longer);
  kmeans_assign(sliced.points.view, sliced.centroids.view, view_of_longer.view, kStream);
  kmeans_assign(plain.points.view, plain.centroids.view, plain.labels.view, kStream);
  EXPECT_EQ(ref::to_i32(view_of_longer.view), ref::to_i32(plain.labels.view));
  EXPECT_TRUE(view_of_longer.outside_view_unchanged(before));
  kmeans_update(sliced.points.view, view_of_longer.view, sliced.centroids.view, sliced.sizes.view, kStream);
  kmeans_update(plain.points.view, plain.labels.view, plain.centroids.view, plain.sizes.view, kStream);
  EXPECT_TRUE(same_bytes(plain.centroids, sliced.centroids));
  EXPECT_TRUE(same_bytes(plain.sizes, sliced.sizes));
}

TEST(Kmeans, ObjectiveNeverIncreases) {
  for (DType dtype : {DType::F32, DType::BF16}) {
    const Shape s{1, 2, 400, 64, 12, dtype, Layout::Transposed};
    SCOPED_TRACE(describe(s));
    ref::Rng rng(case_seed(static_cast<uint64_t>(dtype)));
    const Kmeans start = make_kmeans(s, rng);
    // J(0): the initial centroids with their exact assignment.
    std::vector<double> previous = ref::kmeans_objective(start.points.view, start.centroids.view,
                                                         ref::kmeans_assign(start.points.view, start.centroids.view));
    const std::vector<double> j0 = previous;
    for (int t = 1; t <= 8; ++t) {
      Kmeans k = clone(start);
      kmeans(k.points.view, k.centroids.view, k.labels.view, k.sizes.view, t, kStream);
      const std::vector<int32_t> labels = ref::to_i32(k.labels.view);
      const std::vector<double> j = ref::kmeans_objective(k.points.view, k.centroids.view, labels);
      // Exact Lloyd never increases J. In fp32 a point may take a centroid that is farther by at
      // most the two distances' rounding bounds, so J may grow by at most the sum of those bounds.
      const std::vector<double> e = ref::sq_distance_error_bound(k.points.view, k.centroids.view);
      for (int64_t bh = 0; bh < s.B * s.H; ++bh) {
        double slack = 0.0;
        for (int64_t i = 0; i < s.N; ++i) {
          const size_t p = static_cast<size_t>(bh * s.N + i);
          slack += 2.0 * *std::max_element(e.begin() + static_cast<int64_t>(p * s.C),
                                           e.begin() + static_cast<int64_t>((p + 1) * s.C));
        }
        EXPECT_LE(j[static_cast<size_t>(bh)], previous[static_cast<size_t>(bh)] + slack)
            << "iteration " << t << " (b,h) " << bh;
      }
      previous = j;
    }
    for (int64_t bh = 0; bh < s.B * s.H; ++bh) {
      EXPECT_LT(previous[static_cast<size_t>(bh)], 0.9 * j0[static_cast<size_t>(bh)])
          << "8 iterations did not improve the objective";
    }
  }
}

TEST(Kmeans, EmptyClusterKeepsItsCentroid) {
  const Shape s{2, 2, 120, 24, 5, DType::F32, Layout::Contiguous};
  ref::Rng rng(case_seed());
  Kmeans k = make_kmeans(s, rng);
  // Centroid 2 far from every point (data within a few units of 0): it can never win a point.
  for (int64_t bh = 0; bh < s.B * s.H; ++bh) {
    for (int64_t d = 0; d < s.D; ++d) ref::set(k.centroids.view, {bh / s.H, bh % s.H, 2, d}, 1000.0 + rng.normal());
  }
  const std::vector<double> before = ref::to_vector(k.centroids.view);
  kmeans(k.points.view, k.centroids.view, k.labels.view, k.sizes.view, 3, kStream);
  const std::vector<double> after = ref::to_vector(k.centroids.view);
  const std::vector<int32_t> sizes = ref::to_i32(k.sizes.view);
  for (int64_t bh = 0; bh < s.B * s.H; ++bh) {
    EXPECT_EQ(sizes[static_cast<size_t>(bh * s.C + 2)], 0);
    for (int64_t d = 0; d < s.D; ++d) {
      const size_t o = static_cast<size_t>((bh * s.C + 2) * s.D + d);
      EXPECT_EQ(after[o], before[o]);
    }
  }
  EXPECT_TRUE(centroids_are_means(k.points.view, k.centroids.view, ref::to_i32(k.labels.view), sizes));
}

TEST(Kmeans, TiesGoToTheLowestIndex) {
  ref::Rng rng(case_seed());
  const int64_t B = 1, H = 2, N = 90, D = 24, C = 4;
  for (DType dtype : {DType::F32, DType::BF16}) {
    HostTensor points = ref::make_tensor(dtype, {B, H, N, D}, Layout::Transposed);
    ref::fill_normal(points.view, rng);
    // Exact ties: a third of the points have x_0 = 0, equidistant from c0 = -1.5 e0 and c1 = +1.5 e0
    // (both distances are the same fp32 operations on the same values). c2, c3 duplicate c1, c0.
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t i = 0; i < N; i += 3) ref::set(points.view, {0, h, i, 0}, 0.0);
    }
    HostTensor centroids = ref::make_tensor(DType::F32, {B, H, C, D});
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t d = 0; d < D; ++d) {
        const double axis = d == 0 ? 1.5 : 0.0;
        ref::set(centroids.view, {0, h, 0, d}, -axis);
        ref::set(centroids.view, {0, h, 1, d}, axis);
        ref::set(centroids.view, {0, h, 2, d}, axis);
        ref::set(centroids.view, {0, h, 3, d}, -axis);
      }
    }
    HostTensor labels = ref::make_tensor(DType::I32, {B, H, N});
    ref::poison(labels);
    kmeans_assign(points.view, centroids.view, labels.view, kStream);
    const std::vector<int32_t> got = ref::to_i32(labels.view);
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t i = 0; i < N; ++i) {
        const double x0 = ref::get(points.view, {0, h, i, 0});
        const int32_t want = x0 > 0 ? 1 : 0;  // x0 == 0: tie between 0 and 1 (and 3); lowest wins
        EXPECT_EQ(got[static_cast<size_t>(h * N + i)], want) << "h " << h << " point " << i << " x0 " << x0;
      }
    }
    // Through one kmeans iteration: the duplicates win no point, stay empty and keep their centroids.
    HostTensor sizes = ref::make_tensor(DType::I32, {B, H, C});
    ref::poison(sizes);
    const std::vector<double> before = ref::to_vector(centroids.view);
    kmeans(points.view, centroids.view, labels.view, sizes.view, 1, kStream);
    const std::vector<int32_t> sz = ref::to_i32(sizes.view);
    const std::vector<double> after = ref::to_vector(centroids.view);
    for (int64_t h = 0; h < H; ++h) {
      EXPECT_EQ(sz[static_cast<size_t>(h * C + 2)], 0);
      EXPECT_EQ(sz[static_cast<size_t>(h * C + 3)], 0);
      for (int64_t c : {2, 3}) {
        for (int64_t d = 0; d < D; ++d) {
          const size_t o = static_cast<size_t>((h * C + c) * D + d);
          EXPECT_EQ(after[o], before[o]);
        }
      }
    }
  }
}

TEST(Kmeans, InitWithMoreClustersThanPointsRepeatsTheSample) {
  ref::Rng rng(case_seed());
  const int64_t B = 2, H = 3, N = 5, D = 24, C = 12;
  HostTensor points = ref::make_tensor(DType::BF16, {B, H, N, D}, Layout::TransposedPadded);
  ref::fill_normal(points.view, rng);
  HostTensor centroids = ref::make_tensor(DType::F32, {B, H, C, D});
  ref::poison(centroids);
  const uint64_t seed = rng.next();
  kmeans_init(points.view, centroids.view, seed, kStream);
  const std::vector<double> got = ref::to_vector(centroids.view);
  EXPECT_EQ(got, ref::kmeans_init(points.view, C, seed));
  // Centroid c and c + N are the same point (the sample repeats); the first N are distinct points.
  for (int64_t bh = 0; bh < B * H; ++bh) {
    for (int64_t c = 0; c + N < C; ++c) {
      for (int64_t d = 0; d < D; ++d) {
        EXPECT_EQ(got[static_cast<size_t>((bh * C + c) * D + d)], got[static_cast<size_t>((bh * C + c + N) * D + d)]);
      }
    }
  }
  // Then kmeans gives every point to the first copy: the repeats stay empty.
  HostTensor labels = ref::make_tensor(DType::I32, {B, H, N});
  HostTensor sizes = ref::make_tensor(DType::I32, {B, H, C});
  kmeans(points.view, centroids.view, labels.view, sizes.view, 1, kStream);
  const std::vector<int32_t> sz = ref::to_i32(sizes.view);
  for (size_t c = 0; c < sz.size(); ++c) EXPECT_EQ(sz[c], c % C < static_cast<size_t>(N) ? 1 : 0) << "cluster " << c;
}

TEST(Kmeans, DifferentSeedsSampleDifferently) {
  ref::Rng rng(case_seed());
  HostTensor points = ref::make_tensor(DType::F32, {1, 2, 200, 24});
  ref::fill_normal(points.view, rng);
  HostTensor a = ref::make_tensor(DType::F32, {1, 2, 10, 24}), b = ref::make_tensor(DType::F32, {1, 2, 10, 24});
  kmeans_init(points.view, a.view, 7, kStream);
  kmeans_init(points.view, b.view, 8, kStream);
  EXPECT_NE(ref::to_vector(a.view), ref::to_vector(b.view));
  EXPECT_EQ(ref::to_vector(a.view), ref::kmeans_init(points.view, 10, 7));
}

TEST(Kmeans, SampleIdsKeepAHeadsSampleWhenItRunsApart) {
  expect_sample_ids_keep_a_head([](const TensorView& points, const TensorView& centroids,
                                   const TensorView& ids) { kmeans_init(points, centroids, 11, kStream, {}, ids); },
                                2, 3, 50, 16, 7);
  // Bad ids: a negative one, the wrong shape or dtype.
  const int64_t B = 2, N = 50, D = 16, C = 7;
  HostTensor points = ref::make_tensor(DType::F32, {B, 1, N, D}), one = ref::make_tensor(DType::F32, {B, 1, C, D});
  ref::Rng rng(case_seed());
  ref::fill_normal(points.view, rng);
  HostTensor ids = ref::make_tensor(DType::I32, {B, 1});
  static_cast<int32_t*>(ids.view.data)[0] = 2;
  static_cast<int32_t*>(ids.view.data)[1] = -1;
  EXPECT_THROW(kmeans_init(points.view, one.view, 11, kStream, {}, ids.view), InvalidArgumentError);
  HostTensor wrong = ref::make_tensor(DType::I32, {B, 2});
  EXPECT_THROW(kmeans_init(points.view, one.view, 11, kStream, {}, wrong.view), ShapeError);
  HostTensor floats = ref::make_tensor(DType::F32, {B, 1});
  EXPECT_THROW(kmeans_init(points.view, one.view, 11, kStream, {}, floats.view), DTypeError);
}

// ---------------------------------------------------------------------------------------------
// Errors: the documented exception type, and the outputs untouched.

struct ErrorFixture {
  Shape s{1, 2, 40, 24, 6};
  Kmeans k;
  ErrorFixture() {
    ref::Rng rng(case_seed());
    k = make_kmeans(s, rng);
  }
};

TEST(KmeansErrors, ShapeErrors) {
  ErrorFixture f;
  auto& k = f.k;
  const Shape& s = f.s;
  const std::vector<const HostTensor*> outs = {&k.centroids, &k.labels, &k.sizes};
  TensorView rank3 = k.points.view;
  rank3.rank = 3;
  HostTensor wrong_d = ref::make_tensor(DType::F32, {s.B, s.H, s.C, s.D + 1});
  HostTensor wrong_b = ref::make_tensor(DType::F32, {s.B + 1, s.H, s.C, s.D});
  HostTensor wrong_h = ref::make_tensor(DType::F32, {s.B, s.H + 1, s.C, s.D});
  HostTensor labels_short = ref::make_tensor(DType::I32, {s.B, s.H, s.N - 1});
  HostTensor sizes_short = ref::make_tensor(DType::I32, {s.B, s.H, s.C - 1});
  HostTensor labels_rank4 = ref::make_tensor(DType::I32, {s.B, s.H, s.N, 1});
  HostTensor no_points = ref::make_tensor(DType::F32, {s.B, s.H, 0, s.D});
  // Centroids must be contiguous; labels need unit stride along N ([B,N,H] memory has stride H).
  HostTensor centroids_strided = ref::make_tensor(DType::F32, {s.B, s.H, s.C, s.D}, Layout::Transposed);
  HostTensor labels_strided = ref::make_tensor(DType::I32, {s.B, s.H, s.N}, Layout::Transposed);
  HostTensor sizes_strided = ref::make_tensor(DType::I32, {s.B, s.H, s.C}, Layout::Padded);
  const Stream st = kStream;

  EXPECT_ERROR_UNTOUCHED(ShapeError, outs, kmeans(rank3, k.centroids.view, k.labels.view, k.sizes.view, 1, st));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs, kmeans(k.points.view, wrong_d.view, k.labels.view, k.sizes.view, 1, st));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs, kmeans(k.points.view, wrong_b.view, k.labels.view, k.sizes.view, 1, st));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs, kmeans(k.points.view, wrong_h.view, k.labels.view, k.sizes.view, 1, st));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs,
                         kmeans(k.points.view, k.centroids.view, labels_short.view, k.sizes.view, 1, st));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs,
                         kmeans(k.points.view, k.centroids.view, k.labels.view, sizes_short.view, 1, st));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs,
                         kmeans(k.points.view, k.centroids.view, labels_rank4.view, k.sizes.view, 1, st));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs,
                         kmeans(k.points.view, centroids_strided.view, k.labels.view, k.sizes.view, 1, st));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs,
                         kmeans(k.points.view, k.centroids.view, labels_strided.view, k.sizes.view, 1, st));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs,
                         kmeans(k.points.view, k.centroids.view, k.labels.view, sizes_strided.view, 1, st));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs, kmeans_assign(k.points.view, k.centroids.view, labels_strided.view, st));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs, kmeans_assign(k.points.view, wrong_d.view, k.labels.view, st));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs, kmeans_assign(k.points.view, k.centroids.view, labels_short.view, st));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs, kmeans_assign(rank3, k.centroids.view, k.labels.view, st));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs,
                         kmeans_update(k.points.view, labels_short.view, k.centroids.view, k.sizes.view, st));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs, kmeans_update(k.points.view, k.labels.view, wrong_d.view, k.sizes.view, st));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs,
                         kmeans_update(k.points.view, k.labels.view, k.centroids.view, sizes_short.view, st));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs, kmeans_init(k.points.view, wrong_d.view, 0, st));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs, kmeans_init(k.points.view, wrong_b.view, 0, st));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs, kmeans_init(rank3, k.centroids.view, 0, st));
  // N >= 1 is part of the points contract.
  HostTensor labels0 = ref::make_tensor(DType::I32, {s.B, s.H, 0});
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs, kmeans_init(no_points.view, k.centroids.view, 0, st));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs, kmeans(no_points.view, k.centroids.view, labels0.view, k.sizes.view, 1, st));
}

TEST(KmeansErrors, DTypeErrors) {
  ErrorFixture f;
  auto& k = f.k;
  const Shape& s = f.s;
  const std::vector<const HostTensor*> outs = {&k.centroids, &k.labels, &k.sizes};
  HostTensor centroids_f16 = ref::make_tensor(DType::F16, {s.B, s.H, s.C, s.D});
  HostTensor centroids_bf16 = ref::make_tensor(DType::BF16, {s.B, s.H, s.C, s.D});
  HostTensor labels_f32 = ref::make_tensor(DType::F32, {s.B, s.H, s.N});
  HostTensor labels_u8 = ref::make_tensor(DType::U8, {s.B, s.H, s.N});
  HostTensor sizes_f32 = ref::make_tensor(DType::F32, {s.B, s.H, s.C});
  HostTensor points_i32 = ref::make_tensor(DType::I32, {s.B, s.H, s.N, s.D});
  const Stream st = kStream;
  EXPECT_ERROR_UNTOUCHED(DTypeError, outs,
                         kmeans(k.points.view, centroids_f16.view, k.labels.view, k.sizes.view, 1, st));
  EXPECT_ERROR_UNTOUCHED(DTypeError, outs,
                         kmeans(k.points.view, k.centroids.view, labels_f32.view, k.sizes.view, 1, st));
  EXPECT_ERROR_UNTOUCHED(DTypeError, outs,
                         kmeans(k.points.view, k.centroids.view, k.labels.view, sizes_f32.view, 1, st));
  EXPECT_ERROR_UNTOUCHED(DTypeError, outs,
                         kmeans(points_i32.view, k.centroids.view, k.labels.view, k.sizes.view, 1, st));
  EXPECT_ERROR_UNTOUCHED(DTypeError, outs, kmeans_init(k.points.view, centroids_bf16.view, 0, st));
  EXPECT_ERROR_UNTOUCHED(DTypeError, outs, kmeans_init(points_i32.view, k.centroids.view, 0, st));
  EXPECT_ERROR_UNTOUCHED(DTypeError, outs, kmeans_assign(k.points.view, centroids_f16.view, k.labels.view, st));
  EXPECT_ERROR_UNTOUCHED(DTypeError, outs, kmeans_assign(k.points.view, k.centroids.view, labels_u8.view, st));
  EXPECT_ERROR_UNTOUCHED(DTypeError, outs,
                         kmeans_update(k.points.view, labels_f32.view, k.centroids.view, k.sizes.view, st));
  EXPECT_ERROR_UNTOUCHED(DTypeError, outs,
                         kmeans_update(k.points.view, k.labels.view, k.centroids.view, sizes_f32.view, st));
}

TEST(KmeansErrors, InvalidArguments) {
  ErrorFixture f;
  auto& k = f.k;
  const Shape& s = f.s;
  const std::vector<const HostTensor*> outs = {&k.centroids, &k.sizes};
  std::vector<double> labels(static_cast<size_t>(s.B * s.H * s.N));
  for (size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<double>(i % s.C);
  for (double bad : {static_cast<double>(s.C), -1.0}) {
    labels[labels.size() / 2] = bad;  // one label out of [0, C)
    ref::from_vector(k.labels.view, labels);
    EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, outs,
                           kmeans_update(k.points.view, k.labels.view, k.centroids.view, k.sizes.view, kStream));
  }
  const std::vector<const HostTensor*> all = {&k.centroids, &k.labels, &k.sizes};
  EXPECT_ERROR_UNTOUCHED(InvalidArgumentError, all,
                         kmeans(k.points.view, k.centroids.view, k.labels.view, k.sizes.view, -1, kStream));
}

TEST(KmeansErrors, CudaTensorsAreUnsupported) {
  ErrorFixture f;
  auto& k = f.k;
  const std::vector<const HostTensor*> outs = {&k.centroids, &k.labels, &k.sizes};
  const Stream cuda{Device::cuda(0), nullptr, 0};
  EXPECT_ERROR_UNTOUCHED(
      UnsupportedError, outs,
      kmeans(ref::on_cuda(k.points.view), k.centroids.view, k.labels.view, k.sizes.view, 1, kStream));
  EXPECT_ERROR_UNTOUCHED(
      UnsupportedError, outs,
      kmeans(k.points.view, ref::on_cuda(k.centroids.view), k.labels.view, k.sizes.view, 1, kStream));
  EXPECT_ERROR_UNTOUCHED(UnsupportedError, outs,
                         kmeans_init(ref::on_cuda(k.points.view), k.centroids.view, 0, kStream));
  EXPECT_ERROR_UNTOUCHED(UnsupportedError, outs,
                         kmeans_assign(k.points.view, k.centroids.view, ref::on_cuda(k.labels.view), kStream));
  EXPECT_ERROR_UNTOUCHED(
      UnsupportedError, outs,
      kmeans_update(k.points.view, k.labels.view, k.centroids.view, ref::on_cuda(k.sizes.view), kStream));
#if !SAPATTN_HAS_CUDA
  // Every tensor on CUDA with a CUDA stream: a CPU-only build has no backend for it. (In a CUDA
  // build these host pointers would go to the GPU: tests/cuda covers that backend.)
  EXPECT_ERROR_UNTOUCHED(UnsupportedError, outs,
                         kmeans(ref::on_cuda(k.points.view), ref::on_cuda(k.centroids.view),
                                ref::on_cuda(k.labels.view), ref::on_cuda(k.sizes.view), 1, cuda));
#endif
  // CPU tensors on a CUDA stream.
  EXPECT_ERROR_UNTOUCHED(UnsupportedError, outs, kmeans_assign(k.points.view, k.centroids.view, k.labels.view, cuda));
}

}  // namespace
