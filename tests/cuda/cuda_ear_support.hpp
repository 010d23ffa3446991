// What the SVG-EAR and ear-plus GPU suites (test_cuda_ear_*.cpp) share beyond cuda_support.hpp
// (streams, device twins of host tensors, workspaces, poisoned tensors): inputs drawn on the host
// (normal values, labels with empty, 1-token and large clusters, sizes, values that bf16 holds
// exactly), the probe's conditioning (what its error model scales), the byte-for-byte comparison of
// a GPU output with the CPU's, and the tensor-core compensation's error bound.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "cpu/rows.hpp"
#include "cuda/backend.hpp"
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

// F32 values on a grid of 1/4 in [lo, hi], so that rows hold ties, about half the zeros -0 and a
// share `nan_share` NaN: the weights and scores of the routing suites.
inline HostTensor coarse(std::vector<int64_t> shape, ref::Rng& rng, Layout layout, double lo, double hi,
                         double nan_share) {
  HostTensor t = cuda_test::poisoned(DType::F32, std::move(shape), layout);
  ref::for_each_index(t.view, [&](const auto& idx) {
    double x = std::floor(rng.uniform(lo, hi) * 4) / 4;
    if (x == 0 && rng.uniform() < 0.5) x = -0.0;
    if (rng.uniform() < nan_share) x = std::numeric_limits<double>::quiet_NaN();
    ref::set(t.view, idx, x);
  });
  return t;
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

// A process-wide kernel override (cuda::set_*_kernel_override) on "cuda_cores" for a scope.
template <void (*kSet)(const char*)>
class CudaCoresFor : public cuda_test::KernelOverrideScope<kSet> {
 public:
  CudaCoresFor() : cuda_test::KernelOverrideScope<kSet>("cuda_cores") {}
};

// centroid_compensation on the CUDA-core kernel.
using CudaCoreCompensation = CudaCoresFor<cuda::set_compensation_kernel_override>;

// The compensation ops on the kernel `name` for a scope.
using CompensationKernelScope = cuda_test::KernelOverrideScope<cuda::set_compensation_kernel_override>;
// ear_probe and ear_plus_probe on the CUDA-core pass (the CPU's logits bit for bit, fp64 sums); the
// tensor-core pass has its own suite, test_cuda_ear_probe_tc.cpp.
using CudaCoreProbe = CudaCoresFor<cuda::set_probe_kernel_override>;

// ---------------------------------------------------------------------------------------------
// bf16 operands
// ---------------------------------------------------------------------------------------------

inline constexpr double kBf16Eps = 0x1p-8;  // unit roundoff of bf16 (8 significant bits)

// x rounded to the nearest bf16 value, ties to even (what the kernels' conversions do).
inline float bf16_round(float x) {
  uint32_t u = 0;
  std::memcpy(&u, &x, sizeof u);
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  float r = 0;
  std::memcpy(&r, &u, sizeof r);
  return r;
}

// The relative error of a tensor's values as bf16 operands: 0 when every value is a bf16 value.
inline double bf16_rounding(const TensorView& t) {
  for (double x : ref::to_vector(t))
    if (static_cast<float>(x) != bf16_round(static_cast<float>(x))) return kBf16Eps;
  return 0.0;
}

// Normal(0, stddev) values that bf16 holds exactly (and f16 too: |x| < 2^-10 becomes 0).
inline void fill_bf16_values(const TensorView& t, ref::Rng& rng, double stddev = 1.0) {
  ref::for_each_index(t, [&](const auto& idx) {
    const float x = bf16_round(static_cast<float>(rng.normal() * stddev));
    ref::set(t, idx, std::abs(x) < 0x1p-10f ? 0.0 : x);
  });
}

// ---------------------------------------------------------------------------------------------
// The tensor-core compensation's error bound (docs/ear.md, "The CUDA backend")
// ---------------------------------------------------------------------------------------------

// The inputs of (corrected_)centroid_compensation as host views (spread, pair_values may be empty).
struct CompensationInputs {
  TensorView q, q_labels, mask, k_centroids, v_centroids, k_sizes, spread, pair_values;
  float scale = 1.0f;
};

// One video row's compensation evaluated in float64 from the stored inputs, and how far the
// tensor-core kernel may be from it. With u = 2^-24, u_b = 2^-8, Dp = 64 or 128 (D padded), the
// relative bf16 roundings e_q, e_k, e_v of q, kbar and the values (0 for values bf16 holds), and per
// skipped pseudo-key j with bias b_j = log|K_j| (+ spread_aj) and logit w_j = b_j + scale q.kbar_j:
//   delta_j = scale sum_d |q_d kbar_jd| (e_q + e_k + e_q e_k + (Dp + 16) 2^-23 + (D + 8) u)
//             + (Dp + 16) 2^-23 |b_j| + 8 u (|w_j| + |b_j| + 1)
// (the bf16 products; the tensor cores' fp32 accumulation of the products and of b_j / scale, which
// the accumulators start from, with truncation; the CPU's own fp32 dot product; the fp32 roundings
// of the bias, the scale and the exponent). With Delta = max_j delta_j over the row's n pseudo-keys:
//   |dlse| <= L = Delta + 2^-21 + (n + 16) u + 4 u (|lse'| + |lse_c| + 1)
// (ex2.approx, the fp32 sums and logs), and each weight, exact part included, moves by a factor
// within exp(+-2 L), so per output dim, with A = pi_0 |out0| + sum_j pi_j |v_j| and C = sum_j pi_j |v_j|:
//   |dout| <= (exp(2 L) - 1) A + exp(2 L) ((1 + u_b)(1 + e_v) - 1 + (n + 16) 2^-23) C + 8 u A
// (P and the values as bf16 operands of P V, its fp32 accumulation, the merge).
struct RowModel {
  bool skips = false;  // false: the op leaves the row as it is
  double lse = 0, lse_bound = 0;
  std::vector<double> out, out_bound, magnitude;  // [D]; magnitude: A
};

class CompensationModel {
 public:
  explicit CompensationModel(const CompensationInputs& in)
      : in_(in),
        q_(ref::to_vector(in.q)),
        kc_(ref::to_vector(in.k_centroids)),
        values_(ref::to_vector(in.pair_values.empty() ? in.v_centroids : in.pair_values)),
        spread_(in.spread.empty() ? std::vector<double>{} : ref::to_vector(in.spread)),
        e_q_(bf16_rounding(in.q)),
        e_k_(bf16_rounding(in.k_centroids)),
        e_v_(bf16_rounding(in.pair_values.empty() ? in.v_centroids : in.pair_values)) {}

  // Row i of (b, h) whose exact part is (lse0, out0).
  RowModel row(int64_t b, int64_t h, int64_t i, double lse0, const std::vector<double>& out0) const {
    const int64_t H = in_.q.shape[1], S = in_.q.shape[2], D = in_.q.shape[3], N = in_.q_labels.shape[2];
    const int64_t Cq = in_.mask.shape[2], Ck = in_.k_centroids.shape[2], m = Ck / in_.mask.shape[3];
    const int64_t bh = b * H + h, Dp = D <= 64 ? 64 : 128;
    const double u = ref::kF32Eps, acc = (Dp + 16) * 0x1p-23;
    RowModel r;
    if (i >= N) return r;
    const auto a = static_cast<int64_t>(ref::get(in_.q_labels, {b, h, i}));
    const double* q = &q_[static_cast<size_t>((bh * S + i) * D)];
    std::vector<int64_t> skipped;
    std::vector<double> w;
    double delta = 0, wmax = lse0;
    for (int64_t j = 0; j < Ck; ++j) {
      const double size = ref::get(in_.k_sizes, {b, h, j});
      if (ref::get(in_.mask, {b, h, a, j / m}) != 0 || size <= 0) continue;
      const double* k = &kc_[static_cast<size_t>((bh * Ck + j) * D)];
      double dot = 0, magnitude = 0;
      for (int64_t d = 0; d < D; ++d) {
        dot += q[d] * k[d];
        magnitude += std::abs(q[d] * k[d]);
      }
      double bias = std::log(size);
      if (!spread_.empty()) bias += spread_[static_cast<size_t>((bh * Cq + a) * Ck + j)];
      const double wj = bias + in_.scale * dot;
      const double dj = in_.scale * magnitude * (e_q_ + e_k_ + e_q_ * e_k_ + acc + (D + 8) * u) + acc * std::abs(bias) +
                        8 * u * (std::abs(wj) + std::abs(bias) + 1);
      skipped.push_back(j);
      w.push_back(wj);
      delta = std::max(delta, dj);
      wmax = std::max(wmax, wj);
    }
    r.skips = !skipped.empty();
    if (!r.skips) return r;
    const double n = static_cast<double>(skipped.size());
    double total = lse0 == -std::numeric_limits<double>::infinity() ? 0.0 : std::exp(lse0 - wmax), comp = 0;
    for (double x : w) comp += std::exp(x - wmax);
    total += comp;
    r.lse = wmax + std::log(total);
    const double lse_c = wmax + std::log(comp);
    r.lse_bound = delta + 0x1p-21 + (n + 16) * u + 4 * u * (std::abs(r.lse) + std::abs(lse_c) + 1);
    const double pi0 = lse0 == -std::numeric_limits<double>::infinity() ? 0.0 : std::exp(lse0 - r.lse);
    const double grow = std::exp(2 * r.lse_bound);
    const double operand = (1 + kBf16Eps) * (1 + e_v_) - 1 + (n + 16) * 0x1p-23;
    r.out.assign(static_cast<size_t>(D), 0.0);
    r.out_bound.assign(static_cast<size_t>(D), 0.0);
    r.magnitude.assign(static_cast<size_t>(D), 0.0);
    for (int64_t d = 0; d < D; ++d) {
      double o = pi0 * out0[static_cast<size_t>(d)], A = pi0 * std::abs(out0[static_cast<size_t>(d)]), C = 0;
      for (size_t t = 0; t < skipped.size(); ++t) {
        const double pi = std::exp(w[t] - r.lse);
        const int64_t row = in_.pair_values.empty() ? bh * Ck + skipped[t] : (bh * Cq + a) * Ck + skipped[t];
        const double v = values_[static_cast<size_t>(row * D + d)];
        o += pi * v;
        C += pi * std::abs(v);
      }
      A += C;
      r.out[static_cast<size_t>(d)] = o;
      r.magnitude[static_cast<size_t>(d)] = A;
      r.out_bound[static_cast<size_t>(d)] = (grow - 1) * A + grow * operand * C + 8 * u * A;
    }
    return r;
  }

 private:
  CompensationInputs in_;
  std::vector<double> q_, kc_, values_, spread_;
  double e_q_, e_k_, e_v_;
};

// Unit roundoff of an output dtype.
inline double unit_roundoff(DType dtype) {
  return dtype == DType::F32 ? ref::kF32Eps : dtype == DType::F16 ? 0x1p-11 : kBf16Eps;
}

}  // namespace sapattn::ear_cuda_test
