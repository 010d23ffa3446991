// order_clusters: the greedy nearest-neighbour chain it promises (checked step by step in float64),
// a known answer, that only the numbering moves (centroids, sizes and every token's cluster stay
// together), empty clusters last, strided labels, and its errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "reference.hpp"
#include "sapattn/ops.hpp"
#include "test_support.hpp"

namespace {

using namespace sapattn;
using ref::HostTensor;
using testing_support::case_seed;
using testing_support::kStream;

struct Problem {
  int64_t B, H, C, D, N;
  HostTensor centroids, sizes, labels;
};

// Random centroids; labels drawn so that sizes count them, with about a fifth of the clusters empty.
Problem make_problem(int64_t B, int64_t H, int64_t C, int64_t D, int64_t N, ref::Rng& rng) {
  Problem p{B, H, C, D, N, ref::make_tensor(DType::F32, {B, H, C, D}), ref::make_tensor(DType::I32, {B, H, C}),
            ref::make_tensor(DType::I32, {B, H, N})};
  ref::fill_normal(p.centroids.view, rng);
  auto* size = static_cast<int32_t*>(p.sizes.view.data);
  auto* label = static_cast<int32_t*>(p.labels.view.data);
  for (int64_t bh = 0; bh < B * H; ++bh) {
    std::vector<int32_t> used;
    for (int64_t c = 0; c < C; ++c)
      if (rng.uniform() > 0.2) used.push_back(static_cast<int32_t>(c));
    std::fill(size + bh * C, size + (bh + 1) * C, 0);
    for (int64_t i = 0; i < N; ++i) {
      const int32_t c = used.empty() ? 0 : used[static_cast<size_t>(rng.integer(0, static_cast<int64_t>(used.size()) - 1))];
      label[bh * N + i] = c;
      ++size[bh * C + c];
    }
  }
  return p;
}

const float* row(const HostTensor& t, int64_t bh, int64_t c) {
  const int64_t C = t.view.shape[2], D = t.view.shape[3];
  return static_cast<const float*>(t.view.data) + (bh * C + c) * D;
}

double cosine(const float* a, const float* b, int64_t D) {
  double ab = 0, aa = 0, bb = 0;
  for (int64_t d = 0; d < D; ++d) {
    ab += static_cast<double>(a[d]) * b[d];
    aa += static_cast<double>(a[d]) * a[d];
    bb += static_cast<double>(b[d]) * b[d];
  }
  return aa > 0 && bb > 0 ? ab / std::sqrt(aa * bb) : 0.0;
}

// The old cluster now numbered p, recovered from the moved centroid rows (all distinct here).
std::vector<int64_t> recover_order(const Problem& before, const HostTensor& after, int64_t bh) {
  std::vector<int64_t> order;
  for (int64_t p = 0; p < before.C; ++p) {
    int64_t found = -1;
    for (int64_t c = 0; c < before.C && found < 0; ++c)
      if (std::memcmp(row(after, bh, p), row(before.centroids, bh, c), sizeof(float) * before.D) == 0) found = c;
    order.push_back(found);
  }
  return order;
}

HostTensor copy_of(const HostTensor& t) {
  HostTensor c = ref::make_tensor(t.view.dtype, std::vector<int64_t>(t.view.shape.begin(), t.view.shape.begin() + t.view.rank));
  std::memcpy(c.view.data, t.view.data, static_cast<size_t>(t.view.numel()) * dtype_size(t.view.dtype));
  return c;
}

TEST(ClusterOrder, IsTheNearestNeighbourChainAndOnlyRenumbers) {
  ref::Rng rng(case_seed());
  const Problem before = make_problem(2, 3, 37, 20, 500, rng);
  HostTensor cent = copy_of(before.centroids), sizes = copy_of(before.sizes), labels = copy_of(before.labels);
  order_clusters(cent.view, sizes.view, labels.view, kStream);
  const auto* old_size = static_cast<const int32_t*>(before.sizes.view.data);
  const auto* new_size = static_cast<const int32_t*>(sizes.view.data);
  const auto* old_label = static_cast<const int32_t*>(before.labels.view.data);
  const auto* new_label = static_cast<const int32_t*>(labels.view.data);
  for (int64_t bh = 0; bh < 6; ++bh) {
    const std::vector<int64_t> order = recover_order(before, cent, bh);
    std::vector<int64_t> sorted = order;
    std::sort(sorted.begin(), sorted.end());
    ASSERT_EQ(sorted, [&] { std::vector<int64_t> v(37); std::iota(v.begin(), v.end(), 0); return v; }())
        << "head " << bh << ": the centroids are not a permutation of the old ones";
    std::vector<bool> visited(37, false);
    int64_t non_empty = 0;
    for (int64_t c = 0; c < 37; ++c) non_empty += old_size[bh * 37 + c] > 0;
    for (int64_t p = 0; p < 37; ++p) {
      const int64_t c = order[static_cast<size_t>(p)];
      EXPECT_EQ(new_size[bh * 37 + p], old_size[bh * 37 + c]) << "head " << bh << " position " << p;
      if (p >= non_empty) {  // empty clusters last, in index order
        EXPECT_EQ(old_size[bh * 37 + c], 0);
        if (p > non_empty) {
          EXPECT_GT(c, order[static_cast<size_t>(p - 1)]);
        }
        continue;
      }
      ASSERT_GT(old_size[bh * 37 + c], 0) << "an empty cluster inside the chain";
      if (p == 0) {
        int64_t first = 0;
        while (old_size[bh * 37 + first] == 0) ++first;
        EXPECT_EQ(c, first) << "the chain starts at the lowest non-empty cluster";
      } else {
        // The most similar unvisited non-empty cluster to the previous one (up to float rounding).
        const int64_t prev = order[static_cast<size_t>(p - 1)];
        double best = -2;
        for (int64_t o = 0; o < 37; ++o)
          if (!visited[static_cast<size_t>(o)] && old_size[bh * 37 + o] > 0 && o != prev)
            best = std::max(best, cosine(row(before.centroids, bh, prev), row(before.centroids, bh, o), 20));
        EXPECT_GE(cosine(row(before.centroids, bh, prev), row(before.centroids, bh, c), 20), best - 1e-5)
            << "head " << bh << " step " << p;
      }
      visited[static_cast<size_t>(c)] = true;
    }
    // Every token keeps its cluster: its new label names the moved row of its old one.
    for (int64_t i = 0; i < 500; ++i) {
      const int32_t nl = new_label[bh * 500 + i];
      ASSERT_TRUE(nl >= 0 && nl < 37);
      EXPECT_EQ(order[static_cast<size_t>(nl)], old_label[bh * 500 + i]) << "head " << bh << " token " << i;
    }
  }
}

TEST(ClusterOrder, KnownAnswerOnDirectionsInAPlane) {
  // Unit directions at 0, 60, 10, 50 and 20 degrees (cosine similarity orders them by angle), and a
  // cluster 5 that is empty: the chain from cluster 0 is 0, 2 (10), 4 (20), 3 (50), 1 (60), then 5.
  const double deg[] = {0, 60, 10, 50, 20, 30};
  HostTensor cent = ref::make_tensor(DType::F32, {1, 1, 6, 2}), sizes = ref::make_tensor(DType::I32, {1, 1, 6}),
             labels = ref::make_tensor(DType::I32, {1, 1, 5});
  for (int c = 0; c < 6; ++c) {
    ref::set(cent.view, {0, 0, c, 0}, 3.0 * std::cos(deg[c] * M_PI / 180));
    ref::set(cent.view, {0, 0, c, 1}, 3.0 * std::sin(deg[c] * M_PI / 180));
    ref::set(sizes.view, {0, 0, c}, c == 5 ? 0 : 1);
  }
  for (int i = 0; i < 5; ++i) ref::set(labels.view, {0, 0, i}, i);
  order_clusters(cent.view, sizes.view, labels.view, kStream);
  EXPECT_EQ(ref::to_i32(labels.view), (std::vector<int32_t>{0, 4, 1, 3, 2}));
  EXPECT_EQ(ref::to_i32(sizes.view), (std::vector<int32_t>{1, 1, 1, 1, 1, 0}));
  EXPECT_NEAR(ref::get(cent.view, {0, 0, 2, 1}), 3.0 * std::sin(20 * M_PI / 180), 1e-6);
  EXPECT_NEAR(ref::get(cent.view, {0, 0, 5, 1}), 3.0 * std::sin(30 * M_PI / 180), 1e-6);
}

TEST(ClusterOrder, StridedLabelsAndAllEmpty) {
  ref::Rng rng(case_seed());
  // Labels as the video part of a longer [B, H, N + 7] tensor: the tail is not touched.
  const Problem p = make_problem(1, 2, 9, 8, 40, rng);
  HostTensor longer = ref::make_tensor(DType::I32, {1, 2, 47});
  auto* l = static_cast<int32_t*>(longer.view.data);
  for (int64_t h = 0; h < 2; ++h)
    for (int64_t i = 0; i < 47; ++i) l[h * 47 + i] = i < 40 ? static_cast<const int32_t*>(p.labels.view.data)[h * 40 + i] : -7;
  HostTensor cent = copy_of(p.centroids), sizes = copy_of(p.sizes), contiguous = copy_of(p.labels);
  order_clusters(cent.view, sizes.view, contiguous.view, kStream);
  HostTensor cent2 = copy_of(p.centroids), sizes2 = copy_of(p.sizes);
  order_clusters(cent2.view, sizes2.view, longer.view.slice(2, 0, 40), kStream);
  for (int64_t h = 0; h < 2; ++h)
    for (int64_t i = 0; i < 47; ++i)
      EXPECT_EQ(l[h * 47 + i], i < 40 ? static_cast<const int32_t*>(contiguous.view.data)[h * 40 + i] : -7);
  // No non-empty cluster: the numbering stays.
  std::memset(sizes.view.data, 0, sizeof(int32_t) * 18);
  HostTensor before = copy_of(cent);
  order_clusters(cent.view, sizes.view, ref::make_tensor(DType::I32, {1, 2, 0}).view, kStream);
  EXPECT_EQ(std::memcmp(cent.view.data, before.view.data, sizeof(float) * 144), 0);
}

TEST(ClusterOrder, Errors) {
  ref::Rng rng(case_seed());
  Problem p = make_problem(1, 2, 5, 4, 10, rng);
  // A label outside [0, C): a typed error, and nothing changed.
  HostTensor cent = copy_of(p.centroids), labels = copy_of(p.labels);
  static_cast<int32_t*>(labels.view.data)[13] = 5;
  EXPECT_THROW(order_clusters(cent.view, p.sizes.view, labels.view, kStream), InvalidArgumentError);
  EXPECT_EQ(std::memcmp(cent.view.data, p.centroids.view.data, sizeof(float) * 40), 0);
  HostTensor f16 = ref::make_tensor(DType::F16, {1, 2, 5, 4});
  EXPECT_THROW(order_clusters(f16.view, p.sizes.view, p.labels.view, kStream), DTypeError);
  HostTensor sizes_f32 = ref::make_tensor(DType::F32, {1, 2, 5});
  EXPECT_THROW(order_clusters(p.centroids.view, sizes_f32.view, p.labels.view, kStream), DTypeError);
  HostTensor short_sizes = ref::make_tensor(DType::I32, {1, 2, 4});
  EXPECT_THROW(order_clusters(p.centroids.view, short_sizes.view, p.labels.view, kStream), ShapeError);
  HostTensor other_heads = ref::make_tensor(DType::I32, {1, 3, 10});
  EXPECT_THROW(order_clusters(p.centroids.view, p.sizes.view, other_heads.view, kStream), ShapeError);
  EXPECT_THROW(order_clusters_workspace_bytes(-1, 5, 4, Device::cpu()), InvalidArgumentError);
  EXPECT_EQ(order_clusters_workspace_bytes(2, 5, 4, Device::cpu()), 0u);
}

}  // namespace
