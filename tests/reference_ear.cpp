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
                                      int guaranteed) {
  std::vector<uint8_t> mask(static_cast<size_t>(B * H * R * C), 0);
  const auto key = [](double x) { return std::isnan(x) ? -std::numeric_limits<double>::infinity() : x; };
  for (int64_t bh = 0; bh < B * H; ++bh) {
    for (int64_t a = 0; a < R; ++a) {
      const size_t row = static_cast<size_t>((bh * R + a) * C);
      const auto area = [&](int64_t j) {
        return static_cast<int64_t>(q_sizes[static_cast<size_t>(bh * R + a)]) *
               k_sizes[static_cast<size_t>(bh * C + j)];
      };
      std::vector<uint8_t> sure(static_cast<size_t>(C), 0);
      const std::vector<int64_t> by_prob = rank_descending(&probs[row], C);
      for (int64_t r = 0; r < std::min<int64_t>(guaranteed, C); ++r) sure[static_cast<size_t>(by_prob[r])] = 1;
      int64_t budget = 0, sure_area = 0;
      for (int64_t j = 0; j < C; ++j) {
        if (budget_mask[row + j] != 0) budget += area(j);
        if (sure[static_cast<size_t>(j)] != 0) sure_area += area(j);
      }
      const int64_t remaining = std::max<int64_t>(0, budget - sure_area);
      for (int64_t j = 0; j < C; ++j) {
        if (sure[static_cast<size_t>(j)] != 0) {
          mask[row + j] = 1;
          continue;
        }
        int64_t before = 0;
        for (int64_t i = 0; i < C; ++i) {
          if (i == j || sure[static_cast<size_t>(i)] != 0) continue;
          const double si = key(scores[row + i]), sj = key(scores[row + j]);
          if (si > sj || (si == sj && i < j)) before += area(i);
        }
        mask[row + j] = before < remaining ? 1 : 0;
      }
    }
  }
  return mask;
}

Attention compensated_attention(const TensorView& q, const TensorView& k, const TensorView& v, double scale,
                                const std::vector<uint8_t>& token_mask, const std::vector<int32_t>& q_labels, int64_t N,
                                const std::vector<uint8_t>& cluster_mask, int64_t Cq, const TensorView& k_centroids,
                                const TensorView& v_centroids, const std::vector<int32_t>& k_sizes) {
  const int64_t B = q.shape[0], H = q.shape[1], S = q.shape[2], D = q.shape[3], Sk = k.shape[2];
  const int64_t Ck = k_centroids.shape[2];
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
          if (cluster_mask[static_cast<size_t>((bh * Cq + a) * Ck + j)] != 0 || size == 0) continue;
          logits.push_back(std::log(static_cast<double>(size)) +
                           scale * dot(qi, &ck[static_cast<size_t>((bh * Ck + j) * D)], D));
          values.push_back(&cv[static_cast<size_t>((bh * Ck + j) * D)]);
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
