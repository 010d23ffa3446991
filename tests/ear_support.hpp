// What the SVG-EAR op suites (test_ear_*.cpp) share: tensors from values, random cluster labels and
// their counts; the probe cases (a hand-made one with a closed form, random ones with float64
// copies); the compensation cases, the path svg2_attention takes through the compensation, and the
// fp32 attention error model the compensated outputs are checked with.
#pragma once

#include <cmath>
#include <cstdint>
#include <string_view>
#include <vector>

#include "reference.hpp"
#include "sapattn/tensor.hpp"

namespace sapattn::ear_test {

inline constexpr double kEps = 1e-8;  // the probe's floor on errors and areas (ops.hpp)

Tensor from_values(DType dtype, std::vector<int64_t> shape, const std::vector<double>& values);
Tensor sizes_tensor(std::vector<int64_t> shape, const std::vector<int32_t>& sizes);
// Per (b,h), the number of labels equal to each of C clusters.
std::vector<int32_t> counts_of(const std::vector<int32_t>& labels, int64_t BH, int64_t N, int64_t C);
// Random labels [B*H, N] over C clusters with empty, 1-token and larger clusters in every (b,h).
std::vector<int32_t> random_labels(ref::Rng& rng, int64_t BH, int64_t N, int64_t C);

// ---------------------------------------------------------------------------------------------
// ear_probe
// ---------------------------------------------------------------------------------------------

struct ProbeCase {
  Tensor qc, kc, vc, labels, q_sizes, k_sizes;
};

// ear_probe's scores [B,H,Cq,Ck] for the case's centroids and sizes.
Tensor probe(const ProbeCase& c, const TensorView& k, const TensorView& v, float scale, float gamma);

// One query centroid (1, 0) of 3 queries. Key cluster 0 holds k = (1,0), v = (1,0) and
// k = (-1,0), v = (0,1), with centroids kbar = (0,0), vbar = (1/2,1/2); key cluster 1 is empty
// (a stale centroid (5,5)); key cluster 2 holds two copies of k = (0,1), v = (2,0), which are
// exactly its centroids. The keys and values, in token order: the k and v of EarProbe's and
// EarPlusProbe's hand-made tests.
ProbeCase hand_made_probe_case();

// Random centroids of Cq query clusters; keys and values (strided) in Ck random clusters (empty and
// 1-token ones included) with their means as centroids; query-cluster sizes with 0 and 1 among them.
struct RandomProbe {
  ProbeCase c;
  ref::HostTensor k, v;
  std::vector<int32_t> labels, k_sizes, q_sizes;
  std::vector<double> qd, kd, vd, ck, cv;  // float64 copies of the query centroids, k, v and k, v centroids
  int64_t N = 0, Cq = 0, Ck = 0, D = 0;
  const double* row(const std::vector<double>& x, int64_t r) const { return &x[static_cast<size_t>(r * D)]; }
  // x . y, or sum |x_d y_d| with `magnitude`.
  double dot(const double* x, const double* y, bool magnitude) const {
    double sum = 0;
    for (int64_t d = 0; d < D; ++d) sum += magnitude ? std::fabs(x[d] * y[d]) : x[d] * y[d];
    return sum;
  }

  // The probe's error E of query cluster a and key cluster j of (b,h) bh in float64, and what its
  // fp32 evaluation may be off by. With s_t = scale qbar_a . k_t over the cluster's keys and
  // c = scale qbar_a . kbar_j:
  struct PairError {
    double error = 0;        // E = sum_t |exp(s_t) v_t - exp(c) vbar_j|^2
    double magnitude = 0;    // T, the total magnitude of E's terms once expanded
    double logit_error = 0;  // ds = (D + 2) u scale max sum_d |qbar_d k_d| over the keys and kbar_j (Higham 3.5)
  };
  PairError pair_error(int64_t bh, int64_t a, int64_t j, double scale) const;
};

RandomProbe random_probe(ref::Rng& rng, DType dtype, int64_t B, int64_t H, int64_t N, int64_t Cq, int64_t Ck,
                         int64_t D);

// ---------------------------------------------------------------------------------------------
// centroid_compensation
// ---------------------------------------------------------------------------------------------

// Sparse attention in token order through the clusters of `q_labels` / `k_labels` and the mask,
// then the compensation: the path svg2_attention takes.
// With `corrections`, the compensation is corrected_centroid_compensation's with these terms.
struct Corrections {
  TensorView spread, pair_values;
};

ref::Attention compensated(const TensorView& q, const TensorView& k, const TensorView& v, const Tensor& q_labels,
                           const Tensor& k_labels, const Tensor& mask, const Tensor& k_centroids,
                           const Tensor& v_centroids, const Tensor& k_sizes, float scale, int64_t N,
                           ref::Attention* before = nullptr, const Corrections* corrections = nullptr);

struct CompensationCase {
  ref::HostTensor q, k, v;
  Tensor q_labels, k_labels, mask, kc, vc, k_sizes;
  std::vector<int32_t> q_label_values, k_label_values, k_size_values;
  std::vector<uint8_t> mask_values;
};

// Random clusters (empty ones included) and a random mask; N video query rows of S (the rest
// stand for text tokens: label Cq, attending everything, never compensated).
CompensationCase compensation_case(ref::Rng& rng, DType dtype, int64_t B, int64_t H, int64_t S, int64_t N, int64_t D,
                                   int64_t Cq, int64_t Ck, bool identical_clusters);

// What the float64 reference (ref::compensated_attention) takes of a case whose first N of S rows
// are video: the layout's token mask [B,H,S,S] in token order, the video rows' labels [B,H,N] and
// the mask's video rows [B,H,Cq,Ck].
struct CompensationReference {
  std::vector<uint8_t> tokens;
  std::vector<int32_t> video_labels;
  std::vector<uint8_t> video_mask;
};
CompensationReference compensation_reference(const CompensationCase& c, int64_t N);

// The fp32 attention error model of the attention suite: |out - out64| <= 4 (D + Sk) u max|v| per
// element (the sums of Sk weights and D products, the exp and the division), lse to (D + Sk) u.
void expect_close(const ref::Attention& got, const ref::Attention& want, double max_v, int64_t D, int64_t Sk,
                  std::string_view what);

double max_abs(const std::vector<double>& x);

}  // namespace sapattn::ear_test
