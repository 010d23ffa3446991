// round_query_clusters on the GPU against the CPU reference on the same inputs.
// The exact path (set_round_kernel_override("exact"); the default for f32 points): labels and sizes
// compared byte for byte (the whole storage: labels are a strided slice of a longer tensor, whose
// other bytes must stay). It reproduces every arithmetic step (core/round_arithmetic.hpp's dot
// products and exp, sums in the reference's order), so no tolerance applies: one label different is
// a failure.
//   - random heads: B*H > 1, empty query clusters (far centroids), empty key clusters and a head with
//     none, Cq not a multiple of anything, f32/f16/bf16 points in several layouts, odd head dims (the
//     scalar path), with and without the prefilter, several slacks, caps, rounds and candidate
//     counts, many heads sharing the cost kernels' blocks, one head with more than 128 targets and
//     several chunks of key clusters, and the Wan 14B head shape (N 75,600, Cq 300, Ck 1,000, D 128);
//   - invariants on the GPU's result (sizes count the labels, no cluster gains padding);
//   - typed errors: argument errors and a short workspace leave the outputs untouched, and so does a
//     bad label or a negative key-cluster size under the device value checks (anywhere in the call);
//   - the op captured in a CUDA graph and replayed on fresh labels;
//   - the SVG2 layer call with round_q_clusters on CUDA: its sizes and density are the CPU op's on the
//     GPU clustering and selection, with less padding than without.
// The tensor-core path ("tc"; the default for f16/bf16 points on sm_80+) on the same heads and a
// Wan-like one, held to the outcome: the padding left and the points moved within a stated margin of
// the CPU op's, every size rule of the contract exactly, labels valid, sizes counting them, the same
// labels run to run; and its ranked costs against fp64 ones within the bf16 error model.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "cuda/backend.hpp"
#include "cuda/round/round_internal.hpp"
#include "cuda_support.hpp"
#include "sapattn/ops.hpp"
#include "sapattn/svg2.hpp"
#include "svg2/pipeline.hpp"
#include "test_support.hpp"

namespace sapattn::cuda_test {
namespace {

using ref::Layout;

constexpr float kUncapped = std::numeric_limits<float>::infinity();

// The cost path for a scope.
using RoundKernel = KernelOverrideScope<cuda::set_round_kernel_override>;

struct RoundCase {
  const char* name;
  int64_t B, H, N, D, Cq, Ck;
  DType dtype = DType::F32;
  Layout layout = Layout::Contiguous;
  RoundQueryOptions options = {};
  double keep = 0.6;  // share of mask entries kept
};

RoundQueryOptions opts(int slack, float max_cost, int prefilter, int rounds, int candidates) {
  return {slack, max_cost, prefilter, rounds, candidates};
}

// One call's inputs on the host: points, sampled query centroids (10% of them moved far away, so
// their clusters are empty) with every point labelled by its nearest one, random key centroids and
// sizes (20% empty; with several heads the last has none), a random strided mask.
struct Problem {
  HostTensor q, qc, kc, ks, mask, labels, sizes;
  float scale;
};

Problem make_problem(const RoundCase& c, uint64_t seed) {
  ref::Rng rng(seed);
  Problem p;
  p.q = mixture_points(c.dtype, c.B, c.H, c.N, c.D, c.layout, std::max<int64_t>(c.Cq / 2, 1), rng);
  p.qc = poisoned(DType::F32, {c.B, c.H, c.Cq, c.D});
  kmeans_init(p.q.view, p.qc.view, seed, kCpu);
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h)
      for (int64_t a = 0; a < c.Cq; ++a)
        if (rng.uniform() < 0.1) ref::set(p.qc.view, {b, h, a, 0}, 1000.0);
  // Labels: a strided slice of a longer tensor, as svg2's video labels are.
  const HostTensor whole = poisoned(DType::I32, {c.B, c.H, c.N + 7});
  p.labels = HostTensor{whole.storage, whole.view.slice(2, 0, c.N)};
  kmeans_assign(p.q.view, p.qc.view, p.labels.view, kCpu);
  p.kc = poisoned(DType::F32, {c.B, c.H, c.Ck, c.D});
  ref::for_each_index(p.kc.view, [&](const auto& idx) { ref::set(p.kc.view, idx, 2.0 * rng.normal()); });
  p.ks = poisoned(DType::I32, {c.B, c.H, c.Ck});
  ref::for_each_index(p.ks.view, [&](const auto& idx) {
    const bool last_head = c.B * c.H > 1 && idx[0] == c.B - 1 && idx[1] == c.H - 1;
    ref::set(p.ks.view, idx, last_head || rng.uniform() < 0.2 ? 0.0 : static_cast<double>(rng.integer(1, 300)));
  });
  p.mask = poisoned(DType::U8, {c.B, c.H, c.Cq, c.Ck}, Layout::Padded);
  ref::for_each_index(p.mask.view, [&](const auto& idx) { ref::set(p.mask.view, idx, rng.uniform() < c.keep); });
  p.sizes = poisoned(DType::I32, {c.B, c.H, c.Cq});
  p.scale = 1.0f / std::sqrt(static_cast<float>(c.D));
  return p;
}

// The device copies of a problem and the call on them.
struct DeviceProblem {
  DeviceTensor q, qc, kc, ks, mask, labels, sizes;
  Buffer workspace;
  explicit DeviceProblem(const Problem& p, const RoundQueryOptions& o)
      : q(to_device(p.q)), qc(to_device(p.qc)), kc(to_device(p.kc)), ks(to_device(p.ks)), mask(to_device(p.mask)),
        labels(to_device(p.labels)), sizes(to_device(p.sizes)),
        workspace(device_workspace(round_query_clusters_workspace_bytes(
            p.q.view.shape[0] * p.q.view.shape[1], p.q.view.shape[2], p.qc.view.shape[2], p.kc.view.shape[2], o,
            Device::cuda(0)))) {}
  void run(const Problem& p, const RoundQueryOptions& o, const Stream& s, Workspace ws) const {
    round_query_clusters(q.view, qc.view, kc.view, ks.view, mask.view, p.scale, o, labels.view, sizes.view, s, ws);
  }
  void run(const Problem& p, const RoundQueryOptions& o, const Stream& s) const {
    run(p, o, s, as_workspace(workspace));
  }
};

// The CPU reference's labels and sizes (on copies).
std::pair<HostTensor, HostTensor> cpu_result(const Problem& p, const RoundQueryOptions& o) {
  HostTensor labels = deep_copy(p.labels), sizes = deep_copy(p.sizes);
  round_query_clusters(p.q.view, p.qc.view, p.kc.view, p.ks.view, p.mask.view, p.scale, o, labels.view, sizes.view,
                       kCpu);
  return {std::move(labels), std::move(sizes)};
}

int64_t padding(const std::vector<double>& sizes) {
  int64_t pad = 0;
  for (double n : sizes) pad += (static_cast<int64_t>(n) + 63) / 64 * 64 - static_cast<int64_t>(n);
  return pad;
}

class RoundOnGpu : public ::testing::TestWithParam<RoundCase> {};

TEST_P(RoundOnGpu, IsIdenticalToCpu) {
  const RoundCase& c = GetParam();
  const ValueChecksOn checks;
  const RoundKernel exact("exact");
  int64_t moved_total = 0;
  for (uint64_t s = 0; s < 2; ++s) {
    const Problem p = make_problem(c, testing_support::case_seed(s));
    const auto [cpu_labels, cpu_sizes] = cpu_result(p, c.options);
    NonBlockingStream cs;
    const DeviceProblem d(p, c.options);
    d.run(p, c.options, cs.stream());
    cs.sync();
    const HostTensor gpu_labels = to_host(d.labels, p.labels), gpu_sizes = to_host(d.sizes, p.sizes);
    EXPECT_EQ(gpu_labels.bytes(), cpu_labels.bytes()) << "seed " << s;
    EXPECT_EQ(gpu_sizes.bytes(), cpu_sizes.bytes()) << "seed " << s;
    // Invariants of the GPU's own result: sizes count its labels; no head gains padding rows.
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t h = 0; h < c.H; ++h) {
        std::vector<double> before(c.Cq, 0.0), count(c.Cq, 0.0), got(c.Cq);
        for (int64_t i = 0; i < c.N; ++i) {
          const auto old = static_cast<int64_t>(ref::get(p.labels.view, {b, h, i}));
          const auto now = static_cast<int64_t>(ref::get(gpu_labels.view, {b, h, i}));
          before[old] += 1, count[now] += 1, moved_total += old != now;
        }
        for (int64_t a = 0; a < c.Cq; ++a) got[a] = ref::get(gpu_sizes.view, {b, h, a});
        EXPECT_EQ(got, count) << "b " << b << " h " << h;
        EXPECT_LE(padding(got), padding(before)) << "b " << b << " h " << h;
      }
  }
  EXPECT_GT(moved_total, 0) << "the random heads should move something";
  std::printf("[round %s] %lld points moved over 2 seeds, labels identical\n", c.name,
              static_cast<long long>(moved_total));
}

const auto kRoundCases = ::testing::Values(
    RoundCase{"f32_defaults", 2, 3, 1500, 16, 20, 12},
    RoundCase{"f16_no_prefilter_slack0_uncapped", 1, 2, 2000, 32, 24, 40, DType::F16, Layout::Transposed,
              opts(0, kUncapped, 0, 8, 16)},
    RoundCase{"bf16_slack8_cap03_F2_3rounds_3cands", 2, 2, 3000, 64, 37, 100, DType::BF16, Layout::Transposed,
              opts(8, 0.3f, 2, 3, 3)},
    RoundCase{"f32_D13_padded_uncapped", 1, 3, 1000, 13, 11, 7, DType::F32, Layout::Padded,
              opts(16, kUncapped, 4, 8, 16)},
    RoundCase{"bf16_D128_Ck1000", 1, 2, 4000, 128, 50, 1000, DType::BF16, Layout::Transposed},
    // 21 heads share the cost kernels' 264 blocks through the flat tile list.
    RoundCase{"f32_21_heads_flat_tiles", 3, 7, 900, 16, 14, 30},
    // One head: 16 cost blocks walk many tiles each; about 160 targets of 300
    // clusters (two blocks of masked sums) and 300 key clusters (three chunks, the
    // last partial).
    RoundCase{"bf16_one_head_many_targets", 1, 1, 30000, 64, 300, 300, DType::BF16},
    RoundCase{"Large_wan14b_head", 1, 1, 75600, 128, 300, 1000, DType::BF16, Layout::Transposed, {}, 0.3},
    // Wan-like: a few thousand points, Cq ~ 120, Ck 500, head dim 128, 30% kept.
    RoundCase{"bf16_wanlike_head", 1, 2, 6000, 128, 120, 500, DType::BF16, Layout::Transposed, {}, 0.3});
const auto kRoundCaseName = [](const ::testing::TestParamInfo<RoundCase>& param) {
  return std::string(param.param.name);
};
INSTANTIATE_TEST_SUITE_P(Cases, RoundOnGpu, kRoundCases, kRoundCaseName);

// ---------------------------------------------------------------------------------------------
// The tensor-core path
// ---------------------------------------------------------------------------------------------

// One head's sizes before and after, and what the contract promises of them exactly: a cluster that
// shrinks gave its whole tail t = n mod 64 away and was open (0 < t < 64 - slack); one that grows had
// a tail and stays within its 64-row block; one without a tail is untouched; no head gains padding.
struct HeadOutcome {
  int64_t pad_before = 0, pad_after = 0, moved = 0, rounded = 0;  // rounded: tail 0 or >= 64 - slack
};

HeadOutcome check_head(const std::vector<int64_t>& before, const std::vector<int64_t>& after, int slack,
                       const std::string& where) {
  HeadOutcome o;
  int64_t total_before = 0, total_after = 0;
  for (size_t a = 0; a < before.size(); ++a) {
    const int64_t n = before[a], m = after[a], t = n % 64;
    total_before += n, total_after += m;
    o.pad_before += (n + 63) / 64 * 64 - n;
    o.pad_after += (m + 63) / 64 * 64 - m;
    o.rounded += m % 64 == 0 || m % 64 >= 64 - slack;
    if (m < n) {
      o.moved += n - m;
      EXPECT_EQ(n - m, t) << where << " cluster " << a << ": a donor gives its whole tail or nothing";
      EXPECT_TRUE(t > 0 && t < 64 - slack) << where << " cluster " << a << " gave points with tail " << t;
    } else if (m > n) {
      EXPECT_GT(t, 0) << where << " cluster " << a << " had no tail, yet received";
      EXPECT_LE(m, n - t + 64) << where << " cluster " << a << " received past its block";
    }
  }
  EXPECT_EQ(total_after, total_before) << where;
  EXPECT_LE(o.pad_after, o.pad_before) << where;
  return o;
}

// Labels [B,H,N] (host) as per-head cluster counts; every label in [0, Cq).
std::vector<std::vector<int64_t>> counts_of(const HostTensor& labels, const RoundCase& c, const char* what) {
  std::vector<std::vector<int64_t>> n(static_cast<size_t>(c.B * c.H), std::vector<int64_t>(c.Cq, 0));
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h)
      for (int64_t i = 0; i < c.N; ++i) {
        const auto a = static_cast<int64_t>(ref::get(labels.view, {b, h, i}));
        EXPECT_TRUE(a >= 0 && a < c.Cq) << what << " label " << a << " at " << b << "," << h << "," << i;
        if (a >= 0 && a < c.Cq) ++n[b * c.H + h][a];
      }
  return n;
}

// The ranked costs of the last tensor-core call against fp64 ones (the reference's formula in
// double): the error model of round_cost_tc.cu per cost, |err| <= (own + m) (exp(2E) - 1 + 2^-8) +
// 1e-6 with E = max_j scale sum_d |x_d kbar_jd| 2^-8 (bf16 rounding of kbar and x; P's rounding the
// 2^-8), and the median error relative to own + m below 1e-2. Up to 256 candidates per head.
void check_costs(const RoundCase& c, const Problem& p, const DeviceProblem& d) {
  const cuda::qround::RankedCosts rc = cuda::qround::read_ranked_costs(
      d.workspace.data(), c.B * c.H, c.N, c.Cq, c.Ck, c.options.slack, c.options.prefilter, c.options.candidates);
  std::vector<double> rel;
  int64_t checked = 0;
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.H; ++h) {
      const int64_t bh = b * c.H + h;
      const cuda::qround::HeadInfo& info = rc.info[bh];
      if (!info.active) continue;
      const int64_t stride = std::max<int64_t>(1, info.P / 256);
      for (int64_t cand = 0; cand < info.P; cand += stride) {
        const int64_t i = rc.pts[bh * rc.Pb + cand], own_c = rc.donor[bh * rc.Pb + cand];
        std::vector<double> z(c.Ck, 0.0), logit(c.Ck, 0.0);
        double top = -std::numeric_limits<double>::infinity(), err = 0.0;
        for (int64_t j = 0; j < c.Ck; ++j) {
          if (ref::get(p.ks.view, {b, h, j}) <= 0) continue;
          double dot = 0.0, mag = 0.0;
          for (int64_t e = 0; e < c.D; ++e) {
            const double x = ref::get(p.q.view, {b, h, i, e}), k = ref::get(p.kc.view, {b, h, j, e});
            dot += x * k, mag += std::fabs(x * k);
          }
          logit[j] = p.scale * dot;
          top = std::max(top, logit[j]);
          err = std::max(err, p.scale * mag * std::ldexp(1.0, -8));
        }
        double sum = 0.0;
        for (int64_t j = 0; j < c.Ck; ++j) {
          const double ks = ref::get(p.ks.view, {b, h, j});
          z[j] = ks > 0 ? ks * std::exp(logit[j] - top) : 0.0;
          sum += z[j];
        }
        auto mass = [&](int64_t a) {
          double m = 0.0;
          for (int64_t j = 0; j < c.Ck; ++j)
            if (sum > 0 && ref::get(p.mask.view, {b, h, a, j}) != 0) m += z[j] / sum;
          return m;
        };
        const double own = mass(own_c);
        for (int64_t k = 0; k < info.kk; ++k) {
          const double got = rc.ranked_cost(bh, cand, k);
          if (!std::isfinite(got)) continue;  // forbidden (above the cap): its value is not kept
          const double m = mass(rc.ranked_target(bh, cand, k)), want = own - m;
          const double bound = (own + m) * (std::expm1(2.0 * err) + std::ldexp(1.0, -8)) + 1e-6;
          EXPECT_LE(std::fabs(got - want), bound) << c.name << " bh " << bh << " candidate " << cand << " rank " << k;
          if (own + m > 0) rel.push_back(std::fabs(got - want) / (own + m));
          ++checked;
        }
      }
    }
  if (rel.empty()) return;
  std::sort(rel.begin(), rel.end());
  const double median = rel[rel.size() / 2];
  EXPECT_LE(median, 1e-2) << c.name << ": the median cost error relative to the masses";
  std::printf("[round tc %s] %lld ranked costs vs fp64: median relative error %.2e, max %.2e\n", c.name,
              static_cast<long long>(checked), median, rel.back());
}

class RoundOnTensorCores : public ::testing::TestWithParam<RoundCase> {};

// Margins, summed over the heads and 2 seeds: the padding rows left within 128 (two donors' tails
// decided the other way) or 10% of the rows the CPU op removes, whichever is larger; the points moved
// within 128 or 10% of the CPU's; the clusters meeting the tail rule within 2 or 10%.
TEST_P(RoundOnTensorCores, OutcomeWithinMarginOfCpu) {
  const RoundCase& c = GetParam();
  const ValueChecksOn checks;
  const RoundKernel tc("tc");
  HeadOutcome cpu_sum, tc_sum;
  for (uint64_t s = 0; s < 2; ++s) {
    const Problem p = make_problem(c, testing_support::case_seed(s));
    const auto [cpu_labels, cpu_sizes] = cpu_result(p, c.options);
    NonBlockingStream cs;
    const DeviceProblem d(p, c.options);
    d.run(p, c.options, cs.stream());
    cs.sync();
    const HostTensor gpu_labels = to_host(d.labels, p.labels), gpu_sizes = to_host(d.sizes, p.sizes);
    check_costs(c, p, d);
    // Run to run: the same labels and sizes from the same inputs.
    upload(p.labels, d.labels);
    upload(p.sizes, d.sizes);
    d.run(p, c.options, cs.stream());
    cs.sync();
    EXPECT_EQ(device_bytes(d.labels), gpu_labels.bytes()) << "seed " << s << ": labels run to run";
    EXPECT_EQ(device_bytes(d.sizes), gpu_sizes.bytes()) << "seed " << s << ": sizes run to run";
    const auto before = counts_of(p.labels, c, "input"), after_tc = counts_of(gpu_labels, c, "tc"),
               after_cpu = counts_of(cpu_labels, c, "cpu");
    for (int64_t bh = 0; bh < c.B * c.H; ++bh) {
      const std::string where = std::string(c.name) + " seed " + std::to_string(s) + " bh " + std::to_string(bh);
      std::vector<double> got(c.Cq), want(after_tc[bh].begin(), after_tc[bh].end());
      for (int64_t a = 0; a < c.Cq; ++a) got[a] = ref::get(gpu_sizes.view, {bh / c.H, bh % c.H, a});
      EXPECT_EQ(got, want) << where << ": sizes count the labels";
      const HeadOutcome t = check_head(before[bh], after_tc[bh], c.options.slack, where + " tc");
      const HeadOutcome u = check_head(before[bh], after_cpu[bh], c.options.slack, where + " cpu");
      tc_sum.pad_before += t.pad_before, tc_sum.pad_after += t.pad_after, tc_sum.moved += t.moved;
      tc_sum.rounded += t.rounded;
      cpu_sum.pad_before += u.pad_before, cpu_sum.pad_after += u.pad_after, cpu_sum.moved += u.moved;
      cpu_sum.rounded += u.rounded;
    }
  }
  const int64_t removed = cpu_sum.pad_before - cpu_sum.pad_after;
  EXPECT_GT(removed, 0) << "the random heads should move something";
  EXPECT_LE(std::llabs(tc_sum.pad_after - cpu_sum.pad_after), std::max<int64_t>(128, removed / 10))
      << "padding rows left: tc " << tc_sum.pad_after << ", cpu " << cpu_sum.pad_after << " (of " << cpu_sum.pad_before
      << ")";
  EXPECT_LE(std::llabs(tc_sum.moved - cpu_sum.moved), std::max<int64_t>(128, cpu_sum.moved / 10))
      << "points moved: tc " << tc_sum.moved << ", cpu " << cpu_sum.moved;
  EXPECT_LE(std::llabs(tc_sum.rounded - cpu_sum.rounded), std::max<int64_t>(2, cpu_sum.rounded / 10))
      << "clusters meeting the tail rule: tc " << tc_sum.rounded << ", cpu " << cpu_sum.rounded;
  const double rows = static_cast<double>(2 * c.B * c.H * c.N);
  std::printf("[round tc %s] padding share %.4f -> cpu %.4f, tc %.4f; moved share cpu %.4f, tc %.4f\n", c.name,
              cpu_sum.pad_before / rows, cpu_sum.pad_after / rows, tc_sum.pad_after / rows, cpu_sum.moved / rows,
              tc_sum.moved / rows);
}

INSTANTIATE_TEST_SUITE_P(Cases, RoundOnTensorCores, kRoundCases, kRoundCaseName);

TEST(RoundOnTensorCoresKnob, DefaultFollowsDtypeAndUnknownNamesThrow) {
  const int dev = 0;
  EXPECT_TRUE(cuda::qround::round_on_tensor_cores(DType::BF16, 128, dev));
  EXPECT_TRUE(cuda::qround::round_on_tensor_cores(DType::F16, 64, dev));
  EXPECT_FALSE(cuda::qround::round_on_tensor_cores(DType::F32, 128, dev));
  EXPECT_FALSE(cuda::qround::round_on_tensor_cores(DType::BF16, 256, dev));
  {
    const RoundKernel exact("exact");
    EXPECT_FALSE(cuda::qround::round_on_tensor_cores(DType::BF16, 128, dev));
  }
  {
    const RoundKernel tc("tc");
    EXPECT_TRUE(cuda::qround::round_on_tensor_cores(DType::F32, 16, dev));
    EXPECT_THROW(cuda::qround::round_on_tensor_cores(DType::BF16, 256, dev), UnsupportedError);
  }
  EXPECT_THROW(cuda::set_round_kernel_override("tensor"), InvalidArgumentError);
}

TEST(RoundOnGpuErrors, TypedErrorsLeaveOutputsUntouched) {
  const RoundKernel exact("exact");
  const RoundCase c{"errors", 1, 2, 1500, 16, 20, 12};
  const Problem p = make_problem(c, testing_support::case_seed());
  const RoundQueryOptions o;
  const DeviceProblem d(p, o);
  NonBlockingStream cs;
  const ValueChecksOn checks;
  const std::vector<uint8_t> labels0 = device_bytes(d.labels), sizes0 = device_bytes(d.sizes);
  auto untouched = [&](const char* what) {
    cs.sync();
    EXPECT_EQ(device_bytes(d.labels), labels0) << what;
    EXPECT_EQ(device_bytes(d.sizes), sizes0) << what;
  };
  RoundQueryOptions bad = o;
  bad.slack = 64;
  EXPECT_THROW(d.run(p, bad, cs.stream()), InvalidArgumentError);
  untouched("slack");
  const DeviceTensor q_short = to_device(poisoned(DType::F32, {1, 2, 100, 16}));
  EXPECT_THROW(round_query_clusters(q_short.view, d.qc.view, d.kc.view, d.ks.view, d.mask.view, p.scale, o,
                                    d.labels.view, d.sizes.view, cs.stream(), as_workspace(d.workspace)),
               ShapeError);
  untouched("q extent");
  EXPECT_THROW(round_query_clusters(d.q.view, d.qc.view, d.kc.view, d.ks.view, d.mask.view, p.scale, o, d.labels.view,
                                    p.sizes.view, cs.stream(), as_workspace(d.workspace)),
               UnsupportedError);
  untouched("sizes on the host");
  EXPECT_THROW(d.run(p, o, cs.stream(), Workspace{d.workspace.data(), d.workspace.bytes() - 1}), WorkspaceError);
  untouched("short workspace");
  // Values only the device reads: a label outside [0, Cq) in the second head, a negative key size.
  HostTensor bad_labels = deep_copy(p.labels);
  ref::set(bad_labels.view, {0, 1, 17}, static_cast<double>(c.Cq));
  upload(bad_labels, d.labels);
  const std::vector<uint8_t> labels1 = device_bytes(d.labels);
  EXPECT_THROW(d.run(p, o, cs.stream()), InvalidArgumentError);
  cs.sync();
  EXPECT_EQ(device_bytes(d.labels), labels1) << "bad label: no head touched";
  EXPECT_EQ(device_bytes(d.sizes), sizes0) << "bad label: no head touched";
  upload(p.labels, d.labels);
  HostTensor bad_ks = deep_copy(p.ks);
  ref::set(bad_ks.view, {0, 0, 3}, -1.0);
  upload(bad_ks, d.ks);
  EXPECT_THROW(d.run(p, o, cs.stream()), InvalidArgumentError);
  untouched("negative key size");
  upload(p.ks, d.ks);
  // The same call then runs.
  d.run(p, o, cs.stream());
  cs.sync();
  EXPECT_EQ(to_host(d.labels, p.labels).bytes(), cpu_result(p, o).first.bytes());
}

TEST(RoundOnGpuGraph, CapturedCallMatchesCpu) {
  const RoundKernel exact("exact");
  const RoundCase c{"graph", 2, 2, 3000, 64, 37, 100, DType::BF16, Layout::Transposed};
  const Problem p = make_problem(c, testing_support::case_seed());
  const RoundQueryOptions o;
  const DeviceProblem d(p, o);
  const std::vector<uint8_t> want = cpu_result(p, o).first.bytes();
  NonBlockingStream cs;
  const CapturedGraph graph(cs.handle(), [&] { d.run(p, o, cs.stream()); });
  for (int replay = 0; replay < 2; ++replay) {
    upload(p.labels, d.labels);
    upload(p.sizes, d.sizes);
    graph.launch(cs.handle());
    cs.sync();
    EXPECT_EQ(device_bytes(d.labels), want) << "replay " << replay;
  }
  std::printf("[round graph] %zu nodes captured, replays identical to the CPU\n", graph.nodes());
}

// A contiguous device view copied into a host tensor.
Tensor host_copy(const TensorView& v) {
  Tensor t(v.dtype, shape_of(v));
  SAPATTN_CUDA_CHECK(cudaMemcpy(t.data(), v.data, t.bytes(), cudaMemcpyDeviceToHost));
  return t;
}

// Cluster offsets [B,H,C+1] from sizes [B,H,C] (host).
Tensor offsets_of(const Tensor& sizes) {
  const int64_t BH = sizes.shape()[0] * sizes.shape()[1], C = sizes.shape()[2];
  Tensor o(DType::I32, {sizes.shape()[0], sizes.shape()[1], C + 1});
  for (int64_t bh = 0; bh < BH; ++bh) {
    int32_t* out = o.data_as<int32_t>() + bh * (C + 1);
    out[0] = 0;
    for (int64_t c = 0; c < C; ++c) out[c + 1] = out[c] + sizes.data_as<int32_t>()[bh * C + c];
  }
  return o;
}

// The layer call: the GPU's clustering and selection (the pipeline stages svg2_attention runs, on
// fresh centroids) copied to the host and rounded by the CPU op give the sizes and the density that
// svg2_attention with round_q_clusters reports on the GPU, and less padding than without. At
// top_p = 1 every move is free, so something must move.
TEST(RoundOnGpuLayer, Svg2RoundsAsTheCpuOpOnTheGpuClusters) {
  const RoundKernel exact("exact");  // the layer call's sizes are compared with the CPU op's bit for bit
  const int64_t B = 1, H = 2, S = 4000, D = 64;
  const uint32_t seed = static_cast<uint32_t>(testing_support::case_seed());
  const Device dev = Device::cuda(0);
  const Tensor q_host = testing_support::clustered_tensor(DType::BF16, B, H, S, D, 12, seed, 1.0f, 0.4f);
  const Tensor q = copy_to(q_host, dev),
               k = copy_to(testing_support::clustered_tensor(DType::BF16, B, H, S, D, 12, seed + 1, 1.0f, 0.4f), dev),
               v = copy_to(testing_support::random_tensor(DType::BF16, {B, H, S, D}, seed + 2), dev);
  const AttentionShape shape = AttentionShape::of(q.view());
  const TestStream cs;
  const Stream st = cs.stream();
  for (float top_p : {0.9f, 1.0f}) {
    Config off;
    off.q_clusters = 23;
    off.k_clusters = 40;
    off.top_p = top_p;
    Config on = off;
    on.round_q_clusters = true;
    // The scratch covers the op's (the layer call below would throw WorkspaceError otherwise).
    const size_t with_round = svg2_workspace_bytes(shape, on, DType::BF16, dev);
    EXPECT_GE(with_round, svg2_workspace_bytes(shape, off, DType::BF16, dev));
    EXPECT_GE(with_round, round_query_clusters_workspace_bytes(B * H, S, on.q_clusters, on.k_clusters, {}, dev));
    // The stages before the rounding.
    const Buffer ws = device_workspace(pipeline::carve(shape, off, DType::BF16, dev, nullptr, nullptr));
    const Workspace workspace = as_workspace(ws);
    pipeline::Buffers buf;
    pipeline::carve(shape, off, DType::BF16, dev, &workspace, &buf);
    BranchState stages;
    stages.q_centroids = Tensor(DType::F32, {B, H, off.q_clusters, D}, dev);
    stages.k_centroids = Tensor(DType::F32, {B, H, off.k_clusters, D}, dev);
    pipeline::cluster(q.view(), k.view(), off, stages.views(), true, buf, buf.q_sizes, buf.k_sizes, st);
    pipeline::probe(k.view(), v.view(), off, stages.views(), buf.q_sizes, buf.k_sizes, buf, st);
    pipeline::select(off, stages.views(), buf.q_sizes, buf.k_sizes, buf, st);
    cs.sync();
    // The CPU op on host copies of them.
    const Tensor labels = host_copy(buf.q_labels), mask = host_copy(buf.mask), k_sizes = host_copy(buf.k_sizes),
                 q_sizes_before = host_copy(buf.q_sizes), qc = copy_to(stages.q_centroids, Device::cpu()),
                 kc = copy_to(stages.k_centroids, Device::cpu());
    Tensor q_sizes(DType::I32, {B, H, off.q_clusters});
    round_query_clusters(q_host.view(), qc.view(), kc.view(), k_sizes.view(), mask.view(), off.scale_for(D),
                         RoundQueryOptions{}, labels.view(), q_sizes.view(), kCpu);
    Tensor density(DType::F32, {B, H});
    const Tensor q_offsets = offsets_of(q_sizes), k_offsets = offsets_of(k_sizes);
    block_density(BlockLayout{q_offsets.view(), k_offsets.view(), mask.view()}, density.view(), kCpu);
    // The layer calls on the GPU, without and with the rounding.
    auto layer = [&](const Config& config, std::vector<double>& sizes, std::vector<double>& dens) {
      Tensor out(DType::BF16, {B, H, S, D}, dev), qs(DType::I32, {B, H, config.q_clusters}, dev),
          den(DType::F32, {B, H}, dev);
      Svg2Outputs o;
      o.out = out.view();
      o.density = den.view();
      o.q_cluster_sizes = qs.view();
      BranchState state;
      svg2_attention(q.view(), k.view(), v.view(), config, state, o, st);
      cs.sync();
      sizes = host_values(qs);
      dens = host_values(den);
    };
    std::vector<double> sizes_off, sizes_on, dens_off, dens_on;
    layer(off, sizes_off, dens_off);
    layer(on, sizes_on, dens_on);
    EXPECT_EQ(sizes_off, ref::to_vector(q_sizes_before.view())) << "the stages are the layer's";
    EXPECT_EQ(sizes_on, ref::to_vector(q_sizes.view())) << "top_p " << top_p;
    EXPECT_EQ(dens_on, ref::to_vector(density.view())) << "top_p " << top_p;
    EXPECT_LE(padding(sizes_on), padding(sizes_off)) << "top_p " << top_p;
    if (top_p == 1.0f) {
      EXPECT_LT(padding(sizes_on), padding(sizes_off));
    }
    std::printf("[round layer top_p %.1f] padding rows %lld -> %lld, density %.4f -> %.4f\n", top_p,
                static_cast<long long>(padding(sizes_off)), static_cast<long long>(padding(sizes_on)), dens_off[0],
                dens_on[0]);
  }
}

}  // namespace
}  // namespace sapattn::cuda_test
