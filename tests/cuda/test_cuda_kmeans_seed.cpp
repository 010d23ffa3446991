// kmeans_seed_greedy on the GPU (src/cuda/kmeans/kmeans_seed.cu, seed_cluster.cu) against the CPU op
// on the same inputs. The contract makes the two bit-identical: the same fp32 distances (the exact
// assignment's arithmetic), the same draws and 64-bit fixed-point sums, so the centroids are compared
// byte for byte, for random points (near-ties in the potentials included), duplicates (the Q = 0
// rule), non-finite, subnormal and overflowing points (the cap; the screen's NaN norms), every seeding
// path (C < N, C = N, C > N, C = 1), sample ids, Wan-shaped heads, a too-small workspace, and a CUDA
// graph replay (no host sync inside). Each case runs with the kernel seed_kernel() picks (the cluster
// kernel on sm_90, with its tensor-core screen for bf16 and f16 points) and with the block kernel;
// the cluster kernel's edges run with the knob's forced CTA counts: a sample not a multiple of the
// CTAs, CTAs with no points, one CTA, more trials than one mma tile, unpadded and padded rows, f32
// points (no screen), and the screened dtypes without the screen. Forced cluster cases skip (and say
// so) on GPUs before sm_90. Tests whose name contains "Large" take realistic sizes; the sanitizer runs
// skip them.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "core/cuda_check.hpp"
#include "cuda/backend.hpp"
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
  const char* kernel;  // set_seed_kernel_override's name; "" for seed_kernel()'s choice
};

std::string describe(const SeedCase& c) {
  const std::string kernel = c.kernel[0] == '\0' ? "default" : c.kernel;
  return testing_support::case_name("B" + std::to_string(c.B) + "H" + std::to_string(c.H), "N" + std::to_string(c.N),
                                    "D" + std::to_string(c.D), "C" + std::to_string(c.C),
                                    "f" + std::to_string(c.factor), dtype_name(c.dtype), ref::layout_name(c.layout),
                                    c.what, kernel);
}

// The seeding kernel for a scope.
using SeedKernelScope = cuda_test::KernelOverrideScope<cuda::set_seed_kernel_override>;

bool sm90() {
  int device = 0, major = 0;
  SAPATTN_CUDA_CHECK(cudaGetDevice(&device));
  SAPATTN_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 9;
}

// Whether a knob names the cluster kernel (which only sm_90 runs).
bool names_cluster(const char* kernel) {
  return std::string(kernel).rfind("cluster", 0) == 0 || std::string(kernel).rfind("unscreened", 0) == 0;
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
  if (names_cluster(c.kernel) && !sm90()) GTEST_SKIP() << "the cluster kernel needs an sm_90 GPU";
  const SeedKernelScope scope(c.kernel);
  const int64_t M = std::min(c.N, c.factor * c.C);
  if (c.C < c.N) {  // which kernel runs, as the op asks
    const cuda::SeedKernel k = cuda::seed_kernel(0, c.B * c.H, M, c.C, c.D, c.dtype);
    if (names_cluster(c.kernel) || (c.kernel[0] == '\0' && sm90())) {
      EXPECT_TRUE(k.cluster) << "the case no longer covers the cluster kernel";
      EXPECT_EQ(k.screen, c.dtype != DType::F32 && std::string(c.kernel).rfind("unscreened", 0) != 0);
    }
    if (std::string(c.kernel) == "block") {
      EXPECT_FALSE(k.cluster);
    }
  }
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

// The shapes of every seeding path, each with the default kernel and the block kernel.
std::vector<SeedCase> with_both_kernels(std::vector<SeedCase> cases) {
  std::vector<SeedCase> out;
  for (SeedCase c : cases) {
    out.push_back(c);
    c.kernel = "block";
    out.push_back(c);
  }
  return out;
}

INSTANTIATE_TEST_SUITE_P(
    Cases, KmeansSeedOnGpu,
    ::testing::ValuesIn(with_both_kernels({
        SeedCase{1, 2, 3000, 128, 100, 2, DType::BF16, Layout::Transposed, "wan_like", ""},
        SeedCase{2, 3, 500, 64, 30, 2, DType::F16, Layout::Contiguous, "d64", ""},
        SeedCase{1, 2, 700, 27, 40, 3, DType::F32, Layout::Padded, "d27", ""},  // D not a multiple of 8
        SeedCase{1, 2, 400, 64, 100, 8, DType::F32, Layout::TransposedPadded, "sample_all", ""},  // M = N
        SeedCase{2, 2, 200, 16, 1, 2, DType::BF16, Layout::Contiguous, "one_cluster", ""},
        SeedCase{1, 1, 300, 128, 300, 2, DType::BF16, Layout::Transposed, "c_equals_n", ""},
        SeedCase{1, 2, 100, 64, 150, 2, DType::F32, Layout::Contiguous, "c_above_n", ""},
        // Past one pass of 8 trial sums (1100 clusters: 9 trials, two mma tiles), 5 points per thread.
        SeedCase{1, 1, 4000, 64, 1100, 1, DType::BF16, Layout::Contiguous, "nine_trials", ""},
    })),
    [](const auto& p) { return describe(p.param); });

// The cluster kernel's edges, by the knob's forced CTA counts.
INSTANTIATE_TEST_SUITE_P(
    ClusterEdges, KmeansSeedOnGpu,
    ::testing::Values(
        // 74 sample points over 3 CTAs (25, 25, 24); 5 trials: a part-filled mma tile.
        SeedCase{1, 2, 500, 64, 37, 2, DType::BF16, Layout::Transposed, "ctas_not_dividing", "cluster:3"},
        // 20 sample points over 8 CTAs of 3: CTA 6 holds 2, CTA 7 none; far fewer points than threads.
        SeedCase{1, 3, 50, 32, 10, 2, DType::F16, Layout::Contiguous, "tiny_sample", "cluster:8"},
        SeedCase{2, 2, 600, 96, 50, 2, DType::BF16, Layout::Padded, "one_cta", "cluster:1"},
        // Rows of 27 f16 elements padded to 32 (not swizzled); tail dims past 24.
        SeedCase{1, 2, 700, 27, 40, 3, DType::F16, Layout::TransposedPadded, "d27_screened", "cluster:4"},
        // Rows of 200 bf16 elements (400 bytes: padded, not swizzled).
        SeedCase{1, 2, 900, 200, 60, 2, DType::BF16, Layout::Contiguous, "d200", ""},
        SeedCase{1, 2, 3000, 128, 100, 2, DType::BF16, Layout::Transposed, "wan_like", "unscreened"},
        SeedCase{1, 2, 700, 48, 40, 3, DType::F16, Layout::Contiguous, "f16", "unscreened:2"},
        SeedCase{1, 2, 700, 48, 40, 3, DType::F32, Layout::Transposed, "f32", "cluster:2"},
        // Several heads: 10 (b,h) pairs in one launch, each its own cluster.
        SeedCase{2, 5, 900, 128, 150, 2, DType::BF16, Layout::Transposed, "heads", ""},
        SeedCase{1, 1, 4000, 64, 1100, 1, DType::F16, Layout::Contiguous, "nine_trials", "cluster:5"}),
    [](const auto& p) { return describe(p.param); });

// Runs `body` with each kernel: the default, the block kernel, and on sm_90 the cluster kernel without
// its screen.
void with_each_kernel(const std::function<void()>& body) {
  std::vector<const char*> kernels = {"", "block"};
  if (sm90()) kernels.push_back("unscreened");
  for (const char* kernel : kernels) {
    SCOPED_TRACE(std::string("kernel '") + kernel + "'");
    const SeedKernelScope scope(kernel);
    body();
  }
}

TEST(KmeansSeedOnGpuValues, DuplicatesAndNonFinitePointsMatchCpu) {
  with_each_kernel([] {
    ref::Rng rng(case_seed());
    // 2 dims of values 0..2 (9 possible points): equal potentials, and Q = 0 once every distinct point
    // is a centroid (12 clusters > 9 points).
    for (const DType dtype : {DType::F32, DType::BF16}) {
      HostTensor small = poisoned(dtype, {1, 3, 200, 2});
      ref::for_each_index(small.view, [&](const auto& idx) { ref::set(small.view, idx, rng.integer(0, 2)); });
      expect_gpu_matches_cpu(small, 12, 4, 9, "duplicates");
    }
    // An infinite and a NaN coordinate: non-finite distances count as the cap.
    for (const DType dtype : {DType::F32, DType::BF16, DType::F16}) {
      HostTensor odd = normal(dtype, {1, 2, 300, 32}, rng);
      for (int64_t h = 0; h < 2; ++h) {
        ref::set(odd.view, {0, h, 7, 3}, std::numeric_limits<double>::infinity());
        ref::set(odd.view, {0, h, 100, 0}, std::numeric_limits<double>::quiet_NaN());
      }
      expect_gpu_matches_cpu(odd, 20, 15, 4, "non-finite points");  // M = N: both are in the sample
    }
  });
}

TEST(KmeansSeedOnGpuValues, SubnormalAndHugePointsMatchCpu) {
  // Elements a tensor core may flush (subnormal in the dtype) give a point a NaN norm: the screen never
  // clears its pairs. Huge elements overflow the fp32 squares: infinite distances, capped.
  with_each_kernel([] {
    ref::Rng rng(case_seed());
    for (const DType dtype : {DType::F16, DType::BF16}) {
      HostTensor x = normal(dtype, {1, 2, 400, 64}, rng, Layout::Transposed);
      const double tiny = dtype == DType::F16 ? 3e-6 : 1e-39;  // below the smallest normal of the dtype
      const double huge = dtype == DType::F16 ? 6e4 : 1e25;
      for (int64_t h = 0; h < 2; ++h)
        for (int64_t i = 0; i < 400; i += 3) {
          ref::set(x.view, {0, h, i, rng.integer(0, 63)}, (i % 2 == 0 ? tiny : -tiny) * rng.integer(1, 4));
          if (i % 30 == 0) ref::set(x.view, {0, h, i, rng.integer(0, 63)}, huge);
        }
      expect_gpu_matches_cpu(x, 50, 4, 5, "subnormal and huge points");
      // Small points throughout: f16 ones with many subnormal elements; bf16 ones whose distances lie
      // below the screen's absolute floor (2^-100), so that it clears nothing.
      HostTensor small = normal(dtype, {1, 2, 400, 64}, rng, Layout::Contiguous);
      ref::for_each_index(small.view, [&](const auto& idx) {
        ref::set(small.view, idx, ref::get(small.view, idx) * (dtype == DType::F16 ? 1e-3 : 1e-18));
      });
      expect_gpu_matches_cpu(small, 50, 4, 6, "small points");
    }
  });
}

TEST(KmeansSeedOnGpuLarge, WanShapedHeadsMatchCpu) {
  // Wan 1.3B 480p keys: 32,760 tokens, 1000 clusters, sample 2000, head dim 128, [B,S,H,D] bf16; with
  // the default kernel, and on sm_90 with the 3 CTAs per head that Wan 14B's 40 heads get (the largest
  // shared memory of a CTA) and without the screen.
  ref::Rng rng(case_seed());
  const HostTensor points = normal(DType::BF16, {1, 2, 32760, 128}, rng, Layout::Transposed);
  const uint64_t seed = rng.next();
  std::vector<const char*> kernels = {""};
  if (sm90()) kernels.insert(kernels.end(), {"cluster:3", "unscreened:3"});
  for (const char* kernel : kernels) {
    SCOPED_TRACE(std::string("kernel '") + kernel + "'");
    const SeedKernelScope scope(kernel);
    expect_gpu_matches_cpu(points, 1000, 2, seed, "Wan-shaped key centroids");
  }
}

TEST(KmeansSeedOnGpuKernels, ChoiceAndKnob) {
  EXPECT_THROW(cuda::set_seed_kernel_override("cluster:9"), InvalidArgumentError);
  EXPECT_THROW(cuda::set_seed_kernel_override("cluster:0"), InvalidArgumentError);
  EXPECT_THROW(cuda::set_seed_kernel_override("cluster:"), InvalidArgumentError);
  EXPECT_THROW(cuda::set_seed_kernel_override("unscreened:x"), InvalidArgumentError);
  EXPECT_THROW(cuda::set_seed_kernel_override("warp"), InvalidArgumentError);
  {
    const SeedKernelScope scope("block");
    EXPECT_FALSE(cuda::seed_kernel(0, 40, 2000, 1000, 128, DType::BF16).cluster);
  }
  if (!sm90()) {
    const SeedKernelScope scope("cluster");
    EXPECT_THROW(cuda::seed_kernel(0, 40, 2000, 1000, 128, DType::BF16), UnsupportedError);
    GTEST_SKIP() << "the cluster kernel needs an sm_90 GPU";
  }
  // Wan 14B 720p (40 heads, 1000 key and 300 query clusters, sample factor 2, D = 128, bf16): the
  // screened cluster kernel, with 3 CTAs per head on the 132 SMs of an H100 SXM or H200 (docs/cuda.md).
  int sms = 0;
  SAPATTN_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  for (const int64_t C : {int64_t{1000}, int64_t{300}}) {
    const cuda::SeedKernel k = cuda::seed_kernel(0, 40, 2 * C, C, 128, DType::BF16);
    EXPECT_TRUE(k.cluster);
    EXPECT_TRUE(k.screen);
    if (sms == 132) {
      EXPECT_EQ(k.ctas, 3) << "C = " << C;
    }
  }
  // A sample too large for 8 CTAs' shared memory takes the block kernel; forced, the cluster kernel refuses.
  EXPECT_FALSE(cuda::seed_kernel(0, 40, 40000, 20000, 128, DType::BF16).cluster);
  const SeedKernelScope scope("cluster:2");
  EXPECT_THROW(cuda::seed_kernel(0, 40, 40000, 20000, 128, DType::BF16), UnsupportedError);
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
  const CapturedGraph graph(cs.handle(),
                            [&] { kmeans_seed_greedy(x.dev, centroids.dev, 21, 2, cs.stream(), as_workspace(ws)); });
  for (int replay = 0; replay < 2; ++replay) {
    centroids.upload();
    graph.launch(cs.handle());
    cs.sync();
    expect_identical(centroids.download(), eager, "replayed centroids");
  }
}

}  // namespace
}  // namespace sapattn
