// The CUDA k-means ops (kmeans_init, kmeans_assign, kmeans_update, kmeans) against the CPU backend
// on the same inputs, as ggml's test-backend-ops does: points drawn on the host from a mixture of
// Gaussians (or noise), copied to the GPU byte for byte (views keep their strides and offsets), both
// backends run the public op, and the outputs are compared with the tolerance each contract allows:
//   exact (bytes):  kmeans_init (with and without sample ids), the exact kmeans_assign, the sizes;
//   error model:    the tensor-core assignment (a different label only where the two best distances
//                   tie within the bound E of docs/cuda.md, never on a row the exact re-ranking
//                   settles) and the centroid means (the fp64 sums are added in another order: at most
//                   1 ulp after rounding to fp32).
// The tensor-core assignment here is the mma.sync kernel, forced (an H100 would run the wgmma kernel
// by default): test_cuda_kmeans_sm90.cpp runs the same case table (kmeans_support.cpp) on the wgmma one.
// Tests whose name contains "Large" take realistic sizes; the sanitizer runs skip them.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cuda_support.hpp"
#include "kmeans_support.hpp"
#include "sapattn/ops.hpp"
#include "test_support.hpp"

namespace sapattn::cuda_test {
namespace {

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
  const DeviceTensor dx = to_device(x), dc = to_device(c);
  // The mma.sync kernel (test_cuda_kmeans_sm90.cpp runs this table on the wgmma kernel). Both of its
  // variants give the same labels; the default one (16 columns) goes last.
  const AssignKernelScope mma("mma");
  cuda::set_assign_columns_per_pass(8);
  const HostTensor labels8 = gpu_assign(k, dx, dc, cpu_l);
  cuda::set_assign_columns_per_pass(16);
  unsigned long long refined = 0;
  const HostTensor gl = gpu_assign(k, dx, dc, cpu_l, &refined);
  EXPECT_EQ(labels8.bytes(), gl.bytes());
  const Agreement a = compare_labels(x.view, c.view, ref::to_vector(gl.view), ref::to_vector(cpu_l.view), 64);
  std::printf(
      "[assign %s] %lld/%lld labels differ (%lld rows settled), %llu rows re-ranked exactly, "
      "worst |d| gap / 2E = %.3f\n",
      describe(k).c_str(), static_cast<long long>(a.differ), static_cast<long long>(a.total),
      static_cast<long long>(a.settled), refined, a.worst_excess);
  expect_agreement(a, describe(k));
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

// kmeans with the mma.sync assignment (test_cuda_kmeans_sm90.cpp: with the wgmma one).
TEST_P(KmeansCase, ZeroIterationsAssignsAndCounts) {
  const AssignKernelScope mma("mma");
  check_kmeans(GetParam(), 0);
}
TEST_P(KmeansCase, TwoIterationsMatchCpu) {
  const AssignKernelScope mma("mma");
  check_kmeans(GetParam(), 2);
}
TEST_P(KmeansCase, TenIterationsMatchCpu) {
  const AssignKernelScope mma("mma");
  check_kmeans(GetParam(), 10);
}

INSTANTIATE_TEST_SUITE_P(Cases, KmeansCase, ::testing::ValuesIn(kmeans_cases()),
                         [](const auto& p) { return describe(p.param); });

TEST(KmeansLarge, WanShapedHeadsMatchCpu) {
  // Two heads of Wan 2.1 I2V 480p: [1,2,32760,128] bf16, 1000 key clusters, 3 iterations.
  const AssignKernelScope mma("mma");
  check_kmeans(KmCase{1, 2, 32760, 128, 1000, DType::BF16, ref::Layout::Transposed, 700}, 3);
}

}  // namespace
}  // namespace sapattn::cuda_test
