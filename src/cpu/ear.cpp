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
// ear_plus_probe's floor on the row-normalised error |Q_a| E / Z^2 (a relative squared error, so
// far below EAR's 1e-8 on the unnormalised one: a pair under it is, for routing, error-free).
constexpr double kNormalisedErrorEps = 1e-30;

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

namespace {

// What one query centroid sees of every key cluster j in one pass over the keys: the running max
// m_j of the logits s_t = scale qbar . k_t (starting at the centroid logit c_j = scale qbar . kbar_j),
// squared_j = sum exp(2(s-m)) |v|^2, cross_j = sum exp(s-m) vbar.v, mass_j = sum exp(s-m) and, when
// asked for, values_j = sum exp(s-m) v ([Ck, D]). Sums in fp64.
struct CentroidView {
  std::vector<double> run_max, squared, cross, mass, centroid_logit, values;
};

// The keys and value statistics of one (b,h), loaded once for every query centroid.
struct ProbeInputs {
  int64_t N = 0, D = 0, Ck = 0;
  const int32_t* label = nullptr;
  const float* ck = nullptr;        // [Ck, D] key centroids
  const float* cv = nullptr;        // [Ck, D] value centroids
  std::vector<float> keys, values;  // [N, D]; values only when the pass accumulates them
  ValueStats stats;
  std::vector<double> centroid_norm2;  // |vbar_j|^2
};

ProbeInputs load_probe_inputs(const TensorView& k_centroids, const TensorView& v_centroids, const TensorView& k,
                              const TensorView& v, const TensorView& k_labels, int64_t b, int64_t h, bool keep_values) {
  ProbeInputs in;
  in.N = k.shape[2];
  in.D = k.shape[3];
  in.Ck = k_centroids.shape[2];
  in.label = &at<int32_t>(k_labels, b, h);
  in.ck = &at<float>(k_centroids, b, h);
  in.cv = &at<float>(v_centroids, b, h);
  in.keys = load_rows(k, b, h, in.N);
  std::vector<float> values = load_rows(v, b, h, in.N);
  in.stats = value_stats(values, in.label, in.cv, in.N, in.D);
  if (keep_values) in.values = std::move(values);
  in.centroid_norm2.resize(in.Ck);
  for (int64_t j = 0; j < in.Ck; ++j) {
    double n2 = 0;
    for (int64_t d = 0; d < in.D; ++d) n2 += static_cast<double>(in.cv[j * in.D + d]) * in.cv[j * in.D + d];
    in.centroid_norm2[j] = n2;
  }
  return in;
}

void view_from_centroid(const float* qa, const ProbeInputs& in, float scale, CentroidView& view) {
  const int64_t Ck = in.Ck, D = in.D;
  const bool with_values = !in.values.empty();
  view.run_max.resize(Ck);
  view.squared.assign(Ck, 0.0);
  view.cross.assign(Ck, 0.0);
  view.mass.assign(Ck, 0.0);
  view.centroid_logit.resize(Ck);
  if (with_values) view.values.assign(Ck * D, 0.0);
  for (int64_t j = 0; j < Ck; ++j) {
    view.centroid_logit[j] = static_cast<double>(dot(qa, in.ck + j * D, D) * scale);
    view.run_max[j] = view.centroid_logit[j];
  }
  for (int64_t t = 0; t < in.N; ++t) {
    const int32_t j = in.label[t];
    const double s = static_cast<double>(dot(qa, &in.keys[t * D], D) * scale);
    if (s > view.run_max[j]) {
      const double r = std::exp(view.run_max[j] - s);
      view.squared[j] *= r * r;
      view.cross[j] *= r;
      view.mass[j] *= r;
      if (with_values)
        for (int64_t d = 0; d < D; ++d) view.values[j * D + d] *= r;
      view.run_max[j] = s;
    }
    const double p = std::exp(s - view.run_max[j]);
    view.squared[j] += p * p * in.stats.norm2[t];
    view.cross[j] += p * in.stats.centroid_dot[t];
    view.mass[j] += p;
    if (with_values)
      for (int64_t d = 0; d < D; ++d) view.values[j * D + d] += p * in.values[t * D + d];
  }
}

// log E_j - 2 m_j of the probe (E as ear_probe defines it), or -inf when E <= 0:
// E / exp(2 m) = squared - 2 pc cross + pc^2 |K_j| |vbar|^2 with pc = exp(c - m) <= 1.
double log_scaled_error(const CentroidView& view, const ProbeInputs& in, int64_t j, double k_size) {
  const double pc = std::exp(view.centroid_logit[j] - view.run_max[j]);
  const double rest = view.squared[j] - 2.0 * pc * view.cross[j] + pc * pc * k_size * in.centroid_norm2[j];
  return rest > 0.0 ? std::log(rest) : -std::numeric_limits<double>::infinity();
}

// Checks the probe's labels and sizes, then calls row(b, h, a, in, view) for every query centroid a
// of every (b,h), in parallel over (b,h): `in` holds the (b,h)'s keys and value statistics (and its
// values, with `keep_values`), `view` what centroid a sees of every key cluster.
template <typename RowFn>
void for_each_probe_row(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& v_centroids,
                        const TensorView& k, const TensorView& v, const TensorView& k_labels, const TensorView& q_sizes,
                        const TensorView& k_sizes, float scale, bool keep_values, int threads, RowFn&& row) {
  const int64_t B = k.shape[0], H = k.shape[1], D = k.shape[3];
  const int64_t Cq = q_centroids.shape[2], Ck = k_centroids.shape[2];
  check_index_range(k_labels, Ck, "k_labels");
  check_sizes_nonnegative(q_sizes, "q_sizes");
  check_sizes_nonnegative(k_sizes, "k_sizes");
  parallel_for(B * H, threads, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    const ProbeInputs in = load_probe_inputs(k_centroids, v_centroids, k, v, k_labels, b, h, keep_values);
    const float* cq = &at<float>(q_centroids, b, h);
    CentroidView view;
    for (int64_t a = 0; a < Cq; ++a) {
      view_from_centroid(cq + a * D, in, scale, view);
      row(b, h, a, in, view);
    }
  });
}

}  // namespace

void ear_probe(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& v_centroids,
               const TensorView& k, const TensorView& v, const TensorView& k_labels, const TensorView& q_sizes,
               const TensorView& k_sizes, float scale, float gamma, TensorView scores, int threads) {
  const double log_eps = std::log(kProbeEps);
  for_each_probe_row(q_centroids, k_centroids, v_centroids, k, v, k_labels, q_sizes, k_sizes, scale, false, threads,
                     [&](int64_t b, int64_t h, int64_t a, const ProbeInputs& in, const CentroidView& view) {
                       const double q_size = at<int32_t>(q_sizes, b, h, a);
                       for (int64_t j = 0; j < in.Ck; ++j) {
                         const double k_size = at<int32_t>(k_sizes, b, h, j);
                         const double log_error =
                             std::max(log_scaled_error(view, in, j, k_size) + 2.0 * view.run_max[j], log_eps);
                         const double log_area = std::log(std::max(q_size * k_size, kProbeEps));
                         at<float>(scores, b, h, a, j) = static_cast<float>(log_error - gamma * log_area);
                       }
                     });
}

void ear_plus_probe(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& v_centroids,
                    const TensorView& k, const TensorView& v, const TensorView& k_labels, const TensorView& q_sizes,
                    const TensorView& k_sizes, float scale, float gamma, TensorView scores, TensorView spread,
                    TensorView pair_values, int threads) {
  const int64_t D = k.shape[3];
  const double log_error_floor = std::log(kNormalisedErrorEps);
  for_each_probe_row(
      q_centroids, k_centroids, v_centroids, k, v, k_labels, q_sizes, k_sizes, scale, !pair_values.empty(), threads,
      [&](int64_t b, int64_t h, int64_t a, const ProbeInputs& in, const CentroidView& view) {
        const int64_t Ck = in.Ck;
        // log Z = log sum_j mass_j exp(m_j), over the non-empty clusters (at least one: N >= 1).
        double top = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < Ck; ++j)
          if (view.mass[j] > 0.0) top = std::max(top, view.run_max[j]);
        double z = 0.0;
        for (int64_t j = 0; j < Ck; ++j)
          if (view.mass[j] > 0.0) z += view.mass[j] * std::exp(view.run_max[j] - top);
        const double log_z = top + std::log(z);
        const double q_size = at<int32_t>(q_sizes, b, h, a);
        for (int64_t j = 0; j < Ck; ++j) {
          const double k_size = at<int32_t>(k_sizes, b, h, j);
          const double log_error =
              std::max(log_scaled_error(view, in, j, k_size) + 2.0 * (view.run_max[j] - log_z) + std::log(q_size),
                       log_error_floor);
          const double log_area = std::log(std::max(q_size * k_size, kProbeEps));
          at<float>(scores, b, h, a, j) = static_cast<float>(log_error - gamma * log_area);
          const bool empty = view.mass[j] == 0.0 || k_size == 0.0;
          if (!spread.empty())
            at<float>(spread, b, h, a, j) =
                empty ? 0.0f
                      : static_cast<float>(std::log(view.mass[j] / k_size) + view.run_max[j] - view.centroid_logit[j]);
          if (!pair_values.empty()) {
            float* row = &at<float>(pair_values, b, h, a * Ck + j);
            for (int64_t d = 0; d < D; ++d)
              row[d] = empty ? in.cv[j * D + d] : static_cast<float>(view.values[j * D + d] / view.mass[j]);
          }
        }
      });
}

namespace {

// Error-aware routing with one area budget per group of `group_rows` consecutive query-cluster rows
// of a head: 1 is EAR's budget per row, R ear-plus's per head. Pairs (a, j) of a group are indexed
// (a - first row) * C + j, so ties go to the lower row, then the lower cluster.
void route_error_aware(const TensorView& probs, const TensorView& budget_mask, const TensorView& scores,
                       const TensorView& q_sizes, const TensorView& k_sizes, int guaranteed, TensorView mask,
                       bool per_head, int threads) {
  const int64_t B = probs.shape[0], H = probs.shape[1], R = probs.shape[2], C = probs.shape[3];
  check_sizes_nonnegative(q_sizes, "q_sizes");
  check_sizes_nonnegative(k_sizes, "k_sizes");
  const int64_t kept_first = std::min<int64_t>(guaranteed, C);
  const int64_t group_rows = per_head ? R : 1;
  parallel_for(B * H, threads, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    std::vector<int32_t> order;
    std::vector<uint8_t> keep(group_rows * C);
    for (int64_t first = 0; first < R; first += group_rows) {
      const auto area = [&](int64_t pair) {
        return static_cast<int64_t>(at<int32_t>(q_sizes, b, h, first + pair / C)) *
               at<int32_t>(k_sizes, b, h, pair % C);
      };
      std::fill(keep.begin(), keep.end(), 0);
      int64_t budget = 0;
      for (int64_t r = 0; r < group_rows; ++r) {
        for (int64_t j = 0; j < C; ++j)
          if (at<uint8_t>(budget_mask, b, h, first + r, j) != 0) budget += area(r * C + j);
        rank_descending(
            C, [&](int32_t j) { return at<float>(probs, b, h, first + r, j); }, order);
        for (int64_t n = 0; n < kept_first; ++n) {
          keep[r * C + order[n]] = 1;
          budget -= area(r * C + order[n]);
        }
      }
      const int64_t remaining = std::max<int64_t>(budget, 0);
      rank_descending(
          group_rows * C, [&](int32_t pair) { return at<float>(scores, b, h, first + pair / C, pair % C); }, order);
      int64_t spent = 0;
      for (int64_t n = 0; n < group_rows * C && spent < remaining; ++n) {
        if (keep[order[n]]) continue;  // guaranteed already
        keep[order[n]] = 1;
        spent += area(order[n]);
      }
      for (int64_t r = 0; r < group_rows; ++r)
        for (int64_t j = 0; j < C; ++j) at<uint8_t>(mask, b, h, first + r, j) = keep[r * C + j];
    }
  });
}

}  // namespace

void select_error_aware(const TensorView& probs, const TensorView& budget_mask, const TensorView& scores,
                        const TensorView& q_sizes, const TensorView& k_sizes, int guaranteed, TensorView mask,
                        int threads) {
  route_error_aware(probs, budget_mask, scores, q_sizes, k_sizes, guaranteed, mask, false, threads);
}

void select_error_aware_per_head(const TensorView& probs, const TensorView& budget_mask, const TensorView& scores,
                                 const TensorView& q_sizes, const TensorView& k_sizes, int guaranteed, TensorView mask,
                                 int threads) {
  route_error_aware(probs, budget_mask, scores, q_sizes, k_sizes, guaranteed, mask, true, threads);
}

void split_clusters(const TensorView& points, const TensorView& labels, const TensorView& centroids,
                    TensorView sub_labels, TensorView sub_sizes, int threads) {
  const int64_t B = points.shape[0], H = points.shape[1], N = points.shape[2], D = points.shape[3];
  const int64_t C = centroids.shape[2];
  check_index_range(labels, C, "labels");
  constexpr int kPowerIterations = 8, kTwoMeansSteps = 2;
  parallel_for(B * H, threads, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    const int32_t* label = &at<int32_t>(labels, b, h);
    int32_t* sub = &at<int32_t>(sub_labels, b, h);
    const float* centroid = &at<float>(centroids, b, h);
    const std::vector<float> x = load_rows(points, b, h, N);
    // Members of each cluster, in token order.
    std::vector<int64_t> offsets(C + 1, 0), members(N);
    for (int64_t t = 0; t < N; ++t) ++offsets[label[t] + 1];
    for (int64_t c = 0; c < C; ++c) offsets[c + 1] += offsets[c];
    std::vector<int64_t> cursor(offsets.begin(), offsets.end() - 1);
    for (int64_t t = 0; t < N; ++t) members[cursor[label[t]]++] = t;
    std::vector<double> u(D), next(D), mean0(D), mean1(D);
    for (int64_t c = 0; c < C; ++c) {
      const float* mu = centroid + c * D;
      const int64_t* first = &members[offsets[c]];
      const int64_t n = offsets[c + 1] - offsets[c];
      const auto offset = [&](int64_t t, int64_t d) { return static_cast<double>(x[t * D + d]) - mu[d]; };
      const auto project = [&](int64_t t, const std::vector<double>& w) {
        double p = 0;
        for (int64_t d = 0; d < D; ++d) p += offset(t, d) * w[d];
        return p;
      };
      // Start from the member farthest from the centroid (ties to the first in token order).
      double far = 0.0;
      std::fill(u.begin(), u.end(), 0.0);
      for (int64_t m = 0; m < n; ++m) {
        double r2 = 0;
        for (int64_t d = 0; d < D; ++d) r2 += offset(first[m], d) * offset(first[m], d);
        if (r2 > far) {
          far = r2;
          for (int64_t d = 0; d < D; ++d) u[d] = offset(first[m], d);
        }
      }
      std::vector<uint8_t> side(n, 0);
      if (far > 0.0) {
        for (int it = 0; it < kPowerIterations; ++it) {  // u <- Cov u, normalised
          std::fill(next.begin(), next.end(), 0.0);
          for (int64_t m = 0; m < n; ++m) {
            const double p = project(first[m], u);
            for (int64_t d = 0; d < D; ++d) next[d] += p * offset(first[m], d);
          }
          double norm = 0;
          for (double w : next) norm += w * w;
          if (!(norm > 0.0)) break;  // u orthogonal to every offset: keep it
          norm = std::sqrt(norm);
          for (int64_t d = 0; d < D; ++d) u[d] = next[d] / norm;
        }
        for (int64_t m = 0; m < n; ++m) side[m] = project(first[m], u) > 0.0 ? 1 : 0;
        for (int step = 0; step < kTwoMeansSteps; ++step) {
          std::fill(mean0.begin(), mean0.end(), 0.0);
          std::fill(mean1.begin(), mean1.end(), 0.0);
          int64_t n1 = 0;
          for (int64_t m = 0; m < n; ++m) {
            std::vector<double>& acc = side[m] ? mean1 : mean0;
            n1 += side[m];
            for (int64_t d = 0; d < D; ++d) acc[d] += x[first[m] * D + d];
          }
          if (n1 == 0 || n1 == n) break;  // one side empty: nothing to refine
          for (int64_t d = 0; d < D; ++d) {
            mean0[d] /= static_cast<double>(n - n1);
            mean1[d] /= static_cast<double>(n1);
          }
          for (int64_t m = 0; m < n; ++m) {
            double d0 = 0, d1 = 0;
            for (int64_t d = 0; d < D; ++d) {
              const double xd = x[first[m] * D + d];
              d0 += (xd - mean0[d]) * (xd - mean0[d]);
              d1 += (xd - mean1[d]) * (xd - mean1[d]);
            }
            side[m] = d1 < d0 ? 1 : 0;
          }
        }
      }
      int32_t count[2] = {0, 0};
      for (int64_t m = 0; m < n; ++m) {
        sub[first[m]] = static_cast<int32_t>(2 * c + side[m]);
        ++count[side[m]];
      }
      at<int32_t>(sub_sizes, b, h, 2 * c) = count[0];
      at<int32_t>(sub_sizes, b, h, 2 * c + 1) = count[1];
    }
  });
}

void corrected_centroid_compensation(const TensorView& q, const TensorView& q_labels, const TensorView& mask,
                                     const TensorView& k_centroids, const TensorView& v_centroids,
                                     const TensorView& k_sizes, const TensorView& spread, const TensorView& pair_values,
                                     float scale, TensorView out, TensorView lse, int threads) {
  const int64_t B = q.shape[0], H = q.shape[1], N = q_labels.shape[2], D = q.shape[3];
  const int64_t Ck = k_centroids.shape[2], per_cluster = Ck / mask.shape[3];  // pseudo-keys per mask column
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
        if (at<uint8_t>(mask, b, h, label[i], j / per_cluster) == 0 && at<int32_t>(k_sizes, b, h, j) > 0)
          skipped.push_back(j);
      if (skipped.empty()) continue;
      load_row(q, b, h, i, qi.data());
      logit.resize(skipped.size());
      float& row_lse = at<float>(lse, b, h, i);
      double m = row_lse;
      for (size_t n = 0; n < skipped.size(); ++n) {
        const int64_t j = skipped[n];
        logit[n] = std::log(static_cast<double>(at<int32_t>(k_sizes, b, h, j))) +
                   static_cast<double>(dot(qi.data(), ck + j * D, D) * scale);
        if (!spread.empty()) logit[n] += static_cast<double>(at<float>(spread, b, h, label[i], j));
        m = std::max(m, logit[n]);
      }
      // The exact part enters with weight exp(lse - m) (0 for a row that attended to nothing).
      const double exact = std::exp(static_cast<double>(row_lse) - m);
      load_row(out, b, h, i, oi.data());
      double total = exact;
      for (int64_t d = 0; d < D; ++d) acc[d] = exact * oi[d];
      for (size_t n = 0; n < skipped.size(); ++n) {
        const double w = std::exp(logit[n] - m);
        const float* vj =
            pair_values.empty() ? cv + skipped[n] * D : &at<float>(pair_values, b, h, label[i] * Ck + skipped[n]);
        for (int64_t d = 0; d < D; ++d) acc[d] += w * vj[d];
        total += w;
      }
      for (int64_t d = 0; d < D; ++d) oi[d] = static_cast<float>(acc[d] / total);
      store_row(out, b, h, i, oi.data());
      row_lse = static_cast<float>(m + std::log(total));
    }
  });
}

void centroid_compensation(const TensorView& q, const TensorView& q_labels, const TensorView& mask,
                           const TensorView& k_centroids, const TensorView& v_centroids, const TensorView& k_sizes,
                           float scale, TensorView out, TensorView lse, int threads) {
  corrected_centroid_compensation(q, q_labels, mask, k_centroids, v_centroids, k_sizes, {}, {}, scale, out, lse,
                                  threads);
}

}  // namespace sapattn::cpu
