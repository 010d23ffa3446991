// The wgmma (sm_90a) k-means assignment (src/cuda/kmeans/assign_sm90.cuh) against the CPU labels and
// against the mma.sync kernel on the same inputs, with the error model of test_cuda_kmeans.cpp
// (kmeans_support.hpp): a label may differ from the CPU's only within the tie bound 2E, never on a row
// that the exact re-ranking settles (no third centroid within 2E of the CPU's), and on >= 99.9% of
// the rows not at all. The shared case table (its head dims 64 and 128) runs on both kernels; the
// cases below add what the wgmma kernel's tiles make interesting (C = 7 and 1000, N just past a tile,
// f32 and padded points for the converting loader, B*H > 1), every compiled configuration, duplicate
// points, exact ties, kmeans iterations, a graph capture and a Wan-shaped pair of heads. Every test
// needs an sm_90 GPU (skipped, and reported as skipped, elsewhere).
#include <gtest/gtest.h>

#include <cstdio>
#include <string>
#include <vector>

#include "cuda/kmeans/kmeans_internal.hpp"  // kSm90AssignConfigs
#include "cuda_support.hpp"
#include "kmeans_support.hpp"
#include "sapattn/ops.hpp"
#include "test_support.hpp"

namespace sapattn::cuda_test {
namespace {

using ref::Layout;

bool sm90_device() {
  int major = 0, minor = 0;
  SAPATTN_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0));
  SAPATTN_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0));
  return major == 9 && minor == 0;
}

#define SKIP_UNLESS_SM90() \
  if (!sm90_device()) GTEST_SKIP() << "the wgmma k-means assignment runs on sm_90 GPUs only"

// The centroid padding (the key's column bits) of the kernel that runs now for C clusters.
int64_t pad_multiple(int64_t clusters, int64_t dim) {
  const cuda::AssignKernel k = cuda::assign_kernel(0, clusters, dim);
  return k.wgmma ? k.tile_n : 64;
}

// The shared table's cases with a tensor-core assignment (D = 64 and 128), and more.
std::vector<KmCase> sm90_cases() {
  std::vector<KmCase> cases;
  for (const KmCase& k : kmeans_cases())
    if (k.D == 64 || k.D == 128) cases.push_back(k);
  cases.push_back({1, 3, 1201, 128, 1000, DType::BF16, Layout::Transposed, 400});  // Wan's key clusters
  cases.push_back({2, 2, 333, 64, 7, DType::F16, Layout::Contiguous, 5});          // C = 7, B*H = 4
  cases.push_back({1, 2, 1000, 64, 300, DType::F32, Layout::Padded, 90});          // f32, converted
  cases.push_back({1, 1, 257, 128, 64, DType::F16, Layout::Transposed, 20});       // N = one tile + 1
  cases.push_back({1, 1, 130, 64, 1000, DType::BF16, Layout::Contiguous, 50});     // C > N, 1000
  return cases;
}

class Sm90Case : public ::testing::TestWithParam<KmCase> {
 protected:
  const KmCase k = GetParam();
  ref::Rng rng{testing_support::case_seed()};
  const HostTensor x = points_of(k, rng);
  // Sampled centroids, perturbed so that points are not their own centroids.
  HostTensor perturbed_centroids() {
    HostTensor c = initial_centroids(k, x, rng);
    ref::for_each_index(c.view,
                        [&](const auto& idx) { ref::set(c.view, idx, ref::get(c.view, idx) + 0.3 * rng.normal()); });
    return c;
  }
};

TEST_P(Sm90Case, AssignAgreesWithCpuOnBothKernels) {
  SKIP_UNLESS_SM90();
  const HostTensor c = perturbed_centroids();
  const HostTensor cpu_l = cpu_labels(k, x, c);
  const DeviceTensor dx = to_device(x), dc = to_device(c);
  const std::vector<double> cpu = ref::to_vector(cpu_l.view);
  std::vector<std::vector<double>> labels;
  std::vector<Agreement> agreement;
  for (const char* kernel : {"mma", "wgmma"}) {
    const AssignKernelScope scope(kernel);
    unsigned long long refined = 0;
    labels.push_back(ref::to_vector(gpu_assign(k, dx, dc, cpu_l, &refined).view));
    agreement.push_back(compare_labels(x.view, c.view, labels.back(), cpu, pad_multiple(k.C, k.D)));
    const Agreement& a = agreement.back();
    std::printf("[assign %s %s] %lld/%lld labels differ (%lld rows settled), %llu re-ranked, worst gap / 2E = %.3f\n",
                kernel, describe(k).c_str(), static_cast<long long>(a.differ), static_cast<long long>(a.total),
                static_cast<long long>(a.settled), refined, a.worst_excess);
    expect_agreement(a, std::string(kernel) + " " + describe(k));
  }
  // The two kernels: equal wherever the re-ranking settles the row (for both), else both within 2E.
  int64_t between = 0, between_settled = 0;
  for (size_t t = 0; t < cpu.size(); ++t) {
    if (labels[0][t] == labels[1][t]) continue;
    ++between;
    between_settled += agreement[0].is_settled[t] && agreement[1].is_settled[t];
  }
  std::printf("[assign %s] mma.sync and wgmma labels differ on %lld rows\n", describe(k).c_str(),
              static_cast<long long>(between));
  EXPECT_EQ(between_settled, 0);
}

TEST_P(Sm90Case, EveryConfigurationAgreesWithCpu) {
  SKIP_UNLESS_SM90();
  const HostTensor c = perturbed_centroids();
  const HostTensor cpu_l = cpu_labels(k, x, c);
  const DeviceTensor dx = to_device(x), dc = to_device(c);
  for (const cuda::Sm90AssignConfig& config : cuda::kSm90AssignConfigs) {
    const std::string name = "wgmma:" + std::to_string(config.group_rows) + "x" + std::to_string(config.tile_n);
    const AssignKernelScope scope(name.c_str());
    const cuda::AssignKernel chosen = cuda::assign_kernel(0, k.C, k.D);
    ASSERT_TRUE(chosen.wgmma && chosen.group_rows == config.group_rows && chosen.tile_n == config.tile_n);
    const HostTensor gl = gpu_assign(k, dx, dc, cpu_l);
    const Agreement a =
        compare_labels(x.view, c.view, ref::to_vector(gl.view), ref::to_vector(cpu_l.view), config.tile_n);
    std::printf("[assign %s %s] %lld/%lld labels differ\n", name.c_str(), describe(k).c_str(),
                static_cast<long long>(a.differ), static_cast<long long>(a.total));
    expect_agreement(a, name + " " + describe(k));
  }
}

TEST_P(Sm90Case, TwoIterationsMatchCpu) {
  SKIP_UNLESS_SM90();
  const AssignKernelScope scope("wgmma");
  check_kmeans(k, 2);
}

TEST_P(Sm90Case, TenIterationsMatchCpu) {
  SKIP_UNLESS_SM90();
  const AssignKernelScope scope("wgmma");
  check_kmeans(k, 10);
}

INSTANTIATE_TEST_SUITE_P(Cases, Sm90Case, ::testing::ValuesIn(sm90_cases()),
                         [](const auto& p) { return describe(p.param); });

// Labels of the wgmma kernel in every configuration, for x and c on the host.
std::vector<std::pair<std::string, HostTensor>> every_configuration(const KmCase& k, const HostTensor& x,
                                                                    const HostTensor& c, const HostTensor& like) {
  const DeviceTensor dx = to_device(x), dc = to_device(c);
  std::vector<std::pair<std::string, HostTensor>> out;
  for (const cuda::Sm90AssignConfig& config : cuda::kSm90AssignConfigs) {
    const std::string name = "wgmma:" + std::to_string(config.group_rows) + "x" + std::to_string(config.tile_n);
    const AssignKernelScope scope(name.c_str());
    out.emplace_back(name, gpu_assign(k, dx, dc, like));
  }
  return out;
}

// Points that repeat 6 rows, centroids sampled from them (so many centroids repeat too): distances of
// exactly 0 and ties among identical centroids, which the CPU gives to the lowest index. Identical
// centroids give identical accumulators, so the keys order them by column and the re-ranking keeps
// the lower: every label is the CPU's.
TEST(Sm90Assign, DuplicatePointsAndCentroidsGiveTheCpuLabels) {
  SKIP_UNLESS_SM90();
  for (const DType dtype : {DType::BF16, DType::F16, DType::F32})
    for (const int64_t D : {64, 128}) {
      const KmCase k{1, 2, 700, D, 40, dtype, Layout::Contiguous, 6};
      ref::Rng rng(testing_support::case_seed(static_cast<uint64_t>(D) + static_cast<uint64_t>(dtype)));
      HostTensor x = poisoned(dtype, {k.B, k.H, k.N, k.D});
      for (int64_t b = 0; b < k.B; ++b)
        for (int64_t h = 0; h < k.H; ++h) {
          std::vector<double> rows(static_cast<size_t>(k.modes * D));
          for (double& v : rows) v = 2.0 * rng.normal();
          for (int64_t i = 0; i < k.N; ++i) {
            const int64_t m = rng.integer(0, k.modes - 1);
            for (int64_t d = 0; d < D; ++d) ref::set(x.view, {b, h, i, d}, rows[static_cast<size_t>(m * D + d)]);
          }
        }
      const HostTensor c = initial_centroids(k, x, rng);
      const HostTensor cpu_l = cpu_labels(k, x, c);
      for (const auto& [name, gl] : every_configuration(k, x, c, cpu_l))
        EXPECT_EQ(gl.bytes(), cpu_l.bytes()) << name << " " << describe(k);
    }
}

// Centroid pairs mirrored in coordinate 0 around points whose coordinate 0 is 0: each point is
// exactly as far from both centroids of its pair (the same fp32 terms in the same order), so the CPU
// labels every point with the even index of a pair; the wgmma kernel's keys of the two are equal but
// for the column, and the re-ranking finds the exact tie and keeps the lower index.
TEST(Sm90Assign, ExactTiesGoToTheLowerIndex) {
  SKIP_UNLESS_SM90();
  for (const DType dtype : {DType::BF16, DType::F16, DType::F32})
    for (const int64_t D : {64, 128}) {
      const int64_t pairs = 37;
      const KmCase k{1, 2, 900, D, 2 * pairs, dtype, Layout::Contiguous, pairs};
      ref::Rng rng(testing_support::case_seed(static_cast<uint64_t>(D) + static_cast<uint64_t>(dtype)));
      HostTensor x = poisoned(dtype, {k.B, k.H, k.N, k.D});
      HostTensor c = poisoned(DType::F32, {k.B, k.H, k.C, k.D});
      for (int64_t b = 0; b < k.B; ++b)
        for (int64_t h = 0; h < k.H; ++h) {
          std::vector<double> centre(static_cast<size_t>(pairs * D));
          for (double& v : centre) v = 2.0 * rng.normal();
          for (int64_t j = 0; j < pairs; ++j) {
            const double offset = 0.5 + rng.uniform();
            for (int64_t d = 0; d < D; ++d) {
              const double v = d == 0 ? offset : centre[static_cast<size_t>(j * D + d)] + 0.2 * rng.normal();
              ref::set(c.view, {b, h, 2 * j, d}, v);
              ref::set(c.view, {b, h, 2 * j + 1, d}, d == 0 ? -v : v);
            }
          }
          for (int64_t i = 0; i < k.N; ++i) {
            const int64_t j = rng.integer(0, pairs - 1);
            for (int64_t d = 0; d < D; ++d)
              ref::set(x.view, {b, h, i, d}, d == 0 ? 0.0 : centre[static_cast<size_t>(j * D + d)] + rng.normal());
          }
        }
      const HostTensor cpu_l = cpu_labels(k, x, c);
      const std::vector<double> cpu = ref::to_vector(cpu_l.view);
      for (const double l : cpu) ASSERT_EQ(static_cast<int64_t>(l) % 2, 0) << "the construction gives no tie";
      for (const auto& [name, gl] : every_configuration(k, x, c, cpu_l))
        EXPECT_EQ(gl.bytes(), cpu_l.bytes()) << name << " " << describe(k);
    }
}

// The switch: names, the default configurations at Wan 14B's cluster counts, and a bad name.
TEST(Sm90Assign, SwitchPicksTheKernel) {
  SKIP_UNLESS_SM90();
  {
    const AssignKernelScope scope("auto");
    const cuda::AssignKernel q = cuda::assign_kernel(0, 300, 128), kk = cuda::assign_kernel(0, 1000, 128);
    EXPECT_TRUE(q.wgmma && q.group_rows == 64 && q.tile_n == 160);
    EXPECT_TRUE(kk.wgmma && kk.group_rows == 64 && kk.tile_n == 256);
    EXPECT_FALSE(cuda::assign_kernel(0, 300, 96).tensor_cores);
  }
  {
    const AssignKernelScope scope("mma");
    const cuda::AssignKernel q = cuda::assign_kernel(0, 300, 128);
    EXPECT_TRUE(q.tensor_cores && !q.wgmma);
  }
  EXPECT_THROW(cuda::set_assign_kernel("wgmma:64x100"), InvalidArgumentError);
  EXPECT_THROW(cuda::set_assign_kernel("sm90"), InvalidArgumentError);
}

// kmeans (2 iterations of a bf16 tensor, loaded by TMA, and an f32 one, converted by the producer
// warps) captured into a graph with the copies of its starting centroids, and replayed: the same
// bytes as eager launches, twice.
TEST(Sm90Assign, GraphReplayMatchesEager) {
  SKIP_UNLESS_SM90();
  const AssignKernelScope scope("wgmma");
  ref::Rng rng(testing_support::case_seed());
  const KmCase bf16{1, 3, 2500, 128, 30, DType::BF16, Layout::Transposed, 20};
  const KmCase f32{1, 3, 2500, 128, 300, DType::F32, Layout::Contiguous, 60};
  const HostTensor xb = points_of(bf16, rng), xf = points_of(f32, rng);
  const DeviceTensor dxb = to_device(xb), dxf = to_device(xf);
  const DeviceTensor start_b = to_device(initial_centroids(bf16, xb, rng));
  const DeviceTensor start_f = to_device(initial_centroids(f32, xf, rng));
  DeviceTensor cb = to_device(poisoned(DType::F32, {1, 3, bf16.C, 128})),
               cf = to_device(poisoned(DType::F32, {1, 3, f32.C, 128}));
  DeviceTensor lb = to_device(poisoned(DType::I32, {1, 3, 2500})), lf = to_device(poisoned(DType::I32, {1, 3, 2500}));
  DeviceTensor sb = to_device(poisoned(DType::I32, {1, 3, bf16.C})),
               sf = to_device(poisoned(DType::I32, {1, 3, f32.C}));
  const Buffer ws = device_workspace(kmeans_workspace_bytes(3, 2500, f32.C, 128, Device::cuda(0)));
  NonBlockingStream cs;
  auto run = [&](const DeviceTensor& x, const DeviceTensor& start, DeviceTensor& c, DeviceTensor& l, DeviceTensor& sz) {
    SAPATTN_CUDA_CHECK(
        cudaMemcpyAsync(c.buffer.data(), start.buffer.data(), c.buffer.bytes(), cudaMemcpyDeviceToDevice, cs.handle()));
    kmeans(x.view, c.view, l.view, sz.view, 2, cs.stream(), as_workspace(ws));
  };
  expect_replays_match_eager(cs,
                             [&] {
                               run(dxb, start_b, cb, lb, sb);
                               run(dxf, start_f, cf, lf, sf);
                             },
                             {&cb, &cf, &lb, &lf, &sb, &sf});
}

TEST(Sm90AssignLarge, WanShapedHeadsMatchCpu) {
  SKIP_UNLESS_SM90();
  // Two heads of Wan 2.1 I2V 480p: [1,2,32760,128] bf16, 1000 key clusters, 3 iterations.
  const AssignKernelScope scope("wgmma");
  check_kmeans(KmCase{1, 2, 32760, 128, 1000, DType::BF16, Layout::Transposed, 700}, 3);
}

}  // namespace
}  // namespace sapattn::cuda_test
