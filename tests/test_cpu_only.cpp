// What a build without the CUDA backend answers when asked for CUDA (README "Building without
// CUDA"): a typed UnsupportedError from every op that returns a value, and an attention_kernel()
// that says why, never a crash or a silent 0. The workspace-size ops are the ones whose CPU-only
// expansion of SAPATTN_ON_CUDA once failed to compile (docs/cmake.md). Built only where SAPATTN_CUDA
// is off or nvcc is missing; tests/cuda covers the CUDA backend.
#if SAPATTN_HAS_CUDA
#error "test_cpu_only is built only without the CUDA backend"
#endif

#include <gtest/gtest.h>

#include <cstdint>
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
  EXPECT_THROW(block_sparse_attention_e4m3_workspace_bytes(2, 8, 8, 64, 64, gpu), UnsupportedError);
  // The CPU answers stay what they are in every build.
  EXPECT_EQ(block_sparse_attention_workspace_bytes(2, 8, 8, 64, Device::cpu()), 0u);
  EXPECT_EQ(kmeans_workspace_bytes(2, 64, 8, 16, Device::cpu()), 0u);
}

// An op with a CUDA version (quantize_e4m3, which has one since the FP8 path began) on a CUDA stream:
// the build, not the op, is what refuses it.
TEST(CpuOnlyBuild, QuantizeE4m3OnCudaThrowsUnsupported) {
  const Device gpu = Device::cuda(0);
  float x[2 * 4] = {1, 2, 3, 4, 5, 6, 7, 8};
  uint8_t codes[2 * 4] = {};
  float scales[2] = {};
  const TensorView xv = TensorView::bhsd(x, DType::F32, 1, 1, 2, 4, gpu);
  const TensorView cv = TensorView::bhsd(codes, DType::U8, 1, 1, 2, 4, gpu);
  const TensorView sv = TensorView::contiguous(scales, DType::F32, {1, 1, 2}, gpu);
  try {
    quantize_e4m3(xv, {}, {}, {}, Fp8Scale::Tile, 2, cv, sv, Stream{gpu, nullptr, 0});
    ADD_FAILURE() << "no exception";
  } catch (const UnsupportedError& e) {
    EXPECT_NE(std::string(e.what()).find("CPU only"), std::string::npos) << e.what();
  }
  EXPECT_EQ(codes[0], 0);
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
