// The CUDA ops of ear-plus (src/cuda/ear/: ear_plus.cu, ear_select.cu, ear_split.cu) against the CPU
// backend on the same inputs, their bad input, the sequence the layer runs captured into a CUDA
// graph, and the layer call's refusal of the ear-plus fields on a CUDA stream (still in place).
// Inputs are drawn on the host (seeded by the test's name) and copied byte for byte to the GPU with their
// strides and offsets; the outputs are compared as each op's contract allows (docs/ear.md, "The
// CUDA backend"):
//   bit-identical: select_error_aware_per_head (the CPU's ranking, exact integer areas) and
//                  split_clusters (every fp64 sum in the CPU's order, IEEE operations only): the whole
//                  output storage, so bytes outside a strided view are checked too;
//   error model:   ear_plus_probe's CUDA-core pass (the logits bit-identical, fp64 sums in another
//                  order; the tensor-core pass: test_cuda_ear_probe_tc.cpp): the scores within
//                  ear_probe's bound on log E plus the log Z term, the spread within the mass's fp64
//                  rounding, the pair values within the value sums' (both plus one fp32 rounding);
//                  empty clusters' spread and pair values exactly the CPU's.
// Every failure message names the case (shape, dtypes, layout) and the first element that differs.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "cuda/backend.hpp"
#include "cuda_ear_support.hpp"
#include "reference.hpp"
#include "sapattn/ops.hpp"
#include "sapattn/svg2.hpp"
#include "test_support.hpp"

namespace sapattn {
namespace {

using cuda_test::as_workspace;
using cuda_test::device_workspace;
using cuda_test::kCpu;
using cuda_test::poisoned;
using cuda_test::TestStream;
using cuda_test::Twin;
using cuda_test::ValueChecksOn;
using ear_cuda_test::coarse;
using ear_cuda_test::counts_of;
using ear_cuda_test::ErrorInputs;
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
using testing_support::expect_error_message;

constexpr double kU64 = 0x1p-52;  // fp64 relative spacing

struct PlusCase {
  int64_t B, H, N, D, Cq, Ck;
  DType k_dtype, v_dtype;  // the probe's keys (and split's points) and values
  Layout layout;
};

std::string describe(const PlusCase& c) {
  std::ostringstream os;
  os << "B" << c.B << "_H" << c.H << "_N" << c.N << "_D" << c.D << "_Cq" << c.Cq << "_Ck" << c.Ck << "_k"
     << dtype_name(c.k_dtype) << "_v" << dtype_name(c.v_dtype) << "_" << ref::layout_name(c.layout);
  return testing_support::case_name(os.str());
}

class EarPlusOp : public ::testing::TestWithParam<PlusCase> {
 protected:
  ref::Rng rng{testing_support::case_seed()};
  TestStream cs;
  float scale() const { return 1.0f / std::sqrt(static_cast<float>(GetParam().D)); }
  Buffer workspace(int64_t Ck) const {
    const PlusCase c = GetParam();
    return device_workspace(ear_plus_workspace_bytes(c.B * c.H, c.N, c.Cq, Ck, Device::cuda(0)));
  }
};

// ---------------------------------------------------------------------------------------------
// ear_plus_probe
// ---------------------------------------------------------------------------------------------

// log Z_a = log sum_j M_aj exp(m_aj) per row [B,H,Cq] from the host's conditioning, and the largest
// |log M_aj + m_aj| of the row (what the fp64 rounding of the GPU's log-mass scales).
struct RowMass {
  std::vector<double> log_z, log_mass_max;
};

RowMass row_mass(const ProbeConditioning& cond, int64_t rows, int64_t Ck) {
  RowMass r{std::vector<double>(static_cast<size_t>(rows)), std::vector<double>(static_cast<size_t>(rows), 0.0)};
  for (int64_t row = 0; row < rows; ++row) {
    double top = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < Ck; ++j) {
      const size_t i = static_cast<size_t>(row * Ck + j);
      if (cond.mass[i] > 0) top = std::max(top, std::log(cond.mass[i]) + cond.run_max[i]);
    }
    double z = 0;
    for (int64_t j = 0; j < Ck; ++j) {
      const size_t i = static_cast<size_t>(row * Ck + j);
      if (cond.mass[i] > 0) {
        z += std::exp(std::log(cond.mass[i]) + cond.run_max[i] - top);
        r.log_mass_max[static_cast<size_t>(row)] =
            std::max(r.log_mass_max[static_cast<size_t>(row)], std::abs(std::log(cond.mass[i]) + cond.run_max[i]));
      }
    }
    r.log_z[static_cast<size_t>(row)] = top + std::log(z);
  }
  return r;
}

// Scores, spread and pair values against the CPU op within the error model of the file comment; the
// scores also with the optional outputs left out (the same kernels: bit-identical), and EAR's probe,
// whose pass this is, on the same inputs within its own bound (k and v of different dtypes included).
TEST_P(EarPlusOp, ProbeWithinItsErrorModel) {
  const PlusCase c = GetParam();
  const ear_cuda_test::CudaCoreProbe cuda_cores;  // the pass this bound is for
  if (c.N * c.Cq * c.Ck * c.B * c.H > 40'000'000) GTEST_SKIP() << "the host conditioning would take too long";
  const int64_t B = c.B, H = c.H, N = c.N, D = c.D, Cq = c.Cq, Ck = c.Ck;
  Twin qc(normal(DType::F32, {B, H, Cq, D}, rng));
  Twin kc(normal(DType::F32, {B, H, Ck, D}, rng));
  Twin vc(normal(DType::F32, {B, H, Ck, D}, rng));
  Twin k(normal(c.k_dtype, {B, H, N, D}, rng, c.layout));
  Twin v(normal(c.v_dtype, {B, H, N, D}, rng, c.layout));
  Twin labels(random_labels(rng, B, H, N, Ck));
  const std::vector<int32_t> k_counts = counts_of(labels.host.view, Ck);
  std::vector<int32_t> k_sizes = k_counts;
  if (Ck > 2) k_sizes[1] = 0;  // a cluster of tokens whose size says empty: spread 0, value centroid
  Twin qs(i32_tensor({B, H, Cq}, random_sizes(rng, B * H * Cq, 400)));
  Twin ks(i32_tensor({B, H, Ck}, k_sizes));
  const ProbeConditioning cond = probe_conditioning(qc.host.view, kc.host.view, vc.host.view, k.host.view, v.host.view,
                                                    labels.host.view, k_sizes, scale());
  const RowMass rows = row_mass(cond, B * H * Cq, Ck);
  const Buffer ws = workspace(Ck);
  const Buffer ear_ws = device_workspace(ear_workspace_bytes(B * H, N, Cq, Ck, D, Device::cuda(0)));
  for (const float gamma : {1.0f, 0.5f}) {
    SCOPED_TRACE("gamma " + std::to_string(gamma));
    HostTensor scores = poisoned(DType::F32, {B, H, Cq, Ck}, c.layout);
    HostTensor spread = poisoned(DType::F32, {B, H, Cq, Ck}, Layout::TransposedPadded);
    HostTensor values = poisoned(DType::F32, {B, H, Cq * Ck, D});
    HostTensor ear_scores = poisoned(DType::F32, {B, H, Cq, Ck}, c.layout);
    Twin g_scores(scores), g_spread(spread), g_values(values), g_bare(scores), g_ear(ear_scores);
    ear_plus_probe(qc.host.view, kc.host.view, vc.host.view, k.host.view, v.host.view, labels.host.view, qs.host.view,
                   ks.host.view, scale(), gamma, scores.view, spread.view, values.view, kCpu);
    ear_probe(qc.host.view, kc.host.view, vc.host.view, k.host.view, v.host.view, labels.host.view, qs.host.view,
              ks.host.view, scale(), gamma, ear_scores.view, kCpu);
    ear_plus_probe(qc.dev, kc.dev, vc.dev, k.dev, v.dev, labels.dev, qs.dev, ks.dev, scale(), gamma, g_scores.dev,
                   g_spread.dev, g_values.dev, cs.stream(), as_workspace(ws));
    ear_plus_probe(qc.dev, kc.dev, vc.dev, k.dev, v.dev, labels.dev, qs.dev, ks.dev, scale(), gamma, g_bare.dev, {}, {},
                   cs.stream(), as_workspace(ws));
    ear_probe(qc.dev, kc.dev, vc.dev, k.dev, v.dev, labels.dev, qs.dev, ks.dev, scale(), gamma, g_ear.dev, cs.stream(),
              as_workspace(ear_ws));
    cs.sync();
    const HostTensor got = g_scores.download(), got_spread = g_spread.download(), got_values = g_values.download();
    expect_identical(g_bare.download(), got, "scores without spread and pair values");
    ASSERT_TRUE(got.outside_view_unchanged(scores.bytes())) << "scores written outside their view";
    ASSERT_TRUE(got_spread.outside_view_unchanged(spread.bytes())) << "spread written outside its view";
    const std::vector<double> g = ref::to_vector(got.view), r = ref::to_vector(scores.view);
    const std::vector<double> gs = ref::to_vector(got_spread.view), rs = ref::to_vector(spread.view);
    const std::vector<double> gv = ref::to_vector(got_values.view), rv = ref::to_vector(values.view);
    const std::vector<double> ge = ref::to_vector(g_ear.download().view), re = ref::to_vector(ear_scores.view);
    int64_t ill_conditioned = 0;
    for (size_t i = 0; i < g.size(); ++i) {
      const int64_t pair = static_cast<int64_t>(i), j = pair % Ck, row = pair / Ck, bh = pair / (Cq * Ck);
      const size_t cluster = static_cast<size_t>(bh * Ck + j);
      const int64_t n = cond.tokens[cluster];
      const double m = cond.run_max[i], cl = cond.centroid_logit[i], mass = cond.mass[i];
      const std::string at = where(scores.view, pair);
      // Spread: log M in another order (positive terms: 4 (n + 16) 2^-52 relative), the fp64 rounding
      // of log(M/K) + m - c, one fp32 rounding on each side.
      const bool empty = n == 0 || k_sizes[cluster] == 0;
      if (empty) {
        ASSERT_EQ(gs[i], rs[i]) << "spread of an empty cluster " << at;
      } else {
        const double log_mk = std::log(mass / k_sizes[cluster]);
        const double tol = 4 * (n + 16) * kU64 + 4 * (std::abs(log_mk) + std::abs(m) + std::abs(cl) + 1) * kU64 +
                           2 * ref::kF32Eps * std::abs(rs[i]);
        ASSERT_LE(std::abs(gs[i] - rs[i]), tol) << "spread " << at << ": GPU " << gs[i] << ", CPU " << rs[i];
      }
      // Pair values: sum_t exp(s_t - log M) v_t against the CPU's rescaled sum over M.
      for (int64_t d = 0; d < D; ++d) {
        const size_t e = i * static_cast<size_t>(D) + static_cast<size_t>(d);
        if (empty) {
          ASSERT_EQ(gv[e], rv[e]) << "pair value of an empty cluster " << at << " d=" << d;
          continue;
        }
        const double tol =
            2 * ref::kF32Eps * std::abs(rv[e]) +
            (8.0 * (n + 16) + 4 * (std::abs(m) + std::abs(std::log(mass)) + 1)) * kU64 * cond.value_max[cluster];
        ASSERT_LE(std::abs(gv[e] - rv[e]), tol)
            << "pair value " << at << " d=" << d << ": GPU " << gv[e] << ", CPU " << rv[e];
      }
      const double relative = log_error_bound(cond, i, n);
      if (!(relative < 0.25)) {  // E cancels to rounding noise: only the range is checked
        ++ill_conditioned;
        ASSERT_TRUE(std::isfinite(g[i])) << "score " << at;
        ASSERT_TRUE(std::isfinite(ge[i])) << "EAR score " << at;
        continue;
      }
      // Scores: log E as ear_probe's, 2 log Z (Z: positive terms in another order, through fp64 log
      // masses), the fp64 composition, one fp32 rounding.
      const double log_z = rows.log_z[static_cast<size_t>(row)];
      const double dz = 4 * (N + Ck + 16 + rows.log_mass_max[static_cast<size_t>(row)]) * kU64;
      const double log_e = cond.value[i] > 0 ? std::abs(std::log(cond.value[i])) : 0.0;  // 0: the floor's path
      const double composition = 8 * (log_e + 2 * std::abs(m) + 2 * std::abs(log_z) + 16) * kU64;
      const double tol = 2 * relative + 2 * dz + composition + 4 * ref::kF32Eps * std::max(1.0, std::abs(r[i]));
      ASSERT_LE(std::abs(g[i] - r[i]), tol)
          << "score " << at << ": GPU " << g[i] << ", CPU " << r[i] << " (cancellation M/R " << relative << ")";
      const double ear_tol = 2 * relative + 4 * ref::kF32Eps * std::max(1.0, std::abs(re[i]));
      ASSERT_LE(std::abs(ge[i] - re[i]), ear_tol) << "EAR score " << at << ": GPU " << ge[i] << ", CPU " << re[i];
    }
    EXPECT_LE(ill_conditioned, static_cast<int64_t>(g.size()) / 100) << "too few well-conditioned scores to test";
  }
}

// ---------------------------------------------------------------------------------------------
// select_error_aware_per_head
// ---------------------------------------------------------------------------------------------

// Rows with ties (scores on a coarse grid), -0, NaN scores and empty clusters; budgets of none, some
// and every pair; sizes small, or large enough that a head's areas pass 2^32.
TEST_P(EarPlusOp, PerHeadRoutingIsIdentical) {
  const PlusCase c = GetParam();
  const int64_t B = c.B, H = c.H, R = c.Cq, C = c.Ck;
  Twin probs(coarse({B, H, R, C}, rng, c.layout, 0, 3, 0.0));
  Twin scores(coarse({B, H, R, C}, rng, c.layout, -20, 5, 0.05));
  const Buffer ws = workspace(C);
  for (const double share : {0.0, 0.3, 1.0})
    for (const int64_t largest : {int64_t{300}, int64_t{1'000'000}}) {
      HostTensor budget_host = poisoned(DType::U8, {B, H, R, C}, c.layout);
      ref::for_each_index(budget_host.view,
                          [&](const auto& idx) { ref::set(budget_host.view, idx, rng.uniform() < share); });
      Twin budget(std::move(budget_host));
      Twin qs(i32_tensor({B, H, R}, random_sizes(rng, B * H * R, largest)));
      Twin ks(i32_tensor({B, H, C}, random_sizes(rng, B * H * C, largest / 4)));
      for (const int guaranteed : {0, 1, 3, static_cast<int>(C) + 5}) {
        SCOPED_TRACE("budget share " + std::to_string(share) + ", sizes up to " + std::to_string(largest) +
                     ", guaranteed " + std::to_string(guaranteed));
        HostTensor cpu = poisoned(DType::U8, {B, H, R, C}, Layout::TransposedPadded);
        Twin gpu(poisoned(DType::U8, {B, H, R, C}, Layout::TransposedPadded));
        select_error_aware_per_head(probs.host.view, budget.host.view, scores.host.view, qs.host.view, ks.host.view,
                                    guaranteed, cpu.view, kCpu);
        select_error_aware_per_head(probs.dev, budget.dev, scores.dev, qs.dev, ks.dev, guaranteed, gpu.dev, cs.stream(),
                                    as_workspace(ws));
        cs.sync();
        expect_identical(gpu.download(), cpu, "select_error_aware_per_head mask");
      }
    }
}

// ---------------------------------------------------------------------------------------------
// split_clusters
// ---------------------------------------------------------------------------------------------

// Random clusters (empty, 1-point and large ones), one of identical points, with their means as
// centroids (the layer's use) and with other centroids: byte-identical sub-labels and sizes, and the
// contract's invariants on the GPU's own output (a 1-point or identical-point cluster stays whole on
// side 0 when its centroid is its mean; against another centroid it may go whole to side 1).
TEST_P(EarPlusOp, SplitIsIdentical) {
  const PlusCase c = GetParam();
  const int64_t B = c.B, H = c.H, N = c.N, D = c.D, C = c.Ck;
  HostTensor points_host = normal(c.k_dtype, {B, H, N, D}, rng, c.layout);
  Twin labels(random_labels(rng, B, H, N, C));
  const std::vector<int32_t> label = ref::to_i32(labels.host.view);
  const std::vector<int32_t> sizes = counts_of(labels.host.view, C);
  // In every (b,h), the cluster of token 0 gets identical points (when it has several).
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int32_t target = label[static_cast<size_t>((b * H + h) * N)];
      for (int64_t t = 1; t < N; ++t)
        if (label[static_cast<size_t>((b * H + h) * N + t)] == target)
          for (int64_t d = 0; d < D; ++d)
            ref::set(points_host.view, {b, h, t, d}, ref::get(points_host.view, {b, h, 0, d}));
    }
  Twin points(std::move(points_host));
  Twin means(poisoned(DType::F32, {B, H, C, D}));
  cluster_means(points.host.view, labels.host.view, means.host.view, kCpu);
  means.upload();
  Twin others(normal(DType::F32, {B, H, C, D}, rng, Layout::Contiguous, 0.5));
  const Buffer ws = workspace(C);
  for (const Twin* centroids : {&means, &others}) {
    SCOPED_TRACE(centroids == &means ? "the clusters' means" : "other centroids");
    auto sub_labels = [&] {  // [B,H,N] within [B,H,N+3]: a row stride other than N
      HostTensor t = poisoned(DType::I32, {B, H, N + 3});
      t.view = t.view.slice(2, 0, N);
      return t;
    };
    HostTensor cpu_labels = sub_labels(), cpu_sizes = poisoned(DType::I32, {B, H, 2 * C});
    Twin gpu_labels(sub_labels()), gpu_sizes(poisoned(DType::I32, {B, H, 2 * C}));
    split_clusters(points.host.view, labels.host.view, centroids->host.view, cpu_labels.view, cpu_sizes.view, kCpu);
    split_clusters(points.dev, labels.dev, centroids->dev, gpu_labels.dev, gpu_sizes.dev, cs.stream(),
                   as_workspace(ws));
    cs.sync();
    const HostTensor got_labels = gpu_labels.download(), got_sizes = gpu_sizes.download();
    expect_identical(got_labels, cpu_labels, "split_clusters sub_labels");
    expect_identical(got_sizes, cpu_sizes, "split_clusters sub_sizes");
    const std::vector<int32_t> sub = ref::to_i32(got_labels.view);
    for (size_t i = 0; i < sub.size(); ++i) {
      ASSERT_EQ(sub[i] / 2, label[i]) << "token " << i << " left its cluster";
      const int32_t n = sizes[i / static_cast<size_t>(N) * static_cast<size_t>(C) + static_cast<size_t>(label[i])];
      if (centroids == &means && (n == 1 || label[i] == label[i / static_cast<size_t>(N) * static_cast<size_t>(N)])) {
        EXPECT_EQ(sub[i] % 2, 0) << "token " << i << ": a 1-point or identical-point cluster stays on side 0";
      }
    }
    EXPECT_EQ(ref::to_i32(got_sizes.view), counts_of(got_labels.view, 2 * C)) << "sub_sizes do not count the halves";
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, EarPlusOp,
    ::testing::Values(PlusCase{1, 2, 300, 64, 7, 24, DType::BF16, DType::BF16, Layout::Contiguous},
                      PlusCase{2, 1, 517, 128, 33, 70, DType::F32, DType::BF16, Layout::Transposed},
                      PlusCase{1, 3, 200, 40, 5, 13, DType::F16, DType::F32, Layout::Padded},       // D % 8 != 0
                      PlusCase{1, 1, 150, 256, 3, 5, DType::BF16, DType::F16, Layout::Padded},      // the widest D
                      PlusCase{2, 2, 1000, 32, 45, 9, DType::F32, DType::F32, Layout::Contiguous},  // several tiles
                      PlusCase{1, 1, 900, 64, 40, 1100, DType::BF16, DType::BF16, Layout::TransposedPadded},
                      PlusCase{1, 1, 64, 8, 1, 1, DType::F32, DType::F32, Layout::Contiguous}),
    [](const ::testing::TestParamInfo<PlusCase>& p) { return describe(p.param); });

// ---------------------------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------------------------

// Too small a workspace, bad values with the value checks on, bad shapes and dtypes (typed errors,
// outputs untouched), and the limits of the kernels.
TEST(EarPlusErrors, WorkspaceValuesShapesAndLimits) {
  ref::Rng rng(testing_support::case_seed());
  TestStream cs;
  const Stream s = cs.stream();
  const ErrorInputs in(rng);
  const int64_t B = in.B, H = in.H, N = in.N, D = in.D, Cq = in.Cq, Ck = in.Ck;
  const float scale = in.scale;
  const Twin &qc = in.qc, &kc = in.kc, &vc = in.vc, &k = in.k, &v = in.v, &labels = in.labels;
  const Twin &qs = in.qs, &ks = in.ks, &ks_negative = in.ks_negative, &bad_labels = in.bad_labels;
  Twin scores(poisoned(DType::F32, {B, H, Cq, Ck})), spread(poisoned(DType::F32, {B, H, Cq, Ck}));
  Twin values(poisoned(DType::F32, {B, H, Cq * Ck, D})), probs(normal(DType::F32, {B, H, Cq, Ck}, rng));
  Twin mask(poisoned(DType::U8, {B, H, Cq, Ck})), budget(poisoned(DType::U8, {B, H, Cq, Ck}));
  Twin sub_labels(poisoned(DType::I32, {B, H, N})), sub_sizes(poisoned(DType::I32, {B, H, 2 * Ck}));
  const size_t need = ear_plus_workspace_bytes(B * H, N, Cq, Ck, Device::cuda(0));
  ASSERT_GT(need, 0u);
  EXPECT_EQ(ear_plus_workspace_bytes(B * H, N, Cq, Ck, Device::cpu()), 0u);
  const Buffer ws = device_workspace(need), small = device_workspace(1);
  const auto probe = [&](const TensorView& l, const TensorView& k_sizes, const TensorView& sp, const TensorView& pv,
                         Workspace w) {
    ear_plus_probe(qc.dev, kc.dev, vc.dev, k.dev, v.dev, l, qs.dev, k_sizes, scale, 1.0f, scores.dev, sp, pv, s, w);
  };
  const auto route = [&](const TensorView& k_sizes, const TensorView& out, Workspace w) {
    select_error_aware_per_head(probs.dev, budget.dev, probs.dev, qs.dev, k_sizes, 1, out, s, w);
  };
  const auto split = [&](const TensorView& l, const TensorView& sizes_out, Workspace w) {
    split_clusters(k.dev, l, kc.dev, sub_labels.dev, sizes_out, s, w);
  };
  // Argument errors leave every output's device bytes as they were.
  const auto untouched = [&] {
    for (const Twin* t : {&scores, &spread, &values, &mask, &sub_labels, &sub_sizes})
      EXPECT_EQ(cuda_test::device_bytes(t->device), t->host.bytes()) << "an output was written by a failing call";
  };

  // Too small a workspace, or none: WorkspaceError before anything is launched.
  EXPECT_THROW(probe(labels.dev, ks.dev, spread.dev, values.dev, as_workspace(small)), WorkspaceError);
  EXPECT_THROW(probe(labels.dev, ks.dev, spread.dev, values.dev, {}), WorkspaceError);
  EXPECT_THROW(route(ks.dev, mask.dev, as_workspace(small)), WorkspaceError);
  EXPECT_THROW(split(labels.dev, sub_sizes.dev, {}), WorkspaceError);
  untouched();

  // Shapes, dtypes and devices are checked before the backend is chosen.
  Twin spread_t(poisoned(DType::F32, {B, H, Ck, Cq})), spread_u8(poisoned(DType::U8, {B, H, Cq, Ck}));
  Twin values_padded(poisoned(DType::F32, {B, H, Cq * Ck, D}, Layout::Padded));
  Twin sizes_c(poisoned(DType::I32, {B, H, Ck})), mask_f32(poisoned(DType::F32, {B, H, Cq, Ck}));
  EXPECT_THROW(probe(labels.dev, ks.dev, spread_t.dev, values.dev, as_workspace(ws)), ShapeError);
  EXPECT_THROW(probe(labels.dev, ks.dev, spread_u8.dev, values.dev, as_workspace(ws)), DTypeError);
  EXPECT_THROW(probe(labels.dev, ks.dev, spread.dev, values_padded.dev, as_workspace(ws)), ShapeError);
  EXPECT_THROW(probe(labels.dev, ks.dev, spread.host.view, values.dev, as_workspace(ws)), UnsupportedError);
  EXPECT_THROW(route(ks.dev, mask_f32.dev, as_workspace(ws)), DTypeError);
  EXPECT_THROW(route(ks.dev, mask.host.view, as_workspace(ws)), UnsupportedError);
  EXPECT_THROW(split(labels.dev, sizes_c.dev, as_workspace(ws)), ShapeError);
  EXPECT_THROW(split_clusters(k.dev, labels.dev, kc.dev, sub_labels.dev, sub_sizes.host.view, s, as_workspace(ws)),
               UnsupportedError);
  untouched();

  // Values (labels out of range, negative sizes) with value checks on: InvalidArgumentError; good
  // values pass the same checks.
  {
    const ValueChecksOn on;
    EXPECT_THROW(probe(bad_labels.dev, ks.dev, spread.dev, values.dev, as_workspace(ws)), InvalidArgumentError);
    EXPECT_THROW(probe(labels.dev, ks_negative.dev, spread.dev, values.dev, as_workspace(ws)), InvalidArgumentError);
    EXPECT_THROW(route(ks_negative.dev, mask.dev, as_workspace(ws)), InvalidArgumentError);
    EXPECT_THROW(split(bad_labels.dev, sub_sizes.dev, as_workspace(ws)), InvalidArgumentError);
    EXPECT_NO_THROW(probe(labels.dev, ks.dev, spread.dev, values.dev, as_workspace(ws)));
    EXPECT_NO_THROW(route(ks.dev, mask.dev, as_workspace(ws)));
    EXPECT_NO_THROW(split(labels.dev, sub_sizes.dev, as_workspace(ws)));
  }

  // Limits of the CUDA kernels: UnsupportedError naming them (the corrected compensation's are in
  // test_cuda_ear_comp.cpp).
  {
    Twin qc_wide(normal(DType::F32, {1, 1, 2, 300}, rng)), kc_wide(normal(DType::F32, {1, 1, 2, 300}, rng));
    Twin k_wide(normal(DType::F32, {1, 1, 4, 300}, rng)), l_wide(i32_tensor({1, 1, 4}, {0, 1, 1, 0}));
    Twin s2(i32_tensor({1, 1, 2}, {2, 2})), sc(poisoned(DType::F32, {1, 1, 2, 2}));
    Twin sub_wide(poisoned(DType::I32, {1, 1, 4})), sizes_wide(poisoned(DType::I32, {1, 1, 4}));
    const Buffer w = device_workspace(ear_plus_workspace_bytes(1, 4, 2, 2, Device::cuda(0)));
    expect_error_message<UnsupportedError>(
        [&] {
          ear_plus_probe(qc_wide.dev, kc_wide.dev, kc_wide.dev, k_wide.dev, k_wide.dev, l_wide.dev, s2.dev, s2.dev,
                         scale, 1.0f, sc.dev, {}, {}, s, as_workspace(w));
        },
        "ear_plus_probe");
    expect_error_message<UnsupportedError>(
        [&] { split_clusters(k_wide.dev, l_wide.dev, kc_wide.dev, sub_wide.dev, sizes_wide.dev, s, as_workspace(w)); },
        "split_clusters");
    const int64_t C = cuda::kMaxSelectColumns + 1;
    Twin p_long(normal(DType::F32, {1, 1, 1, C}, rng)), b_long(poisoned(DType::U8, {1, 1, 1, C}));
    Twin m_long(poisoned(DType::U8, {1, 1, 1, C}));
    Twin q1(i32_tensor({1, 1, 1}, {1})), k_long(i32_tensor({1, 1, C}, std::vector<int32_t>(C, 1)));
    const Buffer w_long = device_workspace(ear_plus_workspace_bytes(1, 1, 1, C, Device::cuda(0)));
    expect_error_message<UnsupportedError>(
        [&] {
          select_error_aware_per_head(p_long.dev, b_long.dev, p_long.dev, q1.dev, k_long.dev, 1, m_long.dev, s,
                                      as_workspace(w_long));
        },
        "select_error_aware_per_head");
  }
  cs.sync();
}

// ---------------------------------------------------------------------------------------------
// The sequence the layer runs, captured; the layer call's refusal
// ---------------------------------------------------------------------------------------------

// What svg2_attention's probe and select steps run with every ear-plus idea on (the probe over the
// key clusters, the split, the halves' means, the probe over the halves, the routing per head),
// captured into a CUDA graph: no host synchronisation and no allocation inside, and a replay equals
// the eager sequence bit for bit (deterministic kernels).
TEST(EarPlusGraph, CapturedSequenceMatchesEager) {
  ref::Rng rng(testing_support::case_seed());
  TestStream cs;
  const int64_t B = 1, H = 2, N = 700, D = 64, Cq = 12, Ck = 30, Ck2 = 2 * Ck;
  const float scale = 0.125f;
  Twin qc(normal(DType::F32, {B, H, Cq, D}, rng)), kc(normal(DType::F32, {B, H, Ck, D}, rng));
  Twin k(normal(DType::BF16, {B, H, N, D}, rng)), v(normal(DType::BF16, {B, H, N, D}, rng));
  Twin labels(random_labels(rng, B, H, N, Ck));
  Twin qs(i32_tensor({B, H, Cq}, random_sizes(rng, B * H * Cq, 100)));
  Twin ks(i32_tensor({B, H, Ck}, counts_of(labels.host.view, Ck)));
  const Device dev = Device::cuda(0);
  const Buffer ws = device_workspace(
      std::max(ear_plus_workspace_bytes(B * H, N, Cq, Ck2, dev), ear_workspace_bytes(B * H, N, Cq, Ck2, D, dev)));
  const auto tensor = [&](DType dtype, std::vector<int64_t> shape) { return Tensor(dtype, std::move(shape), dev); };
  Tensor vc = tensor(DType::F32, {B, H, Ck, D}), probs = tensor(DType::F32, {B, H, Cq, Ck});
  Tensor budget = tensor(DType::U8, {B, H, Cq, Ck}), scores = tensor(DType::F32, {B, H, Cq, Ck});
  Tensor sub_labels = tensor(DType::I32, {B, H, N}), sub_sizes = tensor(DType::I32, {B, H, Ck2});
  Tensor sub_kc = tensor(DType::F32, {B, H, Ck2, D}), sub_vc = tensor(DType::F32, {B, H, Ck2, D});
  Tensor sub_scores = tensor(DType::F32, {B, H, Cq, Ck2}), spread = tensor(DType::F32, {B, H, Cq, Ck2});
  Tensor values = tensor(DType::F32, {B, H, Cq * Ck2, D}), mask = tensor(DType::U8, {B, H, Cq, Ck});
  const Workspace w = as_workspace(ws);
  const Stream s = cs.stream();
  auto sequence = [&] {
    cluster_means(v.dev, labels.dev, vc.view(), s, w);
    centroid_probs(qc.dev, kc.dev, ks.dev, scale, probs.view(), s);
    select_top_p(probs.view(), 0.7f, 3, budget.view(), s);
    ear_plus_probe(qc.dev, kc.dev, vc.view(), k.dev, v.dev, labels.dev, qs.dev, ks.dev, scale, 1.0f, scores.view(), {},
                   {}, s, w);
    split_clusters(k.dev, labels.dev, kc.dev, sub_labels.view(), sub_sizes.view(), s, w);
    cluster_means(k.dev, sub_labels.view(), sub_kc.view(), s, w);
    cluster_means(v.dev, sub_labels.view(), sub_vc.view(), s, w);
    ear_plus_probe(qc.dev, sub_kc.view(), sub_vc.view(), k.dev, v.dev, sub_labels.view(), qs.dev, sub_sizes.view(),
                   scale, 1.0f, sub_scores.view(), spread.view(), values.view(), s, w);
    select_error_aware_per_head(probs.view(), budget.view(), scores.view(), qs.dev, ks.dev, 1, mask.view(), s, w);
  };
  const std::vector<const Tensor*> outputs{&scores, &sub_labels, &sub_sizes, &sub_scores, &spread, &values, &mask};
  sequence();  // eager once: kernel attributes are set outside the capture
  cs.sync();
  std::vector<std::vector<double>> eager;
  for (const Tensor* t : outputs) eager.push_back(cuda_test::host_values(*t));
  const cuda_test::CapturedGraph graph(cs.handle(), sequence);
  for (const Tensor* t : outputs) SAPATTN_CUDA_CHECK(cudaMemset(t->data(), 0xff, t->bytes()));
  graph.launch(cs.handle());
  cs.sync();
  for (size_t i = 0; i < outputs.size(); ++i) {
    const std::vector<double> replay = cuda_test::host_values(*outputs[i]);
    ASSERT_EQ(replay.size(), eager[i].size());
    EXPECT_EQ(std::memcmp(replay.data(), eager[i].data(), replay.size() * sizeof(double)), 0)
        << "output " << i << ": the graph replay differs from the eager sequence";
  }
}

// svg2_attention's workspace for an ear-plus config covers the ear-plus ops' scratch (the layer
// itself against the CPU layer: test_cuda_ear_layer.cpp).
TEST(EarPlusLayer, WorkspaceCoversTheEarPlusOps) {
  const int64_t B = 1, H = 2, S = 512, D = 64;
  Config config;
  config.q_clusters = 8;
  config.k_clusters = 24;
  config.routing = Routing::ErrorAware;
  config.compensate = true;
  config.ear_spread = config.ear_head_budget = config.ear_split = true;
  const Device dev = Device::cuda(0);
  EXPECT_GE(svg2_workspace_bytes(AttentionShape{B, H, S, D}, config, DType::BF16, dev),
            ear_plus_workspace_bytes(B * H, S, config.q_clusters, 2 * config.k_clusters, dev));
}

}  // namespace
}  // namespace sapattn
