// The CUDA ops of SVG-EAR and the density budget (src/cuda/ear/) against the CPU backend on the
// same inputs. Inputs are drawn on the host (seeded by the test's name), copied byte for byte to the
// GPU with their strides and offsets, and the outputs compared as each op's contract allows
// (docs/ear.md, "The CUDA backend"):
//   bit-identical:  centroid_probs, select_error_aware, select_top_p_at_density (the whole output
//                   storage, so bytes outside a strided view are checked too);
//   1 fp32 ulp:     cluster_means (fp64 sums in another order, rounded once);
//   error model:    ear_probe's CUDA-core pass (same logits and per-token terms, fp64 sums in another
//                   order: the difference of log E is bounded by the fp64 rounding of the sums times
//                   their cancellation, plus 2 fp32 ulps; the tensor-core pass, the default for bf16
//                   and f16 keys, is tested in test_cuda_ear_probe_tc.cpp), centroid_compensation's
//                   CUDA-core kernel (fp32 FMA logits and accumulation against the CPU's 8-lane logits
//                   and fp64 sums: bound below; the tensor-core kernel, the default, is tested in
//                   test_cuda_ear_comp.cpp).
// Every failure message names the case (shape, dtype, layout) and the first element that differs.
// The layer call is tested in test_cuda_ear_layer.cpp, bad input in test_cuda_ear_errors.cpp.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "cuda/backend.hpp"
#include "cuda_ear_support.hpp"
#include "reference.hpp"
#include "sapattn/ops.hpp"
#include "test_support.hpp"

namespace sapattn {
namespace {

using cuda_test::as_workspace;
using cuda_test::deep_copy;
using cuda_test::device_workspace;
using cuda_test::kCpu;
using cuda_test::poisoned;
using cuda_test::TestStream;
using cuda_test::Twin;
using ear_cuda_test::coarse;
using ear_cuda_test::counts_of;
using ear_cuda_test::expect_identical;
using ear_cuda_test::i32_tensor;
using ear_cuda_test::log_error_bound;
using ear_cuda_test::normal;
using ear_cuda_test::probe_conditioning;
using ear_cuda_test::ProbeConditioning;
using ear_cuda_test::random_labels;
using ear_cuda_test::random_sizes;
using ear_cuda_test::where;
using ref::HostTensor;
using ref::Layout;

constexpr double kInf = std::numeric_limits<double>::infinity();

struct OpCase {
  int64_t B, H, N, D, Cq, Ck;
  DType dtype;
  Layout layout;
};

std::string describe(const OpCase& c) {
  std::ostringstream os;
  os << "B" << c.B << "_H" << c.H << "_N" << c.N << "_D" << c.D << "_Cq" << c.Cq << "_Ck" << c.Ck << "_"
     << dtype_name(c.dtype) << "_" << ref::layout_name(c.layout);
  return testing_support::case_name(os.str());
}

class EarOp : public ::testing::TestWithParam<OpCase> {
 protected:
  ref::Rng rng{testing_support::case_seed()};
  TestStream cs;
  float scale() const { return 1.0f / std::sqrt(static_cast<float>(GetParam().D)); }
};

TEST_P(EarOp, ClusterMeansWithinOneUlp) {
  const OpCase c = GetParam();
  Twin points(normal(c.dtype, {c.B, c.H, c.N, c.D}, rng, c.layout, 2.0));
  Twin labels(random_labels(rng, c.B, c.H, c.N, c.Ck));
  HostTensor cpu = poisoned(DType::F32, {c.B, c.H, c.Ck, c.D});
  Twin gpu(poisoned(DType::F32, {c.B, c.H, c.Ck, c.D}));
  cluster_means(points.host.view, labels.host.view, cpu.view, kCpu);
  const Buffer ws = device_workspace(ear_workspace_bytes(c.B * c.H, c.N, c.Cq, c.Ck, c.D, Device::cuda(0)));
  cluster_means(points.dev, labels.dev, gpu.dev, cs.stream(), as_workspace(ws));
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

TEST_P(EarOp, ProbeWithinItsErrorModel) {
  const OpCase c = GetParam();
  const ear_cuda_test::CudaCoreProbe cuda_cores;  // the pass this bound is for
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
    const Buffer ws = device_workspace(ear_workspace_bytes(c.B * c.H, c.N, c.Cq, c.Ck, c.D, Device::cuda(0)));
    ear_probe(qc.dev, kc.dev, vc.dev, k.dev, v.dev, labels.dev, qs.dev, ks.dev, scale(), gamma, gpu.dev, cs.stream(),
              as_workspace(ws));
    cs.sync();
    const HostTensor got = gpu.download();
    ASSERT_TRUE(got.outside_view_unchanged(cpu.bytes())) << "ear_probe wrote outside its output view";
    const std::vector<double> g = ref::to_vector(got.view), r = ref::to_vector(cpu.view);
    const ProbeConditioning cond = probe_conditioning(qc.host.view, kc.host.view, vc.host.view, k.host.view,
                                                      v.host.view, labels.host.view, k_counts, scale());
    int64_t ill_conditioned = 0;
    for (size_t i = 0; i < g.size(); ++i) {
      const int64_t j = static_cast<int64_t>(i) % c.Ck, bh = static_cast<int64_t>(i) / (c.Cq * c.Ck);
      const double relative = log_error_bound(cond, i, cond.tokens[static_cast<size_t>(bh * c.Ck + j)]);
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
  Twin probs(coarse({c.B, c.H, R, C}, rng, c.layout, 0, 3, 0.0));
  Twin scores(coarse({c.B, c.H, R, C}, rng, c.layout, -20, 5, 0.05));
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
  const Buffer ws = device_workspace(ear_workspace_bytes(c.B * c.H, c.N, R, C, c.D, Device::cuda(0)));
  for (const float density : {0.02f, 0.15f, 0.5f, 0.93f, 1.0f})
    for (const int min_kept : {0, 3}) {
      SCOPED_TRACE("density " + std::to_string(density) + ", min_kept " + std::to_string(min_kept));
      HostTensor cpu = poisoned(DType::U8, {c.B, c.H, R, C}, Layout::Padded);
      Twin gpu(poisoned(DType::U8, {c.B, c.H, R, C}, Layout::Padded));
      select_top_p_at_density(probs.host.view, qs.host.view, ks.host.view, density, min_kept, cpu.view, kCpu);
      select_top_p_at_density(probs.dev, qs.dev, ks.dev, density, min_kept, gpu.dev, cs.stream(), as_workspace(ws));
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

TEST_P(EarOp, CudaCoreCompensationWithinItsErrorModel) {
  const OpCase c = GetParam();
  const ear_cuda_test::CudaCoreCompensation cuda_cores;  // the kernel this bound is for
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

}  // namespace
}  // namespace sapattn
