// The tensor-core compensation (src/cuda/ear/ear_compensation_tc.cu, mma.sync; ear_compensation_sm90.cu,
// wgmma): centroid_compensation and corrected_centroid_compensation on CUDA against the CPU op on the
// same inputs, against closed forms (dense attention), on bad input and under graph capture. The
// comparisons run on every tensor-core kernel the GPU has (compensation_kernels: the wgmma one, forced,
// on sm_90, and the mma.sync one); pair values take the mma.sync kernel under either.
//
// Tolerance: both kernels round q and kbar to bf16 in the logits and P and the values to bf16 in
// P V, so a row may differ from the CPU's float64 result by the bound of CompensationModel
// (cuda_ear_support.hpp, docs/ear.md), computed per row and per output dim from the stored inputs;
// rows the op must not touch (text rows, rows whose cluster skips nothing) are compared bit for
// bit, and so are the bytes outside the output views. Every case runs twice: on normal values, where
// the bound is dominated by the bf16 rounding of q and kbar (a few percent of the logit spread), and
// on values that bf16 holds exactly, where the logits carry only fp32 accumulation error and the
// bound comes down to the rounding of P (2^-8 of the compensated share): a kernel that drops,
// repeats or mixes up a pseudo-key, a row or a dim fails there by orders of magnitude.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "core/cuda_check.hpp"
#include "cuda/backend.hpp"
#include "cuda_attention_support.hpp"
#include "cuda_ear_support.hpp"
#include "cuda_support.hpp"
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
using cuda_test::ValueChecksOn;
using ear_cuda_test::CompensationInputs;
using ear_cuda_test::CompensationKernelScope;
using ear_cuda_test::CompensationModel;
using ear_cuda_test::fill_bf16_values;
using ear_cuda_test::i32_tensor;
using ear_cuda_test::normal;
using ear_cuda_test::random_labels;
using ear_cuda_test::random_sizes;
using ear_cuda_test::RowModel;
using ear_cuda_test::unit_roundoff;
using ref::HostTensor;
using ref::Layout;

constexpr double kInf = std::numeric_limits<double>::infinity();

Buffer compensation_workspace(int64_t BH, int64_t N, int64_t Cq, int64_t pseudo_keys, int64_t D) {
  return device_workspace(compensation_workspace_bytes(BH, N, Cq, pseudo_keys, D, Device::cuda(0)));
}

// The tensor-core kernels of this GPU, as set_compensation_kernel_override names them: "wgmma" (forced,
// so that a device that cannot run it fails instead of falling back) on sm_90, and "mma_sync".
std::vector<const char*> compensation_kernels() {
  if (cuda_test::is_sm90()) return {"wgmma", "mma_sync"};
  return {"mma_sync"};
}

// ---------------------------------------------------------------------------------------------
// Against the CPU op
// ---------------------------------------------------------------------------------------------

struct CompCase {
  int64_t B, H, N, text, D, Cq, Ck;  // Ck: the mask's key clusters
  int64_t per_column;                // m pseudo-keys per mask column
  DType dtype;                       // of q
  Layout layout;                     // of q, the mask and the spread
  bool spread, pair_values;          // corrected_centroid_compensation's terms (m > 1 needs it too)
  int64_t big = 0;                   // > 0: query cluster 2 of every (b,h) has this many rows
  bool corrected() const { return spread || pair_values || per_column > 1; }
};

std::string describe(const CompCase& c) {
  std::ostringstream os;
  os << (c.corrected() ? "corrected" : "ear") << "_B" << c.B << "_H" << c.H << "_N" << c.N << "_T" << c.text << "_D"
     << c.D << "_Cq" << c.Cq << "_Ck" << c.Ck << "_m" << c.per_column << "_" << dtype_name(c.dtype) << "_"
     << ref::layout_name(c.layout) << (c.spread ? "_spread" : "") << (c.pair_values ? "_pairs" : "")
     << (c.big > 0 ? "_big" + std::to_string(c.big) : "");
  return testing_support::case_name(os.str());
}

// The inputs of one case. `exact`: q, the centroids and the values are bf16 values.
struct CompInputs {
  Twin q, labels, mask, kc, vc, ks;
  Twin spread, pairs;  // empty storage when the case has none
};

HostTensor no_tensor() { return HostTensor{Tensor{}, TensorView{}}; }

// Labels [B,H,N] as random_labels draws them, with query cluster 2 of every (b,h) `big` rows large.
HostTensor labels_with_big_cluster(ref::Rng& rng, int64_t B, int64_t H, int64_t N, int64_t C, int64_t big,
                                   int64_t extra) {
  HostTensor t = poisoned(DType::I32, {B, H, N + extra});
  for (int64_t bh = 0; bh < B * H; ++bh) {
    std::vector<int64_t> sizes = ref::random_cluster_sizes(rng, N - big, C - 1);
    sizes.insert(sizes.begin() + 2, big);
    const std::vector<int32_t> l = ref::random_labels_with_sizes(rng, sizes);
    std::copy(l.begin(), l.end(), t.storage.data_as<int32_t>() + bh * (N + extra));
  }
  t.view = t.view.slice(2, 0, N);
  return t;
}

CompInputs comp_inputs(const CompCase& c, ref::Rng& rng, bool exact) {
  const int64_t S = c.N + c.text, Ckp = c.per_column * c.Ck;
  HostTensor q = normal(c.dtype, {c.B, c.H, S, c.D}, rng, c.layout);
  HostTensor kc = normal(DType::F32, {c.B, c.H, Ckp, c.D}, rng);
  HostTensor vc = normal(DType::F32, {c.B, c.H, Ckp, c.D}, rng);
  HostTensor mask = poisoned(DType::U8, {c.B, c.H, c.Cq, c.Ck}, c.layout);
  // Row 0 keeps every cluster (its rows stay as they are), row 1 skips every one, the others 80%.
  ref::for_each_index(mask.view, [&](const auto& idx) {
    ref::set(mask.view, idx, idx[2] == 0 ? 1.0 : idx[2] == 1 ? 0.0 : (rng.uniform() < 0.2 ? 1.0 : 0.0));
  });
  HostTensor spread = no_tensor(), pairs = no_tensor();
  if (c.spread) {
    spread = poisoned(DType::F32, {c.B, c.H, c.Cq, Ckp}, c.layout);
    ref::fill_uniform(spread.view, rng, 0.0, 2.0);
  }
  if (c.pair_values) pairs = normal(DType::F32, {c.B, c.H, c.Cq * Ckp, c.D}, rng);
  if (exact) {
    fill_bf16_values(q.view, rng);
    fill_bf16_values(kc.view, rng);
    fill_bf16_values(vc.view, rng);
    if (c.pair_values) fill_bf16_values(pairs.view, rng);
  }
  return {Twin(std::move(q)),
          Twin(c.big > 0 ? labels_with_big_cluster(rng, c.B, c.H, c.N, c.Cq, c.big, c.text)
                         : random_labels(rng, c.B, c.H, c.N, c.Cq, c.text)),
          Twin(std::move(mask)),
          Twin(std::move(kc)),
          Twin(std::move(vc)),
          Twin(i32_tensor({c.B, c.H, Ckp}, random_sizes(rng, c.B * c.H * Ckp, 90))),
          Twin(std::move(spread)),
          Twin(std::move(pairs))};
}

class EarComp : public ::testing::TestWithParam<CompCase> {
 protected:
  ref::Rng rng{testing_support::case_seed()};
  TestStream cs;
  float scale() const { return 1.0f / std::sqrt(static_cast<float>(GetParam().D)); }

  // The op of the case on `stream` (the CPU's, or the GPU's with `ws`).
  void run(const CompInputs& in, bool gpu, const TensorView& out, const TensorView& lse, const Workspace& ws) {
    const CompCase c = GetParam();
    auto pick = [&](const Twin& t) { return gpu ? t.dev : t.host.view; };
    const Stream stream = gpu ? cs.stream() : kCpu;
    if (c.corrected()) {
      corrected_centroid_compensation(pick(in.q), pick(in.labels), pick(in.mask), pick(in.kc), pick(in.vc), pick(in.ks),
                                      c.spread ? pick(in.spread) : TensorView{},
                                      c.pair_values ? pick(in.pairs) : TensorView{}, scale(), out, lse, stream, ws);
    } else {
      centroid_compensation(pick(in.q), pick(in.labels), pick(in.mask), pick(in.kc), pick(in.vc), pick(in.ks), scale(),
                            out, lse, stream, ws);
    }
  }
};

TEST_P(EarComp, MatchesCpuWithinBf16Bound) {
  const CompCase c = GetParam();
  const int64_t S = c.N + c.text, Ckp = c.per_column * c.Ck;
  const Buffer ws = compensation_workspace(c.B * c.H, c.N, c.Cq, Ckp, c.D);
  for (const bool exact : {false, true})
    for (const DType out_dtype : {DType::F32, DType::BF16}) {
      SCOPED_TRACE(std::string(exact ? "bf16-exact inputs" : "normal inputs") + ", out " +
                   std::string(dtype_name(out_dtype)));
      const CompInputs in = comp_inputs(c, rng, exact);
      HostTensor out0 = normal(out_dtype, {c.B, c.H, S, c.D}, rng, Layout::Transposed);
      HostTensor lse0 = poisoned(DType::F32, {c.B, c.H, S}, Layout::Padded);
      ref::for_each_index(lse0.view, [&](const auto& idx) {
        const bool nothing = rng.uniform() < 0.1;  // a row that attended to no key: out 0, lse -inf
        ref::set(lse0.view, idx, nothing ? -kInf : rng.uniform(-2, 6));
        if (nothing)
          for (int64_t d = 0; d < c.D; ++d) ref::set(out0.view, {idx[0], idx[1], idx[2], d}, 0.0);
      });
      const HostTensor out_cpu = deep_copy(out0), lse_cpu = deep_copy(lse0);
      run(in, false, out_cpu.view, lse_cpu.view, {});
      const CompensationModel model(CompensationInputs{
          in.q.host.view, in.labels.host.view, in.mask.host.view, in.kc.host.view, in.vc.host.view, in.ks.host.view,
          c.spread ? in.spread.host.view : TensorView{}, c.pair_values ? in.pairs.host.view : TensorView{}, scale()});
      const double out_u = unit_roundoff(out_dtype);
      for (const char* kernel : compensation_kernels()) {
        SCOPED_TRACE(std::string("kernel ") + kernel);
        const CompensationKernelScope scope(kernel);
        Twin out_gpu(out0), lse_gpu(lse0);
        run(in, true, out_gpu.dev, lse_gpu.dev, as_workspace(ws));
        cs.sync();
        const HostTensor out_g = out_gpu.download(), lse_g = lse_gpu.download();
        ASSERT_TRUE(out_g.outside_view_unchanged(out0.bytes())) << "out written outside its view";
        ASSERT_TRUE(lse_g.outside_view_unchanged(lse0.bytes())) << "lse written outside its view";
        // Deterministic: a second run from the same start gives the same bytes.
        Twin out_again(out0), lse_again(lse0);
        run(in, true, out_again.dev, lse_again.dev, as_workspace(ws));
        cs.sync();
        ASSERT_EQ(out_again.download().bytes(), out_g.bytes()) << "two GPU runs differ";
        ASSERT_EQ(lse_again.download().bytes(), lse_g.bytes()) << "two GPU runs differ";

        int64_t compensated = 0;
        for (int64_t b = 0; b < c.B; ++b)
          for (int64_t h = 0; h < c.H; ++h)
            for (int64_t i = 0; i < S; ++i) {
              const std::string row =
                  "row [" + std::to_string(b) + "," + std::to_string(h) + "," + std::to_string(i) + "]";
              std::vector<double> o0(static_cast<size_t>(c.D));
              for (int64_t d = 0; d < c.D; ++d) o0[static_cast<size_t>(d)] = ref::get(out0.view, {b, h, i, d});
              const RowModel m = model.row(b, h, i, ref::get(lse0.view, {b, h, i}), o0);
              const double lg = ref::get(lse_g.view, {b, h, i}), lc = ref::get(lse_cpu.view, {b, h, i});
              if (!m.skips) {  // text rows and rows whose cluster skips nothing: untouched, bit for bit
                ASSERT_EQ(std::memcmp(&lg, &lc, sizeof lg), 0) << row << " lse changed: " << lg << " vs " << lc;
                for (int64_t d = 0; d < c.D; ++d)
                  ASSERT_EQ(ref::get(out_g.view, {b, h, i, d}), ref::get(out_cpu.view, {b, h, i, d})) << row;
                continue;
              }
              ++compensated;
              ASSERT_LE(std::abs(lg - lc), m.lse_bound + 2 * ref::kF32Eps * std::abs(lc))
                  << row << " lse: GPU " << lg << ", CPU " << lc << " (float64 " << m.lse << ")";
              for (int64_t d = 0; d < c.D; ++d) {
                const double og = ref::get(out_g.view, {b, h, i, d}), oc = ref::get(out_cpu.view, {b, h, i, d});
                const double bound = m.out_bound[static_cast<size_t>(d)];
                ASSERT_LE(std::abs(og - oc), bound + out_u * (std::abs(og) + std::abs(oc)) + 1e-30)
                    << row << " out d=" << d << ": GPU " << og << ", CPU " << oc << " (float64 "
                    << m.out[static_cast<size_t>(d)] << ", bound " << bound << ")";
              }
            }
        EXPECT_GT(compensated, 0) << "no compensated row to test";
      }
    }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, EarComp,
    ::testing::Values(
        CompCase{1, 2, 300, 5, 64, 7, 24, 1, DType::BF16, Layout::Contiguous, false, false},
        CompCase{2, 1, 517, 3, 128, 33, 70, 1, DType::F32, Layout::Transposed, false, false},
        CompCase{1, 3, 200, 4, 40, 5, 13, 1, DType::F16, Layout::Padded, false, false},  // D padded to 64
        // Two list windows (1100 > 1024 candidates), clusters of ~300 rows (three blocks each).
        CompCase{1, 1, 900, 0, 128, 3, 1100, 1, DType::BF16, Layout::TransposedPadded, false, false},
        CompCase{1, 1, 64, 2, 8, 4, 5, 1, DType::F32, Layout::Contiguous, false, false},
        CompCase{1, 2, 400, 6, 128, 9, 40, 2, DType::BF16, Layout::Transposed, true, true},
        CompCase{2, 1, 333, 0, 64, 6, 30, 1, DType::F32, Layout::Contiguous, true, false},
        CompCase{1, 2, 250, 3, 96, 5, 21, 3, DType::F16, Layout::Padded, false, true},         // D padded to 128
        CompCase{1, 1, 700, 1, 128, 4, 600, 2, DType::BF16, Layout::Contiguous, true, false},  // 1200 pseudo-keys
        // bf16 rows cp.async copies with D < Dp; two pseudo-key tiles of the wgmma kernel, the last partial.
        CompCase{1, 2, 260, 0, 40, 6, 150, 1, DType::BF16, Layout::Contiguous, false, false},
        // A query cluster of 1873 rows (Wan 14B's largest) in each of 8 heads: 152 wgmma work items,
        // more than an H100 has SMs, so that the persistent CTAs take several each.
        CompCase{1, 8, 2300, 2, 128, 5, 40, 1, DType::BF16, Layout::Contiguous, false, false, 1873}),
    [](const ::testing::TestParamInfo<CompCase>& p) { return describe(p.param); });

// ---------------------------------------------------------------------------------------------
// Closed forms: the compensated result is dense attention
// ---------------------------------------------------------------------------------------------

// Keys [B,H,N,D] and values in token order with their key-cluster labels; the exact part of every
// query row (attention over the keys of the clusters the row's query cluster keeps, float64, stored
// as f32 out and lse) and dense attention over all keys.
struct DenseCase {
  int64_t B, H, N, D, Cq, Ck, m;  // Ck mask columns, m pseudo-keys (sub-clusters) each
  std::vector<double> k, v;       // [B,H,N,D]
  std::vector<int32_t> sub;       // [B,H,N]: pseudo-key of each key token (key cluster sub / m)
  std::vector<double> lse_dense, out_dense;
};

// Exact part and dense attention for queries `q` ([B,H,N,D] host view) and the mask.
void attend(const DenseCase& c, const TensorView& q, const TensorView& labels, const TensorView& mask, float scale,
            HostTensor& out0, HostTensor& lse0, std::vector<double>& lse_dense, std::vector<double>& out_dense) {
  const int64_t B = c.B, H = c.H, N = c.N, D = c.D;
  lse_dense.assign(static_cast<size_t>(B * H * N), 0.0);
  out_dense.assign(static_cast<size_t>(B * H * N * D), 0.0);
  std::vector<double> s(static_cast<size_t>(N));
  const std::vector<double> qv = ref::to_vector(q);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < N; ++i) {
        const int64_t bh = b * H + h, a = static_cast<int64_t>(ref::get(labels, {b, h, i}));
        double mx = -kInf, mx_kept = -kInf;
        for (int64_t t = 0; t < N; ++t) {
          double dot = 0;
          for (int64_t d = 0; d < D; ++d)
            dot += qv[static_cast<size_t>((bh * N + i) * D + d)] * c.k[static_cast<size_t>((bh * N + t) * D + d)];
          s[static_cast<size_t>(t)] = scale * dot;
          mx = std::max(mx, s[static_cast<size_t>(t)]);
          const int64_t cluster = c.sub[static_cast<size_t>(bh * N + t)] / c.m;
          if (ref::get(mask, {b, h, a, cluster}) != 0) mx_kept = std::max(mx_kept, s[static_cast<size_t>(t)]);
        }
        double z = 0, z_kept = 0;
        std::vector<double> o(static_cast<size_t>(D), 0.0), o_kept(static_cast<size_t>(D), 0.0);
        for (int64_t t = 0; t < N; ++t) {
          const double e = std::exp(s[static_cast<size_t>(t)] - mx);
          const int64_t cluster = c.sub[static_cast<size_t>(bh * N + t)] / c.m;
          const bool kept = ref::get(mask, {b, h, a, cluster}) != 0;
          const double ek = kept ? std::exp(s[static_cast<size_t>(t)] - mx_kept) : 0.0;
          z += e;
          z_kept += ek;
          for (int64_t d = 0; d < D; ++d) {
            o[static_cast<size_t>(d)] += e * c.v[static_cast<size_t>((bh * N + t) * D + d)];
            o_kept[static_cast<size_t>(d)] += ek * c.v[static_cast<size_t>((bh * N + t) * D + d)];
          }
        }
        lse_dense[static_cast<size_t>(bh * N + i)] = mx + std::log(z);
        ref::set(lse0.view, {b, h, i}, z_kept > 0 ? mx_kept + std::log(z_kept) : -kInf);
        for (int64_t d = 0; d < D; ++d) {
          out_dense[static_cast<size_t>((bh * N + i) * D + d)] = o[static_cast<size_t>(d)] / z;
          ref::set(out0.view, {b, h, i, d}, z_kept > 0 ? o_kept[static_cast<size_t>(d)] / z_kept : 0.0);
        }
      }
}

// Runs the op on the GPU from (out0, lse0) and checks every row against dense attention in two
// steps: the float64 model of the op (from the f32-stored exact part and terms) is dense attention
// up to that storage rounding (the closed form), and the GPU is within the model's bound of it.
void expect_dense(const CompensationInputs& host, const std::function<void(TensorView, TensorView)>& gpu_op,
                  const HostTensor& out0, const HostTensor& lse0, const std::vector<double>& lse_dense,
                  const std::vector<double>& out_dense, double storage_error) {
  const int64_t B = out0.view.shape[0], H = out0.view.shape[1], N = out0.view.shape[2], D = out0.view.shape[3];
  Twin out(out0), lse(lse0);
  gpu_op(out.dev, lse.dev);
  SAPATTN_CUDA_CHECK(cudaDeviceSynchronize());
  const HostTensor out_g = out.download(), lse_g = lse.download();
  const CompensationModel model(host);
  const double u = ref::kF32Eps;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < N; ++i) {
        const int64_t at = (b * H + h) * N + i;
        const std::string row = "row [" + std::to_string(b) + "," + std::to_string(h) + "," + std::to_string(i) + "]";
        std::vector<double> o0(static_cast<size_t>(D));
        for (int64_t d = 0; d < D; ++d) o0[static_cast<size_t>(d)] = ref::get(out0.view, {b, h, i, d});
        const double l0 = ref::get(lse0.view, {b, h, i});
        const RowModel m = model.row(b, h, i, l0, o0);
        const double lse_want = lse_dense[static_cast<size_t>(at)];
        if (!m.skips) {  // every cluster kept: the exact part is dense attention already
          ASSERT_NEAR(l0, lse_want, 4 * u * (std::abs(lse_want) + 1)) << row;
          continue;
        }
        // The closed form: the model reads the exact part and the terms as stored in f32, which moves
        // its weights by <= storage_error + 2 u (|lse0| + 1) in the log domain and its values by u.
        const double closed = storage_error + 2 * u * (std::abs(l0) + 1);
        ASSERT_NEAR(m.lse, lse_want, closed + 1e-12) << row << ": the float64 model is not dense attention";
        const double lg = ref::get(lse_g.view, {b, h, i});
        ASSERT_LE(std::abs(lg - lse_want), m.lse_bound + closed + 2 * u * std::abs(lse_want))
            << row << " lse: GPU " << lg << ", dense " << lse_want;
        for (int64_t d = 0; d < D; ++d) {
          const double want = out_dense[static_cast<size_t>(at * D + d)];
          const double model_gap = std::abs(m.out[static_cast<size_t>(d)] - want);
          ASSERT_LE(model_gap, (std::exp(2 * closed) - 1 + u) * m.magnitude[static_cast<size_t>(d)] + 1e-12)
              << row << " d=" << d << ": the float64 model is not dense attention";
          const double og = ref::get(out_g.view, {b, h, i, d});
          ASSERT_LE(std::abs(og - want), m.out_bound[static_cast<size_t>(d)] + model_gap + u * std::abs(og))
              << row << " out d=" << d << ": GPU " << og << ", dense " << want;
        }
      }
}

class EarCompDense : public ::testing::TestWithParam<int64_t> {};  // the head dim

// Every key cluster a set of identical keys with identical values: its centroid stands in exactly,
// so the compensated output is dense attention for any query and any mask (EAR's closed form).
TEST_P(EarCompDense, IdenticalClusterMembersGiveDenseAttention) {
  const int64_t B = 1, H = 2, N = 600, D = GetParam(), Cq = 6, Ck = 20;
  ref::Rng rng(testing_support::case_seed());
  DenseCase c{B, H, N, D, Cq, Ck, 1, {}, {}, {}, {}, {}};
  HostTensor q = poisoned(DType::BF16, {B, H, N, D}, Layout::Transposed);
  fill_bf16_values(q.view, rng);
  HostTensor kc = poisoned(DType::F32, {B, H, Ck, D}), vc = poisoned(DType::F32, {B, H, Ck, D});
  fill_bf16_values(kc.view, rng, 0.6);
  fill_bf16_values(vc.view, rng);
  const HostTensor k_labels = random_labels(rng, B, H, N, Ck);
  const std::vector<int32_t> sizes = ear_cuda_test::counts_of(k_labels.view, Ck);
  c.sub = ref::to_i32(k_labels.view);
  const std::vector<double> kcv = ref::to_vector(kc.view), vcv = ref::to_vector(vc.view);
  for (int64_t bh = 0; bh < B * H; ++bh)
    for (int64_t t = 0; t < N; ++t)
      for (int64_t d = 0; d < D; ++d) {
        const size_t j = static_cast<size_t>((bh * Ck + c.sub[static_cast<size_t>(bh * N + t)]) * D + d);
        c.k.push_back(kcv[j]);
        c.v.push_back(vcv[j]);
      }
  HostTensor mask = poisoned(DType::U8, {B, H, Cq, Ck});
  ref::for_each_index(mask.view, [&](const auto& idx) {
    ref::set(mask.view, idx, idx[2] == 0 ? 1.0 : idx[2] == 1 ? 0.0 : (rng.uniform() < 0.3 ? 1.0 : 0.0));
  });
  Twin qt(std::move(q)), labels(random_labels(rng, B, H, N, Cq, 0)), mt(std::move(mask)), kct(std::move(kc)),
      vct(std::move(vc)), ks(i32_tensor({B, H, Ck}, sizes));
  HostTensor out0 = poisoned(DType::F32, {B, H, N, D}), lse0 = poisoned(DType::F32, {B, H, N});
  std::vector<double> lse_dense, out_dense;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  attend(c, qt.host.view, labels.host.view, mt.host.view, scale, out0, lse0, lse_dense, out_dense);
  TestStream cs;
  const Buffer ws = compensation_workspace(B * H, N, Cq, Ck, D);
  for (const char* kernel : compensation_kernels()) {
    SCOPED_TRACE(std::string("kernel ") + kernel);
    const CompensationKernelScope scope(kernel);
    expect_dense(
        {qt.host.view, labels.host.view, mt.host.view, kct.host.view, vct.host.view, ks.host.view, {}, {}, scale},
        [&](TensorView out, TensorView lse) {
          centroid_compensation(qt.dev, labels.dev, mt.dev, kct.dev, vct.dev, ks.dev, scale, out, lse, cs.stream(),
                                as_workspace(ws));
        },
        out0, lse0, lse_dense, out_dense, 0.0);
  }
}

// ear-plus's closed form: for a query at its cluster's centroid, the pseudo-key of (a, j) with the
// spread log(M_aj / (|K_j| exp(c_aj))) and the pair value U_aj / M_aj is j's exact contribution, so
// the compensated output is dense attention for any mask; with m = 2 random halves per key cluster
// too. The centroids kbar need not be the keys' means for this: any kbar with its own spread works.
TEST_P(EarCompDense, QueriesAtTheirCentroidGetDenseAttention) {
  for (const int64_t m : {int64_t{1}, int64_t{2}}) {
    SCOPED_TRACE("pseudo-keys per cluster " + std::to_string(m));
    const int64_t B = 2, H = 1, N = 500, D = GetParam(), Cq = 5, Ck = 16, Ckp = m * Ck;
    ref::Rng rng(testing_support::case_seed(static_cast<uint64_t>(m)));
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    DenseCase c{B, H, N, D, Cq, Ck, m, {}, {}, {}, {}, {}};
    HostTensor keys = poisoned(DType::F32, {B, H, N, D}), values = poisoned(DType::F32, {B, H, N, D});
    fill_bf16_values(keys.view, rng, 0.7);
    fill_bf16_values(values.view, rng);
    c.k = ref::to_vector(keys.view);
    c.v = ref::to_vector(values.view);
    const HostTensor k_labels = random_labels(rng, B, H, N, Ck);
    for (int32_t l : ref::to_i32(k_labels.view))
      c.sub.push_back(static_cast<int32_t>(l * m + (m > 1 ? rng.integer(0, m - 1) : 0)));
    // Query clusters: every row of cluster a is its centroid (bf16 values).
    const HostTensor labels_host = random_labels(rng, B, H, N, Cq, 0);
    HostTensor centroids = poisoned(DType::F32, {B, H, Cq, D});
    fill_bf16_values(centroids.view, rng);
    HostTensor q = poisoned(DType::BF16, {B, H, N, D});
    ref::for_each_index(q.view, [&](const auto& idx) {
      const auto a = static_cast<int64_t>(ref::get(labels_host.view, {idx[0], idx[1], idx[2]}));
      ref::set(q.view, idx, ref::get(centroids.view, {idx[0], idx[1], a, idx[3]}));
    });
    // Pseudo-keys: sizes, any bf16 centroid, and the probe's terms from the keys in float64.
    HostTensor kc = poisoned(DType::F32, {B, H, Ckp, D}), vc = poisoned(DType::F32, {B, H, Ckp, D});
    fill_bf16_values(kc.view, rng, 0.3);
    fill_bf16_values(vc.view, rng);  // not used with pair values
    HostTensor spread = poisoned(DType::F32, {B, H, Cq, Ckp}), pairs = poisoned(DType::F32, {B, H, Cq * Ckp, D});
    std::vector<int32_t> sizes(static_cast<size_t>(B * H * Ckp), 0);
    for (int64_t bh = 0; bh < B * H; ++bh)
      for (int64_t t = 0; t < N; ++t) ++sizes[static_cast<size_t>(bh * Ckp + c.sub[static_cast<size_t>(bh * N + t)])];
    double max_spread = 0;
    const std::vector<double> qbar = ref::to_vector(centroids.view), kbar = ref::to_vector(kc.view);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t a = 0; a < Cq; ++a)
          for (int64_t j = 0; j < Ckp; ++j) {
            const int64_t bh = b * H + h;
            const double* qa = &qbar[static_cast<size_t>((bh * Cq + a) * D)];
            double cj = 0;
            for (int64_t d = 0; d < D; ++d) cj += qa[d] * kbar[static_cast<size_t>((bh * Ckp + j) * D + d)];
            cj *= scale;
            double mass = 0;
            std::vector<double> weighted(static_cast<size_t>(D), 0.0);
            for (int64_t t = 0; t < N; ++t) {
              if (c.sub[static_cast<size_t>(bh * N + t)] != j) continue;
              double st = 0;
              for (int64_t d = 0; d < D; ++d) st += qa[d] * c.k[static_cast<size_t>((bh * N + t) * D + d)];
              const double e = std::exp(scale * st - cj);  // relative to the centroid's logit: no overflow
              mass += e;
              for (int64_t d = 0; d < D; ++d)
                weighted[static_cast<size_t>(d)] += e * c.v[static_cast<size_t>((bh * N + t) * D + d)];
            }
            const double n = sizes[static_cast<size_t>(bh * Ckp + j)];
            const double sp = n > 0 ? std::log(mass / n) : 0.0;
            max_spread = std::max(max_spread, std::abs(sp));
            ref::set(spread.view, {b, h, a, j}, sp);
            for (int64_t d = 0; d < D; ++d)
              ref::set(pairs.view, {b, h, a * Ckp + j, d}, n > 0 ? weighted[static_cast<size_t>(d)] / mass : 0.0);
          }
    HostTensor mask = poisoned(DType::U8, {B, H, Cq, Ck});
    ref::for_each_index(mask.view, [&](const auto& idx) {
      ref::set(mask.view, idx, idx[2] == 0 ? 1.0 : idx[2] == 1 ? 0.0 : (rng.uniform() < 0.3 ? 1.0 : 0.0));
    });
    Twin qt(std::move(q)), labels(labels_host), mt(std::move(mask)), kct(std::move(kc)), vct(std::move(vc)),
        ks(i32_tensor({B, H, Ckp}, sizes)), st(std::move(spread)), pt(std::move(pairs));
    HostTensor out0 = poisoned(DType::F32, {B, H, N, D}), lse0 = poisoned(DType::F32, {B, H, N});
    std::vector<double> lse_dense, out_dense;
    attend(c, qt.host.view, labels.host.view, mt.host.view, scale, out0, lse0, lse_dense, out_dense);
    TestStream cs;
    const Buffer ws = compensation_workspace(B * H, N, Cq, Ckp, D);
    // The spread and the pair values are stored in f32: u |spread| in the log domain, u in the values.
    expect_dense(
        {qt.host.view, labels.host.view, mt.host.view, kct.host.view, vct.host.view, ks.host.view, st.host.view,
         pt.host.view, scale},
        [&](TensorView out, TensorView lse) {
          corrected_centroid_compensation(qt.dev, labels.dev, mt.dev, kct.dev, vct.dev, ks.dev, st.dev, pt.dev, scale,
                                          out, lse, cs.stream(), as_workspace(ws));
        },
        out0, lse0, lse_dense, out_dense, 2 * ref::kF32Eps * (max_spread + 1));
  }
}

INSTANTIATE_TEST_SUITE_P(HeadDims, EarCompDense, ::testing::Values(int64_t{64}, int64_t{128}),
                         [](const ::testing::TestParamInfo<int64_t>& p) {
                           return testing_support::case_name("D", p.param);
                         });

// ---------------------------------------------------------------------------------------------
// Bad input and graph capture
// ---------------------------------------------------------------------------------------------

// Small inputs for both ops: q [1,2,N,D] bf16, Cq x Ck clusters, m = 2 pseudo-keys per column for
// the corrected op.
struct SmallOps {
  static constexpr int64_t B = 1, H = 2, N = 150, D = 64, Cq = 4, Ck = 6, m = 2;
  ref::Rng rng{testing_support::case_seed()};
  Twin q{normal(DType::BF16, {B, H, N, D}, rng)};
  Twin labels{random_labels(rng, B, H, N, Cq, 0)};
  Twin mask{skip_most(rng)};
  Twin kc{normal(DType::F32, {B, H, Ck, D}, rng)}, vc{normal(DType::F32, {B, H, Ck, D}, rng)};
  Twin ks{i32_tensor({B, H, Ck}, random_sizes(rng, B* H* Ck, 40))};
  Twin kc2{normal(DType::F32, {B, H, m*Ck, D}, rng)}, vc2{normal(DType::F32, {B, H, m*Ck, D}, rng)};
  Twin ks2{i32_tensor({B, H, m* Ck}, random_sizes(rng, B* H* m* Ck, 40))};
  Twin spread{normal(DType::F32, {B, H, Cq, m* Ck}, rng, Layout::Contiguous, 0.3)};
  Twin pairs{normal(DType::F32, {B, H, Cq* m* Ck, D}, rng)};
  Twin out{normal(DType::BF16, {B, H, N, D}, rng)}, lse{normal(DType::F32, {B, H, N}, rng)};
  float scale = 0.125f;

  static HostTensor skip_most(ref::Rng& rng) {
    HostTensor t = poisoned(DType::U8, {B, H, Cq, Ck});
    ref::for_each_index(t.view, [&](const auto& idx) { ref::set(t.view, idx, rng.uniform() < 0.2 ? 1.0 : 0.0); });
    return t;
  }
  void ear(const Stream& s, Workspace ws) {
    centroid_compensation(q.dev, labels.dev, mask.dev, kc.dev, vc.dev, ks.dev, scale, out.dev, lse.dev, s, ws);
  }
  void corrected(const Stream& s, Workspace ws) {
    corrected_centroid_compensation(q.dev, labels.dev, mask.dev, kc2.dev, vc2.dev, ks2.dev, spread.dev, pairs.dev,
                                    scale, out.dev, lse.dev, s, ws);
  }
  std::vector<uint8_t> output_bytes() const {
    std::vector<uint8_t> b = cuda_test::device_bytes(out.device), l = cuda_test::device_bytes(lse.device);
    b.insert(b.end(), l.begin(), l.end());
    return b;
  }
};

TEST(EarCompErrors, WorkspaceShapesValuesAndKnob) {
  SmallOps ops;
  TestStream cs;
  const Stream s = cs.stream();
  using O = SmallOps;
  EXPECT_EQ(compensation_workspace_bytes(O::B * O::H, O::N, O::Cq, O::m * O::Ck, O::D, Device::cpu()), 0u);
  const size_t need = compensation_workspace_bytes(O::B * O::H, O::N, O::Cq, O::m * O::Ck, O::D, Device::cuda(0));
  ASSERT_GT(need, 0u);
  EXPECT_GE(need, compensation_workspace_bytes(O::B * O::H, O::N, O::Cq, O::Ck, O::D, Device::cuda(0)));
  const Buffer ws = device_workspace(need), small = device_workspace(need / 2);
  const std::vector<uint8_t> before = ops.output_bytes();

  // No or too small a workspace: WorkspaceError before anything is launched.
  EXPECT_THROW(ops.ear(s, {}), WorkspaceError);
  EXPECT_THROW(ops.ear(s, as_workspace(small)), WorkspaceError);
  EXPECT_THROW(ops.corrected(s, {}), WorkspaceError);
  EXPECT_THROW(ops.corrected(s, as_workspace(small)), WorkspaceError);
  // Shapes: pseudo-keys not a whole multiple of the mask's clusters, pair values of another count,
  // a host spread on a CUDA stream; head dims beyond 128 (before the workspace is looked at).
  Twin kc7(normal(DType::F32, {O::B, O::H, 7, O::D}, ops.rng)),
      ks7(i32_tensor({O::B, O::H, 7}, std::vector<int32_t>(14, 2)));
  EXPECT_THROW(corrected_centroid_compensation(ops.q.dev, ops.labels.dev, ops.mask.dev, kc7.dev, kc7.dev, ks7.dev, {},
                                               {}, ops.scale, ops.out.dev, ops.lse.dev, s, as_workspace(ws)),
               ShapeError);
  EXPECT_THROW(
      corrected_centroid_compensation(ops.q.dev, ops.labels.dev, ops.mask.dev, ops.kc.dev, ops.vc.dev, ops.ks.dev, {},
                                      ops.pairs.dev, ops.scale, ops.out.dev, ops.lse.dev, s, as_workspace(ws)),
      ShapeError);
  EXPECT_THROW(corrected_centroid_compensation(ops.q.dev, ops.labels.dev, ops.mask.dev, ops.kc2.dev, ops.vc2.dev,
                                               ops.ks2.dev, ops.spread.host.view, {}, ops.scale, ops.out.dev,
                                               ops.lse.dev, s, as_workspace(ws)),
               UnsupportedError);
  {
    Twin q_wide(normal(DType::F32, {1, 1, 4, 200}, ops.rng)), kc_wide(normal(DType::F32, {1, 1, 2, 200}, ops.rng));
    Twin o_wide(normal(DType::F32, {1, 1, 4, 200}, ops.rng)), lse_wide(normal(DType::F32, {1, 1, 4}, ops.rng));
    Twin l_wide(i32_tensor({1, 1, 4}, {0, 1, 1, 0})), s2(i32_tensor({1, 1, 2}, {2, 2}));
    HostTensor m22 = poisoned(DType::U8, {1, 1, 2, 2});
    std::fill_n(m22.storage.data_as<uint8_t>(), 4, 0);
    Twin mask22(std::move(m22));
    EXPECT_THROW(centroid_compensation(q_wide.dev, l_wide.dev, mask22.dev, kc_wide.dev, kc_wide.dev, s2.dev, ops.scale,
                                       o_wide.dev, lse_wide.dev, s),
                 UnsupportedError);
  }
  cs.sync();
  EXPECT_EQ(ops.output_bytes(), before) << "a refused call wrote its outputs";

  // Values (labels out of range, negative sizes) with value checks on: InvalidArgumentError.
  {
    const ValueChecksOn on;
    HostTensor bad = random_labels(ops.rng, O::B, O::H, O::N, O::Cq, 0);
    bad.storage.data_as<int32_t>()[7] = static_cast<int32_t>(O::Cq);
    Twin bad_labels(std::move(bad));
    std::vector<int32_t> negative(O::B * O::H * O::m * O::Ck, 3);
    negative[5] = -1;
    Twin ks_negative(i32_tensor({O::B, O::H, O::m * O::Ck}, negative));
    EXPECT_THROW(centroid_compensation(ops.q.dev, bad_labels.dev, ops.mask.dev, ops.kc.dev, ops.vc.dev, ops.ks.dev,
                                       ops.scale, ops.out.dev, ops.lse.dev, s, as_workspace(ws)),
                 InvalidArgumentError);
    EXPECT_THROW(corrected_centroid_compensation(ops.q.dev, ops.labels.dev, ops.mask.dev, ops.kc2.dev, ops.vc2.dev,
                                                 ks_negative.dev, ops.spread.dev, {}, ops.scale, ops.out.dev,
                                                 ops.lse.dev, s, as_workspace(ws)),
                 InvalidArgumentError);
    EXPECT_NO_THROW(ops.ear(s, as_workspace(ws)));
    EXPECT_NO_THROW(ops.corrected(s, as_workspace(ws)));
  }

  // The kernel knob: the CUDA-core kernel needs no workspace; unknown names are refused.
  EXPECT_THROW(cuda::set_compensation_kernel_override("tensor"), InvalidArgumentError);
  {
    const ear_cuda_test::CudaCoreCompensation cuda_cores;
    EXPECT_NO_THROW(ops.ear(s, {}));
  }
  EXPECT_THROW(ops.ear(s, {}), WorkspaceError) << "the knob's scope did not restore the tensor cores";
  cs.sync();
  // On sm_90 the default is the wgmma kernel (the same bytes as forcing it); elsewhere forcing it is
  // refused (UnsupportedError, before anything is launched), and mma.sync runs everywhere.
  auto ear_from_start = [&] {
    ops.out.upload();
    ops.lse.upload();
    ops.ear(s, as_workspace(ws));
    cs.sync();
    return ops.output_bytes();
  };
  const std::vector<uint8_t> by_default = ear_from_start();
  {
    const CompensationKernelScope mma_sync("mma_sync");
    EXPECT_NO_THROW(ear_from_start());
  }
  {
    const CompensationKernelScope wgmma("wgmma");
    if (cuda_test::is_sm90()) {
      EXPECT_EQ(ear_from_start(), by_default) << "the default is not the wgmma kernel on sm_90";
    } else {
      EXPECT_THROW(ops.ear(s, as_workspace(ws)), UnsupportedError);
    }
  }
}

// Both ops captured into a CUDA graph: no allocation and no host synchronisation inside, and a
// replay from the same (out, lse) gives the eager call's bytes.
TEST(EarCompGraph, CapturedOpsMatchEager) {
  SmallOps ops;
  TestStream cs;
  const Stream s = cs.stream();
  const size_t need = compensation_workspace_bytes(SmallOps::B * SmallOps::H, SmallOps::N, SmallOps::Cq,
                                                   SmallOps::m * SmallOps::Ck, SmallOps::D, Device::cuda(0));
  const Buffer ws = device_workspace(need);
  const std::vector<uint8_t> start = ops.output_bytes();
  auto both = [&] {
    ops.ear(s, as_workspace(ws));
    ops.corrected(s, as_workspace(ws));
  };
  both();  // eager: kernel attributes are set outside the capture
  cs.sync();
  const std::vector<uint8_t> eager = ops.output_bytes();
  ASSERT_NE(eager, start) << "the ops changed nothing: the inputs do not exercise them";
  const cuda_test::CapturedGraph graph(cs.handle(), both);
  for (int replay = 0; replay < 2; ++replay) {
    ops.out.upload();
    ops.lse.upload();
    graph.launch(cs.handle());
    cs.sync();
    EXPECT_EQ(ops.output_bytes(), eager) << "replay " << replay << " differs from the eager calls";
  }
}

}  // namespace
}  // namespace sapattn
