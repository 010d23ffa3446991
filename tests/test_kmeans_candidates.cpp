// kmeans_assign_candidates (include/sapattn/ops.hpp) against an independent float64 reference of
// its contract and the properties it states: every centroid as a candidate is kmeans_assign, a
// label is never farther than the previous one's centroid, ties go to the lower index, and bad
// arguments throw typed errors with nothing written.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "reference.hpp"
#include "sapattn/ops.hpp"
#include "test_support.hpp"

namespace {

using namespace sapattn;
using namespace sapattn::testing_support;

struct Case {
  int64_t B, H, N, D, C;
  int candidates;
  DType dtype;
  Layout layout;
};

struct Inputs {
  HostTensor points, centroids, prev, labels;
};

// Points around C / 2 modes, centroids at noisy points (close second choices), previous labels at
// random: a point's best centroid is often outside its previous label's candidates.
Inputs make_inputs(const Case& c, ref::Rng& rng) {
  Inputs in;
  in.points = ref::make_tensor(c.dtype, {c.B, c.H, c.N, c.D}, c.layout);
  in.centroids = ref::make_tensor(DType::F32, {c.B, c.H, c.C, c.D});
  const int64_t modes = std::max<int64_t>(1, c.C / 2);
  std::vector<double> x(static_cast<size_t>(c.B * c.H * c.N * c.D));
  for (int64_t bh = 0; bh < c.B * c.H; ++bh) {
    std::vector<double> centers(static_cast<size_t>(modes * c.D));
    for (double& v : centers) v = 2.0 * rng.normal();
    for (int64_t i = 0; i < c.N; ++i) {
      const int64_t m = rng.integer(0, modes - 1);
      for (int64_t d = 0; d < c.D; ++d)
        x[static_cast<size_t>((bh * c.N + i) * c.D + d)] = centers[static_cast<size_t>(m * c.D + d)] + rng.normal();
    }
  }
  ref::from_vector(in.points.view, x);
  const std::vector<double> rounded = ref::to_vector(in.points.view);  // the values in the points' dtype
  std::vector<double> cent(static_cast<size_t>(c.B * c.H * c.C * c.D));
  for (int64_t bh = 0; bh < c.B * c.H; ++bh)
    for (int64_t j = 0; j < c.C; ++j) {
      const int64_t i = rng.integer(0, c.N - 1);
      for (int64_t d = 0; d < c.D; ++d)
        cent[static_cast<size_t>((bh * c.C + j) * c.D + d)] =
            rounded[static_cast<size_t>((bh * c.N + i) * c.D + d)] + 0.3 * rng.normal();
    }
  ref::from_vector(in.centroids.view, cent);
  in.prev = ref::make_tensor(DType::I32, {c.B, c.H, c.N});
  std::vector<double> prev(static_cast<size_t>(c.B * c.H * c.N));
  for (double& p : prev) p = static_cast<double>(rng.integer(0, c.C - 1));
  ref::from_vector(in.prev.view, prev);
  in.labels = ref::make_tensor(DType::I32, {c.B, c.H, c.N});
  ref::poison(in.labels);
  return in;
}

// The contract in float64: the candidates of cluster a are a and the m - 1 other centroids nearest
// to it (ties to the lower index); the label is the nearest candidate (ties to the lower index).
// Returns, per point, the float64 distance to every centroid ([B*H*N, C], row-major) and the
// candidate set as a mask ([B*H*N, C]).
struct Expected {
  std::vector<double> dist;
  std::vector<uint8_t> candidate;
};

Expected expected(const TensorView& points, const TensorView& centroids, const std::vector<int32_t>& prev, int m) {
  const int64_t BH = points.shape[0] * points.shape[1], N = points.shape[2], C = centroids.shape[2];
  const int64_t D = centroids.shape[3];
  Expected e;
  e.dist = ref::sq_distances(points, centroids);
  e.candidate.assign(static_cast<size_t>(BH * N * C), 0);
  const std::vector<double> cent = ref::to_vector(centroids);
  const int64_t take = std::min<int64_t>(m, C);
  for (int64_t bh = 0; bh < BH; ++bh) {
    std::vector<std::vector<int64_t>> lists(static_cast<size_t>(C));
    for (int64_t a = 0; a < C; ++a) {
      std::vector<std::pair<double, int64_t>> others;
      for (int64_t j = 0; j < C; ++j) {
        if (j == a) continue;
        double s = 0.0;
        for (int64_t d = 0; d < D; ++d) {
          const double diff =
              cent[static_cast<size_t>((bh * C + a) * D + d)] - cent[static_cast<size_t>((bh * C + j) * D + d)];
          s += diff * diff;
        }
        others.push_back({s, j});
      }
      std::sort(others.begin(), others.end());
      lists[static_cast<size_t>(a)].push_back(a);
      for (int64_t r = 0; r + 1 < take; ++r)
        lists[static_cast<size_t>(a)].push_back(others[static_cast<size_t>(r)].second);
    }
    for (int64_t i = 0; i < N; ++i) {
      const int64_t p = bh * N + i;
      for (int64_t j : lists[static_cast<size_t>(prev[static_cast<size_t>(p)])])
        e.candidate[static_cast<size_t>(p * C + j)] = 1;
    }
  }
  return e;
}

// Each label a candidate of its point, and no candidate nearer than it beyond the fp32 rounding
// bound (near-ties may go either way between fp32 and float64; the candidate lists' own near-ties
// are far rarer and are counted, not failed, when a list differs only there).
::testing::AssertionResult labels_match(const Inputs& in, const std::vector<int32_t>& got, int m) {
  const TensorView& pts = in.points.view;
  const int64_t C = in.centroids.view.shape[2];
  const std::vector<int32_t> prev = ref::to_i32(in.prev.view);
  const Expected e = expected(pts, in.centroids.view, prev, m);
  const std::vector<double> bound = ref::sq_distance_error_bound(pts, in.centroids.view);
  for (size_t p = 0; p < got.size(); ++p) {
    const int32_t l = got[p];
    if (l < 0 || l >= C) return ::testing::AssertionFailure() << "point " << p << ": label " << l;
    if (!e.candidate[p * C + l])
      return ::testing::AssertionFailure()
             << "point " << p << ": label " << l << " is not a candidate of cluster " << prev[p];
    for (int64_t j = 0; j < C; ++j) {
      if (!e.candidate[p * C + j] || j == l) continue;
      const double gap = e.dist[p * C + l] - e.dist[p * C + j];
      if (gap > bound[p * C + l] + bound[p * C + j])
        return ::testing::AssertionFailure() << "point " << p << ": label " << l << " at " << e.dist[p * C + l]
                                             << " but candidate " << j << " is at " << e.dist[p * C + j];
    }
  }
  return ::testing::AssertionSuccess();
}

// Every case draws its inputs first, from the seed of its own name (which describes the case).
class KmeansCandidates : public ::testing::TestWithParam<Case> {
 protected:
  const Case c = GetParam();
  ref::Rng rng{case_seed()};
  Inputs in = make_inputs(c, rng);
};

TEST_P(KmeansCandidates, LabelIsTheNearestCandidate) {
  const std::vector<uint8_t> cent_bytes = in.centroids.bytes(), prev_bytes = in.prev.bytes();
  kmeans_assign_candidates(in.points.view, in.centroids.view, in.prev.view, in.labels.view, c.candidates, kStream);
  EXPECT_EQ(ref::count_poisoned(in.labels.view), 0);
  EXPECT_TRUE(labels_match(in, ref::to_i32(in.labels.view), c.candidates));
  EXPECT_EQ(in.centroids.bytes(), cent_bytes);
  EXPECT_EQ(in.prev.bytes(), prev_bytes);
}

TEST_P(KmeansCandidates, EveryCentroidACandidateIsKmeansAssign) {
  HostTensor full = ref::make_tensor(DType::I32, {c.B, c.H, c.N});
  kmeans_assign(in.points.view, in.centroids.view, full.view, kStream);
  for (int m : {static_cast<int>(c.C), static_cast<int>(c.C) + 5}) {
    ref::poison(in.labels);
    kmeans_assign_candidates(in.points.view, in.centroids.view, in.prev.view, in.labels.view, m, kStream);
    EXPECT_EQ(ref::to_i32(in.labels.view), ref::to_i32(full.view)) << "candidates " << m;
  }
}

TEST_P(KmeansCandidates, NeverFartherThanThePreviousCentroid) {
  kmeans_assign_candidates(in.points.view, in.centroids.view, in.prev.view, in.labels.view, c.candidates, kStream);
  const std::vector<double> d = ref::sq_distances(in.points.view, in.centroids.view);
  const std::vector<double> bound = ref::sq_distance_error_bound(in.points.view, in.centroids.view);
  const std::vector<int32_t> prev = ref::to_i32(in.prev.view), got = ref::to_i32(in.labels.view);
  int64_t moved = 0;
  for (size_t p = 0; p < got.size(); ++p) {
    const size_t l = p * static_cast<size_t>(c.C) + static_cast<size_t>(got[p]);
    const size_t a = p * static_cast<size_t>(c.C) + static_cast<size_t>(prev[p]);
    ASSERT_LE(d[l], d[a] + bound[l] + bound[a]) << "point " << p;
    moved += got[p] != prev[p];
  }
  if (c.candidates > 1) {
    EXPECT_GT(moved, 0) << "random previous labels: some points must move";
  }
}

TEST_P(KmeansCandidates, PrevLabelsMayBeTheOutput) {
  kmeans_assign_candidates(in.points.view, in.centroids.view, in.prev.view, in.labels.view, c.candidates, kStream);
  kmeans_assign_candidates(in.points.view, in.centroids.view, in.prev.view, in.prev.view, c.candidates, kStream);
  EXPECT_EQ(ref::to_i32(in.prev.view), ref::to_i32(in.labels.view));
}

TEST_P(KmeansCandidates, ThreadCountIndependent) {
  HostTensor one = ref::make_tensor(DType::I32, {c.B, c.H, c.N});
  kmeans_assign_candidates(in.points.view, in.centroids.view, in.prev.view, in.labels.view, c.candidates, kStream);
  kmeans_assign_candidates(in.points.view, in.centroids.view, in.prev.view, one.view, c.candidates, Stream::cpu(1));
  EXPECT_EQ(ref::to_i32(one.view), ref::to_i32(in.labels.view));
}

const std::vector<Case> kCases = {
    {2, 2, 300, 32, 24, 4, DType::F32, Layout::Contiguous},
    {1, 3, 257, 64, 40, 8, DType::BF16, Layout::Transposed},
    {2, 1, 500, 27, 33, 1, DType::F16, Layout::TransposedPadded},  // m = 1 keeps every label
    {1, 2, 1100, 128, 50, 16, DType::BF16, Layout::Padded},        // several work chunks per head
    {1, 1, 40, 16, 3, 2, DType::F32, Layout::Contiguous},
};
INSTANTIATE_TEST_SUITE_P(Cases, KmeansCandidates, ::testing::ValuesIn(kCases), [](const auto& p) {
  const Case& c = p.param;
  return case_name("B" + std::to_string(c.B) + "H" + std::to_string(c.H), "N" + std::to_string(c.N),
                   "D" + std::to_string(c.D), "C" + std::to_string(c.C), "m" + std::to_string(c.candidates),
                   dtype_name(c.dtype), ref::layout_name(c.layout));
});

TEST(KmeansCandidatesRules, OneCandidateKeepsTheLabel) {
  const Case c{1, 2, 200, 16, 12, 1, DType::F32, Layout::Contiguous};
  ref::Rng rng(case_seed());
  Inputs in = make_inputs(c, rng);
  kmeans_assign_candidates(in.points.view, in.centroids.view, in.prev.view, in.labels.view, 1, kStream);
  EXPECT_EQ(ref::to_i32(in.labels.view), ref::to_i32(in.prev.view));
}

TEST(KmeansCandidatesRules, TiesGoToTheLowerIndex) {
  // Centroids 0 and 2 coincide, 1 is far: a point of cluster 2 with candidates {2, 0} (0 is 2's
  // nearest other, at distance 0) is equally near both and takes 0; with one candidate it stays.
  HostTensor points = ref::make_tensor(DType::F32, {1, 1, 2, 2});
  HostTensor centroids = ref::make_tensor(DType::F32, {1, 1, 3, 2});
  HostTensor prev = ref::make_tensor(DType::I32, {1, 1, 2});
  HostTensor labels = ref::make_tensor(DType::I32, {1, 1, 2});
  ref::from_vector(points.view, {1.0, 1.0, 9.0, 9.0});
  ref::from_vector(centroids.view, {0.0, 0.0, 10.0, 10.0, 0.0, 0.0});
  ref::from_vector(prev.view, {2, 1});
  kmeans_assign_candidates(points.view, centroids.view, prev.view, labels.view, 2, kStream);
  EXPECT_EQ(ref::to_i32(labels.view), (std::vector<int32_t>{0, 1}));
  kmeans_assign_candidates(points.view, centroids.view, prev.view, labels.view, 1, kStream);
  EXPECT_EQ(ref::to_i32(labels.view), (std::vector<int32_t>{2, 1}));
}

TEST(KmeansCandidatesRules, AMoveNeedsTheCentroidAmongTheCandidates) {
  // Point at 3.9 on a line of centroids 0, 1, 2, 3, 4 (at 0, 1, 2, 3, 4), previous label 0: with
  // 3 candidates ({0, 1, 2}) it moves to 2, with 5 to 4.
  HostTensor points = ref::make_tensor(DType::F32, {1, 1, 1, 1});
  HostTensor centroids = ref::make_tensor(DType::F32, {1, 1, 5, 1});
  HostTensor prev = ref::make_tensor(DType::I32, {1, 1, 1});
  HostTensor labels = ref::make_tensor(DType::I32, {1, 1, 1});
  ref::from_vector(points.view, {3.9});
  ref::from_vector(centroids.view, {0.0, 1.0, 2.0, 3.0, 4.0});
  ref::from_vector(prev.view, {0});
  kmeans_assign_candidates(points.view, centroids.view, prev.view, labels.view, 3, kStream);
  EXPECT_EQ(ref::to_i32(labels.view), (std::vector<int32_t>{2}));
  kmeans_assign_candidates(points.view, centroids.view, prev.view, labels.view, 5, kStream);
  EXPECT_EQ(ref::to_i32(labels.view), (std::vector<int32_t>{4}));
}

TEST(KmeansCandidatesErrors, BadArgumentsThrowAndWriteNothing) {
  const Case c{1, 2, 30, 8, 5, 2, DType::F32, Layout::Contiguous};
  ref::Rng rng(case_seed());
  Inputs in = make_inputs(c, rng);
  const std::vector<const HostTensor*> outs = {&in.labels, &in.centroids};
  const Stream st = kStream;
  EXPECT_ERROR_UNTOUCHED(
      InvalidArgumentError, outs,
      kmeans_assign_candidates(in.points.view, in.centroids.view, in.prev.view, in.labels.view, 0, st));
  EXPECT_THROW(kmeans_assign_candidates_workspace_bytes(2, 30, 5, 0, Device::cpu()), InvalidArgumentError);
  EXPECT_EQ(kmeans_assign_candidates_workspace_bytes(2, 30, 5, 4, Device::cpu()), 0u);
  HostTensor prev_short = ref::make_tensor(DType::I32, {c.B, c.H, c.N - 1});
  HostTensor prev_f32 = ref::make_tensor(DType::F32, {c.B, c.H, c.N});
  HostTensor prev_strided = ref::make_tensor(DType::I32, {c.B, c.H, c.N}, Layout::Transposed);
  HostTensor wrong_d = ref::make_tensor(DType::F32, {c.B, c.H, c.C, c.D + 1});
  EXPECT_ERROR_UNTOUCHED(
      ShapeError, outs,
      kmeans_assign_candidates(in.points.view, in.centroids.view, prev_short.view, in.labels.view, 2, st));
  EXPECT_ERROR_UNTOUCHED(
      DTypeError, outs,
      kmeans_assign_candidates(in.points.view, in.centroids.view, prev_f32.view, in.labels.view, 2, st));
  EXPECT_ERROR_UNTOUCHED(
      ShapeError, outs,
      kmeans_assign_candidates(in.points.view, in.centroids.view, prev_strided.view, in.labels.view, 2, st));
  EXPECT_ERROR_UNTOUCHED(ShapeError, outs,
                         kmeans_assign_candidates(in.points.view, wrong_d.view, in.prev.view, in.labels.view, 2, st));
  for (double bad : {static_cast<double>(c.C), -1.0}) {
    std::vector<double> prev(static_cast<size_t>(c.B * c.H * c.N), 0.0);
    prev[prev.size() / 2] = bad;
    ref::from_vector(in.prev.view, prev);
    EXPECT_ERROR_UNTOUCHED(
        InvalidArgumentError, outs,
        kmeans_assign_candidates(in.points.view, in.centroids.view, in.prev.view, in.labels.view, 2, st));
  }
  // A CUDA tensor with a CPU stream: a typed refusal.
  EXPECT_ERROR_UNTOUCHED(
      UnsupportedError, outs,
      kmeans_assign_candidates(ref::on_cuda(in.points.view), in.centroids.view, in.prev.view, in.labels.view, 2, st));
}

}  // namespace
