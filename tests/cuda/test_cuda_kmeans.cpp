// The CUDA k-means ops (kmeans_init, kmeans_assign, kmeans_update, kmeans) against the CPU backend
// on the same inputs, as ggml's test-backend-ops does: points drawn on the host from a mixture of
// Gaussians (or noise), copied to the GPU byte for byte (views keep their strides and offsets), both
// backends run the public op, and the outputs are compared with the tolerance each contract allows:
//   exact (bytes):  kmeans_init (with and without sample ids), the exact kmeans_assign, the sizes;
//   error model:    the tensor-core assignment (a different label only where the two best distances
//                   tie within the bound E of docs/cuda.md) and the centroid means (the fp64 sums are
//                   added in another order: at most 1 ulp after rounding to fp32).
// Tests whose name contains "Large" take realistic sizes; the sanitizer runs skip them.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cuda_support.hpp"
#include "sapattn/ops.hpp"
#include "test_support.hpp"

namespace sapattn::cuda_test {
namespace {

using ref::Layout;

struct KmCase {
  int64_t B, H, N, D, C;
  DType dtype;
  Layout layout;
  int64_t modes;  // 0: noise
};

std::string describe(const KmCase& k) {
  return std::string("B") + std::to_string(k.B) + "_H" + std::to_string(k.H) + "_N" + std::to_string(k.N) + "_D" +
         std::to_string(k.D) + "_C" + std::to_string(k.C) + "_" + std::string(dtype_name(k.dtype)) + "_" +
         layout_tag(k.layout) + (k.modes == 0 ? "_noise" : "");
}

HostTensor points_of(const KmCase& k, ref::Rng& rng) {
  return mixture_points(k.dtype, k.B, k.H, k.N, k.D, k.layout, k.modes, rng);
}

// The centroids [B,H,C,D] that the CPU's kmeans_init samples from x with the next seed of rng.
HostTensor initial_centroids(const KmCase& k, const HostTensor& x, ref::Rng& rng) {
  HostTensor c = poisoned(DType::F32, {k.B, k.H, k.C, k.D});
  kmeans_init(x.view, c.view, rng.next(), kCpu);
  return c;
}

// x's labels [B,H,N] by the CPU's exact assignment to the centroids c.
HostTensor cpu_labels(const KmCase& k, const HostTensor& x, const HostTensor& c) {
  HostTensor l = poisoned(DType::I32, {k.B, k.H, k.N});
  kmeans_assign(x.view, c.view, l.view, kCpu);
  return l;
}

// The bound E of docs/cuda.md on |approximate - exact| of one squared distance of the tensor-core
// assignment, key truncation included (double here, so no rounding of its own).
std::vector<double> tie_bound(const TensorView& points, const TensorView& centroids) {
  const int64_t B = points.shape[0], H = points.shape[1], N = points.shape[2], D = points.shape[3];
  const int64_t C = centroids.shape[2];
  const bool f16 = points.dtype == DType::F16;
  const double ux = points.dtype == DType::F32 ? 0x1p-8 : 0.0;
  std::vector<double> bound(static_cast<size_t>(B * H * N));
  const int64_t c_pad = (C + 63) / 64 * 64;
  int index_bits = 1;
  while ((int64_t{1} << index_bits) < c_pad) ++index_bits;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      double max_norm2 = 0, max_resid = 0;
      for (int64_t c = 0; c < C; ++c) {
        double n2 = 0, r2 = 0;
        for (int64_t d = 0; d < D; ++d) {
          const float v = static_cast<float>(ref::get(centroids, {b, h, c, d}));
          const float r = f16 ? f16_to_f32(f32_to_f16(v)) : bf16_to_f32(f32_to_bf16(v));
          n2 += static_cast<double>(v) * v;
          r2 += static_cast<double>(v - r) * (v - r);
        }
        max_norm2 = std::max(max_norm2, n2);
        max_resid = std::max(max_resid, std::sqrt(r2));
      }
      const double nc = std::sqrt(max_norm2);
      for (int64_t i = 0; i < N; ++i) {
        double x2 = 0;
        for (int64_t d = 0; d < D; ++d) {
          const float v = static_cast<float>(ref::get(points, {b, h, i, d}));
          const float r = points.dtype == DType::F32 ? bf16_to_f32(f32_to_bf16(v)) : v;
          x2 += static_cast<double>(r) * r;
        }
        const double nx = std::sqrt(x2), span = (nx + nc) * (nx + nc);
        const double accumulate = (D + 4) * 0x1p-23 * span;
        const double full = 2 * nx * max_resid + 2 * ux * nx * nc + accumulate + (D + 4) * 0x1p-24 * span;
        const double margin = 1.01 * nc * max_resid + accumulate;
        const double quant = std::ldexp(0.5 * span + margin, index_bits - 23);  // key truncation, half units
        bound[static_cast<size_t>((b * H + h) * N + i)] = 1.01 * (full + 2 * quant);
      }
    }
  return bound;
}

double exact_distance(const TensorView& points, const TensorView& centroids, int64_t b, int64_t h, int64_t i,
                      int64_t c) {
  double s = 0;
  for (int64_t d = 0; d < points.shape[3]; ++d) {
    const double diff = ref::get(points, {b, h, i, d}) - ref::get(centroids, {b, h, c, d});
    s += diff * diff;
  }
  return s;
}

struct Agreement {
  int64_t total = 0, differ = 0, beyond_tie = 0;
  double worst_excess = 0;  // max over disagreements of (d(gpu) - d(cpu)) / bound
};

// Compares GPU labels with CPU labels of the same centroids; a disagreement is allowed only where
// the GPU's label is within 2E of the CPU's in exact distance.
Agreement compare_labels(const TensorView& points, const TensorView& centroids, const std::vector<double>& gpu,
                         const std::vector<double>& cpu) {
  const int64_t H = points.shape[1], N = points.shape[2];
  const std::vector<double> bound = tie_bound(points, centroids);
  Agreement a;
  a.total = static_cast<int64_t>(gpu.size());
  for (size_t t = 0; t < gpu.size(); ++t) {
    if (gpu[t] == cpu[t]) continue;
    ++a.differ;
    const int64_t bh = static_cast<int64_t>(t) / N, i = static_cast<int64_t>(t) % N;
    const double dg = exact_distance(points, centroids, bh / H, bh % H, i, static_cast<int64_t>(gpu[t]));
    const double dc = exact_distance(points, centroids, bh / H, bh % H, i, static_cast<int64_t>(cpu[t]));
    const double excess = (dg - dc) / (2 * bound[t]);
    a.worst_excess = std::max(a.worst_excess, excess);
    if (excess > 1.0) ++a.beyond_tie;
  }
  return a;
}

double objective(const TensorView& points, const TensorView& centroids, const std::vector<double>& labels) {
  const int64_t H = points.shape[1], N = points.shape[2];
  double total = 0;
  for (size_t t = 0; t < labels.size(); ++t) {
    const int64_t bh = static_cast<int64_t>(t) / N;
    total +=
        exact_distance(points, centroids, bh / H, bh % H, static_cast<int64_t>(t) % N, static_cast<int64_t>(labels[t]));
  }
  return total;
}

// Every test draws the case's points first, from the seed of its own name.
class KmeansCase : public ::testing::TestWithParam<KmCase> {
 protected:
  const KmCase k = GetParam();
  ref::Rng rng{testing_support::case_seed()};
  const HostTensor x = points_of(k, rng);
};

TEST_P(KmeansCase, InitIsIdenticalToCpu) {
  HostTensor cpu_c = poisoned(DType::F32, {k.B, k.H, k.C, k.D});
  const uint64_t seed = rng.next();
  kmeans_init(x.view, cpu_c.view, seed, kCpu);
  NonBlockingStream cs;
  const DeviceTensor dx = to_device(x);
  DeviceTensor dc = to_device(poisoned(DType::F32, {k.B, k.H, k.C, k.D}));
  const Buffer ws = device_workspace(kmeans_workspace_bytes(k.B * k.H, k.N, k.C, k.D, Device::cuda(0)));
  kmeans_init(dx.view, dc.view, seed, cs.stream(), as_workspace(ws));
  cs.sync();
  EXPECT_EQ(to_host(dc, cpu_c).bytes(), cpu_c.bytes());
  // With sample ids (reversed order: each (b,h) samples as another one would).
  HostTensor ids = poisoned(DType::I32, {k.B, k.H});
  for (int64_t i = 0; i < k.B * k.H; ++i)
    static_cast<int32_t*>(ids.view.data)[i] = static_cast<int32_t>(k.B * k.H - 1 - i);
  kmeans_init(x.view, cpu_c.view, seed, kCpu, {}, ids.view);
  const DeviceTensor dids = to_device(ids);
  kmeans_init(dx.view, dc.view, seed, cs.stream(), as_workspace(ws), dids.view);
  cs.sync();
  EXPECT_EQ(to_host(dc, cpu_c).bytes(), cpu_c.bytes());
}

TEST_P(KmeansCase, ExactAssignIsIdenticalToCpu) {
  const HostTensor c = initial_centroids(k, x, rng);
  const HostTensor cpu_l = cpu_labels(k, x, c);
  NonBlockingStream cs;
  const DeviceTensor dx = to_device(x), dc = to_device(c);
  DeviceTensor dl = to_device(poisoned(DType::I32, {k.B, k.H, k.N}));
  kmeans_assign(dx.view, dc.view, dl.view, cs.stream());  // the public op: no workspace, exact path
  cs.sync();
  EXPECT_EQ(to_host(dl, cpu_l).bytes(), cpu_l.bytes());
}

TEST_P(KmeansCase, TensorCoreAssignAgreesUpToTies) {
  HostTensor c = initial_centroids(k, x, rng);
  // Perturb the sampled centroids so that points are not their own centroids.
  ref::for_each_index(c.view,
                      [&](const auto& idx) { ref::set(c.view, idx, ref::get(c.view, idx) + 0.3 * rng.normal()); });
  const HostTensor cpu_l = cpu_labels(k, x, c);
  NonBlockingStream cs;
  const DeviceTensor dx = to_device(x), dc = to_device(c);
  DeviceTensor dl = to_device(poisoned(DType::I32, {k.B, k.H, k.N}));
  const Buffer ws = device_workspace(kmeans_workspace_bytes(k.B * k.H, k.N, k.C, k.D, Device::cuda(0)));
  Buffer counter = Buffer::allocate(sizeof(unsigned long long), Device::cuda(0));
  SAPATTN_CUDA_CHECK(cudaMemset(counter.data(), 0, sizeof(unsigned long long)));
  // Both variants of the kernel give the same labels; the default one (16 columns) goes last.
  cuda::set_assign_columns_per_pass(8);
  cuda::kmeans_assign(dx.view, dc.view, dl.view, cs.stream(), as_workspace(ws));
  cs.sync();
  const HostTensor labels8 = to_host(dl, cpu_l);
  cuda::set_assign_columns_per_pass(16);
  SAPATTN_CUDA_CHECK(cudaMemset(dl.buffer.data(), 0xff, dl.buffer.bytes()));
  cuda::kmeans_assign(dx.view, dc.view, dl.view, cs.stream(), as_workspace(ws),
                      {static_cast<unsigned long long*>(counter.data())});
  cs.sync();
  const HostTensor gl = to_host(dl, cpu_l);
  EXPECT_EQ(labels8.bytes(), gl.bytes());
  const unsigned long long refined = download(static_cast<const unsigned long long*>(counter.data()), 1)[0];
  const Agreement a = compare_labels(x.view, c.view, ref::to_vector(gl.view), ref::to_vector(cpu_l.view));
  std::printf("[assign %s] %lld/%lld labels differ, %llu rows re-ranked exactly, worst |d| gap / 2E = %.3f\n",
              describe(k).c_str(), static_cast<long long>(a.differ), static_cast<long long>(a.total), refined,
              a.worst_excess);
  EXPECT_EQ(a.beyond_tie, 0);
  EXPECT_LE(a.differ, a.total / 1000);  // >= 99.9% identical
}

TEST_P(KmeansCase, UpdateMatchesCpuOnTheSameLabels) {
  HostTensor c = initial_centroids(k, x, rng);  // updated in place by the CPU below
  const HostTensor l = cpu_labels(k, x, c);
  NonBlockingStream cs;
  const DeviceTensor dx = to_device(x), dl = to_device(l);
  DeviceTensor dc = to_device(c), ds = to_device(poisoned(DType::I32, {k.B, k.H, k.C}));
  HostTensor cpu_s = poisoned(DType::I32, {k.B, k.H, k.C});
  kmeans_update(x.view, l.view, c.view, cpu_s.view, kCpu);
  const Buffer ws = device_workspace(kmeans_workspace_bytes(k.B * k.H, k.N, k.C, k.D, Device::cuda(0)));
  kmeans_update(dx.view, dl.view, dc.view, ds.view, cs.stream(), as_workspace(ws));
  cs.sync();
  EXPECT_EQ(to_host(ds, cpu_s).bytes(), cpu_s.bytes());
  const HostTensor gc = to_host(dc, c);
  int64_t ulps = 0, max_ulp = 0;
  for (int64_t t = 0; t < c.view.numel(); ++t) {
    int32_t a, b;
    std::memcpy(&a, static_cast<const float*>(gc.view.data) + t, 4);
    std::memcpy(&b, static_cast<const float*>(c.view.data) + t, 4);
    const int64_t diff = std::abs(static_cast<int64_t>(a) - b);
    ulps += diff != 0;
    max_ulp = std::max(max_ulp, diff);
  }
  EXPECT_LE(max_ulp, 1) << ulps << " centroid values differ";
  std::printf("[update %s] %lld of %lld centroid values differ by 1 ulp\n", describe(k).c_str(),
              static_cast<long long>(ulps), static_cast<long long>(c.view.numel()));
}

// kmeans from the same initial centroids: labels, objective, and the internal consistency of the
// GPU's result (sizes count its labels; non-empty centroids are the means of its labels).
void check_kmeans(const KmCase& k, int iters) {
  ref::Rng rng(testing_support::case_seed());
  const HostTensor x = points_of(k, rng);
  const HostTensor c0 = initial_centroids(k, x, rng);
  HostTensor cpu_c = deep_copy(c0), cpu_l = poisoned(DType::I32, {k.B, k.H, k.N}),
             cpu_s = poisoned(DType::I32, {k.B, k.H, k.C});
  kmeans(x.view, cpu_c.view, cpu_l.view, cpu_s.view, iters, kCpu);
  NonBlockingStream cs;
  const DeviceTensor dx = to_device(x);
  DeviceTensor dc = to_device(c0), dl = to_device(cpu_l), ds = to_device(cpu_s);
  SAPATTN_CUDA_CHECK(cudaMemset(dl.buffer.data(), 0xff, dl.buffer.bytes()));
  SAPATTN_CUDA_CHECK(cudaMemset(ds.buffer.data(), 0xff, ds.buffer.bytes()));
  const Buffer ws = device_workspace(kmeans_workspace_bytes(k.B * k.H, k.N, k.C, k.D, Device::cuda(0)));
  kmeans(dx.view, dc.view, dl.view, ds.view, iters, cs.stream(), as_workspace(ws));
  cs.sync();
  const HostTensor gc = to_host(dc, cpu_c), gl = to_host(dl, cpu_l), gs = to_host(ds, cpu_s);
  const std::vector<double> glab = ref::to_vector(gl.view), clab = ref::to_vector(cpu_l.view);
  int64_t differ = 0;
  for (size_t t = 0; t < glab.size(); ++t) differ += glab[t] != clab[t];
  const double obj_g = objective(x.view, gc.view, glab), obj_c = objective(x.view, cpu_c.view, clab);
  std::printf("[kmeans %s iters=%d] %lld/%zu labels differ, objective gpu - cpu = %.3g (cpu %.6g)\n",
              describe(k).c_str(), iters, static_cast<long long>(differ), glab.size(), obj_g - obj_c, obj_c);
  EXPECT_LE(differ, static_cast<int64_t>(glab.size()) / 1000);
  EXPECT_LE(std::abs(obj_g - obj_c), 1e-3 * obj_c + 1e-9);  // (0 when every point is a centroid: C >= N)
  // Consistency of the GPU's own result.
  const int64_t BH = k.B * k.H;
  std::vector<int64_t> count(static_cast<size_t>(BH * k.C), 0);
  std::vector<double> sum(static_cast<size_t>(BH * k.C * k.D), 0.0);
  for (size_t t = 0; t < glab.size(); ++t) {
    const int64_t bh = static_cast<int64_t>(t) / k.N, i = static_cast<int64_t>(t) % k.N;
    const int64_t l = static_cast<int64_t>(glab[t]);
    ASSERT_TRUE(l >= 0 && l < k.C);
    ++count[static_cast<size_t>(bh * k.C + l)];
    for (int64_t d = 0; d < k.D; ++d)
      sum[static_cast<size_t>((bh * k.C + l) * k.D + d)] += ref::get(x.view, {bh / k.H, bh % k.H, i, d});
  }
  const std::vector<double> sizes = ref::to_vector(gs.view), cents = ref::to_vector(gc.view),
                            init = ref::to_vector(c0.view);
  for (int64_t t = 0; t < BH * k.C; ++t) {
    ASSERT_EQ(sizes[static_cast<size_t>(t)], count[static_cast<size_t>(t)]) << "cluster " << t;
    for (int64_t d = 0; d < k.D; ++d) {
      const size_t e = static_cast<size_t>(t * k.D + d);
      if (iters == 0) {
        ASSERT_EQ(cents[e], init[e]);  // no iteration: the centroids are not moved
      } else if (count[static_cast<size_t>(t)] > 0) {
        const double mean = sum[e] / count[static_cast<size_t>(t)];
        ASSERT_NEAR(cents[e], mean, 1e-5 * (1 + std::abs(mean))) << "cluster " << t << " dim " << d;
      }
    }
  }
}

TEST_P(KmeansCase, ZeroIterationsAssignsAndCounts) { check_kmeans(GetParam(), 0); }
TEST_P(KmeansCase, TwoIterationsMatchCpu) { check_kmeans(GetParam(), 2); }
TEST_P(KmeansCase, TenIterationsMatchCpu) { check_kmeans(GetParam(), 10); }

INSTANTIATE_TEST_SUITE_P(
    Cases, KmeansCase,
    ::testing::Values(KmCase{1, 2, 1000, 128, 64, DType::BF16, Layout::Contiguous, 33},
                      KmCase{2, 3, 777, 64, 100, DType::F32, Layout::Transposed, 51},  // B > 1, strided
                      KmCase{1, 2, 700, 128, 90, DType::F16, Layout::Padded, 46},      // padded rows
                      KmCase{1, 1, 50, 128, 80, DType::BF16, Layout::Contiguous, 9},   // C > N: empty clusters
                      KmCase{1, 2, 2000, 128, 300, DType::BF16, Layout::Transposed, 151},
                      KmCase{1, 1, 1500, 128, 200, DType::BF16, Layout::Contiguous, 0},  // noise: many near-ties
                      KmCase{1, 2, 600, 64, 1, DType::F32, Layout::Contiguous, 5},       // C = 1
                      KmCase{1, 2, 513, 32, 40, DType::BF16, Layout::Contiguous, 21},    // D 32: exact path
                      KmCase{2, 1, 300, 96, 17, DType::F16, Layout::Transposed, 9}),     // D 96: exact path
    [](const auto& p) { return describe(p.param); });

TEST(KmeansLarge, WanShapedHeadsMatchCpu) {
  // Two heads of Wan 2.1 I2V 480p: [1,2,32760,128] bf16, 1000 key clusters, 3 iterations.
  check_kmeans(KmCase{1, 2, 32760, 128, 1000, DType::BF16, Layout::Transposed, 700}, 3);
}

}  // namespace
}  // namespace sapattn::cuda_test
