// SVG-EAR on the CPU: value centroids, the error probe, error-aware routing and centroid
// compensation (docs/ear.md). Sums are fp64; dot products use the fp32 lanes of the attention.
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

constexpr double kProbeEps = 1e-8;  // the published probe's floor on errors and areas

// fp32 copy of rows [0, N) of one (b,h) slice, [N, D] row-major.
std::vector<float> load_rows(const TensorView& t, int64_t b, int64_t h, int64_t N) {
  const int64_t D = t.shape[3];
  std::vector<float> rows(N * D);
  for (int64_t i = 0; i < N; ++i) load_row(t, b, h, i, &rows[i * D]);
  return rows;
}

// Indices 0..n-1 by key descending, ties by lower index; NaN ranks as -inf (a strict weak order,
// so a NaN never breaks the sort).
template <typename Key>
void rank_descending(int64_t n, Key&& key, std::vector<int32_t>& order) {
  order.resize(n);
  std::iota(order.begin(), order.end(), 0);
  const auto value = [&](int32_t i) {
    const float x = key(i);
    return std::isnan(x) ? -std::numeric_limits<float>::infinity() : x;
  };
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return value(a) > value(b); });
}

// Per-token value statistics of one (b,h) for the probe: |v_t|^2 and vbar_{label t} . v_t.
struct ValueStats {
  std::vector<double> norm2, centroid_dot;
};

ValueStats value_stats(const std::vector<float>& v, const int32_t* labels, const float* v_centroids, int64_t N,
                       int64_t D) {
  ValueStats s{std::vector<double>(N), std::vector<double>(N)};
  for (int64_t t = 0; t < N; ++t) {
    const float* vt = &v[t * D];
    const float* vc = v_centroids + labels[t] * D;
    double n2 = 0, cd = 0;
    for (int64_t d = 0; d < D; ++d) {
      n2 += static_cast<double>(vt[d]) * vt[d];
      cd += static_cast<double>(vc[d]) * vt[d];
    }
    s.norm2[t] = n2;
    s.centroid_dot[t] = cd;
  }
  return s;
}

}  // namespace

void cluster_means(const TensorView& points, const TensorView& labels, TensorView means, int threads) {
  const int64_t B = points.shape[0], H = points.shape[1], C = means.shape[2];
  check_index_range(labels, C, "labels");  // before anything is written
  // kmeans_update's mean (fp64 sums), with zero as the "previous centroid" an empty cluster keeps.
  std::fill_n(static_cast<float*>(means.data), means.numel(), 0.0f);  // contiguous by contract
  Tensor sizes(DType::I32, {B, H, C});
  kmeans_update(points, labels, means, sizes.view(), /*move_centroids=*/true, threads);
}

void ear_probe(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& v_centroids,
               const TensorView& k, const TensorView& v, const TensorView& k_labels, const TensorView& q_sizes,
               const TensorView& k_sizes, float scale, float gamma, TensorView scores, int threads) {
  const int64_t B = k.shape[0], H = k.shape[1], N = k.shape[2], D = k.shape[3];
  const int64_t Cq = q_centroids.shape[2], Ck = k_centroids.shape[2];
  check_index_range(k_labels, Ck, "k_labels");
  check_sizes_nonnegative(q_sizes, "q_sizes");
  check_sizes_nonnegative(k_sizes, "k_sizes");
  const double log_eps = std::log(kProbeEps);
  parallel_for(B * H, threads, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    const int32_t* label = &at<int32_t>(k_labels, b, h);
    const float* cq = &at<float>(q_centroids, b, h);
    const float* ck = &at<float>(k_centroids, b, h);
    const float* cv = &at<float>(v_centroids, b, h);
    const std::vector<float> keys = load_rows(k, b, h, N);
    const ValueStats stats = value_stats(load_rows(v, b, h, N), label, cv, N, D);
    std::vector<double> centroid_norm2(Ck);
    for (int64_t j = 0; j < Ck; ++j) {
      double n2 = 0;
      for (int64_t d = 0; d < D; ++d) n2 += static_cast<double>(cv[j * D + d]) * cv[j * D + d];
      centroid_norm2[j] = n2;
    }
    // Per key cluster, seen from one query centroid: the running max m of the logits (starting at
    // the centroid logit), sum exp(2(s-m)) |v|^2 and sum exp(s-m) vbar.v.
    std::vector<double> run_max(Ck), squared(Ck), cross(Ck), centroid_logit(Ck);
    for (int64_t a = 0; a < Cq; ++a) {
      const float* qa = cq + a * D;
      for (int64_t j = 0; j < Ck; ++j) {
        centroid_logit[j] = static_cast<double>(dot(qa, ck + j * D, D) * scale);
        run_max[j] = centroid_logit[j];
        squared[j] = cross[j] = 0.0;
      }
      for (int64_t t = 0; t < N; ++t) {
        const int32_t j = label[t];
        const double s = static_cast<double>(dot(qa, &keys[t * D], D) * scale);
        if (s > run_max[j]) {
          const double r = std::exp(run_max[j] - s);
          squared[j] *= r * r;
          cross[j] *= r;
          run_max[j] = s;
        }
        const double p = std::exp(s - run_max[j]);
        squared[j] += p * p * stats.norm2[t];
        cross[j] += p * stats.centroid_dot[t];
      }
      const double q_size = at<int32_t>(q_sizes, b, h, a);
      for (int64_t j = 0; j < Ck; ++j) {
        const double k_size = at<int32_t>(k_sizes, b, h, j);
        // E / exp(2 m) = squared - 2 pc cross + pc^2 |K_j| |vbar|^2 with pc = exp(c - m) <= 1.
        const double pc = std::exp(centroid_logit[j] - run_max[j]);
        const double rest = squared[j] - 2.0 * pc * cross[j] + pc * pc * k_size * centroid_norm2[j];
        const double log_error = rest > 0.0 ? std::max(std::log(rest) + 2.0 * run_max[j], log_eps) : log_eps;
        const double log_area = std::log(std::max(q_size * k_size, kProbeEps));
        at<float>(scores, b, h, a, j) = static_cast<float>(log_error - gamma * log_area);
      }
    }
  });
}

void select_error_aware(const TensorView& probs, const TensorView& budget_mask, const TensorView& scores,
                        const TensorView& q_sizes, const TensorView& k_sizes, int guaranteed, TensorView mask,
                        int threads) {
  const int64_t B = probs.shape[0], H = probs.shape[1], R = probs.shape[2], C = probs.shape[3];
  check_sizes_nonnegative(q_sizes, "q_sizes");
  check_sizes_nonnegative(k_sizes, "k_sizes");
  const int64_t kept_first = std::min<int64_t>(guaranteed, C);
  parallel_for(B * H, threads, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    std::vector<int32_t> order;
    std::vector<uint8_t> keep(C);
    for (int64_t a = 0; a < R; ++a) {
      const int64_t q_size = at<int32_t>(q_sizes, b, h, a);
      const auto area = [&](int64_t j) { return q_size * at<int32_t>(k_sizes, b, h, j); };
      int64_t budget = 0;
      for (int64_t j = 0; j < C; ++j)
        if (at<uint8_t>(budget_mask, b, h, a, j) != 0) budget += area(j);
      std::fill(keep.begin(), keep.end(), 0);
      rank_descending(
          C, [&](int32_t j) { return at<float>(probs, b, h, a, j); }, order);
      for (int64_t r = 0; r < kept_first; ++r) {
        keep[order[r]] = 1;
        budget -= area(order[r]);
      }
      const int64_t remaining = std::max<int64_t>(budget, 0);
      rank_descending(
          C, [&](int32_t j) { return at<float>(scores, b, h, a, j); }, order);
      int64_t spent = 0;
      for (int64_t r = 0; r < C && spent < remaining; ++r) {
        if (keep[order[r]]) continue;  // guaranteed already
        keep[order[r]] = 1;
        spent += area(order[r]);
      }
      for (int64_t j = 0; j < C; ++j) at<uint8_t>(mask, b, h, a, j) = keep[j];
    }
  });
}

void centroid_compensation(const TensorView& q, const TensorView& q_labels, const TensorView& mask,
                           const TensorView& k_centroids, const TensorView& v_centroids, const TensorView& k_sizes,
                           float scale, TensorView out, TensorView lse, int threads) {
  const int64_t B = q.shape[0], H = q.shape[1], N = q_labels.shape[2], D = q.shape[3];
  const int64_t Ck = k_centroids.shape[2];
  check_index_range(q_labels, mask.shape[2], "q_labels");
  check_sizes_nonnegative(k_sizes, "k_sizes");
  parallel_for(B * H, threads, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    const int32_t* label = &at<int32_t>(q_labels, b, h);
    const float* ck = &at<float>(k_centroids, b, h);
    const float* cv = &at<float>(v_centroids, b, h);
    std::vector<float> qi(D), oi(D);
    std::vector<double> acc(D);
    std::vector<int64_t> skipped;
    std::vector<double> logit;
    for (int64_t i = 0; i < N; ++i) {
      skipped.clear();
      for (int64_t j = 0; j < Ck; ++j)
        if (at<uint8_t>(mask, b, h, label[i], j) == 0 && at<int32_t>(k_sizes, b, h, j) > 0) skipped.push_back(j);
      if (skipped.empty()) continue;
      load_row(q, b, h, i, qi.data());
      logit.resize(skipped.size());
      float& row_lse = at<float>(lse, b, h, i);
      double m = row_lse;
      for (size_t n = 0; n < skipped.size(); ++n) {
        const int64_t j = skipped[n];
        logit[n] = std::log(static_cast<double>(at<int32_t>(k_sizes, b, h, j))) +
                   static_cast<double>(dot(qi.data(), ck + j * D, D) * scale);
        m = std::max(m, logit[n]);
      }
      // The exact part enters with weight exp(lse - m) (0 for a row that attended to nothing).
      const double exact = std::exp(static_cast<double>(row_lse) - m);
      load_row(out, b, h, i, oi.data());
      double total = exact;
      for (int64_t d = 0; d < D; ++d) acc[d] = exact * oi[d];
      for (size_t n = 0; n < skipped.size(); ++n) {
        const double w = std::exp(logit[n] - m);
        const float* vj = cv + skipped[n] * D;
        for (int64_t d = 0; d < D; ++d) acc[d] += w * vj[d];
        total += w;
      }
      for (int64_t d = 0; d < D; ++d) oi[d] = static_cast<float>(acc[d] / total);
      store_row(out, b, h, i, oi.data());
      row_lse = static_cast<float>(m + std::log(total));
    }
  });
}

}  // namespace sapattn::cpu
