// Float64 references of the SVG-EAR ops: the probe as its formula reads, the routing by a
// brute-force characterisation, and compensated attention as one softmax over exact keys and
// centroid pseudo-keys.
#include <algorithm>
#include <cmath>
#include <limits>

#include "reference.hpp"

namespace sapattn::ref {

namespace {

double dot(const double* a, const double* b, int64_t D) {
  double s = 0;
  for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

}  // namespace

std::vector<double> ear_probe(const TensorView& q_centroids, const TensorView& k_centroids,
                              const TensorView& v_centroids, const TensorView& k, const TensorView& v,
                              const std::vector<int32_t>& k_labels, const std::vector<int32_t>& q_sizes,
                              const std::vector<int32_t>& k_sizes, double scale, double gamma) {
  const int64_t B = k.shape[0], H = k.shape[1], N = k.shape[2], D = k.shape[3];
  const int64_t Cq = q_centroids.shape[2], Ck = k_centroids.shape[2];
  const std::vector<double> cq = to_vector(q_centroids), ck = to_vector(k_centroids), cv = to_vector(v_centroids);
  const std::vector<double> kd = to_vector(k), vd = to_vector(v);
  const double eps = 1e-8;
  std::vector<double> scores(static_cast<size_t>(B * H * Cq * Ck));
  for (int64_t bh = 0; bh < B * H; ++bh) {
    for (int64_t a = 0; a < Cq; ++a) {
      const double* qa = &cq[static_cast<size_t>((bh * Cq + a) * D)];
      for (int64_t j = 0; j < Ck; ++j) {
        const double* kbar = &ck[static_cast<size_t>((bh * Ck + j) * D)];
        const double* vbar = &cv[static_cast<size_t>((bh * Ck + j) * D)];
        const double centroid_weight = std::exp(scale * dot(qa, kbar, D));
        double error = 0;
        for (int64_t t = 0; t < N; ++t) {
          if (k_labels[static_cast<size_t>(bh * N + t)] != j) continue;
          const double w = std::exp(scale * dot(qa, &kd[static_cast<size_t>((bh * N + t) * D)], D));
          const double* vt = &vd[static_cast<size_t>((bh * N + t) * D)];
          for (int64_t d = 0; d < D; ++d) {
            const double diff = w * vt[d] - centroid_weight * vbar[d];
            error += diff * diff;
          }
        }
        const double area =
            static_cast<double>(q_sizes[static_cast<size_t>(bh * Cq + a)]) * k_sizes[static_cast<size_t>(bh * Ck + j)];
        scores[static_cast<size_t>((bh * Cq + a) * Ck + j)] =
            std::log(std::max(error, eps)) - gamma * std::log(std::max(area, eps));
      }
    }
  }
  return scores;
}

std::vector<uint8_t> error_aware_mask(const std::vector<double>& probs, const std::vector<uint8_t>& budget_mask,
                                      const std::vector<double>& scores, const std::vector<int32_t>& q_sizes,
                                      const std::vector<int32_t>& k_sizes, int64_t B, int64_t H, int64_t R, int64_t C,
                                      int guaranteed, bool per_head) {
  std::vector<uint8_t> mask(static_cast<size_t>(B * H * R * C), 0);
  const auto key = [](double x) { return std::isnan(x) ? -std::numeric_limits<double>::infinity() : x; };
  // A group of pairs shares one budget: a row, or with per_head all rows of a head.
  const int64_t group_rows = per_head ? R : 1;
  for (int64_t g = 0; g < B * H * R / group_rows; ++g) {
    const int64_t bh = g * group_rows / R, first_row = g * group_rows;  // rows of [B*H*R]
    const size_t base = static_cast<size_t>(first_row * C);
    const int64_t pairs = group_rows * C;
    const auto area = [&](int64_t p) {
      return static_cast<int64_t>(q_sizes[static_cast<size_t>(first_row + p / C)]) *
             k_sizes[static_cast<size_t>(bh * C + p % C)];
    };
    std::vector<uint8_t> sure(static_cast<size_t>(pairs), 0);
    for (int64_t r = 0; r < group_rows; ++r) {
      const std::vector<int64_t> by_prob = rank_descending(&probs[base + static_cast<size_t>(r * C)], C);
      for (int64_t n = 0; n < std::min<int64_t>(guaranteed, C); ++n) sure[static_cast<size_t>(r * C + by_prob[n])] = 1;
    }
    int64_t budget = 0, sure_area = 0;
    for (int64_t p = 0; p < pairs; ++p) {
      if (budget_mask[base + static_cast<size_t>(p)] != 0) budget += area(p);
      if (sure[static_cast<size_t>(p)] != 0) sure_area += area(p);
    }
    const int64_t remaining = std::max<int64_t>(0, budget - sure_area);
    for (int64_t p = 0; p < pairs; ++p) {
      if (sure[static_cast<size_t>(p)] != 0) {
        mask[base + static_cast<size_t>(p)] = 1;
        continue;
      }
      int64_t before = 0;
      for (int64_t i = 0; i < pairs; ++i) {
        if (i == p || sure[static_cast<size_t>(i)] != 0) continue;
        const double si = key(scores[base + static_cast<size_t>(i)]), sp = key(scores[base + static_cast<size_t>(p)]);
        if (si > sp || (si == sp && i < p)) before += area(i);
      }
      mask[base + static_cast<size_t>(p)] = before < remaining ? 1 : 0;
    }
  }
  return mask;
}

EarPlusProbe ear_plus_probe(const TensorView& q_centroids, const TensorView& k_centroids, const TensorView& v_centroids,
                            const TensorView& k, const TensorView& v, const std::vector<int32_t>& k_labels,
                            const std::vector<int32_t>& q_sizes, const std::vector<int32_t>& k_sizes, double scale,
                            double gamma) {
  const int64_t B = k.shape[0], H = k.shape[1], N = k.shape[2], D = k.shape[3];
  const int64_t Cq = q_centroids.shape[2], Ck = k_centroids.shape[2];
  const std::vector<double> cq = to_vector(q_centroids), ck = to_vector(k_centroids), cv = to_vector(v_centroids);
  const std::vector<double> kd = to_vector(k), vd = to_vector(v);
  EarPlusProbe r;
  r.scores.resize(static_cast<size_t>(B * H * Cq * Ck));
  r.spread.resize(r.scores.size());
  r.pair_values.resize(r.scores.size() * static_cast<size_t>(D));
  for (int64_t bh = 0; bh < B * H; ++bh) {
    for (int64_t a = 0; a < Cq; ++a) {
      const double* qa = &cq[static_cast<size_t>((bh * Cq + a) * D)];
      std::vector<double> error(static_cast<size_t>(Ck), 0.0), mass(error.size(), 0.0);
      std::vector<double> weighted(static_cast<size_t>(Ck * D), 0.0);
      double z = 0;
      for (int64_t t = 0; t < N; ++t) {
        const int64_t j = k_labels[static_cast<size_t>(bh * N + t)];
        const double* vt = &vd[static_cast<size_t>((bh * N + t) * D)];
        const double* vbar = &cv[static_cast<size_t>((bh * Ck + j) * D)];
        const double w = std::exp(scale * dot(qa, &kd[static_cast<size_t>((bh * N + t) * D)], D));
        const double wc = std::exp(scale * dot(qa, &ck[static_cast<size_t>((bh * Ck + j) * D)], D));
        for (int64_t d = 0; d < D; ++d) {
          const double diff = w * vt[d] - wc * vbar[d];
          error[static_cast<size_t>(j)] += diff * diff;
          weighted[static_cast<size_t>(j * D + d)] += w * vt[d];
        }
        mass[static_cast<size_t>(j)] += w;
        z += w;
      }
      const double q_size = q_sizes[static_cast<size_t>(bh * Cq + a)];
      for (int64_t j = 0; j < Ck; ++j) {
        const size_t i = static_cast<size_t>((bh * Cq + a) * Ck + j);
        const double k_size = k_sizes[static_cast<size_t>(bh * Ck + j)];
        r.scores[i] = std::log(std::max(q_size * error[static_cast<size_t>(j)] / (z * z), 1e-30)) -
                      gamma * std::log(std::max(q_size * k_size, 1e-8));
        const bool empty = k_size == 0;
        const double c = scale * dot(qa, &ck[static_cast<size_t>((bh * Ck + j) * D)], D);
        r.spread[i] = empty ? 0.0 : std::log(mass[static_cast<size_t>(j)] / k_size) - c;
        for (int64_t d = 0; d < D; ++d)
          r.pair_values[i * static_cast<size_t>(D) + static_cast<size_t>(d)] =
              empty ? cv[static_cast<size_t>((bh * Ck + j) * D + d)]
                    : weighted[static_cast<size_t>(j * D + d)] / mass[static_cast<size_t>(j)];
      }
    }
  }
  return r;
}

Attention compensated_attention(const TensorView& q, const TensorView& k, const TensorView& v, double scale,
                                const std::vector<uint8_t>& token_mask, const std::vector<int32_t>& q_labels, int64_t N,
                                const std::vector<uint8_t>& cluster_mask, int64_t Cq, const TensorView& k_centroids,
                                const TensorView& v_centroids, const std::vector<int32_t>& k_sizes,
                                const CompensationTerms& terms) {
  const int64_t B = q.shape[0], H = q.shape[1], S = q.shape[2], D = q.shape[3], Sk = k.shape[2];
  const int64_t Ck = k_centroids.shape[2], mask_columns = Ck / terms.per_cluster;
  const std::vector<double> qd = to_vector(q), kd = to_vector(k), vd = to_vector(v);
  const std::vector<double> ck = to_vector(k_centroids), cv = to_vector(v_centroids);
  Attention r;
  r.out.assign(static_cast<size_t>(B * H * S * D), 0.0);
  r.lse.assign(static_cast<size_t>(B * H * S), -std::numeric_limits<double>::infinity());
  for (int64_t bh = 0; bh < B * H; ++bh) {
    for (int64_t i = 0; i < S; ++i) {
      const double* qi = &qd[static_cast<size_t>((bh * S + i) * D)];
      std::vector<double> logits;
      std::vector<const double*> values;
      for (int64_t j = 0; j < Sk; ++j) {
        if (token_mask[static_cast<size_t>((bh * S + i) * Sk + j)] == 0) continue;
        logits.push_back(scale * dot(qi, &kd[static_cast<size_t>((bh * Sk + j) * D)], D));
        values.push_back(&vd[static_cast<size_t>((bh * Sk + j) * D)]);
      }
      if (i < N) {
        const int64_t a = q_labels[static_cast<size_t>(bh * N + i)];
        for (int64_t j = 0; j < Ck; ++j) {
          const int32_t size = k_sizes[static_cast<size_t>(bh * Ck + j)];
          const size_t column = static_cast<size_t>((bh * Cq + a) * mask_columns + j / terms.per_cluster);
          if (cluster_mask[column] != 0 || size == 0) continue;
          const size_t pair = static_cast<size_t>((bh * Cq + a) * Ck + j);
          logits.push_back(std::log(static_cast<double>(size)) +
                           scale * dot(qi, &ck[static_cast<size_t>((bh * Ck + j) * D)], D) +
                           (terms.spread != nullptr ? (*terms.spread)[pair] : 0.0));
          values.push_back(terms.pair_values != nullptr ? &(*terms.pair_values)[pair * static_cast<size_t>(D)]
                                                        : &cv[static_cast<size_t>((bh * Ck + j) * D)]);
        }
      }
      if (logits.empty()) continue;
      const double m = *std::max_element(logits.begin(), logits.end());
      double l = 0;
      double* o = &r.out[static_cast<size_t>((bh * S + i) * D)];
      for (size_t n = 0; n < logits.size(); ++n) {
        const double p = std::exp(logits[n] - m);
        l += p;
        for (int64_t d = 0; d < D; ++d) o[d] += p * values[n][d];
      }
      for (int64_t d = 0; d < D; ++d) o[d] /= l;
      r.lse[static_cast<size_t>(bh * S + i)] = m + std::log(l);
    }
  }
  return r;
}

}  // namespace sapattn::ref
