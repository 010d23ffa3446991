// Block selection on the CPU: the size-weighted centroid softmax and the per-row top-p rule.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "core/parallel.hpp"
#include "cpu/backend.hpp"
#include "cpu/rows.hpp"
#include "sapattn/error.hpp"

namespace sapattn::cpu {

namespace {

// Keeps the shortest descending-weight prefix of one row whose fp32 running sum reaches top_p
// (at least one entry, at least min_kept). Writes all C entries of the mask row.
void keep_top_p_row(const float* w, int64_t w_stride, int64_t C, float top_p, int64_t min_kept, uint8_t* mask,
                    int64_t mask_stride, std::vector<int32_t>& order) {
  // A NaN weight (from a NaN or Inf centroid) cannot be ranked: such a row keeps every cluster, so
  // that the NaN reaches its queries' outputs as in dense attention instead of an empty row's 0.
  bool ranked = true;
  for (int64_t c = 0; c < C; ++c) ranked = ranked && !std::isnan(w[c * w_stride]);
  if (top_p >= 1.0f || !ranked) {
    for (int64_t c = 0; c < C; ++c) mask[c * mask_stride] = 1;
    return;
  }
  order.resize(C);
  std::iota(order.begin(), order.end(), 0);
  // Stable sort on an index-ordered array: equal weights keep the lower index first.
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return w[a * w_stride] > w[b * w_stride]; });
  int64_t kept = C;  // if rounding keeps the sum below top_p, every cluster is kept
  float running = 0.0f;
  for (int64_t r = 0; r < C; ++r) {
    running += w[order[r] * w_stride];
    if (running >= top_p) {
      kept = r + 1;
      break;
    }
  }
  kept = std::min<int64_t>(C, std::max(kept, min_kept));
  for (int64_t c = 0; c < C; ++c) mask[c * mask_stride] = 0;
  for (int64_t r = 0; r < kept; ++r) mask[order[r] * mask_stride] = 1;
}

}  // namespace

void select_top_p(const TensorView& probs, float top_p, int min_kept, TensorView mask, int threads) {
  const int64_t B = probs.shape[0], H = probs.shape[1], R = probs.shape[2], C = probs.shape[3];
  parallel_for(B * H, threads, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    std::vector<int32_t> order;
    for (int64_t r = 0; r < R; ++r)
      keep_top_p_row(&at<float>(probs, b, h, r), probs.stride[3], C, top_p, min_kept, &at<uint8_t>(mask, b, h, r),
                     mask.stride[3], order);
  });
}

namespace {

// One row of the size-weighted centroid softmax: weight[j] = |K_j| exp(S_j - m) / sum, m the max
// over non-empty key clusters. Returns false (weights all 0) when every key cluster is empty. A
// non-finite score of a non-empty cluster (NaN or Inf in the inputs) makes every weight NaN.
bool centroid_prob_row(const float* cq, const float* ck, const int32_t* size, int64_t Ck, int64_t D, float scale,
                       std::vector<float>& score, float* weight) {
  float row_max = -std::numeric_limits<float>::infinity();
  bool finite = true;
  for (int64_t j = 0; j < Ck; ++j) {
    float dot = 0.0f;
    for (int64_t d = 0; d < D; ++d) dot += cq[d] * ck[j * D + d];
    score[j] = dot * scale;
    if (size[j] > 0) {
      row_max = std::max(row_max, score[j]);
      finite = finite && std::isfinite(score[j]);
    }
  }
  if (!finite) {
    std::fill(weight, weight + Ck, std::numeric_limits<float>::quiet_NaN());
    return true;
  }
  if (row_max == -std::numeric_limits<float>::infinity()) {  // every key cluster is empty
    std::fill(weight, weight + Ck, 0.0f);
    return false;
  }
  // exp in double, rounded once: the correctly rounded fp32 value, as the CUDA backend computes it
  // (glibc's expf misses it for a few inputs in a million, enough to differ in one of 44,000 weights).
  float total = 0.0f;
  for (int64_t j = 0; j < Ck; ++j) {
    const float e = static_cast<float>(std::exp(static_cast<double>(score[j] - row_max)));
    weight[j] = size[j] > 0 ? static_cast<float>(size[j]) * e : 0.0f;
    total += weight[j];
  }
  for (int64_t j = 0; j < Ck; ++j) weight[j] /= total;
  return true;
}

// Calls row(b, h, a, any, weights, order) for every query-cluster row of every (b,h), in parallel
// over (b,h); `any` is false when every key cluster is empty, `order` is the task's scratch.
template <typename RowFn>
void for_each_prob_row(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& k_sizes,
                       float scale, int threads, RowFn&& row) {
  check_sizes_nonnegative(k_sizes, "k_sizes");
  const int64_t B = q_centroids.shape[0], H = q_centroids.shape[1];
  const int64_t Cq = q_centroids.shape[2], Ck = k_centroids.shape[2], D = q_centroids.shape[3];
  parallel_for(B * H, threads, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    const float* cq = &at<float>(q_centroids, b, h);
    const float* ck = &at<float>(k_centroids, b, h);
    const int32_t* size = &at<int32_t>(k_sizes, b, h);
    std::vector<float> score(Ck), weight(Ck);
    std::vector<int32_t> order;
    for (int64_t a = 0; a < Cq; ++a) {
      const bool any = centroid_prob_row(cq + a * D, ck, size, Ck, D, scale, score, weight.data());
      row(b, h, a, any, weight.data(), order);
    }
  });
}

}  // namespace

void centroid_probs(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& k_sizes,
                    float scale, TensorView probs, int threads) {
  const int64_t Ck = k_centroids.shape[2];
  for_each_prob_row(q_centroids, k_centroids, k_sizes, scale, threads,
                    [&](int64_t b, int64_t h, int64_t a, bool, const float* weight, std::vector<int32_t>&) {
                      for (int64_t j = 0; j < Ck; ++j) at<float>(probs, b, h, a, j) = weight[j];
                    });
}

void select_top_p_at_density(const TensorView& probs, const TensorView& q_sizes, const TensorView& k_sizes,
                             float density, int min_kept, TensorView mask, int threads) {
  const int64_t B = probs.shape[0], H = probs.shape[1], R = probs.shape[2], C = probs.shape[3];
  check_sizes_nonnegative(q_sizes, "q_sizes");
  check_sizes_nonnegative(k_sizes, "k_sizes");
  parallel_for(B * H, threads, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    // Per row, in rank order: the fp32 running sums keep_top_p_row compares with top_p, and the
    // running key counts, so that the area kept at any top_p is one search per row.
    std::vector<float> running(R * C);
    std::vector<int64_t> keys(R * (C + 1), 0);
    std::vector<int32_t> order(C);
    int64_t q_total = 0, k_total = 0;
    for (int64_t j = 0; j < C; ++j) k_total += at<int32_t>(k_sizes, b, h, j);
    for (int64_t r = 0; r < R; ++r) {
      const float* w = &at<float>(probs, b, h, r);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [&](int32_t x, int32_t y) { return w[x * probs.stride[3]] > w[y * probs.stride[3]]; });
      float sum = 0.0f;
      for (int64_t i = 0; i < C; ++i) {
        running[r * C + i] = sum += w[order[i] * probs.stride[3]];
        keys[r * (C + 1) + i + 1] = keys[r * (C + 1) + i] + at<int32_t>(k_sizes, b, h, order[i]);
      }
      q_total += at<int32_t>(q_sizes, b, h, r);
    }
    const auto kept_area = [&](float top_p) {
      int64_t area = 0;
      for (int64_t r = 0; r < R; ++r) {
        const float* run = &running[r * C];
        int64_t kept = top_p >= 1.0f ? C : std::lower_bound(run, run + C, top_p) - run + 1;
        kept = std::min<int64_t>(C, std::max<int64_t>(kept, min_kept));
        area += at<int32_t>(q_sizes, b, h, r) * keys[r * (C + 1) + kept];
      }
      return area;
    };
    std::vector<float> candidates;
    for (float x : running)
      if (x > 0.0f && x < 1.0f) candidates.push_back(x);
    candidates.push_back(1.0f);
    std::sort(candidates.begin(), candidates.end());
    const double target = static_cast<double>(density) * static_cast<double>(q_total) * static_cast<double>(k_total);
    const float top_p = *std::partition_point(candidates.begin(), candidates.end() - 1,
                                              [&](float p) { return static_cast<double>(kept_area(p)) < target; });
    for (int64_t r = 0; r < R; ++r)
      keep_top_p_row(&at<float>(probs, b, h, r), probs.stride[3], C, top_p, min_kept, &at<uint8_t>(mask, b, h, r),
                     mask.stride[3], order);
  });
}

void select_blocks(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& k_sizes, float scale,
                   float top_p, int min_kept, TensorView mask, int threads) {
  const int64_t Ck = k_centroids.shape[2];
  for_each_prob_row(q_centroids, k_centroids, k_sizes, scale, threads,
                    [&](int64_t b, int64_t h, int64_t a, bool any, const float* weight, std::vector<int32_t>& order) {
                      uint8_t* row = &at<uint8_t>(mask, b, h, a);
                      if (!any) {
                        for (int64_t j = 0; j < Ck; ++j) row[j * mask.stride[3]] = 0;
                        return;
                      }
                      keep_top_p_row(weight, 1, Ck, top_p, min_kept, row, mask.stride[3], order);
                    });
}

void apply_text_rule(TensorView mask, int threads) {
  const int64_t B = mask.shape[0], H = mask.shape[1];
  const int64_t Cq = mask.shape[2] - 2, Ck = mask.shape[3] - 2;
  const int64_t prompt = Ck, padding = Ck + 1;
  parallel_for(B * H, threads, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    auto m = [&](int64_t r, int64_t c) -> uint8_t& { return at<uint8_t>(mask, b, h, r, c); };
    for (int64_t a = 0; a < Cq; ++a) {  // video rows also see the prompt, never the padding
      m(a, prompt) = 1;
      m(a, padding) = 0;
    }
    for (int64_t c = 0; c < Ck; ++c) {
      m(Cq, c) = 1;      // the prompt sees all video
      m(Cq + 1, c) = 0;  // padding sees no video
    }
    m(Cq, prompt) = 1;
    m(Cq, padding) = 0;
    m(Cq + 1, prompt) = 0;
    m(Cq + 1, padding) = 1;
  });
}

void shard_key_clusters(TensorView mask, int index, int count, int threads) {
  const int64_t B = mask.shape[0], H = mask.shape[1], R = mask.shape[2], C = mask.shape[3];
  parallel_for(B * H, threads, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < C; ++c)
        if (c % count != index) at<uint8_t>(mask, b, h, r, c) = 0;
  });
}

}  // namespace sapattn::cpu
