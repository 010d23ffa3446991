// k-means on the CPU: the reference. Distances are computed as sums of squared differences in
// fp32 (not ||x||^2 - 2x.c + ||c||^2, whose cancellation would blur near-ties), and centroid means
// are accumulated in fp64, so the GPU backend is compared against the most accurate version.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "core/kmeans_seeding.hpp"
#include "core/parallel.hpp"
#include "core/splitmix64.hpp"
#include "cpu/backend.hpp"
#include "cpu/rows.hpp"
#include "cpu/squared_distance.hpp"
#include "sapattn/error.hpp"

namespace sapattn::cpu {

namespace {

constexpr int64_t kAssignChunk = 256;  // points per task: ~100 tasks per head at S = 32k

uint64_t problem_id(const int32_t* sample_ids, int64_t bh) {
  return sample_ids != nullptr ? static_cast<uint64_t>(sample_ids[bh]) : static_cast<uint64_t>(bh);
}

// kmeans_init's order of the N points of problem `id`, its first `take` entries sorted: point i has
// the key splitmix64(seed ^ splitmix64(id * 2^32 + i)), ties by index.
std::vector<int64_t> sample_order(int64_t N, uint64_t seed, uint64_t id, int64_t take) {
  std::vector<uint64_t> key(N);
  for (int64_t i = 0; i < N; ++i) key[i] = splitmix64(seed ^ splitmix64((id << 32) + i));
  std::vector<int64_t> order(N);
  std::iota(order.begin(), order.end(), 0);
  auto by_key = [&](int64_t a, int64_t c) { return key[a] != key[c] ? key[a] < key[c] : a < c; };
  std::partial_sort(order.begin(), order.begin() + take, order.end(), by_key);
  order.resize(take);
  return order;
}

// Greedy k-means++ on the M rows of xs ([M, D] fp32, sample order) into C centroid rows of `out`,
// as include/sapattn/ops.hpp specifies kmeans_seed_greedy (here 1 <= C <= M).
void greedy_seeds(const std::vector<float>& xs, int64_t M, int64_t D, int64_t C, int trials, uint64_t seed, uint64_t id,
                  float* out) {
  using namespace seeding;
  const float* x = xs.data();
  std::copy(x, x + D, out);
  std::vector<float> d2(M), candidate(M), best(M);
  float max_finite = 0.0f;
  for (int64_t i = 0; i < M; ++i) {
    d2[i] = squared_distance(x + i * D, x, D);
    if (d2[i] <= std::numeric_limits<float>::max() && d2[i] > max_finite) max_finite = d2[i];
  }
  const int bits = sample_bits(M);
  const int exponent = fixed_point_exponent(max_finite, bits);
  std::vector<uint64_t> prefix(M);  // inclusive running sums of q(D2) in sample order
  for (int64_t step = 1; step < C; ++step) {
    uint64_t total = 0;
    for (int64_t i = 0; i < M; ++i) prefix[i] = total += to_fixed(d2[i], exponent, bits);
    uint64_t best_potential = 0;
    int64_t best_index = -1;
    for (int t = 0; t < trials; ++t) {
      const uint64_t target = draw_target(total, draw(seed, id, static_cast<uint64_t>(step), static_cast<uint64_t>(t)));
      const int64_t j =
          std::min<int64_t>(std::upper_bound(prefix.begin(), prefix.end(), target) - prefix.begin(), M - 1);
      uint64_t potential = 0;
      for (int64_t i = 0; i < M; ++i) {
        candidate[i] = min_distance(d2[i], squared_distance(x + i * D, x + j * D, D));
        potential += to_fixed(candidate[i], exponent, bits);
      }
      if (best_index < 0 || potential < best_potential) {  // strict: ties keep the lower trial
        best_potential = potential;
        best_index = j;
        best.swap(candidate);
      }
    }
    d2.swap(best);
    std::copy(x + best_index * D, x + (best_index + 1) * D, out + step * D);
  }
}

}  // namespace

void kmeans_init(const TensorView& points, TensorView centroids, uint64_t seed, const int32_t* sample_ids,
                 int threads) {
  const int64_t B = points.shape[0], H = points.shape[1], N = points.shape[2], D = points.shape[3];
  const int64_t C = centroids.shape[2];
  parallel_for(B * H, threads, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    const std::vector<int64_t> order = sample_order(N, seed, problem_id(sample_ids, bh), std::min(C, N));
    float* out = &at<float>(centroids, b, h);
    for (int64_t c = 0; c < C; ++c) load_row(points, b, h, order[c % N], out + c * D);
  });
}

void kmeans_seed_greedy(const TensorView& points, TensorView centroids, uint64_t seed, int sample_factor,
                        const int32_t* sample_ids, int threads) {
  const int64_t C = centroids.shape[2], N = points.shape[2];
  if (C >= N) return kmeans_init(points, centroids, seed, sample_ids, threads);
  const int64_t B = points.shape[0], H = points.shape[1], D = points.shape[3];
  const int64_t M = std::min(N, sample_factor * C);
  const int trials = seeding::greedy_trials(C);
  parallel_for(B * H, threads, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    const uint64_t id = problem_id(sample_ids, bh);
    const std::vector<int64_t> order = sample_order(N, seed, id, M);
    std::vector<float> xs(static_cast<size_t>(M * D));
    for (int64_t i = 0; i < M; ++i) load_row(points, b, h, order[i], xs.data() + i * D);
    greedy_seeds(xs, M, D, C, trials, seed, id, &at<float>(centroids, b, h));
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

// Row a of `lists` ([C, m]): the candidates of cluster a, centroid a and the m - 1 other centroids
// nearest to it by the fp32 squared distance (ties to the lower index), in ascending index order:
// the order in which a point scans them, so that a strict comparison keeps the lower index on ties.
void candidate_lists(const float* cent, int64_t C, int64_t D, int64_t m, int32_t* lists) {
  std::vector<std::pair<float, int32_t>> others(static_cast<size_t>(C - 1));
  for (int64_t a = 0; a < C; ++a) {
    size_t n = 0;
    for (int64_t j = 0; j < C; ++j)
      if (j != a) others[n++] = {squared_distance(cent + a * D, cent + j * D, D), static_cast<int32_t>(j)};
    // (distance, index) pairs order as "nearer, then lower index"; a NaN distance sorts last.
    auto nearer = [](const std::pair<float, int32_t>& x, const std::pair<float, int32_t>& y) {
      const bool xn = std::isnan(x.first), yn = std::isnan(y.first);
      if (xn != yn) return yn;
      return (!xn && x.first != y.first) ? x.first < y.first : x.second < y.second;
    };
    std::partial_sort(others.begin(), others.begin() + (m - 1), others.end(), nearer);
    int32_t* row = lists + a * m;
    row[0] = static_cast<int32_t>(a);
    for (int64_t r = 1; r < m; ++r) row[r] = others[static_cast<size_t>(r - 1)].second;
    std::sort(row, row + m);
  }
}

void kmeans_assign_candidates(const TensorView& points, const TensorView& centroids, const TensorView& prev_labels,
                              TensorView labels, int candidates, int threads) {
  const int64_t B = points.shape[0], H = points.shape[1], N = points.shape[2], D = points.shape[3];
  const int64_t C = centroids.shape[2];
  const int64_t m = std::min<int64_t>(candidates, C);
  check_index_range(prev_labels, C, "prev_labels");
  std::vector<int32_t> lists(static_cast<size_t>(B * H * C * m));
  parallel_for(B * H, threads, [&](int64_t bh) {
    candidate_lists(&at<float>(centroids, bh / H, bh % H), C, D, m, lists.data() + bh * C * m);
  });
  // prev_labels may alias labels: each point reads its previous label before writing its new one.
  const int64_t chunks = (N + kAssignChunk - 1) / kAssignChunk;
  parallel_for(B * H * chunks, threads, [&](int64_t task) {
    const int64_t bh = task / chunks, b = bh / H, h = bh % H;
    const int64_t lo = (task % chunks) * kAssignChunk, hi = std::min(N, lo + kAssignChunk);
    const float* cent = &at<float>(centroids, b, h);
    const int32_t* prev = &at<int32_t>(prev_labels, b, h);
    int32_t* lab = &at<int32_t>(labels, b, h);
    std::vector<float> x(D);
    for (int64_t i = lo; i < hi; ++i) {
      load_row(points, b, h, i, x.data());
      const int32_t* list = lists.data() + (bh * C + prev[i]) * m;
      float best = std::numeric_limits<float>::infinity();
      int32_t arg = list[0];
      for (int64_t r = 0; r < m; ++r) {
        const int32_t c = list[r];
        const float dist = squared_distance(x.data(), cent + c * D, D);
        if (dist < best) {
          best = dist;
          arg = c;
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
