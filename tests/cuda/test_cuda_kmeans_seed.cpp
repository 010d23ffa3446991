// kmeans_seed_greedy on the GPU (src/cuda/kmeans/kmeans_seed.cu) against the CPU op on the same
// inputs. The contract makes the two bit-identical: the same fp32 distances (the exact assignment's
// arithmetic), the same draws and 64-bit fixed-point sums, so the centroids are compared byte for
// byte, for random points (near-ties in the potentials included), duplicates (the Q = 0 rule),
// non-finite points (the cap), every seeding path (C < N, C = N, C > N, C = 1), sample ids, a
// Wan-shaped pair of heads, a too-small workspace, and a CUDA graph replay (no host sync inside).
// Tests whose name contains "Large" take realistic sizes; the sanitizer runs skip them.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "core/cuda_check.hpp"
#include "cuda_ear_support.hpp"
#include "reference.hpp"
#include "sapattn/ops.hpp"
#include "test_support.hpp"

namespace sapattn {
namespace {

using cuda_test::as_workspace;
using cuda_test::CapturedGraph;
using cuda_test::device_workspace;
using cuda_test::kCpu;
using cuda_test::poisoned;
using cuda_test::Twin;
using CudaStream = cuda_test::TestStream;
using ear_cuda_test::expect_identical;
using ear_cuda_test::normal;
using ref::HostTensor;
using ref::Layout;
using testing_support::case_seed;

struct SeedCase {
  int64_t B, H, N, D, C;
  int factor;
  DType dtype;
  Layout layout;
  const char* what;
};

std::string describe(const SeedCase& c) {
  return testing_support::case_name("B" + std::to_string(c.B) + "H" + std::to_string(c.H), "N" + std::to_string(c.N),
                                    "D" + std::to_string(c.D), "C" + std::to_string(c.C),
                                    "f" + std::to_string(c.factor), dtype_name(c.dtype), ref::layout_name(c.layout),
                                    c.what);
}

// The CPU's centroids and the GPU's, from the same points (and ids, when given).
void expect_gpu_matches_cpu(const HostTensor& points, int64_t C, int factor, uint64_t seed, const char* what,
                            const HostTensor* ids = nullptr) {
  const int64_t B = points.view.shape[0], H = points.view.shape[1], N = points.view.shape[2];
  const int64_t D = points.view.shape[3];
  HostTensor cpu = poisoned(DType::F32, {B, H, C, D});
  kmeans_seed_greedy(points.view, cpu.view, seed, factor, kCpu, {}, ids != nullptr ? ids->view : TensorView{});
  const Twin x(points), centroids(poisoned(DType::F32, {B, H, C, D}));
  const Twin* dev_ids = nullptr;
  std::optional<Twin> ids_twin;
  if (ids != nullptr) dev_ids = &ids_twin.emplace(*ids);
  const Buffer ws = device_workspace(kmeans_seed_greedy_workspace_bytes(B * H, N, C, factor, Device::cuda(0)));
  CudaStream cs;
  kmeans_seed_greedy(x.dev, centroids.dev, seed, factor, cs.stream(), as_workspace(ws),
                     dev_ids != nullptr ? dev_ids->dev : TensorView{});
  cs.sync();
  expect_identical(centroids.download(), cpu, what);
}

class KmeansSeedOnGpu : public ::testing::TestWithParam<SeedCase> {};

TEST_P(KmeansSeedOnGpu, IdenticalToCpu) {
  const SeedCase c = GetParam();
  ref::Rng rng(case_seed());
  const HostTensor points = normal(c.dtype, {c.B, c.H, c.N, c.D}, rng, c.layout);
  for (const uint64_t seed : {uint64_t{0}, rng.next()}) {
    SCOPED_TRACE("seed " + std::to_string(seed));
    expect_gpu_matches_cpu(points, c.C, c.factor, seed, "centroids");
  }
  // With sample ids, reversed: each (b,h) samples and draws as another one would.
  HostTensor ids = poisoned(DType::I32, {c.B, c.H});
  for (int64_t i = 0; i < c.B * c.H; ++i) ids.storage.data_as<int32_t>()[i] = static_cast<int32_t>(c.B * c.H - 1 - i);
  expect_gpu_matches_cpu(points, c.C, c.factor, 3, "centroids with sample ids", &ids);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, KmeansSeedOnGpu,
    ::testing::Values(SeedCase{1, 2, 3000, 128, 100, 2, DType::BF16, Layout::Transposed, "wan_like"},
                      SeedCase{2, 3, 500, 64, 30, 2, DType::F16, Layout::Contiguous, "d64"},
                      SeedCase{1, 2, 700, 27, 40, 3, DType::F32, Layout::Padded, "d27"},  // D not a multiple of 8
                      SeedCase{1, 2, 400, 64, 100, 8, DType::F32, Layout::TransposedPadded, "sample_all"},  // M = N
                      SeedCase{2, 2, 200, 16, 1, 2, DType::BF16, Layout::Contiguous, "one_cluster"},
                      SeedCase{1, 1, 300, 128, 300, 2, DType::BF16, Layout::Transposed, "c_equals_n"},
                      SeedCase{1, 2, 100, 64, 150, 2, DType::F32, Layout::Contiguous, "c_above_n"},
                      // Past one pass of 8 trial sums (1100 clusters: 9 trials), 5 points per thread.
                      SeedCase{1, 1, 4000, 64, 1100, 1, DType::BF16, Layout::Contiguous, "nine_trials"}),
    [](const auto& p) { return describe(p.param); });

TEST(KmeansSeedOnGpuValues, DuplicatesAndNonFinitePointsMatchCpu) {
  ref::Rng rng(case_seed());
  // 2 dims of values 0..2 (9 possible points): equal potentials, and Q = 0 once every distinct point
  // is a centroid (12 clusters > 9 points).
  HostTensor small = poisoned(DType::F32, {1, 3, 200, 2});
  ref::for_each_index(small.view, [&](const auto& idx) { ref::set(small.view, idx, rng.integer(0, 2)); });
  expect_gpu_matches_cpu(small, 12, 4, 9, "duplicates");
  // An infinite and a NaN coordinate: non-finite distances count as the cap.
  HostTensor odd = normal(DType::F32, {1, 2, 300, 32}, rng);
  for (int64_t h = 0; h < 2; ++h) {
    ref::set(odd.view, {0, h, 7, 3}, std::numeric_limits<double>::infinity());
    ref::set(odd.view, {0, h, 100, 0}, std::numeric_limits<double>::quiet_NaN());
  }
  expect_gpu_matches_cpu(odd, 20, 15, 4, "non-finite points");  // M = N: both are in the sample
}

TEST(KmeansSeedOnGpuLarge, WanShapedHeadsMatchCpu) {
  // Wan 1.3B 480p keys: 32,760 tokens, 1000 clusters, sample 2000, head dim 128, [B,S,H,D] bf16.
  ref::Rng rng(case_seed());
  const HostTensor points = normal(DType::BF16, {1, 2, 32760, 128}, rng, Layout::Transposed);
  expect_gpu_matches_cpu(points, 1000, 2, rng.next(), "Wan-shaped key centroids");
}

TEST(KmeansSeedOnGpuErrors, WorkspaceIsCheckedAndSized) {
  ref::Rng rng(case_seed());
  const int64_t B = 1, H = 2, N = 500, D = 64, C = 20;
  const HostTensor points = normal(DType::BF16, {B, H, N, D}, rng);
  const Twin x(points), centroids(poisoned(DType::F32, {B, H, C, D}));
  const size_t need = kmeans_seed_greedy_workspace_bytes(B * H, N, C, 2, Device::cuda(0));
  EXPECT_GT(need, 0u);
  EXPECT_LT(kmeans_seed_greedy_workspace_bytes(B * H, N, C, 1, Device::cuda(0)), need);  // D2 of fewer points
  CudaStream cs;
  EXPECT_THROW(kmeans_seed_greedy(x.dev, centroids.dev, 1, 2, cs.stream()), WorkspaceError);
  const Buffer small = device_workspace(need - 256);
  EXPECT_THROW(kmeans_seed_greedy(x.dev, centroids.dev, 1, 2, cs.stream(), as_workspace(small)), WorkspaceError);
  EXPECT_THROW(kmeans_seed_greedy(x.dev, centroids.dev, 1, 0, cs.stream()), InvalidArgumentError);
  cs.sync();
  expect_identical(centroids.download(), centroids.host, "centroids after the refused calls");
}

TEST(KmeansSeedOnGpuGraph, CapturedSeedingMatchesEager) {
  ref::Rng rng(case_seed());
  const int64_t B = 1, H = 3, N = 2000, D = 128, C = 60;
  const HostTensor points = normal(DType::BF16, {B, H, N, D}, rng, Layout::Transposed);
  const Twin x(points), centroids(poisoned(DType::F32, {B, H, C, D}));
  const Buffer ws = device_workspace(kmeans_seed_greedy_workspace_bytes(B * H, N, C, 2, Device::cuda(0)));
  CudaStream cs;
  kmeans_seed_greedy(x.dev, centroids.dev, 21, 2, cs.stream(), as_workspace(ws));
  cs.sync();
  const HostTensor eager = centroids.download();
  centroids.upload();  // poison again
  const CapturedGraph graph(cs.handle(), [&] { kmeans_seed_greedy(x.dev, centroids.dev, 21, 2, cs.stream(), as_workspace(ws)); });
  for (int replay = 0; replay < 2; ++replay) {
    centroids.upload();
    graph.launch(cs.handle());
    cs.sync();
    expect_identical(centroids.download(), eager, "replayed centroids");
  }
}

}  // namespace
}  // namespace sapattn
