// What a build without the CUDA backend answers when asked for CUDA (README "Building without
// CUDA"): a typed UnsupportedError from every op that returns a value, and an attention_kernel()
// that says why, never a crash or a silent 0. The workspace-size ops are the ones whose CPU-only
// expansion of SAPATTN_ON_CUDA once failed to compile (docs/cmake.md). Built only where SAPATTN_CUDA
// is off or nvcc is missing; tests/cuda covers the CUDA backend.
#if SAPATTN_HAS_CUDA
#error "test_cpu_only is built only without the CUDA backend"
#endif

#include <gtest/gtest.h>

#include <string>

#include "sapattn/ops.hpp"
#include "sapattn/svg2.hpp"

namespace {

using namespace sapattn;

TEST(CpuOnlyBuild, WorkspaceSizesOnCudaThrowUnsupported) {
  const Device gpu = Device::cuda(0);
  EXPECT_THROW(kmeans_workspace_bytes(2, 64, 8, 16, gpu), UnsupportedError);
  EXPECT_THROW(order_clusters_workspace_bytes(2, 8, 16, gpu), UnsupportedError);
  EXPECT_THROW(cluster_permutation_workspace_bytes(2, 64, 8, gpu), UnsupportedError);
  EXPECT_THROW(block_sparse_attention_workspace_bytes(2, 8, 8, 64, gpu), UnsupportedError);
  // The CPU answers stay what they are in every build.
  EXPECT_EQ(block_sparse_attention_workspace_bytes(2, 8, 8, 64, Device::cpu()), 0u);
  EXPECT_EQ(kmeans_workspace_bytes(2, 64, 8, 16, Device::cpu()), 0u);
}

TEST(CpuOnlyBuild, AttentionKernelOnCudaSaysWhy) {
  const AttentionKernel gpu = attention_kernel(Device::cuda(0), DType::BF16, 128);
  EXPECT_FALSE(gpu.supported);
  EXPECT_NE(std::string(gpu.reason).find("no CUDA backend"), std::string::npos) << gpu.reason;
  const AttentionKernel cpu = attention_kernel(Device::cpu(), DType::BF16, 128);
  EXPECT_TRUE(cpu.supported);
  EXPECT_STREQ(cpu.name, "cpu");
}

}  // namespace
