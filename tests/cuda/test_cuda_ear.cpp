// The CUDA ops of SVG-EAR and the density budget (src/cuda/ear.cu) against the CPU backend on the
// same inputs, then the layer call (svg2_attention with --method ear, sap --compensate and --density)
// on a CUDA stream against the CPU layer, graph capture, and bad input. Inputs are drawn on the host
// (seeded by the test's name), copied byte for byte to the GPU with their strides and offsets, and
// the outputs compared as each op's contract allows (docs/ear.md, "The CUDA backend"):
//   bit-identical:  centroid_probs, select_error_aware, select_top_p_at_density (the whole output
//                   storage, so bytes outside a strided view are checked too);
//   1 fp32 ulp:     cluster_means (fp64 sums in another order, rounded once);
//   error model:    ear_probe (same logits and per-token terms, fp64 sums in another order: the
//                   difference of log E is bounded by the fp64 rounding of the sums times their
//                   cancellation, plus 2 fp32 ulps), centroid_compensation (fp32 FMA logits and
//                   accumulation against the CPU's 8-lane logits and fp64 sums: bound below).
// Every failure message names the case (shape, dtype, layout) and the first element that differs.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include "cpu/rows.hpp"
#include "cuda/backend.hpp"
#include "cuda/check.hpp"
#include "cuda_support.hpp"
#include "reference.hpp"
#include "sapattn/ops.hpp"
#include "sapattn/svg2.hpp"
#include "test_support.hpp"

namespace sapattn {
namespace {

using CudaStream = cuda_test::TestStream;  // blocking: the synchronous copies are ordered with it

using ref::HostTensor;
using ref::Layout;

constexpr double kInf = std::numeric_limits<double>::infinity();
const Stream kCpu = Stream::cpu(0);

// ---------------------------------------------------------------------------------------------
// Device copies, streams, workspaces
// ---------------------------------------------------------------------------------------------

// The device twin of a host tensor: the whole storage, the view at the same offset and strides.
struct Twin {
  HostTensor host;
  Buffer buffer;
  TensorView dev;

  explicit Twin(HostTensor h) : host(std::move(h)) {
    buffer = Buffer::allocate(host.storage.bytes(), Device::cuda(0));
    upload();
    dev = host.view;
    dev.data = static_cast<char*>(buffer.data()) +
               (static_cast<const char*>(host.view.data) - static_cast<const char*>(host.storage.data()));
    dev.device = Device::cuda(0);
  }
  void upload() const {
    SAPATTN_CUDA_CHECK(cudaMemcpy(buffer.data(), host.storage.data(), host.storage.bytes(), cudaMemcpyHostToDevice));
  }
  // The device storage, as a host tensor laid out as `host`.
  HostTensor download() const {
    HostTensor h{Tensor(host.storage.dtype(), host.storage.shape()), host.view};
    SAPATTN_CUDA_CHECK(cudaMemcpy(h.storage.data(), buffer.data(), h.storage.bytes(), cudaMemcpyDeviceToHost));
    h.view.data = static_cast<char*>(h.storage.data()) +
                  (static_cast<const char*>(host.view.data) - static_cast<const char*>(host.storage.data()));
    return h;
  }
};

struct DeviceScratch {
  Buffer buffer;
  explicit DeviceScratch(size_t bytes) : buffer(Buffer::allocate(std::max<size_t>(bytes, 1), Device::cuda(0))) {}
  Workspace workspace() const { return {buffer.data(), buffer.bytes()}; }
};

// Value checks on for the scope (ops that read labels and sizes synchronise and throw).
class ValueChecks {
 public:
  ValueChecks() : was_(cuda::value_checks()) { cuda::set_value_checks(true); }
  ~ValueChecks() { cuda::set_value_checks(was_); }

 private:
  bool was_;
};

struct Environment : ::testing::Environment {
  void SetUp() override {
    int count = 0;
    const cudaError_t e = cudaGetDeviceCount(&count);
    ASSERT_EQ(e, cudaSuccess) << "test_cuda_ear needs a CUDA device: " << cudaGetErrorString(e);
    ASSERT_GT(count, 0) << "test_cuda_ear needs a CUDA device";
  }
};
[[maybe_unused]] const auto* const kEnvironment = ::testing::AddGlobalTestEnvironment(new Environment);

// ---------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------

HostTensor poisoned(DType dtype, std::vector<int64_t> shape, Layout layout = Layout::Contiguous) {
  HostTensor t = ref::make_tensor(dtype, std::move(shape), layout);
  ref::poison(t);
  return t;
}

HostTensor normal(DType dtype, std::vector<int64_t> shape, ref::Rng& rng, Layout layout = Layout::Contiguous,
                  double stddev = 1.0) {
  HostTensor t = poisoned(dtype, std::move(shape), layout);
  ref::fill_normal(t.view, rng, 0.0, stddev);
  return t;
}

HostTensor i32_tensor(std::vector<int64_t> shape, const std::vector<int32_t>& values) {
  HostTensor t = poisoned(DType::I32, std::move(shape));
  std::copy(values.begin(), values.end(), t.storage.data_as<int32_t>());
  return t;
}

// Labels [B,H,N] (every (b,h) with empty, 1-token and large clusters) as the video part of a
// [B,H,N+extra] tensor, so that the views have a row stride other than N.
HostTensor random_labels(ref::Rng& rng, int64_t B, int64_t H, int64_t N, int64_t C, int64_t extra = 3) {
  HostTensor t = poisoned(DType::I32, {B, H, N + extra});
  for (int64_t bh = 0; bh < B * H; ++bh) {
    const std::vector<int32_t> l = ref::random_labels_with_sizes(rng, ref::random_cluster_sizes(rng, N, C));
    std::copy(l.begin(), l.end(), t.storage.data_as<int32_t>() + bh * (N + extra));
  }
  t.view = t.view.slice(2, 0, N);
  return t;
}

// A copy with storage of its own (Tensor copies share their buffer).
HostTensor deep_copy(const HostTensor& t) {
  HostTensor c{Tensor(t.storage.dtype(), t.storage.shape()), t.view};
  std::memcpy(c.storage.data(), t.storage.data(), t.storage.bytes());
  c.view.data = static_cast<char*>(c.storage.data()) +
                (static_cast<const char*>(t.view.data) - static_cast<const char*>(t.storage.data()));
  return c;
}

std::vector<int32_t> counts_of(const TensorView& labels, int64_t C) {
  const int64_t B = labels.shape[0], H = labels.shape[1], N = labels.shape[2];
  std::vector<int32_t> counts(static_cast<size_t>(B * H * C), 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < N; ++i) ++counts[static_cast<size_t>((b * H + h) * C + ref::get(labels, {b, h, i}))];
  return counts;
}

// Random sizes in [0, hi], a quarter of them 0.
std::vector<int32_t> random_sizes(ref::Rng& rng, int64_t n, int64_t hi) {
  std::vector<int32_t> s(static_cast<size_t>(n));
  for (auto& x : s) x = rng.uniform() < 0.25 ? 0 : static_cast<int32_t>(rng.integer(1, hi));
  return s;
}

std::string where(const TensorView& v, int64_t flat) {
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
void expect_identical(const HostTensor& gpu, const HostTensor& cpu, const char* what) {
  if (gpu.bytes() == cpu.bytes()) return;
  const std::vector<double> g = ref::to_vector(gpu.view), c = ref::to_vector(cpu.view);
  for (size_t i = 0; i < g.size(); ++i)
    if (!(g[i] == c[i]) && !(std::isnan(g[i]) && std::isnan(c[i]))) {
      ADD_FAILURE() << what << ": GPU " << g[i] << " != CPU " << c[i] << " at " << where(gpu.view, i);
      return;
    }
  ADD_FAILURE() << what << ": the views agree but bytes outside the view differ (written out of bounds)";
}

// ---------------------------------------------------------------------------------------------
// Op cases
// ---------------------------------------------------------------------------------------------

struct OpCase {
  int64_t B, H, N, D, Cq, Ck;
  DType dtype;
  Layout layout;
};

std::string describe(const OpCase& c) {
  std::ostringstream os;
  os << "B" << c.B << "_H" << c.H << "_N" << c.N << "_D" << c.D << "_Cq" << c.Cq << "_Ck" << c.Ck << "_"
     << dtype_name(c.dtype) << "_" << ref::layout_name(c.layout);
  std::string name = os.str();
  for (char& ch : name)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';  // GoogleTest names: [A-Za-z0-9_]
  return name;
}

class EarOp : public ::testing::TestWithParam<OpCase> {
 protected:
  ref::Rng rng{testing_support::case_seed()};
  CudaStream cs;
  float scale() const { return 1.0f / std::sqrt(static_cast<float>(GetParam().D)); }
};

TEST_P(EarOp, ClusterMeansWithinOneUlp) {
  const OpCase c = GetParam();
  Twin points(normal(c.dtype, {c.B, c.H, c.N, c.D}, rng, c.layout, 2.0));
  Twin labels(random_labels(rng, c.B, c.H, c.N, c.Ck));
  HostTensor cpu = poisoned(DType::F32, {c.B, c.H, c.Ck, c.D});
  Twin gpu(poisoned(DType::F32, {c.B, c.H, c.Ck, c.D}));
  cluster_means(points.host.view, labels.host.view, cpu.view, kCpu);
  DeviceScratch ws(ear_workspace_bytes(c.B * c.H, c.N, c.Cq, c.Ck, c.D, Device::cuda(0)));
  cluster_means(points.dev, labels.dev, gpu.dev, cs.stream(), ws.workspace());
  cs.sync();
  const std::vector<double> g = ref::to_vector(gpu.download().view), r = ref::to_vector(cpu.view);
  const std::vector<int32_t> counts = counts_of(labels.host.view, c.Ck);
  for (size_t i = 0; i < g.size(); ++i) {
    const float want = static_cast<float>(r[i]);
    if (counts[i / static_cast<size_t>(c.D)] == 0) {
      ASSERT_EQ(g[i], 0.0) << "empty cluster, element " << i;
    }
    const float up = std::nextafter(want, INFINITY), down = std::nextafter(want, -INFINITY);
    ASSERT_TRUE(g[i] == want || g[i] == up || g[i] == down)
        << "mean " << where(cpu.view, static_cast<int64_t>(i)) << ": GPU " << g[i] << ", CPU " << want;
  }
}

TEST_P(EarOp, CentroidProbsAreIdentical) {
  const OpCase c = GetParam();
  Twin qc(normal(DType::F32, {c.B, c.H, c.Cq, c.D}, rng, Layout::Contiguous, 1.5));
  Twin kc(normal(DType::F32, {c.B, c.H, c.Ck, c.D}, rng, Layout::Contiguous, 1.5));
  std::vector<int32_t> sizes = random_sizes(rng, c.B * c.H * c.Ck, 50);
  if (c.B * c.H > 1)  // one (b,h) with every key cluster empty: its rows are all zero
    std::fill(sizes.begin(), sizes.begin() + c.Ck, 0);
  Twin ks(i32_tensor({c.B, c.H, c.Ck}, sizes));
  HostTensor cpu = poisoned(DType::F32, {c.B, c.H, c.Cq, c.Ck}, c.layout);
  Twin gpu(poisoned(DType::F32, {c.B, c.H, c.Cq, c.Ck}, c.layout));
  centroid_probs(qc.host.view, kc.host.view, ks.host.view, scale(), cpu.view, kCpu);
  centroid_probs(qc.dev, kc.dev, ks.dev, scale(), gpu.dev, cs.stream());
  cs.sync();
  expect_identical(gpu.download(), cpu, "centroid_probs");
}

// The probe on the host, the CPU backend's way (same fp32 logits, fp64 terms), returning per
// (b,h,a,j) the magnitude M of the terms of E / exp(2m) and its value R, so that the fp64 rounding
// of two summation orders moves log E by at most about (n + 16) 2^-52 M / R.
struct ProbeConditioning {
  std::vector<double> magnitude, value;
  std::vector<int64_t> tokens;
};

ProbeConditioning probe_conditioning(const TensorView& qc, const TensorView& kc, const TensorView& vc,
                                     const TensorView& k, const TensorView& v, const TensorView& labels,
                                     const std::vector<int32_t>& k_sizes, float scale) {
  const int64_t B = k.shape[0], H = k.shape[1], N = k.shape[2], D = k.shape[3];
  const int64_t Cq = qc.shape[2], Ck = kc.shape[2];
  ProbeConditioning out{std::vector<double>(static_cast<size_t>(B * H * Cq * Ck)),
                        std::vector<double>(static_cast<size_t>(B * H * Cq * Ck)),
                        std::vector<int64_t>(static_cast<size_t>(B * H * Ck), 0)};
  std::vector<float> q(D), kk(D), kb(D), vv(D), vb(D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t a = 0; a < Cq; ++a)
        for (int64_t j = 0; j < Ck; ++j) {
          for (int64_t d = 0; d < D; ++d) {
            q[d] = static_cast<float>(ref::get(qc, {b, h, a, d}));
            kb[d] = static_cast<float>(ref::get(kc, {b, h, j, d}));
            vb[d] = static_cast<float>(ref::get(vc, {b, h, j, d}));
          }
          const double c = static_cast<double>(cpu::dot(q.data(), kb.data(), D) * scale);
          std::vector<double> s;
          std::vector<int64_t> members;
          for (int64_t t = 0; t < N; ++t) {
            if (ref::get(labels, {b, h, t}) != j) continue;
            for (int64_t d = 0; d < D; ++d) kk[d] = static_cast<float>(ref::get(k, {b, h, t, d}));
            s.push_back(static_cast<double>(cpu::dot(q.data(), kk.data(), D) * scale));
            members.push_back(t);
          }
          double m = c;
          for (double x : s) m = std::max(m, x);
          const double pc = std::exp(c - m);
          double sq = 0, cr = 0, cr_abs = 0, vn = 0;
          for (int64_t d = 0; d < D; ++d) vn += static_cast<double>(vb[d]) * vb[d];
          for (size_t n = 0; n < s.size(); ++n) {
            double n2 = 0, cd = 0;
            for (int64_t d = 0; d < D; ++d) {
              const double x = ref::get(v, {b, h, members[n], d});
              n2 += x * x;
              cd += vb[d] * x;
            }
            const double e = std::exp(s[n] - m);
            sq += e * e * n2;
            cr += e * cd;
            cr_abs += e * std::abs(cd);
          }
          const double K = k_sizes[static_cast<size_t>((b * H + h) * Ck + j)];
          const size_t at = static_cast<size_t>(((b * H + h) * Cq + a) * Ck + j);
          out.magnitude[at] = sq + 2 * pc * cr_abs + pc * pc * K * vn;
          out.value[at] = sq - 2 * pc * cr + pc * pc * K * vn;
          out.tokens[static_cast<size_t>((b * H + h) * Ck + j)] = static_cast<int64_t>(s.size());
        }
  return out;
}

TEST_P(EarOp, ProbeWithinItsErrorModel) {
  const OpCase c = GetParam();
  if (c.N * c.Cq * c.Ck * c.B * c.H > 40'000'000) GTEST_SKIP() << "the host conditioning would take too long";
  Twin qc(normal(DType::F32, {c.B, c.H, c.Cq, c.D}, rng));
  Twin kc(normal(DType::F32, {c.B, c.H, c.Ck, c.D}, rng));
  Twin vc(normal(DType::F32, {c.B, c.H, c.Ck, c.D}, rng));
  Twin k(normal(c.dtype, {c.B, c.H, c.N, c.D}, rng, c.layout));
  Twin v(normal(c.dtype, {c.B, c.H, c.N, c.D}, rng, c.layout));
  Twin labels(random_labels(rng, c.B, c.H, c.N, c.Ck));
  const std::vector<int32_t> k_counts = counts_of(labels.host.view, c.Ck);
  Twin qs(i32_tensor({c.B, c.H, c.Cq}, random_sizes(rng, c.B * c.H * c.Cq, 400)));
  Twin ks(i32_tensor({c.B, c.H, c.Ck}, k_counts));
  for (const float gamma : {1.0f, 0.5f}) {
    SCOPED_TRACE("gamma " + std::to_string(gamma));
    HostTensor cpu = poisoned(DType::F32, {c.B, c.H, c.Cq, c.Ck}, c.layout);
    Twin gpu(poisoned(DType::F32, {c.B, c.H, c.Cq, c.Ck}, c.layout));
    ear_probe(qc.host.view, kc.host.view, vc.host.view, k.host.view, v.host.view, labels.host.view, qs.host.view,
              ks.host.view, scale(), gamma, cpu.view, kCpu);
    DeviceScratch ws(ear_workspace_bytes(c.B * c.H, c.N, c.Cq, c.Ck, c.D, Device::cuda(0)));
    ear_probe(qc.dev, kc.dev, vc.dev, k.dev, v.dev, labels.dev, qs.dev, ks.dev, scale(), gamma, gpu.dev, cs.stream(),
              ws.workspace());
    cs.sync();
    const HostTensor got = gpu.download();
    ASSERT_TRUE(got.outside_view_unchanged(cpu.bytes())) << "ear_probe wrote outside its output view";
    const std::vector<double> g = ref::to_vector(got.view), r = ref::to_vector(cpu.view);
    const ProbeConditioning cond = probe_conditioning(qc.host.view, kc.host.view, vc.host.view, k.host.view,
                                                      v.host.view, labels.host.view, k_counts, scale());
    int64_t ill_conditioned = 0;
    for (size_t i = 0; i < g.size(); ++i) {
      const int64_t j = static_cast<int64_t>(i) % c.Ck, bh = static_cast<int64_t>(i) / (c.Cq * c.Ck);
      const double n = static_cast<double>(cond.tokens[static_cast<size_t>(bh * c.Ck + j)]);
      // Two fp64 summation orders, each with a rescaling chain of up to n steps and libm vs CUDA exp
      // (<= 2 ulp): 4 (n + 16) 2^-52 of the magnitude. An empty cluster has the closed form (M = 0).
      const double relative =
          cond.magnitude[i] == 0 ? 0.0 : 4 * (n + 16) * 0x1p-52 * cond.magnitude[i] / std::max(cond.value[i], 0.0);
      if (!(relative < 0.25)) {  // E cancels to rounding noise: only the range is checked
        ++ill_conditioned;
        ASSERT_TRUE(std::isfinite(g[i])) << "probe score " << where(cpu.view, static_cast<int64_t>(i));
        continue;
      }
      const double tol = 2 * relative + 4 * ref::kF32Eps * std::max(1.0, std::abs(r[i]));
      ASSERT_LE(std::abs(g[i] - r[i]), tol) << "probe score " << where(cpu.view, static_cast<int64_t>(i)) << ": GPU "
                                            << g[i] << ", CPU " << r[i] << " (cancellation M/R " << relative << ")";
    }
    EXPECT_LE(ill_conditioned, static_cast<int64_t>(g.size()) / 100) << "too few well-conditioned scores to test";
  }
}

// Rows with ties (weights on a coarse grid), -0, NaN scores and empty clusters.
TEST_P(EarOp, ErrorAwareRoutingIsIdentical) {
  const OpCase c = GetParam();
  const int64_t R = c.Cq, C = c.Ck;
  auto coarse = [&](double lo, double hi, double nan_share) {
    HostTensor t = poisoned(DType::F32, {c.B, c.H, R, C}, c.layout);
    ref::for_each_index(t.view, [&](const auto& idx) {
      double x = std::floor(rng.uniform(lo, hi) * 4) / 4;  // ties
      if (x == 0 && rng.uniform() < 0.5) x = -0.0;
      if (rng.uniform() < nan_share) x = std::numeric_limits<double>::quiet_NaN();
      ref::set(t.view, idx, x);
    });
    return t;
  };
  Twin probs(coarse(0, 3, 0.0)), scores(coarse(-20, 5, 0.05));
  HostTensor budget_host = poisoned(DType::U8, {c.B, c.H, R, C}, c.layout);
  ref::for_each_index(budget_host.view, [&](const auto& idx) { ref::set(budget_host.view, idx, rng.uniform() < 0.3); });
  Twin budget(std::move(budget_host));
  Twin qs(i32_tensor({c.B, c.H, R}, random_sizes(rng, c.B * c.H * R, 300)));
  Twin ks(i32_tensor({c.B, c.H, C}, random_sizes(rng, c.B * c.H * C, 80)));
  for (const int guaranteed : {0, 1, 3, static_cast<int>(C) + 5}) {
    SCOPED_TRACE("guaranteed " + std::to_string(guaranteed));
    HostTensor cpu = poisoned(DType::U8, {c.B, c.H, R, C}, Layout::TransposedPadded);
    Twin gpu(poisoned(DType::U8, {c.B, c.H, R, C}, Layout::TransposedPadded));
    select_error_aware(probs.host.view, budget.host.view, scores.host.view, qs.host.view, ks.host.view, guaranteed,
                       cpu.view, kCpu);
    select_error_aware(probs.dev, budget.dev, scores.dev, qs.dev, ks.dev, guaranteed, gpu.dev, cs.stream());
    cs.sync();
    expect_identical(gpu.download(), cpu, "select_error_aware mask");
  }
}

TEST_P(EarOp, DensityBudgetIsIdentical) {
  const OpCase c = GetParam();
  const int64_t R = c.Cq, C = c.Ck;
  // Valid weights (centroid_probs of random centroids), with duplicated columns for ties.
  Twin qc(normal(DType::F32, {c.B, c.H, R, c.D}, rng, Layout::Contiguous, 2.0));
  HostTensor kc_host = normal(DType::F32, {c.B, c.H, C, c.D}, rng, Layout::Contiguous, 2.0);
  for (int64_t j = 1; j < C; j += 7)
    for (int64_t d = 0; d < c.D; ++d)
      for (int64_t bh = 0; bh < c.B * c.H; ++bh)
        kc_host.storage.data_as<float>()[(bh * C + j) * c.D + d] =
            kc_host.storage.data_as<float>()[(bh * C + j - 1) * c.D + d];
  Twin kc(std::move(kc_host));
  std::vector<int32_t> k_sizes = random_sizes(rng, c.B * c.H * C, 60);
  for (int64_t j = 1; j < c.B * c.H * C; j += 7) k_sizes[static_cast<size_t>(j)] = k_sizes[static_cast<size_t>(j - 1)];
  Twin ks(i32_tensor({c.B, c.H, C}, k_sizes));
  Twin qs(i32_tensor({c.B, c.H, R}, random_sizes(rng, c.B * c.H * R, 300)));
  Twin probs(poisoned(DType::F32, {c.B, c.H, R, C}, c.layout));
  centroid_probs(qc.host.view, kc.host.view, ks.host.view, scale(), probs.host.view, kCpu);
  probs.upload();
  DeviceScratch ws(ear_workspace_bytes(c.B * c.H, c.N, R, C, c.D, Device::cuda(0)));
  for (const float density : {0.02f, 0.15f, 0.5f, 0.93f, 1.0f})
    for (const int min_kept : {0, 3}) {
      SCOPED_TRACE("density " + std::to_string(density) + ", min_kept " + std::to_string(min_kept));
      HostTensor cpu = poisoned(DType::U8, {c.B, c.H, R, C}, Layout::Padded);
      Twin gpu(poisoned(DType::U8, {c.B, c.H, R, C}, Layout::Padded));
      select_top_p_at_density(probs.host.view, qs.host.view, ks.host.view, density, min_kept, cpu.view, kCpu);
      select_top_p_at_density(probs.dev, qs.dev, ks.dev, density, min_kept, gpu.dev, cs.stream(), ws.workspace());
      cs.sync();
      expect_identical(gpu.download(), cpu, "select_top_p_at_density mask");
    }
}

// |GPU - CPU| bound of one compensated row (see the file comment): the logits differ by at most
// dw = 2 (D + 4) u scale max_j sum_d |q_d kbar_jd| + 4 u (|w|max + 1) (u = 2^-24: fp32 dot products in two orders,
// the log of the size and the sum); each weight then by 2 dw relative, and the fp32 sums of the
// GPU by (Ck + 8) u, so out moves by at most (2 dw + (Ck + 8) u) 2 (vmax + |out0|), lse by
// 2 dw + (Ck + 8) u + 2 u |lse|; the stored out adds one rounding of its dtype on each side.
struct RowBound {
  double out, lse;
};

TEST_P(EarOp, CompensationWithinItsErrorModel) {
  const OpCase c = GetParam();
  const int64_t text = 5, S = c.N + text;
  Twin q(normal(c.dtype, {c.B, c.H, S, c.D}, rng, c.layout));
  HostTensor labels_host = random_labels(rng, c.B, c.H, c.N, c.Cq, text);
  Twin labels(std::move(labels_host));
  HostTensor mask_host = poisoned(DType::U8, {c.B, c.H, c.Cq, c.Ck}, c.layout);
  ref::for_each_index(mask_host.view, [&](const auto& idx) {
    ref::set(mask_host.view, idx, idx[2] == 0 ? 1.0 : (rng.uniform() < 0.2 ? 1.0 : 0.0));  // row 0 keeps all
  });
  Twin mask(std::move(mask_host));
  Twin kc(normal(DType::F32, {c.B, c.H, c.Ck, c.D}, rng));
  Twin vc(normal(DType::F32, {c.B, c.H, c.Ck, c.D}, rng));
  Twin ks(i32_tensor({c.B, c.H, c.Ck}, random_sizes(rng, c.B * c.H * c.Ck, 90)));
  for (const DType out_dtype : {DType::F32, DType::BF16}) {
    SCOPED_TRACE("out " + std::string(dtype_name(out_dtype)));
    HostTensor out0 = normal(out_dtype, {c.B, c.H, S, c.D}, rng, Layout::Transposed);
    HostTensor lse0 = poisoned(DType::F32, {c.B, c.H, S}, Layout::Padded);
    ref::for_each_index(lse0.view, [&](const auto& idx) {
      const bool nothing = rng.uniform() < 0.1;  // a row that attended to no key
      ref::set(lse0.view, idx, nothing ? -kInf : rng.uniform(-2, 6));
      if (nothing)
        for (int64_t d = 0; d < c.D; ++d) ref::set(out0.view, {idx[0], idx[1], idx[2], d}, 0.0);
    });
    const HostTensor out_cpu = deep_copy(out0), lse_cpu = deep_copy(lse0);
    Twin out_gpu(out0), lse_gpu(lse0);
    centroid_compensation(q.host.view, labels.host.view, mask.host.view, kc.host.view, vc.host.view, ks.host.view,
                          scale(), out_cpu.view, lse_cpu.view, kCpu);
    centroid_compensation(q.dev, labels.dev, mask.dev, kc.dev, vc.dev, ks.dev, scale(), out_gpu.dev, lse_gpu.dev,
                          cs.stream());
    cs.sync();
    const HostTensor out_g = out_gpu.download(), lse_g = lse_gpu.download();
    ASSERT_TRUE(out_g.outside_view_unchanged(out0.bytes())) << "out written outside its view";
    ASSERT_TRUE(lse_g.outside_view_unchanged(lse0.bytes())) << "lse written outside its view";
    const double u = ref::kF32Eps, out_u = out_dtype == DType::F32 ? u : 0x1p-8;
    double vmax = 0;
    for (double x : ref::to_vector(vc.host.view)) vmax = std::max(vmax, std::abs(x));
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t h = 0; h < c.H; ++h)
        for (int64_t i = 0; i < S; ++i) {
          const double lc = ref::get(lse_cpu.view, {b, h, i});
          const double lg = ref::get(lse_g.view, {b, h, i});
          const std::string row = "row [" + std::to_string(b) + "," + std::to_string(h) + "," + std::to_string(i) + "]";
          bool skips = false;  // does the row's cluster skip a non-empty key cluster?
          if (i < c.N) {
            const int64_t a = static_cast<int64_t>(ref::get(labels.host.view, {b, h, i}));
            for (int64_t j = 0; j < c.Ck; ++j)
              skips = skips || (ref::get(mask.host.view, {b, h, a, j}) == 0 && ref::get(ks.host.view, {b, h, j}) > 0);
          }
          if (!skips) {  // text rows and rows with nothing skipped stay as they were
            ASSERT_EQ(std::memcmp(&lg, &lc, sizeof lg), 0) << row << " lse changed: " << lg << " vs " << lc;
            for (int64_t d = 0; d < c.D; ++d)
              ASSERT_EQ(ref::get(out_g.view, {b, h, i, d}), ref::get(out_cpu.view, {b, h, i, d})) << row;
            continue;
          }
          double qk = 0, wmax = 0, out0_max = 0;
          for (int64_t j = 0; j < c.Ck; ++j) {
            double s = 0;
            for (int64_t d = 0; d < c.D; ++d)
              s += std::abs(ref::get(q.host.view, {b, h, i, d}) * ref::get(kc.host.view, {b, h, j, d}));
            qk = std::max(qk, s);
            wmax = std::max(wmax, std::log(91.0) + scale() * s);
          }
          for (int64_t d = 0; d < c.D; ++d) out0_max = std::max(out0_max, std::abs(ref::get(out0.view, {b, h, i, d})));
          const double dw = 2 * (c.D + 4) * u * scale() * qk + 4 * u * (wmax + 1);
          const double rel = 2 * dw + (c.Ck + 8) * u;
          const RowBound bound{rel * 2 * (vmax + out0_max), rel + 2 * u * std::abs(lc)};
          ASSERT_LE(std::abs(lg - lc), bound.lse) << row << " lse: GPU " << lg << ", CPU " << lc;
          for (int64_t d = 0; d < c.D; ++d) {
            const double og = ref::get(out_g.view, {b, h, i, d}), oc = ref::get(out_cpu.view, {b, h, i, d});
            ASSERT_LE(std::abs(og - oc), bound.out + 2 * out_u * std::abs(oc))
                << row << " out d=" << d << ": GPU " << og << ", CPU " << oc;
          }
        }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, EarOp,
    ::testing::Values(OpCase{1, 2, 300, 64, 7, 24, DType::BF16, Layout::Contiguous},
                      OpCase{2, 1, 517, 128, 33, 70, DType::F32, Layout::Transposed},
                      OpCase{1, 3, 200, 40, 5, 13, DType::F16, Layout::Padded},                // D not a multiple of 8
                      OpCase{1, 1, 900, 64, 40, 1100, DType::BF16, Layout::TransposedPadded},  // 2048-column ranking
                      OpCase{1, 1, 64, 8, 1, 1, DType::F32, Layout::Contiguous}),
    [](const ::testing::TestParamInfo<OpCase>& p) { return describe(p.param); });

// ---------------------------------------------------------------------------------------------
// The layer call on a CUDA stream against the CPU layer. Both start from the same centroids, the
// centres of the blobs the tokens are drawn around, and run zero Lloyd iterations: each token's
// nearest centroid wins by a margin far beyond either backend's rounding (squared distances ~128
// apart against noise of ~8), so sizes, probabilities, budgets and masks are the same, and the
// outputs differ by the attention kernels' bf16 error (the tolerance of test_cuda_attention's layer
// test) plus the compensation's.
// ---------------------------------------------------------------------------------------------

struct LayerCase {
  const char* name;
  Routing routing;
  bool compensate;
  float density;
  int64_t text;
};

Config layer_config(const LayerCase& lc) {
  Config c;
  c.q_clusters = 8;
  c.k_clusters = 40;
  c.top_p = 0.7f;
  c.kmeans_iters_step = 0;
  c.routing = lc.routing;
  c.compensate = lc.compensate;
  c.density = lc.density;
  c.text_tokens = lc.text;
  c.prompt_length = lc.text / 2;
  c.check_finite = false;  // it synchronises; the graph test captures the call
  return c;
}

struct LayerResult {
  std::vector<double> out, lse, density, q_sizes, k_sizes;
};

struct LayerInputs {
  HostTensor q, k, v, qc, kc;
  double max_v = 0;
};

LayerInputs layer_inputs(int64_t B, int64_t H, int64_t S, int64_t D, const Config& config) {
  const uint32_t seed = static_cast<uint32_t>(testing_support::case_seed());
  auto host_of = [](Tensor t) { return HostTensor{std::move(t), TensorView{}}; };
  std::vector<float> q_centres, k_centres;
  const int qn = static_cast<int>(config.q_clusters), kn = static_cast<int>(config.k_clusters);
  LayerInputs in{host_of(testing_support::clustered_tensor(DType::BF16, B, H, S, D, qn, seed, 1.0f, 0.3f, &q_centres)),
                 host_of(testing_support::clustered_tensor(DType::BF16, B, H, S, D, kn, seed + 1, 1.0f, 0.3f, &k_centres)),
                 host_of(testing_support::random_tensor(DType::BF16, {B, H, S, D}, seed + 2)),
                 host_of(Tensor(DType::F32, {B, H, config.q_clusters, D})),
                 host_of(Tensor(DType::F32, {B, H, config.k_clusters, D}))};
  for (HostTensor* t : {&in.q, &in.k, &in.v, &in.qc, &in.kc}) t->view = t->storage.view();
  for (double x : ref::to_vector(in.v.view)) in.max_v = std::max(in.max_v, std::abs(x));
  // The centroids: the blobs' centres, in every head.
  for (int64_t bh = 0; bh < B * H; ++bh) {
    std::copy(q_centres.begin(), q_centres.end(), in.qc.storage.data_as<float>() + bh * qn * D);
    std::copy(k_centres.begin(), k_centres.end(), in.kc.storage.data_as<float>() + bh * kn * D);
  }
  return in;
}

LayerResult run_layer(const LayerInputs& in, const Config& config, const Stream& stream) {
  const int64_t B = in.q.view.shape[0], H = in.q.view.shape[1], S = in.q.view.shape[2];
  const bool gpu = stream.device.type == DeviceType::CUDA;
  std::vector<Twin> inputs;
  std::vector<TensorView> views;
  for (const HostTensor* t : {&in.q, &in.k, &in.v, &in.qc, &in.kc}) {
    if (gpu) {
      inputs.emplace_back(*t);
      views.push_back(inputs.back().dev);
    } else {
      views.push_back(t->view);
    }
  }
  // The centroids are read and (with zero iterations) not moved; copies keep `in` untouched.
  const HostTensor qc_copy = deep_copy(in.qc), kc_copy = deep_copy(in.kc);
  if (!gpu) {
    views[3] = qc_copy.view;
    views[4] = kc_copy.view;
  }
  const Device dev = stream.device;
  Tensor out(DType::BF16, in.q.storage.shape(), dev), lse(DType::F32, {B, H, S}, dev), density(DType::F32, {B, H}, dev);
  Tensor qs(DType::I32, {B, H, config.q_clusters}, dev), ks(DType::I32, {B, H, config.k_clusters}, dev);
  const AttentionShape shape = AttentionShape::of(in.q.view);
  const Buffer scratch =
      Buffer::allocate(std::max<size_t>(svg2_workspace_bytes(shape, config, DType::BF16, dev), 1), dev);
  try {
    svg2_attention(views[0], views[1], views[2], config, CentroidViews{views[3], views[4], {}}, false,
                   {out.view(), lse.view(), density.view(), qs.view(), ks.view()}, {scratch.data(), scratch.bytes()},
                   stream);
  } catch (const Error& e) {
    ADD_FAILURE() << (gpu ? "GPU" : "CPU") << " layer call: " << e.what() << " (" << e.file() << ":" << e.line() << ")";
    throw;
  }
  auto values = [&](const Tensor& t) {
    if (!gpu) return ref::to_vector(t.view());
    Tensor h(t.dtype(), t.shape());
    SAPATTN_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(stream.handle)));
    SAPATTN_CUDA_CHECK(cudaMemcpy(h.data(), t.data(), t.bytes(), cudaMemcpyDeviceToHost));
    return ref::to_vector(h.view());
  };
  return {values(out), values(lse), values(density), values(qs), values(ks)};
}

class EarLayer : public ::testing::TestWithParam<LayerCase> {};

TEST_P(EarLayer, CudaLayerMatchesCpuLayer) {
  const LayerCase lc = GetParam();
  const Config config = layer_config(lc);
  const int64_t B = 1, H = 2, S = 1200 + lc.text, D = 64;
  const LayerInputs in = layer_inputs(B, H, S, D, config);
  CudaStream cs;
  const LayerResult cpu = run_layer(in, config, kCpu);
  const LayerResult gpu = run_layer(in, config, cs.stream());
  const LayerResult again = run_layer(in, config, cs.stream());
  ASSERT_EQ(gpu.q_sizes, cpu.q_sizes) << "query clusters differ: the GPU assignment broke a tie (see the comment)";
  ASSERT_EQ(gpu.k_sizes, cpu.k_sizes) << "key clusters differ: the GPU assignment broke a tie (see the comment)";
  EXPECT_EQ(gpu.density, cpu.density) << "the masks differ (exact integer areas on both backends)";
  for (size_t i = 0; i < cpu.out.size(); ++i)
    ASSERT_LE(std::abs(gpu.out[i] - cpu.out[i]), 0x1p-7 * in.max_v + 0x1p-7 * std::abs(cpu.out[i]))
        << "out element " << where(in.q.view, static_cast<int64_t>(i)) << ": GPU " << gpu.out[i] << ", CPU "
        << cpu.out[i];
  for (size_t i = 0; i < cpu.lse.size(); ++i)
    ASSERT_LE(std::abs(gpu.lse[i] - cpu.lse[i]), 0x1p-8 * (1.0 + std::abs(cpu.lse[i])))
        << "lse element " << i << ": GPU " << gpu.lse[i] << ", CPU " << cpu.lse[i];
  EXPECT_EQ(gpu.out, again.out) << "two GPU calls differ: not deterministic";
  EXPECT_EQ(gpu.lse, again.lse) << "two GPU calls differ: not deterministic";
  if (lc.density > 0.0f) {
    for (double d : gpu.density) EXPECT_GE(d, lc.density * (S - lc.text) * (S - lc.text) / (double(S) * S) - 1e-6);
  }
}

INSTANTIATE_TEST_SUITE_P(Methods, EarLayer,
                         ::testing::Values(LayerCase{"ear", Routing::ErrorAware, true, 0.0f, 0},
                                           LayerCase{"sap_compensate", Routing::TopP, true, 0.0f, 0},
                                           LayerCase{"sap_density", Routing::TopP, false, 0.25f, 0},
                                           LayerCase{"ear_density", Routing::ErrorAware, true, 0.2f, 0},
                                           LayerCase{"ear_text", Routing::ErrorAware, true, 0.0f, 40}),
                         [](const ::testing::TestParamInfo<LayerCase>& p) { return std::string(p.param.name); });

// The whole EAR layer call (no check_finite) captured into a CUDA graph: no host synchronisation and
// no allocation inside, and replays equal the eager call bit for bit.
TEST(EarGraph, CapturedLayerMatchesEager) {
  const LayerCase lc{"ear_density", Routing::ErrorAware, true, 0.2f, 0};
  const Config config = layer_config(lc);
  const int64_t B = 1, H = 2, S = 1000, D = 64;
  const LayerInputs in = layer_inputs(B, H, S, D, config);
  CudaStream cs;
  const LayerResult eager = run_layer(in, config, cs.stream());
  Twin q(in.q), k(in.k), v(in.v), qc(in.qc), kc(in.kc);
  const Device dev = Device::cuda(0);
  Tensor out(DType::BF16, {B, H, S, D}, dev), lse(DType::F32, {B, H, S}, dev), density(DType::F32, {B, H}, dev);
  const Buffer scratch =
      Buffer::allocate(svg2_workspace_bytes(AttentionShape::of(in.q.view), config, DType::BF16, dev), dev);
  auto call = [&] {
    svg2_attention(q.dev, k.dev, v.dev, config, CentroidViews{qc.dev, kc.dev, {}}, false,
                   {out.view(), lse.view(), density.view()}, {scratch.data(), scratch.bytes()}, cs.stream());
  };
  call();  // eager once: kernel attributes are set outside the capture
  cs.sync();
  cudaGraph_t graph = nullptr;
  SAPATTN_CUDA_CHECK(cudaStreamBeginCapture(cs.handle(), cudaStreamCaptureModeThreadLocal));
  try {
    call();
  } catch (...) {
    (void)cudaStreamEndCapture(cs.handle(), &graph);
    if (graph != nullptr) (void)cudaGraphDestroy(graph);
    throw;
  }
  SAPATTN_CUDA_CHECK(cudaStreamEndCapture(cs.handle(), &graph));
  cudaGraphExec_t exec = nullptr;
  SAPATTN_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  SAPATTN_CUDA_CHECK(cudaMemset(out.data(), 0xff, out.bytes()));
  SAPATTN_CUDA_CHECK(cudaMemset(lse.data(), 0xff, lse.bytes()));
  SAPATTN_CUDA_CHECK(cudaGraphLaunch(exec, cs.handle()));
  cs.sync();
  (void)cudaGraphExecDestroy(exec);
  (void)cudaGraphDestroy(graph);
  Tensor out_h(DType::BF16, {B, H, S, D}), lse_h(DType::F32, {B, H, S});
  SAPATTN_CUDA_CHECK(cudaMemcpy(out_h.data(), out.data(), out.bytes(), cudaMemcpyDeviceToHost));
  SAPATTN_CUDA_CHECK(cudaMemcpy(lse_h.data(), lse.data(), lse.bytes(), cudaMemcpyDeviceToHost));
  EXPECT_EQ(ref::to_vector(out_h.view()), eager.out) << "the graph replay differs from the eager call";
  EXPECT_EQ(ref::to_vector(lse_h.view()), eager.lse) << "the graph replay differs from the eager call";
}

// ---------------------------------------------------------------------------------------------
// Bad input on a CUDA stream
// ---------------------------------------------------------------------------------------------

TEST(EarErrors, WorkspaceValuesAndLimits) {
  ref::Rng rng(testing_support::case_seed());
  CudaStream cs;
  const int64_t B = 1, H = 2, N = 100, D = 32, Cq = 4, Ck = 9;
  const float scale = 0.2f;
  Twin qc(normal(DType::F32, {B, H, Cq, D}, rng)), kc(normal(DType::F32, {B, H, Ck, D}, rng));
  Twin vc(normal(DType::F32, {B, H, Ck, D}, rng));
  Twin k(normal(DType::BF16, {B, H, N, D}, rng)), v(normal(DType::BF16, {B, H, N, D}, rng));
  Twin labels(random_labels(rng, B, H, N, Ck));
  Twin qs(i32_tensor({B, H, Cq}, std::vector<int32_t>(B * H * Cq, 10)));
  Twin ks(i32_tensor({B, H, Ck}, counts_of(labels.host.view, Ck)));
  std::vector<int32_t> negative(B * H * Ck, 5);
  negative[3] = -1;
  Twin ks_negative(i32_tensor({B, H, Ck}, negative));
  HostTensor bad_host = random_labels(rng, B, H, N, Ck);
  bad_host.storage.data_as<int32_t>()[17] = static_cast<int32_t>(Ck);  // out of range
  Twin bad_labels(std::move(bad_host));
  Twin scores(poisoned(DType::F32, {B, H, Cq, Ck})), probs(poisoned(DType::F32, {B, H, Cq, Ck}));
  Twin mask(poisoned(DType::U8, {B, H, Cq, Ck})), budget(poisoned(DType::U8, {B, H, Cq, Ck}));
  Twin means(poisoned(DType::F32, {B, H, Ck, D}));
  const size_t need = ear_workspace_bytes(B * H, N, Cq, Ck, D, Device::cuda(0));
  ASSERT_GT(need, 0u);
  EXPECT_EQ(ear_workspace_bytes(B * H, N, Cq, Ck, D, Device::cpu()), 0u);
  DeviceScratch ws(need), small(need / 2);
  const Stream s = cs.stream();

  // Too small a workspace: WorkspaceError before anything is launched.
  EXPECT_THROW(cluster_means(v.dev, labels.dev, means.dev, s, small.workspace()), WorkspaceError);
  EXPECT_THROW(cluster_means(v.dev, labels.dev, means.dev, s), WorkspaceError);
  EXPECT_THROW(ear_probe(qc.dev, kc.dev, vc.dev, k.dev, v.dev, labels.dev, qs.dev, ks.dev, scale, 1.0f, scores.dev, s,
                         small.workspace()),
               WorkspaceError);
  EXPECT_THROW(select_top_p_at_density(probs.dev, qs.dev, ks.dev, 0.3f, 0, mask.dev, s), WorkspaceError);

  // Values (labels out of range, negative sizes) with value checks on: InvalidArgumentError.
  {
    const ValueChecks on;
    EXPECT_THROW(cluster_means(v.dev, bad_labels.dev, means.dev, s, ws.workspace()), InvalidArgumentError);
    EXPECT_THROW(centroid_probs(qc.dev, kc.dev, ks_negative.dev, scale, probs.dev, s), InvalidArgumentError);
    EXPECT_THROW(ear_probe(qc.dev, kc.dev, vc.dev, k.dev, v.dev, bad_labels.dev, qs.dev, ks.dev, scale, 1.0f,
                           scores.dev, s, ws.workspace()),
                 InvalidArgumentError);
    EXPECT_THROW(ear_probe(qc.dev, kc.dev, vc.dev, k.dev, v.dev, labels.dev, qs.dev, ks_negative.dev, scale, 1.0f,
                           scores.dev, s, ws.workspace()),
                 InvalidArgumentError);
    centroid_probs(qc.dev, kc.dev, ks.dev, scale, probs.dev, s);
    EXPECT_THROW(select_error_aware(probs.dev, budget.dev, probs.dev, qs.dev, ks_negative.dev, 1, mask.dev, s),
                 InvalidArgumentError);
    EXPECT_THROW(select_top_p_at_density(probs.dev, qs.dev, ks_negative.dev, 0.3f, 0, mask.dev, s, ws.workspace()),
                 InvalidArgumentError);
    Twin q(normal(DType::BF16, {B, H, N, D}, rng)), out(normal(DType::BF16, {B, H, N, D}, rng));
    Twin lse(normal(DType::F32, {B, H, N}, rng));
    HostTensor bad_q_host = random_labels(rng, B, H, N, Cq);
    bad_q_host.storage.data_as<int32_t>()[5] = -2;
    Twin bad_q_labels(std::move(bad_q_host));
    EXPECT_THROW(
        centroid_compensation(q.dev, bad_q_labels.dev, mask.dev, kc.dev, vc.dev, ks.dev, scale, out.dev, lse.dev, s),
        InvalidArgumentError);
    Twin q_labels(random_labels(rng, B, H, N, Cq));
    HostTensor zeros = poisoned(DType::U8, {B, H, Cq, Ck});
    std::fill_n(zeros.storage.data_as<uint8_t>(), zeros.storage.bytes(), 0);  // every cluster skipped
    Twin skip_all(std::move(zeros));
    EXPECT_THROW(centroid_compensation(q.dev, q_labels.dev, skip_all.dev, kc.dev, vc.dev, ks_negative.dev, scale,
                                       out.dev, lse.dev, s),
                 InvalidArgumentError);
    EXPECT_NO_THROW(
        centroid_compensation(q.dev, q_labels.dev, skip_all.dev, kc.dev, vc.dev, ks.dev, scale, out.dev, lse.dev, s));
    // Good values pass the same checks.
    EXPECT_NO_THROW(ear_probe(qc.dev, kc.dev, vc.dev, k.dev, v.dev, labels.dev, qs.dev, ks.dev, scale, 1.0f, scores.dev,
                              s, ws.workspace()));
    EXPECT_NO_THROW(select_top_p_at_density(probs.dev, qs.dev, ks.dev, 0.3f, 0, mask.dev, s, ws.workspace()));
  }

  // Shapes, dtypes and devices are checked before the backend is chosen.
  EXPECT_THROW(centroid_probs(qc.dev, kc.dev, ks.dev, scale, mask.dev, s), DTypeError);
  EXPECT_THROW(ear_probe(qc.dev, kc.dev, qc.dev, k.dev, v.dev, labels.dev, qs.dev, ks.dev, scale, 1.0f, scores.dev, s,
                         ws.workspace()),
               ShapeError);  // v_centroids with Cq clusters
  EXPECT_THROW(select_error_aware(probs.dev, budget.dev, scores.dev, qs.dev, ks.dev, 1, mask.host.view, s),
               UnsupportedError);  // a host tensor on a CUDA stream

  // Limits of the CUDA kernels: UnsupportedError naming them.
  {
    Twin qc_wide(normal(DType::F32, {1, 1, 2, 300}, rng)), kc_wide(normal(DType::F32, {1, 1, 2, 300}, rng));
    Twin k_wide(normal(DType::F32, {1, 1, 4, 300}, rng)), l_wide(i32_tensor({1, 1, 4}, {0, 1, 1, 0}));
    Twin s2(i32_tensor({1, 1, 2}, {2, 2})), sc(poisoned(DType::F32, {1, 1, 2, 2}));
    DeviceScratch w(ear_workspace_bytes(1, 4, 2, 2, 300, Device::cuda(0)));
    EXPECT_THROW(ear_probe(qc_wide.dev, kc_wide.dev, kc_wide.dev, k_wide.dev, k_wide.dev, l_wide.dev, s2.dev, s2.dev,
                           scale, 1.0f, sc.dev, s, w.workspace()),
                 UnsupportedError);
    Twin q_wide(normal(DType::F32, {1, 1, 4, 300}, rng)), o_wide(normal(DType::F32, {1, 1, 4, 300}, rng));
    Twin lse_wide(normal(DType::F32, {1, 1, 4}, rng));
    HostTensor m22 = poisoned(DType::U8, {1, 1, 2, 2});
    std::fill_n(m22.storage.data_as<uint8_t>(), 4, 0);
    Twin mask22(std::move(m22));
    EXPECT_THROW(centroid_compensation(q_wide.dev, l_wide.dev, mask22.dev, kc_wide.dev, kc_wide.dev, s2.dev, scale,
                                       o_wide.dev, lse_wide.dev, s),
                 UnsupportedError);
    const int64_t C = cuda::kMaxSelectColumns + 1;
    Twin p_long(poisoned(DType::F32, {1, 1, 1, C})), b_long(poisoned(DType::U8, {1, 1, 1, C}));
    Twin m_long(poisoned(DType::U8, {1, 1, 1, C}));
    Twin q1(i32_tensor({1, 1, 1}, {1})), k_long(i32_tensor({1, 1, C}, std::vector<int32_t>(C, 1)));
    EXPECT_THROW(select_error_aware(p_long.dev, b_long.dev, p_long.dev, q1.dev, k_long.dev, 1, m_long.dev, s),
                 UnsupportedError);
  }
  cs.sync();
}

}  // namespace
}  // namespace sapattn
