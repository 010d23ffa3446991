// The tensor-core probe (src/cuda/ear/ear_probe_tc.cu: the default pass of ear_probe and
// ear_plus_probe for bf16 and f16 keys up to head dim 128) against the CPU backend on the same
// inputs, the routing from its scores against the CPU's, and the kernel override
// (docs/ear.md, "The probe on tensor cores"). Inputs are drawn on the host (seeded by the test's name):
// normal centroids, keys and values, random labels with empty, 1-token and large clusters, in several
// layouts, some as the video part of a longer tensor whose text rows are NaN (a read of them shows).
//
// The error model (docs/ear.md, "The probe on tensor cores"). The tensor cores see the query centroid
// as hi + lo of the key dtype (f16: the row scaled by 2^e into [2^14, 2^15)) and kbar_j as hi + lo;
// `Model` evaluates the probe in fp64 from exactly those inputs (s*_t = scale q~ . k_t,
// c*_aj = scale q~ . kbar~_j), so what the centroids' rounding does is computed. Both the GPU's
// arithmetic (against the model) and the rounding with the CPU's own fp32 logits (the CPU against
// the model) are bounded per pair, to first order in the perturbations eps of the weights
// w_t = exp(s_t - m) and e_c = exp(c - m), with x_t = w_t v_t - e_c vbar (u = 2^-24, n the cluster's
// tokens, L the pair's largest |logit|):
//   the GPU: eps_t = 18 2^-23 scale B_t + u |s_t| + 2^-22 + 2 u |s_t - m| + (n/32 + 3) 2 (2^-22 + 4 u L),
//            B_t = sum over the k16 steps (hi, then lo) of |accumulator in| + sum |products| (mma_dot);
//            eps_c likewise, its two accumulators and 2 u |c|;
//            dE = 2 sum_t |x_t| dx_t + sum_t dx_t^2, dx_t = w_t |v_t| eps_t + e_c |vbar| eps_c,
//                 + (n/2 + 8) u sum_t tau_t (fp32 sums; tau_t = w^2 d2 + 2 w |dw g| + dw^2 |vbar|^2)
//                 + (D/32 + 8) u sum_t (w^2 d2 + 2 w |dw| sqrt(d2 |vbar|^2)) + u sum_t dw^2 |vbar|^2 (the
//                 fp32 statistics) + |K - n| e_c^2 |vbar|^2 (2 eps_c + 4 u);
//   the CPU: the same first-order sum with eps_t = scale sum_d |q_d - q~_d| |k_td| + (D/8 + 4) u scale
//            sum_d |q_d k_td| + 2 u |s_t| (and kbar's rounding in eps_c);
// |d log E| <= dE / (E - dE), and 8 u max(1, |score|) + 2 u (|log E's sum| + 2 |m|) for the logs and the
// output. A pair with dE >= E / 2 (E cancels to rounding noise) is only checked for range. The mass:
// |d log M| <= sum_t w_t eps_t / M + (n/2 + 8) u (+ its log); the spread adds eps_c and its roundings.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/backend.hpp"
#include "cuda_ear_support.hpp"
#include "reference.hpp"
#include "sapattn/dtype.hpp"
#include "sapattn/ops.hpp"
#include "test_support.hpp"

namespace sapattn {
namespace {

using cuda_test::as_workspace;
using cuda_test::device_workspace;
using cuda_test::kCpu;
using cuda_test::poisoned;
using cuda_test::TestStream;
using cuda_test::Twin;
using ear_cuda_test::counts_of;
using ear_cuda_test::i32_tensor;
using ear_cuda_test::normal;
using ear_cuda_test::random_labels;
using ear_cuda_test::random_sizes;
using ear_cuda_test::where;
using ref::HostTensor;
using ref::Layout;

constexpr double kU = ref::kF32Eps;
constexpr double kInf = std::numeric_limits<double>::infinity();

struct TcCase {
  int64_t B, H, N, D, Cq, Ck;
  DType k_dtype, v_dtype;
  Layout layout;
  int64_t text;  // > 0: k and v are the video part of [B,H,N+text,D] tensors with NaN text rows
};

std::string describe(const TcCase& c) {
  std::ostringstream os;
  os << "B" << c.B << "_H" << c.H << "_N" << c.N << "_D" << c.D << "_Cq" << c.Cq << "_Ck" << c.Ck << "_k"
     << dtype_name(c.k_dtype) << "_v" << dtype_name(c.v_dtype) << "_" << ref::layout_name(c.layout) << "_text"
     << c.text;
  return testing_support::case_name(os.str());
}

// x rounded to `dtype` (bf16 or f16) and back, as the kernels' conversions round (to nearest even).
float round_to(DType dtype, float x) {
  return dtype == DType::F16 ? f16_to_f32(f32_to_f16(x)) : bf16_to_f32(f32_to_bf16(x));
}

// What the tensor cores see of a row of fp32 values: hi and lo of `dtype` (f16: of the row scaled by
// 2^e, e = 14 - ilogb(max|x|) within +-100, as the kernel scales query rows when `scaled`), unscaled.
void split_row(DType dtype, bool scaled, const float* x, int64_t D, double* hi, double* lo) {
  float top = 0.0f;
  for (int64_t d = 0; d < D; ++d) top = std::max(top, std::abs(x[d]));
  const int shift = dtype == DType::F16 && scaled && top > 0.0f ? std::clamp(14 - std::ilogb(top), -100, 100) : 0;
  for (int64_t d = 0; d < D; ++d) {
    const float y = std::ldexp(x[d], shift), h = round_to(dtype, y);
    hi[d] = std::ldexp(static_cast<double>(h), -shift);
    lo[d] = std::ldexp(static_cast<double>(round_to(dtype, y - h)), -shift);
  }
}

// A logit as the tensor cores accumulate it: per k16 step the hi products, then the lo products, into
// one fp32 accumulator. Returns the exact sum of (hi + lo) . k; `bound` gets sum over the steps of
// |accumulator in| + sum |products of the step|, which 18 2^-23 turns into a bound on the fp32
// accumulation (each step aligns its 16 products and the accumulator to the largest and truncates:
// < 1 ulp of the largest term each, and the result's rounding).
double mma_dot(const double* hi, const double* lo, const double* k, int64_t D, double& bound) {
  double acc = 0;
  for (int64_t d0 = 0; d0 < D; d0 += 16)
    for (const double* part : {hi, lo}) {
      double sum = 0, magnitude = 0;
      for (int64_t d = d0; d < std::min(D, d0 + 16); ++d) {
        sum += part[d] * k[d];
        magnitude += std::abs(part[d] * k[d]);
      }
      bound += std::abs(acc) + magnitude;
      acc += sum;
    }
  return acc;
}

constexpr double kMmaStep = 18 * 0x1p-23;  // per unit of the mma_dot bound

// One pair's model values (fp64 from the tensor cores' inputs) and the bounds of the file comment:
// the GPU's arithmetic against the model (tol_*), the model against the CPU (rep_*: the rounding of
// the centroids to hi + lo, and the CPU's own fp32 logits).
struct Pair {
  double log_e = -kInf, log_m = -kInf, spread = 0;  // log E (with its running max), log M, the spread
  double tol_e = 0, tol_m = 0, tol_spread = 0;
  double rep_e = 0, rep_m = 0, rep_spread = 0;
  double log_mag = 0;  // |log of E's fp32 sum| + 2 |m|: what the fp32 log and the fp64 sum round
  bool ill = false;    // E cancels: the perturbations' bound reaches E / 2
};

// |d log E| from the first-order bound dE of the perturbed weights (infinite when dE >= E / 2).
double log_bound(double dE, double E) { return dE == 0 ? 0.0 : dE < E / 2 ? dE / (E - dE) : kInf; }

// The probe of every (b,h,a,j) from the tensor cores' inputs, with the bounds.
class Model {
 public:
  Model(const TensorView& qc, const TensorView& kc, const TensorView& vc, const TensorView& k, const TensorView& v,
        const TensorView& labels, const std::vector<int32_t>& k_sizes, float scale)
      : Ck_(kc.shape[2]), pairs_(static_cast<size_t>(k.shape[0] * k.shape[1] * qc.shape[2] * Ck_)) {
    const int64_t BH = k.shape[0] * k.shape[1], N = k.shape[2], D = k.shape[3], Cq = qc.shape[2], Ck = Ck_;
    const DType t = k.dtype;
    const std::vector<double> q_all = ref::to_vector(qc), kc_all = ref::to_vector(kc), vc_all = ref::to_vector(vc);
    const std::vector<double> k_all = ref::to_vector(k), v_all = ref::to_vector(v);
    const std::vector<int32_t> label = ref::to_i32(labels);
    const double cpu_dot = (D / 8.0 + 4) * kU;  // the CPU's 8-lane fp32 dot, per unit of sum |q k|
    auto sz = [](int64_t i) { return static_cast<size_t>(i); };
    std::vector<float> row(sz(D));
    std::vector<double> q_hi(sz(D)), q_lo(sz(D)), kb_hi(sz(Ck * D)), kb_lo(sz(Ck * D));
    for (int64_t bh = 0; bh < BH; ++bh) {
      const double* q_row = &q_all[sz(bh * Cq * D)];
      const double* kc_row = &kc_all[sz(bh * Ck * D)];
      const double* vc_row = &vc_all[sz(bh * Ck * D)];
      const double* keys = &k_all[sz(bh * N * D)];
      std::vector<std::vector<int64_t>> members(sz(Ck));
      for (int64_t i = 0; i < N; ++i) members[sz(label[sz(bh * N + i)])].push_back(i);
      for (int64_t j = 0; j < Ck; ++j) {
        for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(kc_row[j * D + d]);
        split_row(t, false, row.data(), D, &kb_hi[sz(j * D)], &kb_lo[sz(j * D)]);
      }
      // Per token: d2 = |v - vbar|^2, g = vbar . (v - vbar), |v|; per cluster |vbar|^2.
      std::vector<double> d2(sz(N)), g(sz(N)), vnorm(sz(N)), vn(sz(Ck), 0.0);
      for (int64_t j = 0; j < Ck; ++j)
        for (int64_t d = 0; d < D; ++d) vn[j] += vc_row[j * D + d] * vc_row[j * D + d];
      for (int64_t i = 0; i < N; ++i) {
        const double* x = &v_all[sz((bh * N + i) * D)];
        const double* vb = vc_row + label[sz(bh * N + i)] * D;
        double a = 0, b = 0, c = 0;
        for (int64_t d = 0; d < D; ++d)
          a += (x[d] - vb[d]) * (x[d] - vb[d]), b += vb[d] * (x[d] - vb[d]), c += x[d] * x[d];
        d2[i] = a, g[i] = b, vnorm[i] = std::sqrt(c);
      }
      for (int64_t a = 0; a < Cq; ++a) {
        for (int64_t d = 0; d < D; ++d) row[d] = static_cast<float>(q_row[a * D + d]);
        split_row(t, true, row.data(), D, q_hi.data(), q_lo.data());
        const double* q = q_row + a * D;
        // Sum over d of |q_d - q~_d| |y_d| and of |q_d y_d|, for the CPU side's perturbation.
        auto rounding = [&](const double* y, double& off, double& mag) {
          off = mag = 0;
          for (int64_t d = 0; d < D; ++d)
            off += std::abs((q[d] - q_hi[d] - q_lo[d]) * y[d]), mag += std::abs(q[d] * y[d]);
        };
        for (int64_t j = 0; j < Ck; ++j)
          pairs_[sz((bh * Cq + a) * Ck + j)] =
              pair(members[sz(j)], keys, D, scale, cpu_dot, q, q_hi.data(), q_lo.data(), &kb_hi[sz(j * D)],
                   &kb_lo[sz(j * D)], kc_row + j * D, d2, g, vnorm, vn[j], k_sizes[sz(bh * Ck + j)], rounding);
      }
    }
  }

  const Pair& at(size_t i) const { return pairs_[i]; }

  // Per row (b,h,a): log Z from the model's masses, and the largest |d log M| (arithmetic, rounding).
  void row_mass(std::vector<double>& log_z, std::vector<double>& tol_z, std::vector<double>& rep_z) const {
    const size_t rows = pairs_.size() / static_cast<size_t>(Ck_);
    log_z.assign(rows, -kInf);
    tol_z.assign(rows, (Ck_ + 16) * 8 * 0x1p-52);  // plus_scores_kernel's fp64 sum
    rep_z.assign(rows, (Ck_ + 16) * 8 * 0x1p-52);
    for (size_t r = 0; r < rows; ++r) {
      double top = -kInf, z = 0;
      for (int64_t j = 0; j < Ck_; ++j) top = std::max(top, pairs_[r * Ck_ + j].log_m);
      for (int64_t j = 0; j < Ck_; ++j) {
        const Pair& p = pairs_[r * Ck_ + j];
        if (p.log_m == -kInf) continue;
        z += std::exp(p.log_m - top);
        tol_z[r] = std::max(tol_z[r], p.tol_m);
        rep_z[r] = std::max(rep_z[r], p.rep_m);
      }
      log_z[r] = top + std::log(z);
    }
  }

 private:
  template <typename Rounding>
  static Pair pair(const std::vector<int64_t>& js, const double* keys, int64_t D, double scale, double cpu_dot,
                   const double* q, const double* q_hi, const double* q_lo, const double* kb_hi, const double* kb_lo,
                   const double* kbar, const std::vector<double>& d2, const std::vector<double>& g,
                   const std::vector<double>& vnorm, double vn, double K, Rounding&& rounding) {
    const double n = static_cast<double>(js.size());
    std::vector<double> kb(static_cast<size_t>(D));
    for (int64_t d = 0; d < D; ++d) kb[d] = kb_hi[d] + kb_lo[d];
    // c* and its perturbations: the MMAs (two accumulators, their sum, the scale), and the CPU side's
    // (q - q~ and kbar - kbar~, its fp32 dot).
    double bound_hi = 0, bound_lo = 0, off_q = 0, mag = 0, off_k = 0;
    const double acc = mma_dot(q_hi, q_lo, kb_hi, D, bound_hi) + mma_dot(q_hi, q_lo, kb_lo, D, bound_lo);
    const double c = scale * acc;
    rounding(kbar, off_q, mag);
    for (int64_t d = 0; d < D; ++d) off_k += std::abs((q_hi[d] + q_lo[d]) * (kbar[d] - kb[d]));
    const double gamma_c = kMmaStep * scale * (bound_hi + bound_lo) + 2 * kU * std::abs(c);
    const double rep_c = scale * (off_q + off_k + cpu_dot * mag) + 2 * kU * std::abs(c);
    std::vector<double> s(js.size()), sigma(js.size()), rep(js.size());
    double m = c, L = std::abs(c);
    for (size_t e = 0; e < js.size(); ++e) {
      const double* kt = keys + js[e] * D;
      double bound = 0, off = 0, magnitude = 0;
      s[e] = scale * mma_dot(q_hi, q_lo, kt, D, bound);
      rounding(kt, off, magnitude);
      sigma[e] = kMmaStep * scale * bound + kU * std::abs(s[e]);
      rep[e] = scale * (off + cpu_dot * magnitude) + 2 * kU * std::abs(s[e]);
      m = std::max(m, s[e]);
      L = std::max(L, std::abs(s[e]));
    }
    const double rescale = (n / 32 + 3) * 2 * (0x1p-22 + 4 * kU * L);
    const double ec = std::exp(c - m), vb = std::sqrt(vn);
    const double eps_c = gamma_c + 0x1p-22 + 2 * kU * std::abs(c - m) + rescale;
    double E = 0, mass = 0, first = 0, second = 0, rep_first = 0, rep_second = 0, tau = 0, stats = 0;
    double mass_err = 0, mass_rep = 0;
    for (size_t e = 0; e < js.size(); ++e) {
      const int64_t i = js[e];
      const double w = std::exp(s[e] - m), dw = w - ec;
      const double x = std::sqrt(std::max(0.0, w * w * d2[i] + 2 * w * dw * g[i] + dw * dw * vn));
      const double eps_t = sigma[e] + 0x1p-22 + 2 * kU * std::abs(s[e] - m) + rescale;
      const double dx = w * vnorm[i] * eps_t + ec * vb * eps_c, rx = w * vnorm[i] * rep[e] + ec * vb * rep_c;
      E += x * x;
      mass += w;
      first += 2 * x * dx, second += dx * dx;
      rep_first += 2 * x * rx, rep_second += rx * rx;
      tau += w * w * d2[i] + 2 * w * std::abs(dw * g[i]) + dw * dw * vn;
      stats += (D / 32.0 + 8) * kU * (w * w * d2[i] + 2 * w * std::abs(dw) * std::sqrt(d2[i] * vn)) + kU * dw * dw * vn;
      mass_err += w * eps_t, mass_rep += w * rep[e];
    }
    const double correction = (K - n) * ec * ec * vn;
    E += correction;
    const double dE = first + second + (n / 2 + 8) * kU * tau + stats + std::abs(correction) * (2 * eps_c + 4 * kU);
    const double dE_rep = rep_first + rep_second + 2 * std::abs(correction) * rep_c + 8 * (n + 16) * 0x1p-52 * tau;
    Pair p;
    if (E > 0) {
      p.log_e = std::log(E) + 2 * m;
      p.log_mag = std::abs(std::log(E)) + 2 * std::abs(m);
    }
    p.tol_e = log_bound(dE, E);
    p.rep_e = log_bound(dE_rep, E);
    p.ill = p.tol_e == kInf || p.rep_e == kInf;
    if (mass > 0) {
      p.log_m = std::log(mass) + m;
      p.tol_m = mass_err / mass + (n / 2 + 8) * kU + 2 * kU * (std::abs(std::log(mass)) + std::abs(m));
      p.rep_m = mass_rep / mass;
      if (K > 0) {
        p.spread = std::log(mass / K) + m - c;
        p.tol_spread = p.tol_m + eps_c + 4 * kU * (std::abs(std::log(mass / K)) + std::abs(m) + std::abs(c) + 1);
        p.rep_spread = p.rep_m + rep_c;
      }
    }
    return p;
  }

  int64_t Ck_;
  std::vector<Pair> pairs_;
};

class EarProbeTc : public ::testing::TestWithParam<TcCase> {
 protected:
  ref::Rng rng{testing_support::case_seed()};
  TestStream cs;
  float scale() const { return 1.0f / std::sqrt(static_cast<float>(GetParam().D)); }

  // [B,H,N,D] of `dtype` in the case's layout; with text rows, the video part of a longer tensor.
  HostTensor tokens(DType dtype) {
    const TcCase c = GetParam();
    HostTensor t = normal(dtype, {c.B, c.H, c.N + c.text, c.D}, rng, c.layout);
    if (c.text > 0) {
      ref::for_each_index(t.view.slice(2, c.N, c.N + c.text), [&](const auto& idx) {
        ref::set(t.view, {idx[0], idx[1], idx[2] + c.N, idx[3]}, std::numeric_limits<double>::quiet_NaN());
      });
      t.view = t.view.slice(2, 0, c.N);
    }
    return t;
  }
};

// ear_probe's and ear_plus_probe's scores (and the spread) against the CPU op within the model's
// bounds; twice on the GPU, bit-identical (deterministic).
TEST_P(EarProbeTc, WithinItsErrorModel) {
  const TcCase c = GetParam();
  const int64_t B = c.B, H = c.H, N = c.N, D = c.D, Cq = c.Cq, Ck = c.Ck;
  Twin qc(normal(DType::F32, {B, H, Cq, D}, rng)), kc_random(normal(DType::F32, {B, H, Ck, D}, rng));
  Twin vc_random(normal(DType::F32, {B, H, Ck, D}, rng));
  Twin k(tokens(c.k_dtype)), v(tokens(c.v_dtype));
  Twin labels(random_labels(rng, B, H, N, Ck, c.text + 3));
  const std::vector<int32_t> counts = counts_of(labels.host.view, Ck);
  std::vector<int32_t> k_sizes = counts;
  if (Ck > 4) k_sizes[3] = 0;  // a cluster of tokens whose size says empty: the |K_j| term of the CPU's formula
  Twin qs(i32_tensor({B, H, Cq}, random_sizes(rng, B * H * Cq, 400))), ks(i32_tensor({B, H, Ck}, k_sizes));
  // The clusters' means as centroids, as k-means leaves them: a 1-token cluster's centroids are its
  // token, so its E is exactly 0 on the CPU, and on the tensor cores only if c_aj and the token's
  // logit come out of the same MMAs.
  Twin kc_means(poisoned(DType::F32, {B, H, Ck, D})), vc_means(poisoned(DType::F32, {B, H, Ck, D}));
  cluster_means(k.host.view, labels.host.view, kc_means.host.view, kCpu);
  cluster_means(v.host.view, labels.host.view, vc_means.host.view, kCpu);
  kc_means.upload();
  vc_means.upload();
  const std::vector<int32_t> q_size = ref::to_i32(qs.host.view);
  const Buffer ws = device_workspace(std::max(ear_workspace_bytes(B * H, N, Cq, Ck, D, Device::cuda(0)),
                                              ear_plus_workspace_bytes(B * H, N, Cq, Ck, Device::cuda(0))));
  for (const bool means : {false, true}) {
    const float gamma = means ? 0.5f : 1.0f;
    SCOPED_TRACE(means ? "centroids: the clusters' means, gamma 0.5" : "centroids: random, gamma 1");
    const Twin& kc = means ? kc_means : kc_random;
    const Twin& vc = means ? vc_means : vc_random;
    const Model model(qc.host.view, kc.host.view, vc.host.view, k.host.view, v.host.view, labels.host.view, k_sizes,
                      scale());
    std::vector<double> log_z, tol_z, rep_z;
    model.row_mass(log_z, tol_z, rep_z);
    HostTensor ear = poisoned(DType::F32, {B, H, Cq, Ck}, c.layout), plus = poisoned(DType::F32, {B, H, Cq, Ck});
    HostTensor spread = poisoned(DType::F32, {B, H, Cq, Ck}, Layout::TransposedPadded);
    Twin g_ear(ear), g_ear2(ear), g_plus(plus), g_spread(spread);
    const auto run_ear = [&](const Twin& out) {
      ear_probe(qc.dev, kc.dev, vc.dev, k.dev, v.dev, labels.dev, qs.dev, ks.dev, scale(), gamma, out.dev, cs.stream(),
                as_workspace(ws));
    };
    run_ear(g_ear);
    run_ear(g_ear2);
    ear_plus_probe(qc.dev, kc.dev, vc.dev, k.dev, v.dev, labels.dev, qs.dev, ks.dev, scale(), gamma, g_plus.dev,
                   g_spread.dev, {}, cs.stream(), as_workspace(ws));
    ear_probe(qc.host.view, kc.host.view, vc.host.view, k.host.view, v.host.view, labels.host.view, qs.host.view,
              ks.host.view, scale(), gamma, ear.view, kCpu);
    ear_plus_probe(qc.host.view, kc.host.view, vc.host.view, k.host.view, v.host.view, labels.host.view, qs.host.view,
                   ks.host.view, scale(), gamma, plus.view, spread.view, {}, kCpu);
    cs.sync();
    const HostTensor got_ear = g_ear.download(), got_plus = g_plus.download(), got_spread = g_spread.download();
    ASSERT_EQ(got_ear.bytes(), g_ear2.download().bytes()) << "two runs differ: not deterministic";
    ASSERT_TRUE(got_ear.outside_view_unchanged(ear.bytes())) << "ear_probe wrote outside its output view";
    ASSERT_TRUE(got_spread.outside_view_unchanged(spread.bytes())) << "the spread was written outside its view";
    const std::vector<double> ge = ref::to_vector(got_ear.view), re = ref::to_vector(ear.view);
    const std::vector<double> gp = ref::to_vector(got_plus.view), rp = ref::to_vector(plus.view);
    const std::vector<double> gs = ref::to_vector(got_spread.view), rs = ref::to_vector(spread.view);
    int64_t ill = 0;
    double worst = 0;  // the largest |GPU - CPU| of an EAR score, for the record
    for (size_t i = 0; i < ge.size(); ++i) {
      const Pair& p = model.at(i);
      const int64_t j = static_cast<int64_t>(i) % Ck, row = static_cast<int64_t>(i) / Ck;
      const size_t cluster = static_cast<size_t>(row / Cq * Ck + j);
      const double K = k_sizes[cluster], Q = q_size[static_cast<size_t>(row)];
      const double log_area = std::log(std::max(Q * K, 1e-8));
      const std::string at = where(ear.view, static_cast<int64_t>(i));
      // The fp32 log of E's sum, its fp64 composition and the fp32 output.
      auto out = [&](double x) { return 8 * kU * std::max(1.0, std::abs(x)) + 2 * kU * p.log_mag; };
      // The spread: 0 where no mass or |K_j| = 0, as the CPU's; else within the model's bounds.
      if (p.log_m == -kInf || K == 0) {
        ASSERT_EQ(gs[i], 0.0) << "spread of an empty cluster " << at;
        ASSERT_EQ(rs[i], 0.0) << "the CPU's spread of an empty cluster " << at;
      } else {
        ASSERT_LE(std::abs(gs[i] - p.spread), p.tol_spread + out(p.spread))
            << "spread " << at << ": GPU " << gs[i] << ", model " << p.spread;
        ASSERT_LE(std::abs(gs[i] - rs[i]), p.tol_spread + p.rep_spread + out(p.spread))
            << "spread " << at << ": GPU " << gs[i] << ", CPU " << rs[i] << ", model " << p.spread;
      }
      if (means && counts[cluster] == 1 && K == 1) {  // E = 0 exactly: the CPU's floor
        ASSERT_EQ(p.log_e, -kInf) << "the model of a 1-token cluster " << at;
        ASSERT_LE(std::abs(ge[i] - re[i]), out(re[i])) << "EAR score of a 1-token cluster " << at;
        ASSERT_LE(std::abs(gp[i] - rp[i]), out(rp[i])) << "ear-plus score of a 1-token cluster " << at;
        continue;
      }
      if (p.ill) {  // E cancels within the perturbations: only the range (sizes that disagree aside)
        ill += static_cast<int32_t>(K) == counts[cluster];
        ASSERT_TRUE(std::isfinite(ge[i]) && std::isfinite(gp[i])) << "score " << at;
        continue;
      }
      // EAR: the model within the arithmetic's bound; the CPU within that and the input rounding's.
      const double model_ear = std::max(p.log_e, std::log(1e-8)) - gamma * log_area;
      ASSERT_LE(std::abs(ge[i] - model_ear), p.tol_e + out(model_ear))
          << "EAR score " << at << ": GPU " << ge[i] << ", model " << model_ear << ", CPU " << re[i];
      ASSERT_LE(std::abs(ge[i] - re[i]), p.tol_e + p.rep_e + out(model_ear))
          << "EAR score " << at << ": GPU " << ge[i] << ", CPU " << re[i] << ", model " << model_ear;
      worst = std::max(worst, std::abs(ge[i] - re[i]));
      // ear-plus: log E - 2 log Z + log |Q_a| with the row's log Z bounds.
      const size_t r = static_cast<size_t>(row);
      const double model_plus = std::max(p.log_e - 2 * log_z[r] + std::log(Q), std::log(1e-30)) - gamma * log_area;
      ASSERT_LE(std::abs(gp[i] - model_plus), p.tol_e + 2 * tol_z[r] + out(model_plus))
          << "ear-plus score " << at << ": GPU " << gp[i] << ", model " << model_plus << ", CPU " << rp[i];
      ASSERT_LE(std::abs(gp[i] - rp[i]), p.tol_e + p.rep_e + 2 * (tol_z[r] + rep_z[r]) + out(model_plus))
          << "ear-plus score " << at << ": GPU " << gp[i] << ", CPU " << rp[i] << ", model " << model_plus;
    }
    EXPECT_LE(ill, static_cast<int64_t>(ge.size()) / 100) << "too few well-conditioned scores to test";
    RecordProperty("max_abs_gpu_minus_cpu", std::to_string(worst));
  }
}

// ---------------------------------------------------------------------------------------------
// The routing
// ---------------------------------------------------------------------------------------------

// A routing candidate, in index order (the ranking's tie order).
struct Candidate {
  double score, tol;
  int64_t area;
  bool exact;  // an empty cluster's closed form: equal values stay equal (the same expression)
};

// Whether "keep candidates by score, descending (ties to the lower index), while the area kept before
// is below `remaining`" keeps the same set for all scores within `tol` of `score`: it does when every
// kept candidate stays above every candidate ranked below it (the kept prefix, in its order, is then
// the same; what comes after it is never kept).
bool routing_is_stable(std::vector<Candidate> c, int64_t remaining) {
  std::stable_sort(c.begin(), c.end(), [](const Candidate& x, const Candidate& y) { return x.score > y.score; });
  size_t kept = 0;
  for (int64_t before = 0; kept < c.size() && before < remaining; ++kept) before += c[kept].area;
  for (size_t i = 0; i < kept; ++i)
    for (size_t k = i + 1; k < c.size(); ++k) {
      if (c[i].exact && c[k].exact && c[i].score == c[k].score) continue;
      if (!(c[i].score - c[i].tol > c[k].score + c[k].tol)) return false;
    }
  return true;
}

// select_error_aware (per row) and select_error_aware_per_head on the tensor-core scores against the
// CPU's on the CPU scores: equal masks on every row (head) whose kept set no score within its bound
// (|model - CPU| + the model's arithmetic bound) could change; a majority of the rows must be such.
TEST_P(EarProbeTc, RoutingMatchesCpuWhereStable) {
  const TcCase c = GetParam();
  const int64_t B = c.B, H = c.H, N = c.N, D = c.D, Cq = c.Cq, Ck = c.Ck, BH = B * H;
  Twin qc(normal(DType::F32, {B, H, Cq, D}, rng)), kc(normal(DType::F32, {B, H, Ck, D}, rng));
  Twin vc(normal(DType::F32, {B, H, Ck, D}, rng));
  Twin k(tokens(c.k_dtype)), v(tokens(c.v_dtype));
  Twin labels(random_labels(rng, B, H, N, Ck, c.text + 3));
  const std::vector<int32_t> k_sizes = counts_of(labels.host.view, Ck);
  const std::vector<int32_t> q_size = random_sizes(rng, BH * Cq, 400);
  Twin qs(i32_tensor({B, H, Cq}, q_size)), ks(i32_tensor({B, H, Ck}, k_sizes));
  // SVG2's weights and budget at top-p 0.7 (the CPU ops; the same bytes for both routings).
  Twin probs(poisoned(DType::F32, {B, H, Cq, Ck})), budget(poisoned(DType::U8, {B, H, Cq, Ck}));
  centroid_probs(qc.host.view, kc.host.view, ks.host.view, scale(), probs.host.view, kCpu);
  select_top_p(probs.host.view, 0.7f, static_cast<int>(Ck / 10), budget.host.view, kCpu);
  probs.upload();
  budget.upload();
  const int guaranteed = std::max(1, static_cast<int>(0.05 * static_cast<double>(Ck)));
  const Model model(qc.host.view, kc.host.view, vc.host.view, k.host.view, v.host.view, labels.host.view, k_sizes,
                    scale());
  std::vector<double> log_z, tol_z, rep_z;
  model.row_mass(log_z, tol_z, rep_z);
  const Buffer ws = device_workspace(std::max(ear_workspace_bytes(BH, N, Cq, Ck, D, Device::cuda(0)),
                                              ear_plus_workspace_bytes(BH, N, Cq, Ck, Device::cuda(0))));
  for (const bool per_head : {false, true}) {
    SCOPED_TRACE(per_head ? "ear-plus, one budget per head" : "EAR, one budget per row");
    HostTensor cpu_scores = poisoned(DType::F32, {B, H, Cq, Ck}), cpu_mask = poisoned(DType::U8, {B, H, Cq, Ck});
    Twin scores(poisoned(DType::F32, {B, H, Cq, Ck})), mask(poisoned(DType::U8, {B, H, Cq, Ck}));
    if (per_head) {
      ear_plus_probe(qc.dev, kc.dev, vc.dev, k.dev, v.dev, labels.dev, qs.dev, ks.dev, scale(), 1.0f, scores.dev, {},
                     {}, cs.stream(), as_workspace(ws));
      select_error_aware_per_head(probs.dev, budget.dev, scores.dev, qs.dev, ks.dev, guaranteed, mask.dev, cs.stream(),
                                  as_workspace(ws));
      ear_plus_probe(qc.host.view, kc.host.view, vc.host.view, k.host.view, v.host.view, labels.host.view, qs.host.view,
                     ks.host.view, scale(), 1.0f, cpu_scores.view, {}, {}, kCpu);
      select_error_aware_per_head(probs.host.view, budget.host.view, cpu_scores.view, qs.host.view, ks.host.view,
                                  guaranteed, cpu_mask.view, kCpu);
    } else {
      ear_probe(qc.dev, kc.dev, vc.dev, k.dev, v.dev, labels.dev, qs.dev, ks.dev, scale(), 1.0f, scores.dev,
                cs.stream(), as_workspace(ws));
      select_error_aware(probs.dev, budget.dev, scores.dev, qs.dev, ks.dev, guaranteed, mask.dev, cs.stream());
      ear_probe(qc.host.view, kc.host.view, vc.host.view, k.host.view, v.host.view, labels.host.view, qs.host.view,
                ks.host.view, scale(), 1.0f, cpu_scores.view, kCpu);
      select_error_aware(probs.host.view, budget.host.view, cpu_scores.view, qs.host.view, ks.host.view, guaranteed,
                         cpu_mask.view, kCpu);
    }
    cs.sync();
    const std::vector<double> cpu = ref::to_vector(cpu_scores.view);
    const std::vector<double> p = ref::to_vector(probs.host.view), kept_budget = ref::to_vector(budget.host.view);
    const std::vector<double> want = ref::to_vector(cpu_mask.view), got = ref::to_vector(mask.download().view);
    // Candidates of each group (a row, or a head), their budget less the guaranteed area.
    const int64_t rows_per_group = per_head ? Cq : 1, groups = BH * Cq / rows_per_group;
    int64_t stable = 0, differing = 0;
    for (int64_t grp = 0; grp < groups; ++grp) {
      std::vector<Candidate> cand;
      int64_t remaining = 0;
      for (int64_t r = grp * rows_per_group; r < (grp + 1) * rows_per_group; ++r) {
        const int64_t bh = r / Cq;
        std::vector<int64_t> order(static_cast<size_t>(Ck));
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(),
                         [&](int64_t x, int64_t y) { return p[r * Ck + x] > p[r * Ck + y]; });
        std::vector<bool> forced(static_cast<size_t>(Ck), false);
        for (int64_t x = 0; x < std::min<int64_t>(guaranteed, Ck); ++x) forced[order[x]] = true;
        for (int64_t j = 0; j < Ck; ++j) {
          const size_t i = static_cast<size_t>(r * Ck + j);
          const int64_t area =
              static_cast<int64_t>(q_size[static_cast<size_t>(r)]) * k_sizes[static_cast<size_t>(bh * Ck + j)];
          if (kept_budget[i] != 0) remaining += area;
          if (forced[j]) {
            remaining -= area;
            continue;
          }
          const Pair& m = model.at(i);
          const double model_score = per_head
                                         ? std::max(m.log_e - 2 * log_z[static_cast<size_t>(r)] +
                                                        std::log(static_cast<double>(q_size[static_cast<size_t>(r)])),
                                                    std::log(1e-30)) -
                                               std::log(std::max<double>(area, 1e-8))
                                         : std::max(m.log_e, std::log(1e-8)) - std::log(std::max<double>(area, 1e-8));
          const double arith = m.tol_e + (per_head ? 2 * tol_z[static_cast<size_t>(r)] : 0.0) +
                               8 * kU * std::max(1.0, std::abs(model_score)) + 2 * kU * m.log_mag;
          const bool exact = m.log_e == -kInf && area == 0;
          const double tol = m.ill   ? kInf
                             : exact ? 4 * kU * std::max(1.0, std::abs(cpu[i]))
                                     : std::abs(model_score - cpu[i]) + arith;
          cand.push_back({cpu[i], tol, area, exact});
        }
      }
      const bool group_stable = routing_is_stable(cand, std::max<int64_t>(remaining, 0));
      stable += group_stable;
      for (int64_t i = grp * rows_per_group * Ck; i < (grp + 1) * rows_per_group * Ck; ++i) {
        if (got[static_cast<size_t>(i)] == want[static_cast<size_t>(i)]) continue;
        ++differing;
        ASSERT_FALSE(group_stable) << "mask " << where(cpu_scores.view, i) << " differs in a group whose routing no "
                                   << "score within its bound can change: GPU " << got[static_cast<size_t>(i)]
                                   << ", CPU " << want[static_cast<size_t>(i)];
      }
    }
    RecordProperty(per_head ? "head_groups_stable" : "rows_stable",
                   std::to_string(stable) + "/" + std::to_string(groups));
    RecordProperty(per_head ? "head_pairs_differing" : "row_pairs_differing", std::to_string(differing));
    if (!per_head) {
      EXPECT_GE(2 * stable, groups) << "too few rows whose routing the bounds fix: the test tests little";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, EarProbeTc,
    ::testing::Values(TcCase{1, 2, 700, 64, 20, 24, DType::BF16, DType::BF16, Layout::Contiguous, 0},
                      TcCase{2, 1, 900, 128, 40, 70, DType::F16, DType::F16, Layout::Transposed, 0},
                      TcCase{1, 2, 500, 40, 9, 13, DType::BF16, DType::F32, Layout::Padded, 0},  // D % 8 != 0
                      TcCase{1, 1, 1500, 128, 150, 100, DType::BF16, DType::BF16, Layout::Contiguous, 37},
                      TcCase{1, 3, 300, 64, 5, 60, DType::F16, DType::BF16, Layout::TransposedPadded, 11}),
    [](const ::testing::TestParamInfo<TcCase>& p) { return describe(p.param); });

// ---------------------------------------------------------------------------------------------
// The override and the cases the tensor cores leave to the CUDA-core pass
// ---------------------------------------------------------------------------------------------

// f32 keys run the CUDA-core pass whatever the override says (the same bytes); bf16 keys run the
// tensor cores by default and the CUDA-core pass under the override (different fp32 roundings, so
// some score differs); ear_plus_probe with pair values runs the CUDA-core pass. Unknown names throw.
TEST(EarProbeTcDispatch, OverrideAndFallbacks) {
  ref::Rng rng(testing_support::case_seed());
  TestStream cs;
  const int64_t B = 1, H = 2, N = 400, D = 64, Cq = 12, Ck = 20;
  const float scale = 0.125f;
  Twin qc(normal(DType::F32, {B, H, Cq, D}, rng)), kc(normal(DType::F32, {B, H, Ck, D}, rng));
  Twin vc(normal(DType::F32, {B, H, Ck, D}, rng)), labels(random_labels(rng, B, H, N, Ck));
  Twin k32(normal(DType::F32, {B, H, N, D}, rng)), k16(normal(DType::BF16, {B, H, N, D}, rng));
  Twin v(normal(DType::BF16, {B, H, N, D}, rng));
  Twin qs(i32_tensor({B, H, Cq}, random_sizes(rng, B * H * Cq, 100)));
  Twin ks(i32_tensor({B, H, Ck}, counts_of(labels.host.view, Ck)));
  const Buffer ws = device_workspace(std::max(ear_workspace_bytes(B * H, N, Cq, Ck, D, Device::cuda(0)),
                                              ear_plus_workspace_bytes(B * H, N, Cq, Ck, Device::cuda(0))));
  auto ear = [&](const Twin& k) {
    Twin out(poisoned(DType::F32, {B, H, Cq, Ck}));
    ear_probe(qc.dev, kc.dev, vc.dev, k.dev, v.dev, labels.dev, qs.dev, ks.dev, scale, 1.0f, out.dev, cs.stream(),
              as_workspace(ws));
    cs.sync();
    return out.download().bytes();
  };
  auto plus_with_values = [&] {
    Twin out(poisoned(DType::F32, {B, H, Cq, Ck})), values(poisoned(DType::F32, {B, H, Cq * Ck, D}));
    ear_plus_probe(qc.dev, kc.dev, vc.dev, k16.dev, v.dev, labels.dev, qs.dev, ks.dev, scale, 1.0f, out.dev, {},
                   values.dev, cs.stream(), as_workspace(ws));
    cs.sync();
    return out.download().bytes();
  };
  const std::vector<uint8_t> f32_default = ear(k32), bf16_default = ear(k16), plus_default = plus_with_values();
  std::vector<uint8_t> f32_cores, bf16_cores, plus_cores;
  {
    const ear_cuda_test::CudaCoreProbe cuda_cores;
    f32_cores = ear(k32);
    bf16_cores = ear(k16);
    plus_cores = plus_with_values();
  }
  EXPECT_EQ(f32_default, f32_cores) << "f32 keys must take the CUDA-core pass";
  EXPECT_NE(bf16_default, bf16_cores) << "the override did not change the kernel bf16 keys run";
  EXPECT_EQ(plus_default, plus_cores) << "pair values must take the CUDA-core pass";
  EXPECT_EQ(ear(k16), bf16_default) << "the override was not restored";
  EXPECT_THROW(cuda::set_probe_kernel_override("tensor"), InvalidArgumentError);
}

}  // namespace
}  // namespace sapattn
