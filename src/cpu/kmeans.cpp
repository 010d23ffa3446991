// k-means on the CPU: the reference. Distances are computed as sums of squared differences in
// fp32 (not ||x||^2 - 2x.c + ||c||^2, whose cancellation would blur near-ties), and centroid means
// are accumulated in fp64, so the GPU backend is compared against the most accurate version.
#include <algorithm>
#include <limits>
#include <numeric>
#include <vector>

#include "core/parallel.hpp"
#include "cpu/backend.hpp"
#include "cpu/rows.hpp"
#include "sapattn/error.hpp"

namespace sapattn::cpu {

namespace {

uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Squared distance with 8 independent partial sums, so the compiler vectorises it without
// reassociating (the result is the same on every run and thread count).
float squared_distance(const float* x, const float* c, int64_t D) {
  float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int j = 0; j < 8; ++j) {
      const float diff = x[d + j] - c[d + j];
      part[j] += diff * diff;
    }
  for (; d < D; ++d) {
    const float diff = x[d] - c[d];
    part[0] += diff * diff;
  }
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

constexpr int64_t kAssignChunk = 256;  // points per task: ~100 tasks per head at S = 32k

}  // namespace

void kmeans_init(const TensorView& points, TensorView centroids, uint64_t seed, const int32_t* sample_ids,
                 int threads) {
  const int64_t B = points.shape[0], H = points.shape[1], N = points.shape[2], D = points.shape[3];
  const int64_t C = centroids.shape[2];
  parallel_for(B * H, threads, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    const uint64_t id = sample_ids != nullptr ? static_cast<uint64_t>(sample_ids[bh]) : static_cast<uint64_t>(bh);
    std::vector<uint64_t> key(N);
    for (int64_t i = 0; i < N; ++i) key[i] = splitmix64(seed ^ splitmix64((id << 32) + i));
    std::vector<int64_t> order(N);
    std::iota(order.begin(), order.end(), 0);
    auto by_key = [&](int64_t a, int64_t c) { return key[a] != key[c] ? key[a] < key[c] : a < c; };
    const int64_t take = std::min(C, N);
    std::partial_sort(order.begin(), order.begin() + take, order.end(), by_key);
    float* out = &at<float>(centroids, b, h);
    for (int64_t c = 0; c < C; ++c) load_row(points, b, h, order[c % N], out + c * D);
  });
}

void kmeans_assign(const TensorView& points, const TensorView& centroids, TensorView labels, int threads) {
  const int64_t B = points.shape[0], H = points.shape[1], N = points.shape[2], D = points.shape[3];
  const int64_t C = centroids.shape[2];
  const int64_t chunks = (N + kAssignChunk - 1) / kAssignChunk;
  parallel_for(B * H * chunks, threads, [&](int64_t task) {
    const int64_t bh = task / chunks, b = bh / H, h = bh % H;
    const int64_t lo = (task % chunks) * kAssignChunk, hi = std::min(N, lo + kAssignChunk);
    const float* cent = &at<float>(centroids, b, h);
    int32_t* lab = &at<int32_t>(labels, b, h);
    std::vector<float> x(D);
    for (int64_t i = lo; i < hi; ++i) {
      load_row(points, b, h, i, x.data());
      float best = std::numeric_limits<float>::infinity();
      int32_t arg = 0;
      for (int64_t c = 0; c < C; ++c) {
        const float dist = squared_distance(x.data(), cent + c * D, D);
        if (dist < best) {  // strict: ties keep the lower index
          best = dist;
          arg = static_cast<int32_t>(c);
        }
      }
      lab[i] = arg;
    }
  });
}

void kmeans_update(const TensorView& points, const TensorView& labels, TensorView centroids, TensorView sizes,
                   bool move_centroids, int threads) {
  const int64_t B = points.shape[0], H = points.shape[1], N = points.shape[2], D = points.shape[3];
  const int64_t C = centroids.shape[2];
  check_index_range(labels, C, "labels");
  parallel_for(B * H, threads, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    const int32_t* lab = &at<int32_t>(labels, b, h);
    int32_t* count = &at<int32_t>(sizes, b, h);
    std::fill(count, count + C, 0);
    for (int64_t i = 0; i < N; ++i) ++count[lab[i]];
    if (!move_centroids) return;
    std::vector<double> sum(C * D, 0.0);
    std::vector<float> x(D);
    for (int64_t i = 0; i < N; ++i) {
      load_row(points, b, h, i, x.data());
      double* s = sum.data() + lab[i] * D;
      for (int64_t d = 0; d < D; ++d) s[d] += x[d];
    }
    float* cent = &at<float>(centroids, b, h);
    for (int64_t c = 0; c < C; ++c) {
      if (count[c] == 0) continue;  // an empty cluster keeps its centroid
      for (int64_t d = 0; d < D; ++d) cent[c * D + d] = static_cast<float>(sum[c * D + d] / count[c]);
    }
  });
}

}  // namespace sapattn::cpu
