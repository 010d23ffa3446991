// The SVG-EAR suites' shared cases and checks (ear_support.hpp says what each one is).
#include "ear_support.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include "sapattn/svg2.hpp"
#include "test_support.hpp"

namespace sapattn::ear_test {

using testing_support::kStream;

Tensor from_values(DType dtype, std::vector<int64_t> shape, const std::vector<double>& values) {
  Tensor t(dtype, std::move(shape));
  ref::from_vector(t.view(), values);
  return t;
}

Tensor sizes_tensor(std::vector<int64_t> shape, const std::vector<int32_t>& sizes) {
  Tensor t(DType::I32, std::move(shape));
  std::copy(sizes.begin(), sizes.end(), t.data_as<int32_t>());
  return t;
}

std::vector<int32_t> counts_of(const std::vector<int32_t>& labels, int64_t BH, int64_t N, int64_t C) {
  std::vector<int32_t> counts(static_cast<size_t>(BH * C), 0);
  for (int64_t bh = 0; bh < BH; ++bh)
    for (int64_t i = 0; i < N; ++i) ++counts[static_cast<size_t>(bh * C + labels[static_cast<size_t>(bh * N + i)])];
  return counts;
}

std::vector<int32_t> random_labels(ref::Rng& rng, int64_t BH, int64_t N, int64_t C) {
  std::vector<int32_t> labels;
  for (int64_t bh = 0; bh < BH; ++bh) {
    const std::vector<int32_t> l = ref::random_labels_with_sizes(rng, ref::random_cluster_sizes(rng, N, C));
    labels.insert(labels.end(), l.begin(), l.end());
  }
  return labels;
}

Tensor probe(const ProbeCase& c, const TensorView& k, const TensorView& v, float scale, float gamma) {
  Tensor scores(DType::F32, {c.qc.shape()[0], c.qc.shape()[1], c.qc.shape()[2], c.kc.shape()[2]});
  ear_probe(c.qc.view(), c.kc.view(), c.vc.view(), k, v, c.labels.view(), c.q_sizes.view(), c.k_sizes.view(), scale,
            gamma, scores.view(), kStream);
  return scores;
}

ProbeCase hand_made_probe_case() {
  ProbeCase c;
  c.qc = from_values(DType::F32, {1, 1, 1, 2}, {1, 0});
  c.kc = from_values(DType::F32, {1, 1, 3, 2}, {0, 0, 5, 5, 0, 1});
  c.vc = from_values(DType::F32, {1, 1, 3, 2}, {0.5, 0.5, 0, 0, 2, 0});
  c.labels = sizes_tensor({1, 1, 4}, {0, 2, 0, 2});
  c.q_sizes = sizes_tensor({1, 1, 1}, {3});
  c.k_sizes = sizes_tensor({1, 1, 3}, {2, 0, 2});
  return c;
}

RandomProbe random_probe(ref::Rng& rng, DType dtype, int64_t B, int64_t H, int64_t N, int64_t Cq, int64_t Ck,
                         int64_t D) {
  RandomProbe r{{},
                ref::make_tensor(dtype, {B, H, N, D}, ref::Layout::Padded),
                ref::make_tensor(dtype, {B, H, N, D}, ref::Layout::Transposed)};
  ProbeCase& c = r.c;
  c.qc = Tensor(DType::F32, {B, H, Cq, D});
  ref::fill_normal(c.qc.view(), rng);
  ref::fill_normal(r.k.view, rng);
  ref::fill_normal(r.v.view, rng);
  r.labels = random_labels(rng, B * H, N, Ck);
  r.k_sizes = counts_of(r.labels, B * H, N, Ck);
  for (int64_t i = 0; i < B * H * Cq; ++i) r.q_sizes.push_back(i % 7 == 1 ? 0 : static_cast<int32_t>(1 + i * 5 % 11));
  c.labels = sizes_tensor({B, H, N}, r.labels);
  c.k_sizes = sizes_tensor({B, H, Ck}, r.k_sizes);
  c.q_sizes = sizes_tensor({B, H, Cq}, r.q_sizes);
  c.kc = Tensor(DType::F32, {B, H, Ck, D});
  c.vc = Tensor(DType::F32, {B, H, Ck, D});
  cluster_means(r.k.view, c.labels.view(), c.kc.view(), kStream);
  cluster_means(r.v.view, c.labels.view(), c.vc.view(), kStream);
  r.qd = ref::to_vector(c.qc.view());
  r.kd = ref::to_vector(r.k.view);
  r.vd = ref::to_vector(r.v.view);
  r.ck = ref::to_vector(c.kc.view());
  r.cv = ref::to_vector(c.vc.view());
  r.N = N;
  r.Cq = Cq;
  r.Ck = Ck;
  r.D = D;
  return r;
}

RandomProbe::PairError RandomProbe::pair_error(int64_t bh, int64_t a, int64_t j, double scale) const {
  const double* qa = row(qd, bh * Cq + a);
  const double* kbar = row(ck, bh * Ck + j);
  const double* vbar = row(cv, bh * Ck + j);
  const double c_logit = scale * dot(qa, kbar, false);
  PairError e;
  double largest = dot(qa, kbar, true);
  for (int64_t t = 0; t < N; ++t) {
    if (labels[static_cast<size_t>(bh * N + t)] != j) continue;
    const double* kt = row(kd, bh * N + t);
    const double* vt = row(vd, bh * N + t);
    const double st = scale * dot(qa, kt, false);
    largest = std::max(largest, dot(qa, kt, true));
    e.magnitude += std::exp(2 * st) * dot(vt, vt, false) + 2 * std::exp(st + c_logit) * dot(vt, vbar, true) +
                   std::exp(2 * c_logit) * dot(vbar, vbar, false);
    for (int64_t d = 0; d < D; ++d) e.error += std::pow(std::exp(st) * vt[d] - std::exp(c_logit) * vbar[d], 2);
  }
  e.logit_error = (D + 2) * ref::kF32Eps * scale * largest;
  return e;
}

ref::Attention compensated(const TensorView& q, const TensorView& k, const TensorView& v, const Tensor& q_labels,
                           const Tensor& k_labels, const Tensor& mask, const Tensor& k_centroids,
                           const Tensor& v_centroids, const Tensor& k_sizes, float scale, int64_t N,
                           ref::Attention* before, const Corrections* corrections) {
  const int64_t B = q.shape[0], H = q.shape[1], S = q.shape[2], D = q.shape[3];
  const int64_t Cq = mask.shape()[2], Ck = mask.shape()[3];
  Tensor qp(DType::I32, {B, H, S}), kp(DType::I32, {B, H, k.shape[2]}), qo(DType::I32, {B, H, Cq + 1}),
      ko(DType::I32, {B, H, Ck + 1});
  cluster_permutation(q_labels.view(), static_cast<int>(Cq), qp.view(), qo.view(), kStream);
  cluster_permutation(k_labels.view(), static_cast<int>(Ck), kp.view(), ko.view(), kStream);
  Tensor out(DType::F32, {B, H, S, D}), lse(DType::F32, {B, H, S});
  block_sparse_attention(q, k, v, {qo.view(), ko.view(), mask.view()}, scale, out.view(), lse.view(), kStream, {},
                         {qp.view(), kp.view()});
  if (before != nullptr) *before = {ref::to_vector(out.view()), ref::to_vector(lse.view())};
  const TensorView video_labels = q_labels.view().slice(2, 0, N);
  if (corrections != nullptr)
    corrected_centroid_compensation(q, video_labels, mask.view(), k_centroids.view(), v_centroids.view(),
                                    k_sizes.view(), corrections->spread, corrections->pair_values, scale, out.view(),
                                    lse.view(), kStream);
  else
    centroid_compensation(q, video_labels, mask.view(), k_centroids.view(), v_centroids.view(), k_sizes.view(), scale,
                          out.view(), lse.view(), kStream);
  return {ref::to_vector(out.view()), ref::to_vector(lse.view())};
}

CompensationCase compensation_case(ref::Rng& rng, DType dtype, int64_t B, int64_t H, int64_t S, int64_t N, int64_t D,
                                   int64_t Cq, int64_t Ck, bool identical_clusters) {
  CompensationCase c{ref::make_tensor(dtype, {B, H, S, D}, ref::Layout::Transposed),
                     ref::make_tensor(dtype, {B, H, S, D}, ref::Layout::Contiguous),
                     ref::make_tensor(dtype, {B, H, S, D}, ref::Layout::Padded)};
  ref::fill_normal(c.q.view, rng);
  c.k_label_values = random_labels(rng, B * H, S, Ck);
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const std::vector<int32_t> l = random_labels(rng, 1, N, Cq);
    c.q_label_values.insert(c.q_label_values.end(), l.begin(), l.end());
    c.q_label_values.insert(c.q_label_values.end(), static_cast<size_t>(S - N), static_cast<int32_t>(Cq));
  }
  if (identical_clusters) {  // every key (value) equals its cluster's own random vector
    std::vector<double> kd(static_cast<size_t>(B * H * S * D)), vd(kd.size()), centers(static_cast<size_t>(2 * Ck * D));
    for (double& x : centers) x = rng.normal();
    for (int64_t r = 0; r < B * H * S; ++r)
      for (int64_t d = 0; d < D; ++d) {
        const int64_t j = c.k_label_values[static_cast<size_t>(r)];
        kd[static_cast<size_t>(r * D + d)] = centers[static_cast<size_t>(j * D + d)];
        vd[static_cast<size_t>(r * D + d)] = centers[static_cast<size_t>((Ck + j) * D + d)];
      }
    ref::from_vector(c.k.view, kd);
    ref::from_vector(c.v.view, vd);
  } else {
    ref::fill_normal(c.k.view, rng);
    ref::fill_normal(c.v.view, rng);
  }
  c.q_labels = sizes_tensor({B, H, S}, c.q_label_values);
  c.k_labels = sizes_tensor({B, H, S}, c.k_label_values);
  c.k_size_values = counts_of(c.k_label_values, B * H, S, Ck);
  c.k_sizes = sizes_tensor({B, H, Ck}, c.k_size_values);
  c.mask = Tensor(DType::U8, {B, H, Cq + 1, Ck});  // row Cq: the text rows, keep all
  for (int64_t i = 0; i < c.mask.numel(); ++i) {
    const bool text_row = (i / Ck) % (Cq + 1) == Cq;
    c.mask.data_as<uint8_t>()[i] = text_row || rng.integer(0, 2) == 0 ? 1 : 0;
  }
  c.mask_values.assign(c.mask.data_as<uint8_t>(), c.mask.data_as<uint8_t>() + c.mask.numel());
  c.kc = Tensor(DType::F32, {B, H, Ck, D});
  c.vc = Tensor(DType::F32, {B, H, Ck, D});
  cluster_means(c.k.view, c.k_labels.view(), c.kc.view(), kStream);
  cluster_means(c.v.view, c.k_labels.view(), c.vc.view(), kStream);
  return c;
}

CompensationReference compensation_reference(const CompensationCase& c, int64_t N) {
  const int64_t B = c.q.view.shape[0], H = c.q.view.shape[1], S = c.q.view.shape[2];
  const int64_t Cq = c.mask.shape()[2] - 1, Ck = c.mask.shape()[3];  // mask row Cq: the text rows
  CompensationReference r;
  r.tokens.resize(static_cast<size_t>(B * H * S * S));
  for (int64_t bh = 0; bh < B * H; ++bh)
    for (int64_t i = 0; i < S; ++i)
      for (int64_t j = 0; j < S; ++j) {
        const int64_t a = c.q_label_values[static_cast<size_t>(bh * S + i)];
        const int64_t b = c.k_label_values[static_cast<size_t>(bh * S + j)];
        r.tokens[static_cast<size_t>((bh * S + i) * S + j)] =
            c.mask_values[static_cast<size_t>((bh * (Cq + 1) + a) * Ck + b)];
      }
  for (int64_t bh = 0; bh < B * H; ++bh) {
    r.video_labels.insert(r.video_labels.end(), c.q_label_values.begin() + bh * S,
                          c.q_label_values.begin() + bh * S + N);
    r.video_mask.insert(r.video_mask.end(), c.mask_values.begin() + bh * (Cq + 1) * Ck,
                        c.mask_values.begin() + (bh * (Cq + 1) + Cq) * Ck);
  }
  return r;
}

void expect_close(const ref::Attention& got, const ref::Attention& want, double max_v, int64_t D, int64_t Sk,
                  std::string_view what) {
  const double tol_out = 4.0 * static_cast<double>(D + Sk) * ref::kF32Eps * max_v;
  for (size_t i = 0; i < want.out.size(); ++i) ASSERT_NEAR(got.out[i], want.out[i], tol_out) << what << " out " << i;
  for (size_t i = 0; i < want.lse.size(); ++i)
    ASSERT_NEAR(got.lse[i], want.lse[i],
                4.0 * static_cast<double>(D + Sk) * ref::kF32Eps * (1 + std::fabs(want.lse[i])))
        << what << " lse " << i;
}

double max_abs(const std::vector<double>& x) {
  double m = 0;
  for (double e : x) m = std::max(m, std::fabs(e));
  return m;
}

}  // namespace sapattn::ear_test
