// What the SVG-EAR and ear-plus GPU suites (test_cuda_ear_*.cpp) share beyond cuda_support.hpp
// (streams, device twins of host tensors, workspaces, poisoned tensors): inputs drawn on the host
// (normal values, labels with empty, 1-token and large clusters, sizes), the probe's conditioning
// (what its error model scales) and the byte-for-byte comparison of a GPU output with the CPU's.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "cpu/rows.hpp"
#include "cuda_support.hpp"
#include "reference.hpp"
#include "sapattn/tensor.hpp"

namespace sapattn::ear_cuda_test {

using ref::HostTensor;
using ref::Layout;

// ---------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------

inline HostTensor normal(DType dtype, std::vector<int64_t> shape, ref::Rng& rng, Layout layout = Layout::Contiguous,
                         double stddev = 1.0) {
  HostTensor t = cuda_test::poisoned(dtype, std::move(shape), layout);
  ref::fill_normal(t.view, rng, 0.0, stddev);
  return t;
}

inline HostTensor i32_tensor(std::vector<int64_t> shape, const std::vector<int32_t>& values) {
  HostTensor t = cuda_test::poisoned(DType::I32, std::move(shape));
  std::copy(values.begin(), values.end(), t.storage.data_as<int32_t>());
  return t;
}

// Labels [B,H,N] (every (b,h) with empty, 1-token and large clusters) as the video part of a
// [B,H,N+extra] tensor, so that the views have a row stride other than N.
inline HostTensor random_labels(ref::Rng& rng, int64_t B, int64_t H, int64_t N, int64_t C, int64_t extra = 3) {
  HostTensor t = cuda_test::poisoned(DType::I32, {B, H, N + extra});
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const std::vector<int32_t> l = ref::random_labels_with_sizes(rng, ref::random_cluster_sizes(rng, N, C));
    std::copy(l.begin(), l.end(), t.storage.data_as<int32_t>() + bh * (N + extra));
  }
  t.view = t.view.slice(2, 0, N);
  return t;
}

inline std::vector<int32_t> counts_of(const TensorView& labels, int64_t C) {
  const int64_t B = labels.shape[0], H = labels.shape[1], N = labels.shape[2];
  std::vector<int32_t> counts(static_cast<size_t>(B * H * C), 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < N; ++i) ++counts[static_cast<size_t>((b * H + h) * C + ref::get(labels, {b, h, i}))];
  return counts;
}

// Random sizes in [0, hi], a quarter of them 0.
inline std::vector<int32_t> random_sizes(ref::Rng& rng, int64_t n, int64_t hi) {
  std::vector<int32_t> s(static_cast<size_t>(n));
  for (auto& x : s) x = rng.uniform() < 0.25 ? 0 : static_cast<int32_t>(rng.integer(1, hi));
  return s;
}

// The inputs the EAR and ear-plus error suites share: small centroids, keys (bf16) and values with
// good labels and sizes, and bad twins of them (a label out of range, a negative size).
struct ErrorInputs {
  static constexpr int64_t B = 1, H = 2, N = 100, D = 32, Cq = 4, Ck = 9;
  static constexpr float scale = 0.2f;
  cuda_test::Twin qc, kc, vc, k, v, labels, qs, ks, ks_negative, bad_labels;

  explicit ErrorInputs(ref::Rng& rng)
      : qc(normal(DType::F32, {B, H, Cq, D}, rng)),
        kc(normal(DType::F32, {B, H, Ck, D}, rng)),
        vc(normal(DType::F32, {B, H, Ck, D}, rng)),
        k(normal(DType::BF16, {B, H, N, D}, rng)),
        v(normal(DType::BF16, {B, H, N, D}, rng)),
        labels(random_labels(rng, B, H, N, Ck)),
        qs(i32_tensor({B, H, Cq}, std::vector<int32_t>(B * H * Cq, 10))),
        ks(i32_tensor({B, H, Ck}, counts_of(labels.host.view, Ck))),
        ks_negative(i32_tensor({B, H, Ck}, negative_sizes())),
        bad_labels(labels_out_of_range(rng)) {}

 private:
  static std::vector<int32_t> negative_sizes() {
    std::vector<int32_t> sizes(B * H * Ck, 5);
    sizes[3] = -1;
    return sizes;
  }
  static HostTensor labels_out_of_range(ref::Rng& rng) {
    HostTensor t = random_labels(rng, B, H, N, Ck);
    t.storage.data_as<int32_t>()[17] = static_cast<int32_t>(Ck);
    return t;
  }
};

// ---------------------------------------------------------------------------------------------
// The probe's conditioning
// ---------------------------------------------------------------------------------------------

// The probes on the host, the CPU backend's way (the same fp32 logits through cpu::dot, fp64 terms).
// Per (b,h,a,j), [B,H,Cq,Ck]: the magnitude M of the terms of E / exp(2m) and its value R (the fp64
// rounding of two summation orders moves log E by at most about (n + 16) 2^-52 M / R), the running
// max m (the centroid logit c or a larger key logit), c, and the mass sum_t exp(s_t - m). Per (b,h,j),
// [B,H,Ck]: the number of tokens and the largest |v_td| among them.
struct ProbeConditioning {
  std::vector<double> magnitude, value, run_max, centroid_logit, mass;
  std::vector<int64_t> tokens;
  std::vector<double> value_max;
};

inline ProbeConditioning probe_conditioning(const TensorView& qc, const TensorView& kc, const TensorView& vc,
                                            const TensorView& k, const TensorView& v, const TensorView& labels,
                                            const std::vector<int32_t>& k_sizes, float scale) {
  const int64_t B = k.shape[0], H = k.shape[1], N = k.shape[2], D = k.shape[3];
  const int64_t Cq = qc.shape[2], Ck = kc.shape[2];
  const size_t pairs = static_cast<size_t>(B * H * Cq * Ck);
  ProbeConditioning out{std::vector<double>(pairs),
                        std::vector<double>(pairs),
                        std::vector<double>(pairs),
                        std::vector<double>(pairs),
                        std::vector<double>(pairs),
                        std::vector<int64_t>(static_cast<size_t>(B * H * Ck), 0),
                        std::vector<double>(static_cast<size_t>(B * H * Ck), 0.0)};
  std::vector<float> q(D), kb(D), vb(D), keys(static_cast<size_t>(N * D));
  std::vector<double> values(static_cast<size_t>(N * D));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t bh = b * H + h;
      std::vector<std::vector<int64_t>> members(static_cast<size_t>(Ck));
      for (int64_t t = 0; t < N; ++t) {
        members[static_cast<size_t>(ref::get(labels, {b, h, t}))].push_back(t);
        for (int64_t d = 0; d < D; ++d) {
          keys[static_cast<size_t>(t * D + d)] = static_cast<float>(ref::get(k, {b, h, t, d}));
          values[static_cast<size_t>(t * D + d)] = ref::get(v, {b, h, t, d});
        }
      }
      for (int64_t j = 0; j < Ck; ++j) {
        const size_t at = static_cast<size_t>(bh * Ck + j);
        out.tokens[at] = static_cast<int64_t>(members[static_cast<size_t>(j)].size());
        for (int64_t t : members[static_cast<size_t>(j)])
          for (int64_t d = 0; d < D; ++d)
            out.value_max[at] = std::max(out.value_max[at], std::abs(values[static_cast<size_t>(t * D + d)]));
      }
      for (int64_t a = 0; a < Cq; ++a) {
        for (int64_t d = 0; d < D; ++d) q[d] = static_cast<float>(ref::get(qc, {b, h, a, d}));
        for (int64_t j = 0; j < Ck; ++j) {
          for (int64_t d = 0; d < D; ++d) {
            kb[d] = static_cast<float>(ref::get(kc, {b, h, j, d}));
            vb[d] = static_cast<float>(ref::get(vc, {b, h, j, d}));
          }
          const double c = static_cast<double>(cpu::dot(q.data(), kb.data(), D) * scale);
          const std::vector<int64_t>& js = members[static_cast<size_t>(j)];
          std::vector<double> s(js.size());
          double m = c;
          for (size_t n = 0; n < js.size(); ++n) {
            s[n] = static_cast<double>(cpu::dot(q.data(), &keys[static_cast<size_t>(js[n] * D)], D) * scale);
            m = std::max(m, s[n]);
          }
          const double pc = std::exp(c - m);
          double sq = 0, cr = 0, cr_abs = 0, vn = 0, mass = 0;
          for (int64_t d = 0; d < D; ++d) vn += static_cast<double>(vb[d]) * vb[d];
          for (size_t n = 0; n < js.size(); ++n) {
            double n2 = 0, cd = 0;
            for (int64_t d = 0; d < D; ++d) {
              const double x = values[static_cast<size_t>(js[n] * D + d)];
              n2 += x * x;
              cd += vb[d] * x;
            }
            const double e = std::exp(s[n] - m);
            sq += e * e * n2;
            cr += e * cd;
            cr_abs += e * std::abs(cd);
            mass += e;
          }
          const double K = k_sizes[static_cast<size_t>(bh * Ck + j)];
          const size_t at = static_cast<size_t>((bh * Cq + a) * Ck + j);
          out.magnitude[at] = sq + 2 * pc * cr_abs + pc * pc * K * vn;
          out.value[at] = sq - 2 * pc * cr + pc * pc * K * vn;
          out.run_max[at] = m;
          out.centroid_logit[at] = c;
          out.mass[at] = mass;
        }
      }
    }
  return out;
}

// The bound on |d log E| between two fp64 evaluations of the probe's E (two summation orders, each
// with a rescaling chain of up to n steps, and libm against CUDA exp, <= 2 ulp): 4 (n + 16) 2^-52
// M / R. Infinite when E cancels (R <= 0); 0 for an empty cluster (M = 0: the closed form).
inline double log_error_bound(const ProbeConditioning& cond, size_t pair, int64_t tokens) {
  if (cond.magnitude[pair] == 0) return 0.0;
  if (!(cond.value[pair] > 0)) return std::numeric_limits<double>::infinity();
  return 4 * (static_cast<double>(tokens) + 16) * 0x1p-52 * cond.magnitude[pair] / cond.value[pair];
}

inline std::string where(const TensorView& v, int64_t flat) {
  std::ostringstream os;
  os << "[";
  std::vector<int64_t> idx(static_cast<size_t>(v.rank));
  for (int d = v.rank - 1; d >= 0; --d) {
    idx[static_cast<size_t>(d)] = flat % v.shape[d];
    flat /= v.shape[d];
  }
  for (int d = 0; d < v.rank; ++d) os << (d ? "," : "") << idx[static_cast<size_t>(d)];
  os << "]";
  return os.str();
}

// Expects the two storages to be byte-identical; names the first differing view element.
inline void expect_identical(const HostTensor& gpu, const HostTensor& cpu, const char* what) {
  if (gpu.bytes() == cpu.bytes()) return;
  const std::vector<double> g = ref::to_vector(gpu.view), c = ref::to_vector(cpu.view);
  for (size_t i = 0; i < g.size(); ++i)
    if (!(g[i] == c[i]) && !(std::isnan(g[i]) && std::isnan(c[i]))) {
      ADD_FAILURE() << what << ": GPU " << g[i] << " != CPU " << c[i] << " at " << where(gpu.view, i);
      return;
    }
  ADD_FAILURE() << what << ": the views agree but bytes outside the view differ (written out of bounds)";
}

}  // namespace sapattn::ear_cuda_test
